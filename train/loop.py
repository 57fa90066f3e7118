"""The training loop: start (or resume), step, log, checkpoint, stop.

Data iterator interface — what `train()` needs from the data pipeline (clapjax.train.data's
`DataIterator` and `RandomBatches` below both provide it):

* `next(it)` → dict of NumPy arrays holding THIS PROCESS's rows of the next global batch
  (`train.batch_size / process_count` rows; process p's rows are rows p·b … (p+1)·b − 1 of the
  global batch). The loop uses `waveform` (B, N) float32 — or `mel_fusion` (B, 4, T, mel) and
  `longer` (B,) for fused models — and `input_ids`, `attention_mask` [, `token_type_ids`] (B, 77)
  int32; other keys (`index`, `key`, …) stay on the host. `StopIteration` ends the run early.
* `it.get_state()` → a JSON-serialisable value, taken right after the batch of step s was drawn
  and stored in checkpoint s; `it.set_state(value)` on resume must make the next `next(it)` return
  exactly the batch the uninterrupted run drew for step s + 1.

Files in the workdir: `config.json` (the resolved config), `checkpoints/<step>/` (Orbax; see
clapjax.train.checkpoint), `metrics.jsonl` (process 0: one line per logged step, with the exact
float32 loss; on resume, lines after the restored step are dropped, so the file always describes
one uninterrupted run).

Resume is automatic: if `checkpoints/` holds a step, the run continues from the latest one (state,
rng, data position); otherwise it starts fresh (optionally with pretrained towers, see
clapjax.train.init_towers).

Multi-process runs: an exception on one process stops every process (each exits with status
`distributed.FAILED_EXIT` and a message naming the failing process and its error) instead of
leaving the others waiting in a collective; see clapjax.train.distributed.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import numpy as np

from clapjax.embedding import enable_compilation_cache
from clapjax.train import checkpoint as ckpt_lib
from clapjax.train import config as config_lib
from clapjax.train import distributed, sharding, step as step_lib

MODEL_KEYS = ("waveform", "mel_fusion", "longer", "input_ids", "attention_mask", "token_type_ids")
METRICS_FILE, CONFIG_FILE = "metrics.jsonl", "config.json"


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


# --- data ------------------------------------------------------------------------------------------

class RandomBatches:
    """Random waveforms and token ids, a pure function of (seed, batch index, row): for tests and
    smoke runs. Steps listed in `nan_steps` (0-based batch indices) carry NaN audio."""

    def __init__(self, global_batch: int, clip_samples: int, vocab_size: int, *, text_length: int = 77,
                 seed: int = 0, process_index: int = 0, process_count: int = 1, nan_steps=(), pad_id: int = 1):
        if global_batch % process_count:
            raise ValueError(f"batch {global_batch} is not divisible by {process_count} processes")
        self.local = global_batch // process_count
        self.first_row = process_index * self.local
        self.clip_samples, self.vocab, self.length = clip_samples, vocab_size, text_length
        self.seed, self.nan_steps, self.pad_id = seed, frozenset(int(s) for s in nan_steps), pad_id
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows = range(self.first_row, self.first_row + self.local)
        wav = np.empty((self.local, self.clip_samples), np.float32)
        ids = np.full((self.local, self.length), self.pad_id, np.int32)
        mask = np.zeros((self.local, self.length), np.int32)
        for i, row in enumerate(rows):
            r = np.random.default_rng((self.seed, self.index, row))
            wav[i] = r.uniform(-1.0, 1.0, self.clip_samples).astype(np.float32)
            n = int(r.integers(4, self.length + 1))
            ids[i, :n] = r.integers(3, self.vocab, n)
            ids[i, 0], ids[i, n - 1] = 0, 2            # <s> … </s>, RoBERTa's ids
            mask[i, :n] = 1
        if self.index in self.nan_steps:
            wav[:] = np.nan
        self.index += 1
        return {"waveform": wav, "input_ids": ids, "attention_mask": mask,
                "index": np.asarray(list(rows), np.int32)}

    def get_state(self) -> dict:
        return {"index": self.index}

    def set_state(self, state: Mapping) -> None:
        self.index = int(state["index"])


def make_data_iterator(cfg, model_cfg, process_index: int | None = None, process_count: int | None = None):
    """The iterator `cfg.data` describes, for this process."""
    p = jax.process_index() if process_index is None else process_index
    n = jax.process_count() if process_count is None else process_count
    data = cfg.data
    if data.kind == "random":
        return RandomBatches(cfg.train.batch_size, model_cfg.frontend.clip_samples, int(data.get("vocab_size", 300)),
                             text_length=int(data.get("text_length", 77)), seed=int(data.get("seed", cfg.seed)),
                             process_index=p, process_count=n, nan_steps=tuple(data.get("nan_steps", ())))
    from clapjax.tokenizer import Tokenizer
    from clapjax.train import data as data_lib
    if not data.get("tokenizer"):
        raise ValueError("data.tokenizer must name a tokenizer directory (vocab.json + merges.txt, …)")
    plain = config_lib.to_dict(cfg)["data"]
    fixed = {"global_batch_size": int(cfg.train.batch_size), "seed": int(plain.get("seed", cfg.seed))}
    if model_cfg.enable_fusion:
        fixed["truncating"] = "fusion"
    return data_lib.make_iterator(data_lib.source_from_config(plain), Tokenizer(data.tokenizer, kind=cfg.model.tmodel),
                                  model_cfg.frontend, data_lib.config_from_mapping(plain, **fixed),
                                  process_index=p, process_count=n)


def device_batch(local_batch: Mapping[str, np.ndarray], mesh) -> dict:
    """This process's rows → the global, batch-sharded arrays the step takes."""
    return sharding.global_batch_from_local({k: v for k, v in local_batch.items() if k in MODEL_KEYS}, mesh)


