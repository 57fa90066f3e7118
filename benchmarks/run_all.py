"""`make bench`: every CPU benchmark of issue 7 in one run → benchmarks/results/*.json + bench.md.

    python -m benchmarks.run_all [--quick] [--tiny] [--out benchmarks/results] [--only audio,text,...]
                                 [--gpu-json benchmarks/results/gpu/gpu.json]

Sections (one module each, in this order): audio (audio_throughput), text (text_throughput), train
(train_step), converter, startup (uses the converter's output), fsdp (fsdp_memory), flops
(achieved_flops, from the others' figures + a matmul peak measured here), pipeline (input_pipeline:
the training input pipeline's clips/s), folder (folder_embedding: embedding a folder of files end to
end), host (host_cores: host cores one accelerator needs, from the pipeline's per-core rates and the
step's FLOPs, or the step rates of `--gpu-json`, a `benchmarks.gpu` run's result). Medians over repeats after
a warm-up call. A failing section is recorded with its error and the run goes on (the exit status
is 1 then). `--quick`: one batch size per table, one repeat, a reduced train step and the tiny
FSDP model (a few minutes). `--tiny` (with --quick): tiny clapjax models and no PyTorch columns
(the seconds-long smoke run tests/test_benchmarks.py makes). Ratios from one run; the figures are
only as quiet as the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback

from benchmarks import common

SECTIONS = ("audio", "text", "train", "converter", "startup", "fsdp", "flops", "pipeline", "folder", "host")
TITLES = {"audio": "1. Audio embedding throughput", "text": "2. Text embedding throughput",
          "train": "3. Train step", "converter": "5. Converter", "startup": "4. Cold and warm start",
          "fsdp": "6. FSDP memory per device", "flops": "7. Achieved GFLOP/s",
          "pipeline": "8. Training input pipeline", "folder": "9. Folder embedding",
          "host": "10. Host cores per accelerator"}


def _run_section(name: str, opts: common.Options, workdir: str, results: dict, gpu: dict | None = None) -> dict:
    if name == "audio":
        from benchmarks import audio_throughput
        return audio_throughput.run(opts)
    if name == "text":
        from benchmarks import text_throughput
        return text_throughput.run(opts)
    if name == "train":
        from benchmarks import train_step
        return train_step.run(opts)
    if name == "converter":
        from benchmarks import converter
        return converter.run(opts, workdir)
    if name == "startup":
        from benchmarks import startup
        ckpt = results.get("converter", {}).get("checkpoint")
        if not ckpt:
            raise ValueError("the start-up section needs the converter section's checkpoint")
        return startup.run(opts, workdir, ckpt)
    if name == "fsdp":
        from benchmarks import fsdp_memory
        return fsdp_memory.run(opts)
    if name == "flops":
        from benchmarks import achieved_flops
        return achieved_flops.run(opts, results)
    if name == "pipeline":
        from benchmarks import input_pipeline
        return input_pipeline.run(opts)
    if name == "folder":
        from benchmarks import folder_embedding
        return folder_embedding.run(opts)
    if name == "host":
        from benchmarks import host_cores
        return host_cores.run(opts, results, gpu)
    raise ValueError(f"unknown section {name!r}; sections: {SECTIONS}")


def markdown(results: dict, env: dict, opts: common.Options) -> str:
    v = env["versions"]
    lines = [f"# clapjax benchmarks ({'quick' if opts.quick else 'full'}{', tiny' if opts.tiny else ''} run)", "",
             f"{env['cpu']}, {env['affinity']} cores usable; Python {v['python']}, jax {v['jax']}, flax {v['flax']}, "
             f"torch {v['torch']}, transformers {v['transformers']}, laion_clap {v['laion_clap']}; "
             f"started {env['started_utc']} UTC. Medians over {opts.repeats} timed calls after a warm-up.", ""]
    for name in SECTIONS:
        if name not in results:
            continue
        r = results[name]
        lines += [f"## {TITLES[name]}", ""]
        lines += [r["table"]] if "table" in r else [f"FAILED: {r.get('error', '?')}"]
        lines += [f"\n{n}" for n in r.get("notes", [])] + [f"\n({r['seconds']:.0f} s)", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few-minute smoke run")
    ap.add_argument("--tiny", action="store_true", help="with --quick: tiny models, no PyTorch (seconds)")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--workdir", default="", help="scratch directory (default: a temporary one, removed)")
    ap.add_argument("--gpu-json", default="", help="a `python -m benchmarks.gpu` result (gpu.json): the host "
                                                   "section adds its measured step rates")
    args = ap.parse_args(argv)
    for k, val in common.OFFLINE_ENV.items():
        os.environ.setdefault(k, val)
    opts = common.Options.quick_options(tiny=args.tiny) if args.quick else common.Options()
    only = [s for s in args.only.split(",") if s] or list(SECTIONS)
    bad = set(only) - set(SECTIONS)
    if bad:
        raise ValueError(f"unknown sections {sorted(bad)}; sections: {SECTIONS}")
    gpu = None
    if args.gpu_json:
        with open(args.gpu_json) as f:
            gpu = json.load(f)
    os.makedirs(args.out, exist_ok=True)
    workdir = args.workdir or tempfile.mkdtemp(prefix="clapjax-bench-")
    os.makedirs(workdir, exist_ok=True)
    env = common.environment()
    results: dict = {}
    t_all = time.perf_counter()
    try:
        for name in SECTIONS:
            if name not in only:
                continue
            print(f"== {TITLES[name]}", flush=True)
            t0 = time.perf_counter()
            try:
                results[name] = _run_section(name, opts, workdir, results, gpu)
            except Exception as err:   # record and go on: one broken section must not hide the others
                traceback.print_exc()
                results[name] = {"error": f"{type(err).__name__}: {err}"}
            results[name]["seconds"] = time.perf_counter() - t0
            if "table" in results[name]:
                print(results[name]["table"], flush=True)
            with open(os.path.join(args.out, f"{name}.json"), "w") as f:
                json.dump(results[name], f, indent=2, default=str)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    summary = {"environment": env, "options": opts.__dict__, "total_seconds": time.perf_counter() - t_all,
               "sections": results}
    with open(os.path.join(args.out, "all.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write(markdown(results, env, opts) + f"\nTotal {summary['total_seconds'] / 60:.1f} min.\n")
    print(f"wrote {args.out}/bench.md and {len(results) + 1} JSON files in {summary['total_seconds']:.0f} s")
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
