"""Retrieval and zero-shot metrics with LAION-CLAP's definitions, in jnp; and the run's metrics log
(`MetricsLog`: metrics.jsonl + TensorBoard, read back with `read_metrics`).

* `retrieval_metrics` = `laion_clap.training.train.get_metrics`: one caption per clip; mean and
  median rank, R@1/5/10 and mAP@10 (reciprocal rank cut at 10) in both directions, and the
  contrastive loss ('cumulative_loss'); the mlp-loss variant averages the two heads' logits.
* `clotho_audiocaps_metrics` = the metric part of `evaluate_clotho_audiocaps`: 5 captions per clip
  (clip-major: clip i owns text rows 5i … 5i+4); text→audio ranks each caption separately;
  audio→text takes the best of the 5 ranks for R@k, and its mAP@10 follows LAION's code, which
  numbers the captions ranked within the top 10 in caption order (its docstring, and Mei et al.'s
  original, sort them first: `a2t_map='sorted'`).
* `zero_shot_ranking_metrics` = LAION's zero-shot script (`evaluate/eval_zeroshot_classification.py`):
  each clip ranks the class embeddings, the class index is the ground truth; mean/median rank,
  R@1/5/10, mAP@10. `zero_shot_metrics` is its top-1 / top-5 / mAP@10 under the trainer's names.
  `class_embeddings` builds the classes as LAION's `zero_shot_classifier` (normalise per template,
  mean, renormalise).

Ranks are LAION's exactly, ties included (`laion_ranks`). LAION ranks with
`torch.argsort(descending=True)` on the CPU, an unstable sort: where a ground truth's logit equals
another entry of its row, its position is whatever libstdc++'s introsort leaves (train/torch_argsort.py).
So ranks are computed in two steps: under jit, one comparison per row against its ground-truth logit
(the stable rank: entries strictly greater, plus equal ones at a smaller index) and a count of rows
whose ground truth ties; only when that count is not zero are the logits brought to the host and
those rows' sorts replayed. Without ties (real-valued logits, in practice) everything stays on the
devices, runs unchanged on batch-sharded global arrays, and every output is a scalar. The metric
functions decide on the host whether a replay is needed, so they are called as they are, not inside
another jit.
"""
from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from clapjax.train import torch_argsort

_HIGHEST = jax.lax.Precision.HIGHEST
RECALL_AT = (1, 5, 10)
MAP_CUTOFF = 10
METRICS_FILE = "metrics.jsonl"


def logits(a: jax.Array, b: jax.Array, scale=1.0) -> jax.Array:
    """(scale·a) @ bᵀ in float32 at full matmul precision (no TF32 on GPUs). LAION writes
    `logit_scale * a @ b.t()`, which Python binds as (scale·a) @ bᵀ: the same order rounds the same
    way, so products that tie in LAION's logits tie here."""
    scaled = jnp.asarray(scale, jnp.float32) * a.astype(jnp.float32)
    return jnp.matmul(scaled, b.astype(jnp.float32).T, precision=_HIGHEST)


def ranks(logit_rows: jax.Array, target_cols: jax.Array) -> jax.Array:
    """(R,) 0-based stable rank of column `target_cols[r]` in row r of (R, C) `logit_rows`: entries
    strictly greater, plus equal ones at a smaller index (LAION's rank whenever the target ties with
    nothing; `laion_ranks` gives LAION's in every case)."""
    cols = jnp.arange(logit_rows.shape[1])
    gt = jnp.take_along_axis(logit_rows, target_cols[:, None], axis=1)
    before = (logit_rows > gt) | ((logit_rows == gt) & (cols[None, :] < target_cols[:, None]))
    return before.sum(axis=1).astype(jnp.int32)


@jax.jit
def _stable_ranks_and_ties(logit_rows: jax.Array, targets: jax.Array):
    """Stable ranks of (R, K) targets, the (R,) rows that have a target whose logit another entry shares,
    how many such rows there are, and how many logits are NaN."""
    pos = jnp.stack([ranks(logit_rows, targets[:, d]) for d in range(targets.shape[1])], axis=1)
    gt = jnp.take_along_axis(logit_rows, targets, axis=1)                          # (R, K)
    shared = jnp.stack([(logit_rows == gt[:, d:d + 1]).sum(axis=1) > 1 for d in range(targets.shape[1])], 1)
    tied = shared.any(axis=1)
    return pos, tied, tied.sum(), jnp.isnan(logit_rows).sum()


