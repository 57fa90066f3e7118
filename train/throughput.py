"""What a training run achieves, per logging interval: the share of wall time spent waiting for data,
the FLOP/s the step reached and its MFU (model FLOPs utilisation), so that an input-bound run says so.

* FLOPs of one step: XLA's cost analysis of the compiled step program (`step_flops`), per device
  (an SPMD program is one device's share). Compiled once, before the first step: the step call then
  finds the executable in jit's cache. XLA counts a loop body once whatever its trip count, so with
  gradient accumulation (`optim.accum_steps > 1`: a `lax.scan` over micro-batches) the count comes
  from the same step without accumulation on the same global batch, which holds the model's FLOPs
  (GradCache's extra forward pass is recomputation, which MFU leaves out; remat's recomputation, by
  contrast, is in the compiled program and so in the count).
* Peak: `train.peak_flops_per_device` when set, else `PEAK_FLOPS` by the device kind and the
  compute dtype; none is known for CPUs, and then MFU is left out (FLOP/s are still given).
* Data wait: seconds in `next(data_iter)` and the host→device put of the batch (`Meter.waited`).

An interval runs from one logged step's metrics being read (the step is done) to the next; the
first read of a run only starts the clock, so compilation is never counted. Time in checkpoint
saves and hooks (`Meter.paused`) is not step time and is left out of the interval.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Callable, Mapping

# Dense (no sparsity) peak FLOP/s of one device per compute dtype, from the vendors' data sheets:
# NVIDIA H100 / H200 / A100 Tensor Core GPU data sheets (the sparse figures halved), Google Cloud TPU
# "system architecture" pages (v4, v5e, v5p, v6e: bf16 per chip). 'float32' is what XLA's default
# matmul precision runs float32 at: TF32 tensor cores on these GPUs, one bf16 pass on the TPU's MXU.
# Matched in order as a lower-case substring of jax's `device_kind`; None: a variant whose figures are
# not tabled here (rather than a wrong match with its sibling's entry below it).
PEAK_FLOPS: tuple[tuple[str, Mapping[str, float] | None], ...] = (
    ("h100 nvl", None),
    ("h100 pcie", {"bfloat16": 756e12, "float32": 378e12}),
    ("h100", {"bfloat16": 989.4e12, "float32": 494.7e12}),              # SXM5 ("NVIDIA H100 80GB HBM3")
    ("gh200", {"bfloat16": 989.4e12, "float32": 494.7e12}),             # the H100 SXM's compute
    ("h200 nvl", None),
    ("h200", {"bfloat16": 989.4e12, "float32": 494.7e12}),              # SXM: the H100 SXM's compute
    ("b200", {"bfloat16": 2250e12, "float32": 1125e12}),                # HGX B200, per GPU
    ("a100", {"bfloat16": 312e12, "float32": 156e12}),                  # SXM4 and PCIe alike
    ("a10", {"bfloat16": 125e12, "float32": 62.5e12}),                  # after "a100", which it is a prefix of
    ("l40s", {"bfloat16": 362e12, "float32": 183e12}),
    ("l4", {"bfloat16": 121e12, "float32": 60e12}),                     # after "l40s", which it is a prefix of
    ("tpu v4 lite", None),
    ("tpu v4", {"bfloat16": 275e12, "float32": 275e12}),
    ("tpu v5 lite", {"bfloat16": 197e12, "float32": 197e12}),           # v5e
    ("tpu v5e", {"bfloat16": 197e12, "float32": 197e12}),
    ("tpu v5", {"bfloat16": 459e12, "float32": 459e12}),                # v5p ("TPU v5" or "TPU v5p")
    ("tpu v6", {"bfloat16": 918e12, "float32": 918e12}),                # v6e ("TPU v6 lite")
)
# float16 runs on the same tensor cores as bfloat16 at the same rate on every GPU above
_TABLE_DTYPE = {"bfloat16": "bfloat16", "float16": "bfloat16", "float32": "float32"}


def table_peak(device_kind: str, dtype: str) -> float | None:
    """`PEAK_FLOPS` for a device kind and compute dtype; None when the table does not know them."""
    kind = device_kind.lower()
    entry = next((peaks for name, peaks in PEAK_FLOPS if name in kind), None)
    return None if entry is None else entry.get(_TABLE_DTYPE.get(dtype, dtype))


def compute_dtype(precision) -> str:
    """The dtype whose peak MFU is measured against (a `CLAPConfig.precision`): a 16-bit one when either
    tower computes in 16 bits, so that with mixed towers the larger peak is used and MFU is never overstated."""
    dtypes = {precision.audio.dtype, precision.text.dtype}
    return next((d for d in ("bfloat16", "float16") if d in dtypes), "float32")


def peak_flops(configured: float, device_kind: str, dtype: str) -> tuple[float | None, str]:
    """(peak FLOP/s of one device or None, where it came from) for the run's log."""
    if configured:
        return float(configured), "train.peak_flops_per_device"
    peak = table_peak(device_kind, dtype)
    if peak is None:
        return None, (f"no peak known for {device_kind!r} in {dtype}, so no MFU "
                      "(set train.peak_flops_per_device to have one)")
    return peak, f"{device_kind}, {dtype} (throughput.PEAK_FLOPS)"


