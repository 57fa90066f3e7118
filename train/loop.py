"""The training loop: start (or resume), step, log, checkpoint, stop.

`train()` draws batches from a data iterator (the interface, and the iterators: clapjax.train.batches).

Files in the workdir: `config.json` (the resolved config), `checkpoints/<step>/` (Orbax; see
clapjax.train.checkpoint), `metrics.jsonl` (process 0: one line per logged step, with the exact
float32 loss; on resume, lines after the restored step are dropped, so the file always describes
one uninterrupted run; see clapjax.train.metrics.MetricsLog). Each logged line after a run's first
also holds `perf`, the interval's wall-clock figures: data wait, FLOP/s, MFU (clapjax.train.throughput),
which the console line and TensorBoard show too.

Resume is automatic: if `checkpoints/` holds a step, the run continues from the latest one (state,
rng, data position); otherwise it starts fresh (optionally with pretrained towers, see
clapjax.train.init_towers, or a whole saved model, see clapjax.train.model_io).

A run that ends before `train.steps` says why (`StopReason`): when the data run out, the summary
names that reason (and `clapjax train` exits 3); after too many non-finite steps in a row, `train()`
raises NonFiniteLossError and nothing is exported.

Multi-process runs: an exception on one process stops every process (each exits with status
`distributed.FAILED_EXIT` and a message naming the failing process and its error) instead of
leaving the others waiting in a collective; see clapjax.train.distributed.
"""
from __future__ import annotations

import contextlib
import enum
import os
import sys
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import numpy as np

from clapjax.embedding import enable_compilation_cache
from clapjax.train import checkpoint as ckpt_lib
from clapjax.train import config as config_lib
from clapjax.train import distributed, sharding, step as step_lib, throughput
from clapjax.train.batches import device_batch, make_data_iterator
from clapjax.train.metrics import METRICS_FILE, MetricsLog

CONFIG_FILE = "config.json"


class StopReason(enum.Enum):
    """Why a run ended before `train.steps` (the summary's "stopped"; None when it ran to the end)."""

    DATA_RAN_OUT = "the data ran out"
    NON_FINITE = "too many non-finite steps in a row"


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


def _record(step: int, metrics: Mapping) -> dict:
    """A step's device metrics → the JSON record metrics.jsonl holds."""
    out = {"step": step}
    for k, v in jax.device_get(dict(metrics)).items():
        v = np.asarray(v)
        out[k] = bool(v) if v.dtype == bool else (int(v) if v.dtype.kind in "iu" else float(v))
    return out


# --- the run ---------------------------------------------------------------------------------------

def _check_resumable(saved: Mapping, cfg) -> None:
    now = config_lib.to_dict(cfg)
    for section in ("model", "loss"):
        if saved.get(section) != now[section]:
            raise ValueError(f"the checkpoint was trained with a different `{section}` section; resume with the "
                             f"same settings or use a new workdir (saved: {saved.get(section)}, now: {now[section]})")


def _meter(cfg, model_cfg, mesh, log) -> throughput.Meter:
    """The run's throughput meter, its peak from the config or the device table; `log` says which."""
    kind = mesh.devices.flat[0].device_kind
    peak, source = throughput.peak_flops(float(cfg.train.get("peak_flops_per_device", 0.0)), kind,
                                         throughput.compute_dtype(model_cfg.precision))
    log(f"throughput: {mesh.devices.size} × {kind}; "
        + (f"peak {peak / 1e12:.4g} TFLOP/s per device ({source})" if peak else source))
    return throughput.Meter(mesh.devices.size, peak)


def _add_perf(rec: dict, perf: Mapping | None, metrics_log: MetricsLog) -> str:
    """The interval's wall-clock figures into `rec` (their own object, apart from the run's reproducible
    figures) and TensorBoard (`perf/…`); returns what the console line adds (nothing without figures)."""
    if not perf:
        return ""
    rec["perf"] = dict(perf)
    for name in ("data_wait_fraction", "data_wait_s", "flops_per_s", "mfu"):
        if name in perf:
            metrics_log.scalar(f"perf/{name}", perf[name], rec["step"])
    return f" | {throughput.describe(perf)}"


