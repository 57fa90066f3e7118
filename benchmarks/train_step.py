"""Section 3: train-step pairs/s, HTSAT-tiny + 4-layer RoBERTa, batch 16, 10 s clips, fp32.

clapjax: the trainer's own step (`clapjax.train.step.build_setup / init_state / train_step`, the
jit with donation the loop runs) on a batch already on device; by default on 1 JAX CPU device, so
it uses the same cores torch does; a child process (`--child`, 8 host devices) times it with
FSDP over the 8 devices (replicated state ×8 did not fit in memory beside the driver).
PyTorch: LAION's training step body: CLAP forward in train mode (SpecAugment, dropout) →
`ClipLoss` (LAION's default, no MLP loss) → backward → `torch.optim.AdamW` with LAION's groups
(no weight decay on gains/biases/logit scales). Same batch, same sizes, fp32.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m benchmarks.train_step --child [--batch 16] [--steps 3]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from benchmarks import common
from clapjax.train import throughput


def train_config(batch: int, text_layers: int, *, dtype: str = "float32", tiny: bool = False, fsdp: int = 1):
    from clapjax.train import config as C
    cfg = C.load_config("tiny") if tiny else C.base_config()
    cfg.model.dtype = dtype
    if not tiny:
        cfg.model.text_overrides = {"num_hidden_layers": text_layers}
    cfg.train.batch_size, cfg.train.steps = batch, 1000
    cfg.optim.warmup_steps = 10
    if fsdp > 1:
        cfg.mesh.rules, cfg.mesh.data, cfg.mesh.fsdp = "fsdp", 1, fsdp
    C.validate(cfg)
    return cfg


def random_batch(cfg, model_cfg, seed: int = 0) -> dict[str, np.ndarray]:
    from clapjax.train.batches import RandomBatches
    vocab = model_cfg.text.vocab_size
    b = next(RandomBatches(cfg.train.batch_size, model_cfg.frontend.clip_samples, vocab, seed=seed))
    return {k: v for k, v in b.items() if k != "index"}


def clapjax_step(cfg, steps: int, one_device: bool = False) -> dict:
    """Median seconds of the compiled step, its compile time and XLA's FLOP count; on every JAX
    device, or on the first only (`one_device`: the process may have been given 8 host devices)."""
    import jax
    from clapjax.train import config as C, sharding, step as S
    from clapjax.train.batches import device_batch
    model_cfg = C.model_config(cfg)
    devices = jax.devices()[:1] if one_device else jax.devices()
    mesh = sharding.make_mesh({"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp}, devices=devices)
    setup = S.build_setup(cfg, model_cfg, mesh)
    state = S.init_state(setup, cfg, model_cfg, 0)
    batch = device_batch(random_batch(cfg, model_cfg), mesh)
    step = S.train_step(setup)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    flops = throughput.cost_flops(compiled)
    holder = {"state": state}

    def one():
        holder["state"], metrics = compiled(holder["state"], batch)
        jax.block_until_ready(metrics["loss"])
    timing = common.median_seconds(one, steps, warmup=1, budget_s=60.0)
    loss = float(jax.device_get(compiled(holder["state"], batch)[1]["loss"]))
    return {"timing": timing, "compile_s": compile_s, "flops": flops, "devices": len(devices),
            "params": S.param_count(holder["state"]), "loss_finite": bool(np.isfinite(loss))}


def torch_step(batch: dict[str, np.ndarray], text_layers: int, steps: int) -> dict:
    import torch
    from clapjax.convert import torch_reference as R
    R.laion_clap()
    from laion_clap.clap_module.loss import ClipLoss
    model = R.laion_clap_model("HTSAT-tiny", "roberta", text_layers=text_layers).train()
    # LAION's training/main.py groups: no decay for 1-D params, biases, norms and logit scales
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
    named = list(model.named_parameters())
    opt = torch.optim.AdamW([{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
                             {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": 0.2}],
                            lr=5e-4, betas=(0.9, 0.999), eps=1e-8)
    loss_fn = ClipLoss()
    audio = {"waveform": torch.from_numpy(batch["waveform"]),
             "longer": torch.zeros(len(batch["waveform"]), 1, dtype=torch.bool)}
    text = {"input_ids": torch.from_numpy(batch["input_ids"].astype(np.int64)),
            "attention_mask": torch.from_numpy(batch["attention_mask"].astype(np.int64))}

    def one():
        opt.zero_grad(set_to_none=True)
        a, t, _, _, scale_a, _ = model(audio, text, device="cpu")
        loss = loss_fn(a, t, scale_a)
        loss.backward()
        opt.step()
        with torch.no_grad():   # LAION clamps the logit scales after the step
            model.logit_scale_a.clamp_(0, np.log(100))
            model.logit_scale_t.clamp_(0, np.log(100))
    timing = common.median_seconds(one, steps, warmup=1, budget_s=60.0)
    return {"timing": timing, "threads": torch.get_num_threads()}


def run(opts: common.Options) -> dict:
    from clapjax.train import config as C
    cfg = train_config(opts.train_batch, opts.train_text_layers, tiny=opts.tiny)
    if opts.tiny:   # smoke: the tiny model, compiled fast, no PyTorch twin
        cfg.compiler_options = {"xla_backend_optimization_level": 0}
    ours = clapjax_step(cfg, opts.train_steps, one_device=True)
    b = opts.train_batch
    rows = [{"impl": "clapjax (1 CPU device)", "pairs_per_s": b / ours["timing"]["median_s"], **ours}]
    if opts.tiny:
        rows.append({"impl": "PyTorch (skipped: tiny smoke run)", "pairs_per_s": None})
    else:
        theirs = torch_step(random_batch(cfg, C.model_config(cfg)), opts.train_text_layers, opts.train_steps)
        rows.append({"impl": "PyTorch (LAION forward + ClipLoss + AdamW)",
                     "pairs_per_s": b / theirs["timing"]["median_s"], **theirs})
    if opts.train_devices_8:
        try:
            eight = common.run_json_child(["benchmarks.train_step", "--child", "--batch", str(b), "--text-layers",
                                           str(opts.train_text_layers), "--steps", str(opts.train_steps)],
                                          devices=8, timeout=1200)
            rows.append({"impl": "clapjax (8 host devices, FSDP)",
                         "pairs_per_s": b / eight["timing"]["median_s"], **eight})
        except Exception as err:   # reported, not fatal: the 1-device figure is the comparison
            rows.append({"impl": "clapjax (8 host devices)", "pairs_per_s": None, "error": str(err)[-500:]})
    torch_rate = rows[1]["pairs_per_s"]
    for r in rows:
        r["vs_torch"] = common.ratio(r["pairs_per_s"], torch_rate)
    table = common.md_table(
        ["train step (HTSAT-tiny + RoBERTa-%dL, batch %d, fp32)" % (opts.train_text_layers, b), "pairs/s",
         "median step s", "÷ PyTorch", "compile s"],
        [[r["impl"], common.fmt(r["pairs_per_s"]), common.fmt(r.get("timing", {}).get("median_s"), ".3f"),
          common.fmt(r["vs_torch"], ".2f", "×"), common.fmt(r.get("compile_s"), ".1f")] for r in rows])
    return {"rows": rows, "table": table, "batch": b, "text_layers": opts.train_text_layers}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", action="store_true", help="time only the clapjax step; print one JSON line")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--text-layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args(argv)
    if not args.child:
        opts = common.Options(train_batch=args.batch, train_text_layers=args.text_layers, train_steps=args.steps,
                              train_devices_8=False)
        print(run(opts)["table"])
        return 0
    import jax
    # FSDP over the host devices: 8 data-parallel replicas of params + AdamW moments (~1.2 GB each)
    # beside the driver's models were killed for memory on a 23 GB machine
    n = len(jax.devices())
    print(json.dumps(clapjax_step(train_config(args.batch, args.text_layers, fsdp=n), args.steps)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
