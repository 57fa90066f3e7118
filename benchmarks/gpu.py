"""GPU / TPU benchmark: bf16 train-step throughput and MFU, and inference clips/s against PyTorch.

    python -m benchmarks.gpu [--batches 64,256] [--steps 10] [--out benchmarks/results/gpu] [--peak-tflops X]
    python -m benchmarks.gpu --smoke      # tiny model on whatever JAX has (CPU is fine): is it broken?

Train: the trainer's own step (`clapjax.train.step`, AdamW, donation), HTSAT-tiny + RoBERTa-base,
10 s clips, `model.dtype=bfloat16` (f32 parameters, optimizer state and loss), data parallel over
every local device. MFU = XLA's cost-analysis FLOPs of the compiled step (per device: the SPMD
program) ÷ median step time ÷ the device's dense bf16 peak (`clapjax.train.throughput.PEAK_FLOPS` by `device_kind`,
or `--peak-tflops`; on CPU the peak is a measured f32 matmul). Inference: the public
`CLAP.get_audio_embedding_from_data` vs laion_clap's `CLAP_Module.get_audio_embedding_from_data`
on the same GPU, fp32 both, same clips; without torch (or without CUDA for it) the comparison is
skipped with the reason printed. Nothing here needs the network: weights are random.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

def _say(msg: str) -> None:
    print(msg, flush=True)


def train_throughput(batch: int, steps: int, smoke: bool, remat: bool) -> dict:
    from benchmarks.train_step import clapjax_step, train_config
    cfg = train_config(batch, 12, dtype="bfloat16", tiny=smoke)
    if remat:
        cfg.model.remat = True
    if smoke:
        cfg.compiler_options = {"xla_backend_optimization_level": 0}
    import jax
    n = len(jax.devices())
    if batch % n:
        raise ValueError(f"batch {batch} is not divisible by the {n} devices")
    return clapjax_step(cfg, steps)


def torch_inference(batch: int, repeats: int, wave) -> dict:
    """laion_clap's hook on the GPU (fp32); raises RuntimeError with the reason when it cannot run."""
    try:
        import torch
    except ImportError as err:
        raise RuntimeError(f"torch is not installed ({err})") from None
    if not torch.cuda.is_available():
        raise RuntimeError("torch has no CUDA device here (a CPU build, or no GPU)")
    from benchmarks import common
    from clapjax.convert import torch_reference as R
    lc = R.laion_clap()
    with R.offline_roberta():
        hook = lc.CLAP_Module(enable_fusion=False, amodel="HTSAT-tiny", tmodel="roberta", device="cuda")
    hook.model.eval()

    def call():
        with torch.no_grad():
            hook.get_audio_embedding_from_data(wave)
        torch.cuda.synchronize()
    return {"timing": common.median_seconds(call, repeats, warmup=2), "device": torch.cuda.get_device_name()}