def _next_batch(data_iter: Iterator, mesh, meter: throughput.Meter) -> dict | None:
    """The next global batch on the devices, None when the data ran out; the wait (drawing it and
    putting it on the devices) goes to `meter`."""
    t0 = time.perf_counter()
    try:
        local = next(data_iter)
    except StopIteration:
        return None
    batch = device_batch(local, mesh)
    meter.waited(time.perf_counter() - t0)
    return batch


def _progress_bar(total: int, start: int, enabled: bool):
    """A tqdm bar over the steps on process 0's terminal (silent when output is not a terminal)."""
    from tqdm import tqdm
    return tqdm(total=total, initial=start, unit="step", disable=not (enabled and sys.stderr.isatty()))


def train(cfg, workdir: str, data_iter: Iterator | None = None, *, log=print, hooks: Sequence[Callable] = ()) -> dict:
    """Train (or resume) the run `cfg` describes in `workdir`; returns a summary dict: `step` (the last
    one run), `stopped` (a `StopReason`, None when the run reached train.steps), `stop_message` and
    `nonfinite_total`. A run stopped for non-finite steps raises NonFiniteLossError instead.

    `hooks` are called after every step as `hook(step, state, setup, metrics_log)` (state on device;
    e.g. periodic evaluation: `setup.template.merge(state["params"], state["batch_stats"])` is the model,
    and `metrics_log.scalar(name, value, step)` puts its figures in TensorBoard)."""
    distributed.initialize(cfg.distributed)
    # a failure on one process stops the whole group, before the run's resources are closed
    with contextlib.ExitStack() as resources, distributed.one_failure_stops_all():
        summary = _run(cfg, workdir, data_iter, log, hooks, resources)
    if summary["stopped"] is StopReason.NON_FINITE:
        raise NonFiniteLossError(summary["stop_message"])
    if summary["stopped"] is not None and distributed.is_main():
        message = summary["stop_message"]
        log(message, file=sys.stderr) if log is print else log(message)
    return summary


def _first_state(cfg, setup, model_cfg, checkpointer, data_iter, log) -> tuple[dict, int]:
    """(state, step) the run goes on from: the latest checkpoint (its data position restored into
    `data_iter`), else a fresh state, optionally with pretrained towers or a whole saved model.
    `log` is process 0's (a no-op on the others)."""
    start = checkpointer.latest_step() or 0
    if start:
        state, data_state, saved_cfg = checkpointer.restore(setup.abstract, start)
        _check_resumable(saved_cfg, cfg)
        data_iter.set_state(data_state)
        log(f"resumed from step {start} ({checkpointer.directory})")
        return state, start
    state = step_lib.init_state(setup, cfg, model_cfg, int(cfg.seed))
    if cfg.init.get("checkpoint"):             # fine-tuning: the whole model from a clapjax checkpoint
        from clapjax.train import model_io
        state = model_io.load_checkpoint(cfg, setup, state, log=log)
    elif cfg.init.text or cfg.init.audio:
        from clapjax.train import init_towers
        state = init_towers.apply_to_state(cfg, setup, state, log=log)
    return state, start