def cost_flops(program) -> float | None:
    """FLOPs XLA's cost analysis gives a lowered or compiled program; None when the backend has no count.
    jax returns a dict, or on some versions and backends a list of one dict per program."""
    try:
        cost = program.cost_analysis()
    except (NotImplementedError, RuntimeError):   # a backend without cost analysis
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def step_flops(setup, step_fn: Callable, state: Any, batch: Any) -> float | None:
    """FLOPs of one train step on one device: the cost analysis of `step_fn` (the loop's own jitted
    step) compiled for (`state`, `batch`), or with accumulation of its twin without (module doc)."""
    if setup.settings.accum_steps > 1:
        from clapjax.train import step as step_lib   # here: the table and the meter load without JAX
        step_fn = step_lib.train_step(dataclasses.replace(
            setup, settings=dataclasses.replace(setup.settings, accum_steps=1)))
    return cost_flops(step_fn.lower(state, batch).compile())


class Meter:
    """The figures of each logging interval (module doc): call `waited` for each batch's data wait,
    wrap what is not step time in `paused()`, and call `read(step, report)` whenever a step's
    metrics have been read; with `report` it returns the interval's figures (None for the first read)."""

    def __init__(self, devices: int, peak_per_device: float | None, flops_per_step: float | None = None):
        self.devices = devices                       # devices the step runs on
        self.peak_per_device = peak_per_device       # FLOP/s; None: no MFU
        self.flops_per_step = flops_per_step         # one device's FLOPs per step (step_flops); None: no FLOP/s
        self._since: tuple[int, float] | None = None  # (step, perf_counter) the interval started at
        self._wait = self._paused = 0.0

    def waited(self, seconds: float) -> None:
        self._wait += seconds

    @contextlib.contextmanager
    def paused(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._paused += time.perf_counter() - t0

    def read(self, step: int, report: bool) -> dict | None:
        now = time.perf_counter()
        if self._since is None:            # the run's first read: compilation is behind it, intervals start here
            self._restart(step, now)
            return None
        if not report:
            return None
        first, start = self._since
        busy = max(now - start - self._paused, 1e-9)
        steps = max(step - first, 1)
        out = {"step_time_s": busy / steps, "data_wait_s": self._wait / steps,
               "data_wait_fraction": min(self._wait / busy, 1.0)}
        if self.flops_per_step:
            out["flops_per_s"] = self.flops_per_step * self.devices / out["step_time_s"]
            if self.peak_per_device:
                out["mfu"] = self.flops_per_step / out["step_time_s"] / self.peak_per_device
        self._restart(step, now)
        return out

    def _restart(self, step: int, now: float) -> None:
        self._since, self._wait, self._paused = (step, now), 0.0, 0.0


def describe_cost(flops_per_step: float | None) -> str:
    """The run log's line on the step's cost."""
    if flops_per_step is None:
        return "throughput: XLA's cost analysis gives no FLOP count here, so no FLOP/s or MFU"
    return f"throughput: {flops_per_step / 1e9:.4g} GFLOP per step per device (XLA's cost analysis)"


def describe(figures: Mapping[str, float]) -> str:
    """The console line's part: 'data 3% | 1.2 TFLOP/s | MFU 41.0%'."""
    parts = [f"data {100 * figures['data_wait_fraction']:.0f}%"]
    if "flops_per_s" in figures:
        parts.append(f"{figures['flops_per_s'] / 1e12:.3g} TFLOP/s")
    if "mfu" in figures:
        parts.append(f"MFU {100 * figures['mfu']:.1f}%")
    return " | ".join(parts)
