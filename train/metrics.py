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
* `zero_shot_metrics`: top-1, top-5 and mAP@10 of the true class among class embeddings built by
  `class_embeddings` (LAION's `zero_shot_classifier`: normalise per template, mean, renormalise).

A rank is the position of the ground truth in a stable descending sort of its row: the number of
entries strictly greater, plus equal entries at a smaller index. That equals LAION's
`torch.argsort(descending=True)` whenever the row has no ties (always, for real-valued logits in
practice), and is deterministic when it does. No sort is done: each row needs one comparison with
its ground-truth logit, so the functions run unchanged on batch-sharded global arrays under jit
(each device compares its rows against the global columns), and every output is a scalar.
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

_HIGHEST = jax.lax.Precision.HIGHEST
RECALL_AT = (1, 5, 10)
MAP_CUTOFF = 10
METRICS_FILE = "metrics.jsonl"


def logits(a: jax.Array, b: jax.Array, scale=1.0) -> jax.Array:
    """scale · a @ bᵀ in float32 at full matmul precision (no TF32 on GPUs)."""
    return jnp.asarray(scale, jnp.float32) * jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32).T,
                                                        precision=_HIGHEST)


def ranks(logit_rows: jax.Array, target_cols: jax.Array) -> jax.Array:
    """(R,) 0-based rank of column `target_cols[r]` in row r of (R, C) `logit_rows`."""
    cols = jnp.arange(logit_rows.shape[1])
    gt = jnp.take_along_axis(logit_rows, target_cols[:, None], axis=1)
    before = (logit_rows > gt) | ((logit_rows == gt) & (cols[None, :] < target_cols[:, None]))
    return before.sum(axis=1).astype(jnp.int32)


def rank_summary(preds: jax.Array, prefix: str) -> dict[str, jax.Array]:
    """LAION's summary of 0-based ranks: mean/median rank (1-based; median floored), R@k, mAP@10."""
    p = preds.astype(jnp.float32)
    out = {f"{prefix}_mean_rank": p.mean() + 1.0,
           f"{prefix}_median_rank": jnp.floor(jnp.median(p)) + 1.0}
    for k in RECALL_AT:
        out[f"{prefix}_R@{k}"] = (p < k).mean()
    out[f"{prefix}_mAP@{MAP_CUTOFF}"] = jnp.where(p < MAP_CUTOFF, 1.0 / (p + 1.0), 0.0).mean()
    return out


def cross_entropy(logit_rows: jax.Array, target_cols: jax.Array) -> jax.Array:
    """Mean cross-entropy of rows against integer targets (torch `F.cross_entropy`)."""
    gt = jnp.take_along_axis(logit_rows, target_cols[:, None], axis=1)[:, 0]
    return (jax.nn.logsumexp(logit_rows, axis=1) - gt).mean()


@jax.jit
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
    labels = jnp.arange(n)
    mlp = (audio_mlp, text_mlp, logit_scale_t)
    if any(x is not None for x in mlp):
        if any(x is None for x in mlp):
            raise ValueError("the mlp variant needs audio_mlp, text_mlp and logit_scale_t together")
        a_pa = logits(audio, text_mlp, logit_scale_a)
        t_pa = logits(audio_mlp, text, logit_scale_t)
        loss = (cross_entropy(a_pa, labels) + cross_entropy(a_pa.T, labels) + cross_entropy(t_pa, labels)
                + cross_entropy(t_pa.T, labels)) / 4
        per_audio = (a_pa + t_pa) / 2
        per_text = (a_pa.T + t_pa.T) / 2
    else:
        per_audio = logits(audio, text, logit_scale_a)
        per_text = per_audio.T
        loss = (cross_entropy(per_audio, labels) + cross_entropy(per_text, labels)) / 2
    out = {"cumulative_loss": loss, "num_samples": jnp.asarray(n)}
    out.update(rank_summary(ranks(per_audio, labels), "audio_to_text"))
    out.update(rank_summary(ranks(per_text, labels), "text_to_audio"))
    return out


@functools.partial(jax.jit, static_argnames=("captions_per_clip", "a2t_map"))
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
    per_audio = logits(audio, text, logit_scale_a)                  # (N, K·N)
    labels = jnp.arange(n)
    by_caption = per_audio.reshape(n, n, k)                          # [audio, clip, caption]
    a2t_loss = jnp.mean(jnp.stack([cross_entropy(by_caption[:, :, d], labels) for d in range(k)]))
    t2a_loss = jnp.mean(jnp.stack([cross_entropy(by_caption[:, :, d].T, labels) for d in range(k)]))
    out = {"num_samples": jnp.asarray(n), "cumulative_loss": (a2t_loss + t2a_loss) / 2}
    # text → audio: every caption ranks the clips; LAION concatenates caption d's ranks over d
    t2a = jnp.concatenate([ranks(by_caption[:, :, d].T, labels) for d in range(k)])
    out.update(rank_summary(t2a, "text_to_audio"))
    # audio → text: rank of each of the clip's own captions among all K·N texts
    own = labels[:, None] * k + jnp.arange(k)[None, :]               # (N, K) text rows of clip i
    pos = jnp.stack([ranks(per_audio, own[:, d]) for d in range(k)], axis=1)
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


@jax.jit
def zero_shot_metrics(audio: jax.Array, classes: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
    """Top-1/top-5 accuracy and mAP@10 of the true class, over clips whose label is ≥ 0
    (label −1 = the task does not apply to that clip)."""
    valid = labels >= 0
    scores = logits(audio, classes)
    r = ranks(scores, jnp.maximum(labels, 0)).astype(jnp.float32)
    count = jnp.maximum(valid.sum(), 1)

    def mean(x):
        return jnp.where(valid, x, 0.0).sum() / count
    return {"top1": mean(r < 1), "top5": mean(r < 5),
            f"mAP@{MAP_CUTOFF}": mean(jnp.where(r < MAP_CUTOFF, 1.0 / (r + 1.0), 0.0)),
            "num_samples": valid.sum()}


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


def read_metrics(workdir: str) -> list[dict]:
    """The records of a run's metrics.jsonl, one per logged step."""
    with open(os.path.join(workdir, METRICS_FILE)) as f:
        return [json.loads(line) for line in f if line.strip()]
