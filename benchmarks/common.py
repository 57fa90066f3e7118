"""Shared pieces of the benchmark sections: timing, sizes, environment facts, tables, FLOP counts.

Every section is a module with `run(opts: Options) -> dict` returning {'rows': [...], 'table': str,
...}; `benchmarks.run_all` runs them in order and writes the JSON and markdown. Nothing here runs at
import time (the driver sets XLA/HF environment variables before JAX or transformers load).
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


@dataclasses.dataclass(frozen=True)
class Options:
    """Sizes and repeats of one benchmark run. `quick()` is the smoke run (tiny where it can be)."""

    quick: bool = False
    tiny: bool = False                  # tiny clapjax models, no PyTorch columns (the pytest's run)
    repeats: int = 3                    # timed calls per measurement (median reported)
    audio_batches: tuple[int, ...] = (1, 8, 32)
    text_batches: tuple[int, ...] = (1, 32, 128)
    text_layers: int = 12               # RoBERTa layers of the embedding models (12 = roberta-base)
    train_batch: int = 16
    train_text_layers: int = 4
    train_steps: int = 3                # timed train steps (after one warm-up step)
    train_devices_8: bool = True        # also time the clapjax step on 8 host devices (subprocess)
    fsdp_devices: tuple[int, ...] = (1, 2, 4, 8)
    fsdp_full_size: bool = True         # full-size model (False: the tiny config, for smoke runs)

    @classmethod
    def quick_options(cls, tiny: bool = False) -> "Options":
        """A few minutes: real sizes, one batch size each, one repeat (`tiny`: seconds, smoke only)."""
        return cls(quick=True, tiny=tiny, repeats=1, audio_batches=(1,), text_batches=(1, 8), text_layers=2,
                   train_batch=4 if tiny else 8, train_text_layers=1, train_steps=1, train_devices_8=False,
                   fsdp_devices=(2,) if tiny else (1, 2), fsdp_full_size=False)


TIME_BUDGET_S = 20.0   # per measurement: stop repeating once the timed calls took this long


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 1, budget_s: float = TIME_BUDGET_S) -> dict:
    """Median wall seconds of `fn()` over `repeats` calls after `warmup` untimed ones (compiles,
    allocations); `fn` must block until its result is ready. Calls that take long (PyTorch's
    batch-128 RoBERTa on 2 cores: ~30 s) stop repeating once `budget_s` is spent, after one timed
    call at least, so that `make bench` stays within its time; `times_s` says how many ran."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    while len(times) < max(1, repeats) and (not times or sum(times) < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times}


def ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else a / b


def fmt(x, spec: str = ".2f", suffix: str = "") -> str:
    return "–" if x is None else f"{x:{spec}}{suffix}"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    from importlib import metadata
    out = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "laion_clap", "numpy"):
        try:
            out[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def environment() -> dict:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
            "platform": platform.platform(), "versions": versions(),
            "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}


def subprocess_env(devices: int | None = None, extra: dict | None = None) -> dict:
    """The environment for a child Python: offline hub, the repo on the path, `devices` host devices."""
    env = dict(os.environ, **OFFLINE_ENV)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    if devices:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    env.update(extra or {})
    return env


def run_json_child(args: Sequence[str], *, devices: int | None = None, timeout: float = 900,
                   extra_env: dict | None = None) -> dict:
    """Run `python -m <args>` whose last stdout line is a JSON object; return it (ValueError with
    the child's stderr tail when it fails)."""
    proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout,
                          env=subprocess_env(devices, extra_env))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise ValueError(f"child {' '.join(args)} failed (rc {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(lines[-1])