def _run(cfg, workdir: str, data_iter: Iterator | None, log, hooks: Sequence[Callable],
         resources: contextlib.ExitStack) -> dict:
    """The body of `train`; what it opens it registers with `resources`.

    Kept as one function on purpose (about 90 lines): the loop and its stop conditions read as
    one page, top to bottom; what stands alone (the first state, the batches, the metrics log) is outside."""
    # every program of a run is worth keeping (a resumed or repeated run recompiles nothing)
    enable_compilation_cache(cfg.compilation_cache, min_compile_secs=0.0, min_entry_bytes=-1)
    config_lib.validate(cfg)
    main = distributed.is_main()
    os.makedirs(workdir, exist_ok=True)
    resolved = config_lib.to_dict(cfg)
    if main:
        with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
            f.write(config_lib.to_json(cfg))
    model_cfg = config_lib.model_config(cfg)
    mesh = sharding.make_mesh({"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp})
    setup = step_lib.build_setup(cfg, model_cfg, mesh)
    checkpointer = ckpt_lib.Checkpointer.from_config(cfg, workdir)
    resources.callback(checkpointer.close)
    if data_iter is None:                             # close only what we opened
        data_iter = make_data_iterator(cfg, model_cfg)
        if hasattr(data_iter, "close"):
            resources.callback(data_iter.close)

    say = log if main else (lambda *_: None)        # process 0's log
    state, start = _first_state(cfg, setup, model_cfg, checkpointer, data_iter, say)
    metrics_log = MetricsLog(os.path.join(workdir, METRICS_FILE), start, main, int(cfg.train.batch_size))
    resources.callback(metrics_log.close)
    step_fn = step_lib.train_step(setup)
    meter = _meter(cfg, model_cfg, mesh, say)
    total, every, log_every = int(cfg.train.steps), int(cfg.checkpoint.every), int(cfg.train.log_every)
    max_bad = int(cfg.train.max_nonfinite_in_row)

    pending: tuple[int, Any] | None = None
    stopped: StopReason | None = None
    message, t0, s = "", time.time(), start

    def flush():
        nonlocal pending
        if pending is None:
            return None
        rec = _record(*pending)
        pending = None
        logged = rec["step"] % log_every == 0 or not rec["finite"] or rec["step"] == total
        perf = meter.read(rec["step"], logged)
        if logged:
            tail = _add_perf(rec, perf, metrics_log)
            metrics_log.write(rec)
            if main:
                log(f"step {rec['step']}: loss {rec['loss']:.6f} lr {rec.get('lr', 0):.3g} "
                    f"skipped {rec['nonfinite_total']} ({time.time() - t0:.1f}s){tail}")
        return rec

    progress = _progress_bar(total, start, main)
    resources.callback(progress.close)
    while s < total:
        batch = _next_batch(data_iter, mesh, meter)
        if batch is None:
            stopped, message = StopReason.DATA_RAN_OUT, f"the data ran out after step {s}"
            break
        if s == start:   # compiled here once; the step call below finds the executable in jit's cache
            meter.flops_per_step = throughput.step_flops(setup, step_fn, state, batch)
            say(throughput.describe_cost(meter.flops_per_step))
        state, metrics = step_fn(state, batch)
        s += 1
        progress.update(1)
        rec = flush()                      # the previous step's metrics: the device stays busy
        pending = (s, metrics)
        if s % every == 0 or s == total:
            rec = flush() or rec
            with meter.paused():
                checkpointer.save(s, state, data_iter.get_state(), resolved)
        with meter.paused():
            for hook in hooks:
                hook(s, state, setup, metrics_log)
        if rec is not None and rec["nonfinite_streak"] >= max_bad:
            stopped = StopReason.NON_FINITE
            message = (f"{rec['nonfinite_streak']} steps in a row had a non-finite loss or gradient "
                       f"(last: step {rec['step']}); stopping (train.max_nonfinite_in_row={max_bad})")
            break
    last = flush()
    if last is not None and last["nonfinite_streak"] >= max_bad and stopped is None:
        stopped = StopReason.NON_FINITE
        message = (f"{last['nonfinite_streak']} steps in a row had a non-finite loss or gradient; stopping "
                   f"(train.max_nonfinite_in_row={max_bad})")
    if stopped is not None and s % every and s != total and checkpointer.latest_step() != s:
        checkpointer.save(s, state, data_iter.get_state(), resolved)
    if cfg.get("export", {}).get("model") and stopped is not StopReason.NON_FINITE:
        from clapjax.train import model_io  # the saved-model format: clapjax eval / embed / export read it
        model_io.export_model(cfg, setup, state, model_cfg, os.path.join(workdir, "model"))
        log(f"trained model: {os.path.join(workdir, 'model')}") if main else None
    return {"step": s, "stopped": stopped, "stop_message": message,
            "nonfinite_total": int(jax.device_get(state["nonfinite_total"]))}
