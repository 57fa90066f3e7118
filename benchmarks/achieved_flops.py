"""Section 7: achieved GFLOP/s against this CPU's measured f32 matmul peak.

The peak is measured in the same run: a jitted f32 `jnp.dot` of two N×N matrices, 2·N³ FLOPs per
call, the best call over N = 2048 and 3072 (1024 and 1536 in quick mode). Achieved = XLA's cost-analysis FLOPs of
the compiled program ÷ the measured median time: for the embeddings, the model function's FLOPs ÷
the public API call's time (so host work counts against it); for the train step, the compiled
step's FLOPs ÷ its step time. Read from the other sections' results.
"""
from __future__ import annotations

from benchmarks import common


def matmul_peak(n: int, repeats: int) -> dict:
    """Best f32 GFLOP/s of a jitted N×N `jnp.dot` over N and 1.5·N (best of ≥ 8 calls each: on a
    shared machine the best call is the one least disturbed)."""
    import jax
    import jax.numpy as jnp
    best = None
    for size in (n, n * 3 // 2):
        k1, k2 = jax.random.split(jax.random.key(0))
        a = jax.random.normal(k1, (size, size), jnp.float32)
        b = jax.random.normal(k2, (size, size), jnp.float32)
        dot = jax.jit(jnp.dot)
        t = common.median_seconds(lambda: dot(a, b).block_until_ready(), max(repeats, 8), warmup=2, budget_s=10.0)
        got = {"n": size, "gflops": 2 * size**3 / t["min_s"] / 1e9,
               "gflops_median": 2 * size**3 / t["median_s"] / 1e9, "timing": t}
        best = got if best is None or got["gflops"] > best["gflops"] else best
    return best


def run(opts: common.Options, results: dict) -> dict:
    peak = matmul_peak(1024 if opts.quick else 2048, opts.repeats)
    rows = []
    for section in ("audio", "text"):
        for r in results.get(section, {}).get("rows", []):
            if r.get("model_flops"):
                t = r["clapjax_s"]["median_s"]
                rows.append({"what": f"{section}: {r['kind']}", "batch": r["batch"], "gflop": r["model_flops"] / 1e9,
                             "seconds": t, "gflops": r["model_flops"] / t / 1e9})
    for r in results.get("train", {}).get("rows", []):
        if r.get("flops") and r.get("timing") and r.get("devices") == 1:   # SPMD cost is per device
            t = r["timing"]["median_s"]
            rows.append({"what": f"train step: {r['impl']}", "batch": results["train"]["batch"],
                         "gflop": r["flops"] / 1e9, "seconds": t, "gflops": r["flops"] / t / 1e9})
    for r in rows:
        r["share_of_peak"] = r["gflops"] / peak["gflops"]
    table = common.md_table(
        ["program (clapjax)", "batch", "GFLOP / call (XLA)", "median s", "GFLOP/s", "% of matmul peak"],
        [[r["what"], r["batch"], f"{r['gflop']:.1f}", f"{r['seconds']:.3f}", f"{r['gflops']:.1f}",
          f"{100 * r['share_of_peak']:.0f} %"] for r in rows]
        + [[f"peak: jnp.dot f32 {peak['n']}² (best of {len(peak['timing']['times_s'])})", "", "", "",
            f"{peak['gflops']:.1f}", "100 %"]])
    return {"rows": rows, "peak": peak, "table": table}