def inference(batch: int, repeats: int, smoke: bool) -> dict:
    import numpy as np
    from benchmarks import common
    from benchmarks.reference_models import random_model, tiny
    from clapjax.app.api import CLAP
    from clapjax.model import CLAPConfig
    if smoke:
        clap = tiny(False).clapjax
    else:
        clap = CLAP(random_model(CLAPConfig.from_laion("HTSAT-tiny", "roberta")))
    samples = clap.config.frontend.clip_samples
    wave = np.random.default_rng(0).uniform(-0.5, 0.5, (batch, samples)).astype(np.float32)
    ours = common.median_seconds(lambda: clap.get_audio_embedding_from_data(wave), repeats, warmup=2)
    out = {"batch": batch, "clapjax_per_s": batch / ours["median_s"], "clapjax_s": ours}
    if smoke:
        out["torch_skipped"] = "smoke run: the tiny model has no PyTorch twin"
    else:
        try:
            theirs = torch_inference(batch, repeats, wave)
            out.update(laion_per_s=batch / theirs["timing"]["median_s"], laion_s=theirs["timing"],
                       torch_device=theirs["device"])
            out["vs_laion"] = out["clapjax_per_s"] / out["laion_per_s"]
        except RuntimeError as err:
            out["torch_skipped"] = str(err)
    if "torch_skipped" in out:
        _say(f"PyTorch comparison skipped: {out['torch_skipped']}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model, small batches: checks the script runs")
    ap.add_argument("--batches", default="", help="train batch sizes (default 64,256; smoke 4,8)")
    ap.add_argument("--infer-batch", type=int, default=0, help="inference batch (default 32; smoke 2)")
    ap.add_argument("--steps", type=int, default=0, help="timed train steps (default 10; smoke 2)")
    ap.add_argument("--remat", action="store_true", help="activation checkpointing per block (memory-bound runs)")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="override the device's bf16 peak")
    ap.add_argument("--out", default="benchmarks/results/gpu")
    args = ap.parse_args(argv)
    for k, v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}.items():
        os.environ.setdefault(k, v)
    batches = [int(b) for b in (args.batches or ("4,8" if args.smoke else "64,256")).split(",")]
    steps = args.steps or (2 if args.smoke else 10)
    infer_batch = args.infer_batch or (2 if args.smoke else 32)

    import jax
    from benchmarks import common
    dev = jax.devices()[0]
    kind = dev.device_kind
    from clapjax.train.throughput import table_peak
    peak = args.peak_tflops * 1e12 if args.peak_tflops else table_peak(kind, "bfloat16")
    peak_source = "--peak-tflops" if args.peak_tflops else "clapjax.train.throughput.PEAK_FLOPS"
    if peak is None:
        from benchmarks.achieved_flops import matmul_peak
        peak = matmul_peak(512 if args.smoke else 2048, 3)["gflops"] * 1e9
        peak_source = "measured f32 jnp.dot (no table entry for this device)"
    _say(f"device: {len(jax.devices())} × {kind} ({dev.platform}); peak {peak / 1e12:.3g} TFLOP/s ({peak_source})")

    train_rows = []
    for b in batches:
        t0 = time.perf_counter()
        try:
            r = train_throughput(b, steps, args.smoke, args.remat)
            step_s = r["timing"]["median_s"]
            r.update(batch=b, pairs_per_s=b / step_s,
                     mfu=(r["flops"] / step_s / peak) if r.get("flops") else None)
        except Exception as err:   # e.g. out of memory at 256: record it, go on
            r = {"batch": b, "error": f"{type(err).__name__}: {str(err)[:500]}"}
        r["wall_s"] = time.perf_counter() - t0
        train_rows.append(r)
        _say(json.dumps({k: v for k, v in r.items() if k != "timing"}, default=str))
    infer = inference(infer_batch, 3 if args.smoke else 10, args.smoke)

    lines = [f"# GPU benchmark ({'smoke' if args.smoke else 'full'}): {len(jax.devices())} × {kind}", "",
             f"peak {peak / 1e12:.4g} TFLOP/s per device ({peak_source}); jax {jax.__version__}", "",
             common.md_table(
                 ["train step bf16 (HTSAT-tiny + RoBERTa" + (", tiny smoke" if args.smoke else "") + ")", "batch",
                  "pairs/s", "median step s", "TFLOP / step / device (XLA)", "MFU", "compile s"],
                 [["clapjax", r["batch"], common.fmt(r.get("pairs_per_s"), ".1f"),
                   common.fmt(r.get("timing", {}).get("median_s"), ".4f"),
                   common.fmt(r["flops"] / 1e12 if r.get("flops") else None, ".3f"),
                   common.fmt(100 * r["mfu"] if r.get("mfu") else None, ".1f", " %") if "error" not in r
                   else r["error"][:80], common.fmt(r.get("compile_s"), ".1f")] for r in train_rows]), "",
             common.md_table(["inference (audio, fp32, public API)", "batch", "clapjax clips/s", "laion_clap clips/s",
                              "ratio"],
                             [["HTSAT-tiny 10 s clips" if not args.smoke else "tiny model", infer["batch"],
                               common.fmt(infer["clapjax_per_s"], ".1f"), common.fmt(infer.get("laion_per_s"), ".1f"),
                               common.fmt(infer.get("vs_laion"), ".2f", "×") if "vs_laion" in infer
                               else "skipped: " + infer["torch_skipped"]]])]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu.json"), "w") as f:
        json.dump({"device_kind": kind, "devices": len(jax.devices()), "peak_flops": peak, "peak_source": peak_source,
                   "environment": common.environment(), "train": train_rows, "inference": infer,
                   "smoke": args.smoke}, f, indent=2, default=str)
    with open(os.path.join(args.out, "gpu.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if any("error" in r for r in train_rows) else 0


if __name__ == "__main__":
    sys.exit(main())
