"""Section 6: FSDP memory per device at 1 / 2 / 4 / 8 devices, full-size HTSAT-tiny + RoBERTa-base.

One child process per device count (XLA_FLAGS host device count), mesh (data 1, fsdp n), the
trainer's 'fsdp' rules. Nothing is allocated: the train state comes from abstract shapes
(`build_setup`), and the real train step (AdamW, donation) is lowered and compiled for a batch of
2 clips per device; reported per device: the state's bytes from its shardings (params + AdamW
moments + batch stats), and the compiled step's memory analysis (arguments, outputs, aliased,
temporaries: peak ≈ arguments + outputs − aliased + temporaries). The ratio column is the state's
largest per-device share over total ÷ n (1.0 = perfect sharding). Compiled at XLA backend
optimisation level 0: compiles several times faster; buffer assignment, hence memory, is what
the memory analysis reports either way (the figures are the compiler's, not measured RSS).

    python -m benchmarks.fsdp_memory --child N [--tiny]
"""
from __future__ import annotations

import argparse
import json
import time

from benchmarks import common

PER_DEVICE_BATCH = 2


def child(n: int, tiny: bool) -> dict:
    import jax
    from clapjax.train import config as C, sharding, step as S
    from benchmarks.train_step import train_config
    if len(jax.devices()) != n:
        raise ValueError(f"expected {n} devices, have {len(jax.devices())}")
    cfg = train_config(PER_DEVICE_BATCH * n, 12, tiny=tiny, fsdp=n)
    cfg.compiler_options = {"xla_backend_optimization_level": 0}
    model_cfg = C.model_config(cfg)
    mesh = sharding.make_mesh({"data": 1, "fsdp": n})
    setup = S.build_setup(cfg, model_cfg, mesh)
    import jax.numpy as jnp
    import numpy as np
    batch_sh = sharding.batch_sharding(mesh)
    b = cfg.train.batch_size
    batch = {"waveform": jax.ShapeDtypeStruct((b, model_cfg.frontend.clip_samples), jnp.float32, sharding=batch_sh),
             "input_ids": jax.ShapeDtypeStruct((b, 77), jnp.int32, sharding=batch_sh),
             "attention_mask": jax.ShapeDtypeStruct((b, 77), jnp.int32, sharding=batch_sh)}
    total = sharding.total_bytes(setup.abstract)
    per_device = sharding.bytes_per_device(setup.abstract, setup.shardings)
    t0 = time.perf_counter()
    compiled = S.train_step(setup).lower(setup.abstract, batch).compile()
    compile_s = time.perf_counter() - t0
    m = compiled.memory_analysis()
    args, outs, alias, temp = (int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp"))
    return {"devices": n, "global_batch": b, "params": int(sum(np.prod(x.shape) for x in
                                                               jax.tree.leaves(setup.abstract["params"]))),
            "state_total_bytes": total, "state_max_per_device_bytes": max(per_device.values()),
            "state_ratio_vs_ideal": max(per_device.values()) / (total / n),
            "argument_bytes": args, "output_bytes": outs, "alias_bytes": alias, "temp_bytes": temp,
            "peak_estimate_bytes": args + outs - alias + temp, "compile_s": compile_s}


def run(opts: common.Options) -> dict:
    rows = []
    for n in opts.fsdp_devices:
        args = ["benchmarks.fsdp_memory", "--child", str(n)] + ([] if opts.fsdp_full_size else ["--tiny"])
        rows.append(common.run_json_child(args, devices=n, timeout=1200))
    gib = lambda x: f"{x / 2**30:.3f}"
    table = common.md_table(
        ["FSDP devices", "params", "state GiB / device", "÷ (total ÷ n)", "step args GiB", "step temps GiB",
         "step peak ≈ GiB / device", "batch (2 / device)"],
        [[r["devices"], f"{r['params'] / 1e6:.1f} M", gib(r["state_max_per_device_bytes"]),
          f"{r['state_ratio_vs_ideal']:.4f}", gib(r["argument_bytes"]), gib(r["temp_bytes"]),
          gib(r["peak_estimate_bytes"]), r["global_batch"]] for r in rows])
    return {"rows": rows, "table": table, "full_size": opts.fsdp_full_size}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", type=int, required=True, help="device count (set XLA_FLAGS to match)")
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args(argv)
    print(json.dumps(child(args.child, args.tiny)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