# --- logging ---------------------------------------------------------------------------------------

class MetricsLog:
    """metrics.jsonl and TensorBoard scalars (`tb/`) of process 0 (other processes write nothing).
    Wall-clock figures (step time, samples/s) go to TensorBoard only, so metrics.jsonl stays a pure
    function of the run (resumes are compared with it bit for bit)."""

    def __init__(self, path: str, resume_step: int, enabled: bool, batch_size: int = 0):
        self.path, self.enabled, self.batch_size = path, enabled, batch_size
        self._tb, self._last = None, None
        if not enabled:
            return
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(os.path.dirname(path), "tb"), purge_step=resume_step + 1)
        kept = []
        if resume_step > 0 and os.path.exists(path):
            with open(path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
        with open(path, "w") as f:
            f.writelines(kept)

    def write(self, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        step, now = int(record["step"]), time.time()
        scalars = {f"train/{k}": v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self._last is not None and step > self._last[0]:
            per_step = (now - self._last[1]) / (step - self._last[0])
            scalars.update({"perf/step_time_s": per_step, "perf/samples_per_s": self.batch_size / per_step})
        self._last = (step, now)
        for k, v in scalars.items():
            self._tb.add_scalar(k, float(v), step)
        self._tb.flush()

    def scalar(self, name: str, value: float, step: int) -> None:
        """Extra scalars (e.g. periodic evaluation) beside the training curves."""
        if self.enabled:
            self._tb.add_scalar(name, float(value), step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _record(step: int, metrics: Mapping) -> dict:
    out = {"step": step}
    for k, v in jax.device_get(dict(metrics)).items():
        v = np.asarray(v)
        out[k] = bool(v) if v.dtype == bool else (int(v) if v.dtype.kind in "iu" else float(v))
    return out


def read_metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, METRICS_FILE)) as f:
        return [json.loads(line) for line in f if line.strip()]


# --- the run ---------------------------------------------------------------------------------------

def _check_resumable(saved: Mapping, cfg) -> None:
    now = config_lib.to_dict(cfg)
    for section in ("model", "loss"):
        if saved.get(section) != now[section]:
            raise ValueError(f"the checkpoint was trained with a different `{section}` section; resume with the "
                             f"same settings or use a new workdir (saved: {saved.get(section)}, now: {now[section]})")


def _progress_bar(total: int, start: int, enabled: bool):
    """A tqdm bar over the steps on process 0's terminal (silent when output is not a terminal)."""
    from tqdm import tqdm
    return tqdm(total=total, initial=start, unit="step", disable=not (enabled and sys.stderr.isatty()))


def train(cfg, workdir: str, data_iter: Iterator | None = None, *, log=print, hooks: Sequence[Callable] = ()) -> dict:
    """Train (or resume) the run `cfg` describes in `workdir`; returns a summary dict.

    `hooks` are called after every step as `hook(step, state, setup, metrics_log)` (state on device;
    e.g. periodic evaluation: `setup.template.merge(state["params"], state["batch_stats"])` is the model,
    and `metrics_log.scalar(name, value, step)` puts its figures in TensorBoard)."""
    distributed.initialize(cfg.distributed)
    # a failure on one process stops the whole group, before the run's resources are closed
    with contextlib.ExitStack() as resources, distributed.one_failure_stops_all():
        summary = _run(cfg, workdir, data_iter, log, hooks, resources)
    stopped = summary["stopped"]
    if stopped and "non-finite" in stopped:
        raise NonFiniteLossError(stopped)
    if stopped and distributed.is_main():
        log(stopped, file=sys.stderr) if log is print else log(stopped)
    return summary


def _run(cfg, workdir: str, data_iter: Iterator | None, log, hooks: Sequence[Callable],
         resources: contextlib.ExitStack) -> dict:
    """The body of `train`; what it opens it registers with `resources`."""
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

    start = checkpointer.latest_step() or 0
    if start:
        state, data_state, saved_cfg = checkpointer.restore(setup.abstract, start)
        _check_resumable(saved_cfg, cfg)
        data_iter.set_state(data_state)
        log(f"resumed from step {start} ({checkpointer.directory})") if main else None
    else:
        state = step_lib.init_state(setup, cfg, model_cfg, int(cfg.seed))
        if cfg.init.get("checkpoint"):             # fine-tuning: the whole model from a clapjax checkpoint
            from clapjax.train import init_towers
            state = init_towers.load_checkpoint(cfg, setup, state, log=log if main else (lambda *_: None))
        elif cfg.init.text or cfg.init.audio:
            from clapjax.train import init_towers
            state = init_towers.apply_to_state(cfg, setup, state, log=log if main else (lambda *_: None))
    metrics_log = MetricsLog(os.path.join(workdir, METRICS_FILE), start, main, int(cfg.train.batch_size))
    resources.callback(metrics_log.close)
    step_fn = step_lib.train_step(setup)
    total, every, log_every = int(cfg.train.steps), int(cfg.checkpoint.every), int(cfg.train.log_every)
    max_bad = int(cfg.train.max_nonfinite_in_row)

    pending: tuple[int, Any] | None = None
    stopped, t0, s = "", time.time(), start

    def flush():
        nonlocal pending
        if pending is None:
            return None
        rec = _record(*pending)
        pending = None
        if rec["step"] % log_every == 0 or not rec["finite"] or rec["step"] == total:
            metrics_log.write(rec)
            if main:
                log(f"step {rec['step']}: loss {rec['loss']:.6f} lr {rec.get('lr', 0):.3g} "
                    f"skipped {rec['nonfinite_total']} ({time.time() - t0:.1f}s)")
        return rec

    progress = _progress_bar(total, start, main)
    resources.callback(progress.close)
    while s < total:
        waited = time.time()
        try:
            local = next(data_iter)
        except StopIteration:
            stopped = f"the data ran out after step {s}"
            break
        metrics_log.scalar("perf/data_wait_s", time.time() - waited, s + 1)
        state, metrics = step_fn(state, device_batch(local, mesh))
        s += 1
        progress.update(1)
        rec = flush()                      # the previous step's metrics: the device stays busy
        pending = (s, metrics)
        if s % every == 0 or s == total:
            rec = flush() or rec
            checkpointer.save(s, state, data_iter.get_state(), resolved)
        for hook in hooks:
            hook(s, state, setup, metrics_log)
        if rec is not None and rec["nonfinite_streak"] >= max_bad:
            stopped = (f"{rec['nonfinite_streak']} steps in a row had a non-finite loss or gradient "
                       f"(last: step {rec['step']}); stopping (train.max_nonfinite_in_row={max_bad})")
            break
    last = flush()
    if last is not None and last["nonfinite_streak"] >= max_bad and not stopped:
        stopped = (f"{last['nonfinite_streak']} steps in a row had a non-finite loss or gradient; stopping "
                   f"(train.max_nonfinite_in_row={max_bad})")
    if stopped and s % every and s != total and checkpointer.latest_step() != s:
        checkpointer.save(s, state, data_iter.get_state(), resolved)
    if cfg.get("export", {}).get("model") and not (stopped and "non-finite" in stopped):
        from clapjax.train import init_towers  # the converter's format: clapjax eval / embed / export read it
        init_towers.export_model(cfg, setup, state, model_cfg, os.path.join(workdir, "model"))
        log(f"trained model: {os.path.join(workdir, 'model')}") if main else None
    return {"step": s, "stopped": stopped, "nonfinite_total": int(jax.device_get(state["nonfinite_total"]))}
