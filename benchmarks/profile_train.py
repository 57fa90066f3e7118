"""Where one clapjax train step spends its time, op by op (issue 7, deliverable 3).

Compiles the trainer's step (`clapjax.train.step`, HTSAT-tiny + a 4-layer RoBERTa, batch 16, fp32,
one JAX device) as `benchmarks.train_step` does, traces one step with `jax.profiler`, and charges
every XLA op of the trace to (forward | backward, the clapjax source line it came from), read from
the compiled HLO's op metadata and stack frames. The XLA:CPU thunk executor runs independent ops
concurrently, so an op's time is its *exclusive* share: overlapping ops split the wall time they
share. Ops whose innermost clapjax frame is missing (Flax's Linear/LayerNorm, the optimizer) are
grouped by their JAX primitive instead.

    python -m benchmarks.profile_train [--batch 16] [--text-layers 4] [--top 25] [--out DIR]
    python -m benchmarks.profile_train --tiny        # tiny model, seconds (the test's smoke run)

Prints a markdown table; `--out` also keeps the trace, the HLO text and a JSON of the groups.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

from benchmarks import common


# --- HLO metadata ----------------------------------------------------------------------------------

def _section(hlo: str, name: str) -> list[str]:
    if f"\n{name}\n" not in hlo:
        return []
    return hlo.split(f"\n{name}\n", 1)[1].split("\n\n", 1)[0].splitlines()


def _numbered(lines: list[str]) -> dict[int, str]:
    return {int(line.split(None, 1)[0]): line.split(None, 1)[1] for line in lines if line.strip()}


def op_sources(hlo: str, package_dirs: tuple[str, ...]) -> dict[str, tuple[str, str]]:
    """Entry-computation op name → ('fwd' | 'bwd', 'function:line' of the innermost frame whose file
    lies under one of `package_dirs`, else 'primitive <jax primitive>')."""
    files = {k: v.strip('"') for k, v in _numbered(_section(hlo, "FileNames")).items()}
    funcs = {k: v.strip('"') for k, v in _numbered(_section(hlo, "FunctionNames")).items()}
    locs = {k: dict(re.findall(r"(\w+)=(\d+)", v)) for k, v in _numbered(_section(hlo, "FileLocations")).items()}
    frames = {k: dict(re.findall(r"(\w+)=(\d+)", v)) for k, v in _numbered(_section(hlo, "StackFrames")).items()}

    def innermost(frame_id: int) -> str | None:
        seen = set()
        while frame_id in frames and frame_id not in seen:
            seen.add(frame_id)
            loc = locs[int(frames[frame_id]["file_location_id"])]
            path = files[int(loc["file_name_id"])]
            if any(path.startswith(d) for d in package_dirs) and "site-packages" not in path:
                return f"{funcs[int(loc['function_name_id'])]}:{loc['line']}"
            frame_id = int(frames[frame_id]["parent_frame_id"])
        return None

    entry = hlo[hlo.index("\nENTRY"):] if "\nENTRY" in hlo else hlo
    out = {}
    for line in entry.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = ", line)
        if not m:
            continue
        op = re.search(r'op_name="([^"]*)"', line)
        op_name = op.group(1) if op else ""
        frame = re.search(r"stack_frame_id=(\d+)", line)
        where = innermost(int(frame.group(1))) if frame else None
        if where is None:
            prim = re.sub(r"\[.*", "", op_name.rsplit("/", 1)[-1]) if op_name else m.group(1).split(".")[0]
            where = f"primitive {prim or '?'}"
        out[m.group(1)] = ("bwd" if "transpose(" in op_name else "fwd", where)
    return out


# --- trace ---------------------------------------------------------------------------------------

def exclusive_times(events: list[dict]) -> list[float]:
    """Per event, its wall microseconds with overlaps split evenly among the events running then."""
    points = sorted([(e["ts"], 1, i) for i, e in enumerate(events)]
                    + [(e["ts"] + e["dur"], -1, i) for i, e in enumerate(events)])
    active, last, excl = set(), None, [0.0] * len(events)
    for t, kind, i in points:
        if last is not None and active:
            share = (t - last) / len(active)
            for j in active:
                excl[j] += share
        last = t
        (active.add if kind == 1 else active.discard)(i)
    return excl


def attribute(trace_file: str, sources: dict[str, tuple[str, str]]) -> dict:
    with gzip.open(trace_file) as f:
        raw = json.load(f)
    events = [e for e in (raw["traceEvents"] if isinstance(raw, dict) else raw)
              if e.get("ph") == "X" and e.get("name") in sources]
    excl = exclusive_times(events)
    groups: dict[tuple[str, str], list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for e, t in zip(events, excl):
        g = groups[sources[e["name"]]]
        g[0] += t
        g[1] += 1
    total = sum(excl)
    rows = sorted(({"pass": k[0], "source": k[1], "ms": v[0] / 1e3, "ops": v[1]} for k, v in groups.items()),
                  key=lambda r: -r["ms"])
    return {"total_ms": total / 1e3, "fwd_ms": sum(r["ms"] for r in rows if r["pass"] == "fwd"),
            "bwd_ms": sum(r["ms"] for r in rows if r["pass"] == "bwd"), "rows": rows}


# --- driver --------------------------------------------------------------------------------------

def profile(batch: int, text_layers: int, tiny: bool, out_dir: str) -> dict:
    import jax
    from benchmarks import train_step as T
    from clapjax.train import config as C, sharding, step as S
    from clapjax.train.batches import device_batch
    import clapjax
    cfg = T.train_config(batch, text_layers, tiny=tiny)
    model_cfg = C.model_config(cfg)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
    setup = S.build_setup(cfg, model_cfg, mesh)
    state = S.init_state(setup, cfg, model_cfg, 0)
    data = device_batch(T.random_batch(cfg, model_cfg), mesh)
    compiled = S.train_step(setup).lower(state, data).compile()
    hlo = compiled.as_text()
    with open(os.path.join(out_dir, "step.hlo.txt"), "w") as f:
        f.write(hlo)
    holder = {"state": state}

    def one():
        holder["state"], metrics = compiled(holder["state"], data)
        jax.block_until_ready(metrics["loss"])
    one(), one()
    t0 = time.perf_counter()
    with jax.profiler.trace(os.path.join(out_dir, "trace"), create_perfetto_trace=True):
        one()
    wall = time.perf_counter() - t0
    trace_files = glob.glob(os.path.join(out_dir, "trace", "**", "*.trace.json.gz"), recursive=True)
    if not trace_files:
        raise RuntimeError(f"jax.profiler wrote no perfetto trace under {out_dir}/trace")
    roots = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in (clapjax,))
    roots += tuple(os.path.dirname(os.path.abspath(sys.modules[n].__file__)) + os.sep
                   for n in ("clapjax.train", "clapjax.convert") if n in sys.modules)
    result = attribute(trace_files[0], op_sources(hlo, roots))
    result.update(batch=batch, text_layers=text_layers, tiny=tiny, traced_step_s=wall)
    return result


def table(result: dict, top: int) -> str:
    rows = [(r["pass"], r["source"], r["ops"], f"{r['ms']:.1f}", f"{100 * r['ms'] / result['total_ms']:.1f} %")
            for r in result["rows"][:top]]
    head = (f"one traced step: {result['traced_step_s']:.2f} s wall; XLA ops {result['total_ms']:.0f} ms exclusive "
            f"(forward {result['fwd_ms']:.0f}, backward {result['bwd_ms']:.0f})\n\n")
    return head + common.md_table(["pass", "source (clapjax line or JAX primitive)", "ops", "ms", "share"], rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--text-layers", type=int, default=4)
    p.add_argument("--tiny", action="store_true", help="tiny model (smoke run)")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", default=None, help="keep trace, HLO and JSON here (default: a temporary dir)")
    args = p.parse_args(argv)
    os.environ.update(common.OFFLINE_ENV)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or tmp
        os.makedirs(out, exist_ok=True)
        result = profile(args.batch, args.text_layers, args.tiny, out)
        with open(os.path.join(out, "profile_train.json"), "w") as f:
            json.dump(result, f, indent=1)
        print(table(result, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
