"""Section 10: host cores needed per accelerator — the pairs/s one accelerator consumes in training,
divided by the clips/s one host core delivers through each training input pipeline.

Demand, pairs/s per accelerator:
* estimated from FLOPs: `MFU_TARGET` × the device's dense bf16 peak (clapjax.train.throughput.PEAK_FLOPS)
  ÷ the train step's FLOPs per pair. Those are XLA's cost analysis of the lowered step (not compiled:
  compiling the full model on these CPUs takes minutes) of the GPU benchmark's model, HTSAT-tiny +
  RoBERTa-base in bf16 (issue 17 quotes ≈ 75 GFLOP per pair: one H100/H200 at 50 % MFU wants
  ≈ 6,000 pairs/s); in `--tiny` runs the tiny model's, so the figures are a smoke test only;
* measured: the train rows of a GPU benchmark (`python -m benchmarks.gpu` wrote gpu.json; pass it as
  `run_all --gpu-json PATH`): its pairs/s ÷ its device count.
Supply, clips/s of one core per pipeline (FLAC tars, pre-decoded shards, …): the pipeline section's
`per_core_clips_per_s`. Cores = demand ÷ supply; without the pipeline's figures only the demand is shown.
"""
from __future__ import annotations

from benchmarks import common

MFU_TARGET = 0.5            # the working point: half the dense bf16 peak
FLOPS_BATCH = 4             # rows of the lowered step the FLOPs per pair are read from
# (table label, jax device_kind the peak is looked up by)
ACCELERATORS = (("H100 SXM", "NVIDIA H100 80GB HBM3"), ("H200 SXM", "NVIDIA H200"), ("A100", "NVIDIA A100-SXM4-80GB"),
                ("TPU v5e", "TPU v5 lite"), ("TPU v5p", "TPU v5p"), ("TPU v6e", "TPU v6 lite"))


def flops_per_pair(tiny: bool) -> float:
    """FLOPs of one train-step pair: XLA's cost analysis of the lowered bf16 step on one device
    (HTSAT-tiny + RoBERTa-base; `tiny`: the tiny test model)."""
    import jax
    from benchmarks.train_step import random_batch, train_config
    from clapjax.train import config as C, sharding, step as S, throughput
    cfg = train_config(FLOPS_BATCH, 12, dtype="bfloat16", tiny=tiny)
    model_cfg = C.model_config(cfg)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
    setup = S.build_setup(cfg, model_cfg, mesh)
    batch_sh = sharding.batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh)
             for k, v in random_batch(cfg, model_cfg).items()}
    flops = throughput.cost_flops(S.train_step(setup).lower(setup.abstract, batch))
    if flops is None:
        raise ValueError("XLA's cost analysis gave no FLOP count for the train step on this backend")
    return flops / FLOPS_BATCH


def demand(per_pair: float, gpu: dict | None) -> list[dict]:
    """Pairs/s one accelerator needs: estimated for each of ACCELERATORS, measured from a gpu.json."""
    from clapjax.train.throughput import table_peak
    rows = [{"accelerator": label, "how": f"{MFU_TARGET:.0%} bf16 MFU (estimate)",
             "pairs_per_s": MFU_TARGET * table_peak(kind, "bfloat16") / per_pair} for label, kind in ACCELERATORS]
    for r in (gpu or {}).get("train", []):
        if r.get("pairs_per_s"):
            rows.append({"accelerator": gpu["device_kind"], "how": f"measured, batch {r['batch']} (gpu.json)",
                         "pairs_per_s": r["pairs_per_s"] / gpu["devices"]})
    return rows


def run(opts: common.Options, results: dict, gpu: dict | None = None) -> dict:
    per_pair = flops_per_pair(opts.tiny)
    rows = demand(per_pair, gpu)
    pipeline = results.get("pipeline", {})
    supply = pipeline.get("per_core_clips_per_s") or {}
    notes = [f"Train step: {per_pair / 1e9:.3g} GFLOP per pair (XLA cost analysis, "
             + ("the tiny smoke model: not the real demand)" if opts.tiny else "HTSAT-tiny + RoBERTa-base, bf16)"),
             "For scale: a DGX H100 has 2 × 56-core Xeon 8480C for its 8 GPUs, 14 cores per GPU."]
    if not supply:
        why = pipeline.get("error") or ("the pipeline section did not run" if "pipeline" not in results
                                        else "its result has no per_core_clips_per_s")
        notes.append(f"No host-core column: no per-core pipeline rates ({why}).")
    for r in rows:
        r["cores"] = {name: r["pairs_per_s"] / rate for name, rate in supply.items() if rate}
    names = [n for n in supply if supply[n]]
    table = common.md_table(
        ["accelerator", "demand from", "pairs/s needed"] + [f"cores: {n} ({supply[n]:.0f} clips/s/core)" for n in names],
        [[r["accelerator"], r["how"], f"{r['pairs_per_s']:,.0f}"] + [f"{r['cores'][n]:,.1f}" for n in names]
         for r in rows])
    return {"rows": rows, "table": table, "notes": notes, "flops_per_pair": per_pair, "mfu_target": MFU_TARGET,
            "per_core_clips_per_s": supply}