def _on_host(x) -> np.ndarray:
    """A (possibly multi-process, sharded) array as a NumPy array on every process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)


def laion_ranks(logit_rows: jax.Array, targets: jax.Array) -> jax.Array:
    """0-based position of each target column in its row as LAION's `torch.argsort(row,
    descending=True)` orders it, ties included. `targets` is (R,) (one per row → (R,)) or (R, K)
    (K per row, e.g. a clip's 5 captions → (R, K)). NaN logits are refused (torch sorts them first)."""
    if targets.ndim not in (1, 2) or targets.shape[0] != logit_rows.shape[0]:
        raise ValueError(f"targets must be (R,) or (R, K) for {logit_rows.shape[0]} rows, got {targets.shape}")
    many = targets.reshape(targets.shape[0], -1).astype(jnp.int32)
    pos, tied_rows, tied_count, nans = _stable_ranks_and_ties(logit_rows, many)
    if int(nans):
        raise ValueError(f"{int(nans)} logits are NaN: the embeddings hold NaN (a diverged or broken model)")
    if int(tied_count):
        rows, pos, many = _on_host(logit_rows), _on_host(pos).copy(), _on_host(many)
        for r in np.flatnonzero(_on_host(tied_rows)):
            position = np.empty(rows.shape[1], np.int32)
            position[torch_argsort.descending_order(rows[r])] = np.arange(rows.shape[1], dtype=np.int32)
            pos[r] = position[many[r]]
        pos = jnp.asarray(pos)
    return pos.reshape(targets.shape)


def rank_summary(preds: jax.Array, prefix: str, valid: jax.Array | None = None) -> dict[str, jax.Array]:
    """LAION's summary of 0-based ranks: mean/median rank (1-based; median floored), R@k, mAP@10,
    keyed '{prefix}_R@1' … (bare 'R@1' … when prefix is ''); with `valid`, over those entries only."""
    p = preds.astype(jnp.float32)
    if valid is None:   # plain reductions: no mask array beside the (maybe sharded) ranks
        mean, median = jnp.mean, jnp.median(p)
    else:
        count = jnp.maximum(valid.sum(), 1)

        def mean(x):
            return jnp.where(valid, x, 0.0).sum() / count
        median = jnp.nanmedian(jnp.where(valid, p, jnp.nan))
    key = f"{prefix}_" if prefix else ""
    out = {f"{key}mean_rank": mean(p) + 1.0, f"{key}median_rank": jnp.floor(median) + 1.0}
    for k in RECALL_AT:
        out[f"{key}R@{k}"] = mean(p < k)
    out[f"{key}mAP@{MAP_CUTOFF}"] = mean(jnp.where(p < MAP_CUTOFF, 1.0 / (p + 1.0), 0.0))
    return out


def cross_entropy(logit_rows: jax.Array, target_cols: jax.Array) -> jax.Array:
    """Mean cross-entropy of rows against integer targets (torch `F.cross_entropy`)."""
    gt = jnp.take_along_axis(logit_rows, target_cols[:, None], axis=1)[:, 0]
    return (jax.nn.logsumexp(logit_rows, axis=1) - gt).mean()


@jax.jit
def _retrieval_logits(audio, text, logit_scale_a, audio_mlp, text_mlp, logit_scale_t):
    """get_metrics' loss and its ranking logits, per audio (N, N) and per text (N, N)."""
    labels = jnp.arange(audio.shape[0])
    if audio_mlp is None:
        per_audio = logits(audio, text, logit_scale_a)
        per_text = per_audio.T
        loss = (cross_entropy(per_audio, labels) + cross_entropy(per_text, labels)) / 2
        return loss, per_audio, per_text
    a_pa = logits(audio, text_mlp, logit_scale_a)
    t_pa = logits(audio_mlp, text, logit_scale_t)
    loss = (cross_entropy(a_pa, labels) + cross_entropy(a_pa.T, labels) + cross_entropy(t_pa, labels)
            + cross_entropy(t_pa.T, labels)) / 4
    return loss, (a_pa + t_pa) / 2, (a_pa.T + t_pa.T) / 2


def retrieval_metrics(audio: jax.Array, text: jax.Array, logit_scale_a, audio_mlp: jax.Array | None = None,
                      text_mlp: jax.Array | None = None, logit_scale_t=None) -> dict[str, jax.Array]:
    """LAION's `get_metrics` for N clips with one caption each (row i of `text` belongs to clip i).

    Scales are the exp'ed ones (what the model returns). With `audio_mlp`/`text_mlp`/`logit_scale_t`
    (LAION's --clap-mlploss) the loss has 4 terms and the ranking logits are the mean of
    scale_a·a·t_mlpᵀ and scale_t·a_mlp·tᵀ.
    """
    n = audio.shape[0]
    if text.shape[0] != n:
        raise ValueError(f"retrieval_metrics needs one caption per clip: {n} clips, {text.shape[0]} texts")
    mlp = (audio_mlp, text_mlp, logit_scale_t)
    if any(x is not None for x in mlp) and any(x is None for x in mlp):
        raise ValueError("the mlp variant needs audio_mlp, text_mlp and logit_scale_t together")
    loss, per_audio, per_text = _retrieval_logits(audio, text, logit_scale_a, *mlp)
    labels = jnp.arange(n)
    out = {"cumulative_loss": loss, "num_samples": jnp.asarray(n)}
    out.update(rank_summary(laion_ranks(per_audio, labels), "audio_to_text"))
    out.update(rank_summary(laion_ranks(per_text, labels), "text_to_audio"))
    return out


@functools.partial(jax.jit, static_argnames=("captions_per_clip",))
def _clotho_logits(audio, text, logit_scale_a, captions_per_clip: int):
    """evaluate_clotho_audiocaps' loss and its logits per audio (N, K·N) and per text (K·N, N)."""
    n, k = audio.shape[0], captions_per_clip
    per_audio = logits(audio, text, logit_scale_a)
    labels = jnp.arange(n)
    by_caption = per_audio.reshape(n, n, k)                          # [audio, clip, caption]
    a2t_loss = jnp.mean(jnp.stack([cross_entropy(by_caption[:, :, d], labels) for d in range(k)]))
    t2a_loss = jnp.mean(jnp.stack([cross_entropy(by_caption[:, :, d].T, labels) for d in range(k)]))
    return (a2t_loss + t2a_loss) / 2, per_audio, per_audio.T


def clotho_audiocaps_metrics(audio: jax.Array, text: jax.Array, logit_scale_a, *, captions_per_clip: int = 5,
                             a2t_map: str = "laion") -> dict[str, jax.Array]:
    """The metrics of LAION's `evaluate_clotho_audiocaps` for N clips and K·N captions (clip-major).

    `a2t_map='laion'` reproduces laion_clap's audio→text mAP@10 exactly; 'sorted' is the
    definition its docstring states (captions in the top 10 numbered by rank).
    """
    if a2t_map not in ("laion", "sorted"):
        raise ValueError(f"a2t_map must be 'laion' or 'sorted', got {a2t_map!r}")
    n, k = audio.shape[0], captions_per_clip
    if text.shape[0] != n * k:
        raise ValueError(f"{n} clips with {k} captions each need {n * k} texts, got {text.shape[0]}")
    loss, per_audio, per_text = _clotho_logits(audio, text, logit_scale_a, k)
    out = {"num_samples": jnp.asarray(n), "cumulative_loss": loss}
    # text → audio: every caption ranks the clips (LAION concatenates caption d's ranks over d; the
    # summary does not depend on the order)
    clips = jnp.arange(n)
    out.update(rank_summary(laion_ranks(per_text, jnp.repeat(clips, k)), "text_to_audio"))
    # audio → text: position of each of the clip's own captions among all K·N texts, in caption order
    pos = laion_ranks(per_audio, clips[:, None] * k + jnp.arange(k)[None, :])     # (N, K)
    if a2t_map == "sorted":
        pos = jnp.sort(pos, axis=1)
    hit = pos < MAP_CUTOFF
    order = jnp.cumsum(hit, axis=1).astype(jnp.float32)              # 1, 2, … among the hits
    ap = jnp.where(hit, order / (pos + 1.0), 0.0).sum(axis=1) / k
    out[f"audio_to_text_mAP@{MAP_CUTOFF}"] = ap.mean()
    best = pos.min(axis=1)
    for r in RECALL_AT:
        out[f"audio_to_text_R@{r}"] = (best < r).mean()
    return out


def class_embeddings(text: jax.Array) -> jax.Array:
    """(C, T, D) embeddings of C classes × T prompt templates → (C, D) class embeddings:
    L2-normalised per prompt, averaged over templates, renormalised (LAION/open_clip)."""
    t = text.astype(jnp.float32)
    t = t / jnp.maximum(jnp.linalg.norm(t, axis=-1, keepdims=True), 1e-12)
    m = t.mean(axis=1)
    return m / jnp.linalg.norm(m, axis=-1, keepdims=True)


_scores = jax.jit(logits)


def zero_shot_ranking_metrics(audio: jax.Array, classes: jax.Array, labels, logit_scale=1.0) -> dict[str, jax.Array]:
    """LAION's zero-shot script (`evaluate_zeroshot`): each of N clips ranks the C `classes` by
    logit_scale·audio·classᵀ and the ground truth is its class index `labels[i]`.

    Returns 'mean_rank', 'median_rank' (1-based, median floored), 'R@1', 'R@5', 'R@10', 'mAP@10'
    (LAION keys them '{dataset}_R@1' …) and 'num_samples', over the clips whose label is ≥ 0
    (−1: the task does not apply to that clip; LAION's script has none). `audio` (N, D) and
    `classes` (C, D) are unit embeddings (`class_embeddings` for prompt templates); `logit_scale`
    (LAION passes the model's) never changes an order but, rounding, can make two logits equal.
    """
    labels = jnp.asarray(labels, jnp.int32)
    if labels.shape != (audio.shape[0],):
        raise ValueError(f"labels must be one class index per clip ({audio.shape[0]},), got {labels.shape}")
    if int(labels.max(initial=-1)) >= classes.shape[0]:
        raise ValueError(f"label {int(labels.max())} is not a class index: {classes.shape[0]} classes")
    valid = labels >= 0
    scores = _scores(audio, classes, logit_scale)
    out = rank_summary(laion_ranks(scores, jnp.maximum(labels, 0)), "", valid)
    out["num_samples"] = valid.sum()
    return out


def zero_shot_metrics(audio: jax.Array, classes: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
    """Top-1/top-5 accuracy and mAP@10 of the true class (`zero_shot_ranking_metrics`' R@1, R@5 and
    mAP@10), over clips whose label is ≥ 0 (label −1 = the task does not apply to that clip)."""
    m = zero_shot_ranking_metrics(audio, classes, labels)
    return {"top1": m["R@1"], "top5": m["R@5"], f"mAP@{MAP_CUTOFF}": m[f"mAP@{MAP_CUTOFF}"],
            "num_samples": m["num_samples"]}


def to_python(metrics: Mapping[str, jax.Array], prefix: str = "") -> dict[str, float]:
    """Device scalars → Python floats (ints for counts), optionally prefixed 'name/'."""
    out = {}
    for key, v in metrics.items():
        x = np.asarray(jax.device_get(v))
        out[f"{prefix}{key}"] = int(x) if np.issubdtype(x.dtype, np.integer) else float(x)
    return out


def chance_levels(num_candidates: int) -> dict[str, float]:
    """What uniform random ranking scores: R@k = k/N, mAP@10 = H(min(10,N))/N, mean rank (N+1)/2."""
    n = int(num_candidates)
    if n < 1:
        raise ValueError(f"chance_levels needs at least one candidate, got {n}")
    out = {f"R@{k}": min(k, n) / n for k in RECALL_AT}
    out[f"mAP@{MAP_CUTOFF}"] = sum(1.0 / r for r in range(1, min(MAP_CUTOFF, n) + 1)) / n
    out["mean_rank"] = (n + 1) / 2
    return out


# --- the run's log ---------------------------------------------------------------------------------

class MetricsLog:
    """metrics.jsonl and TensorBoard scalars (`tb/`) of process 0 (other processes write nothing).
    Wall-clock figures (step time, samples/s) go to TensorBoard; the loop's interval figures
    (clapjax.train.throughput) also sit in a record's `perf` object, apart from the run's own figures,
    which stay a pure function of the run (resumes compare those bit for bit)."""

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


def read_metrics(workdir: str) -> list[dict]:
    """The records of a run's metrics.jsonl, one per logged step."""
    with open(os.path.join(workdir, METRICS_FILE)) as f:
        return [json.loads(line) for line in f if line.strip()]
