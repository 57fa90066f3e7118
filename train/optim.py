"""The optimizer: LAION-CLAP's AdamW / Adam recipe in optax, on flat `{dotted.path: array}` params.

LAION (training/main.py, scheduler.py, params.py) does:
* AdamW (torch: decoupled decay, eps outside the sqrt) with betas (0.9, 0.999), eps 1e-8 for
  non-ViT models; `--optimizer adam` sets every weight decay to 0;
* no weight decay for `p.ndim < 2 or 'bn' in n or 'ln' in n or 'bias' in n or 'logit_scale' in n`.
  Our parameter paths are the PyTorch names with only the leaf renamed (kernel/weight,
  scale/weight, embedding/weight), and no rename adds or removes those substrings, so the same
  predicate on our paths selects the same tensors (tests check it against the PyTorch names);
* `cosine_lr`: linear warmup `lr·(step+1)/warmup`, then half a cosine to 0 at the last step.

Additions of this trainer: global-norm clipping over the trainable parameters (0 = off, as LAION),
per-group learning-rate multipliers and freezing. The groups are `audio_branch`, `text_branch`,
`heads` (projections and mlp-loss transforms) and `logit_scale` (the model's temperatures and
the SigLIP loss parameters). A frozen group gets no optimizer state and no update.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from clapjax.model import LogitScale

OPTIMIZERS = ("adamw", "adam")   # LAION's --optimizer choices (adam: every weight decay 0)
# parameter groups for learning-rate multipliers and freezing (see param_group)
GROUPS = ("audio_branch", "text_branch", "heads", "logit_scale")
HEADS = ("audio_projection", "text_projection", "audio_transform", "text_transform")
LOSS_PREFIX = "loss."            # SigLIP's learnable temperature and bias live beside the model's params
NO_DECAY_SUBSTRINGS = ("bn", "ln", "bias", "logit_scale")
FROZEN = "frozen"


def lr_schedule(base_lr: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
    """LAION's `cosine_lr` as a function of the update count."""
    warmup = max(int(warmup_steps), 0)
    decay_steps = max(int(total_steps) - warmup, 1)

    def schedule(count):
        step = jnp.asarray(count, jnp.float32)
        warm = base_lr * (step + 1.0) / max(warmup, 1)
        e = step - warmup
        cos = 0.5 * (1.0 + jnp.cos(jnp.pi * e / decay_steps)) * base_lr
        return jnp.where(step < warmup, warm, cos)
    return schedule


def param_group(path: str) -> str:
    """The learning-rate / freezing group of a parameter path."""
    top = path.split(".", 1)[0]
    if top in ("audio_branch", "text_branch"):
        return top
    if top in HEADS:
        return "heads"
    if top.startswith("logit_scale") or path.startswith(LOSS_PREFIX):
        return "logit_scale"
    raise ValueError(f"parameter {path!r} belongs to no optimizer group (audio_branch, text_branch, "
                     f"{', '.join(HEADS)}, logit_scale_*, {LOSS_PREFIX}*)")


def decays(path: str, ndim: int, kind: type | None = None) -> bool:
    """LAION's weight-decay rule for one parameter (False = excluded from decay)."""
    if kind is not None and issubclass(kind, LogitScale):
        return False
    return ndim >= 2 and not any(s in path for s in NO_DECAY_SUBSTRINGS)


def decay_mask(params: Mapping[str, Any], kinds: Mapping[str, type] | None = None) -> dict[str, bool]:
    kinds = kinds or {}
    return {k: decays(k, np.ndim(v) if not hasattr(v, "ndim") else v.ndim, kinds.get(k)) for k, v in params.items()}


def _scale_per_leaf(mults: Mapping[str, float]) -> optax.GradientTransformation:
    """Multiply each leaf's update by its group's learning-rate multiplier (flat dict params)."""
    def update(updates, state, params=None):
        del params
        return {k: u if isinstance(u, optax.MaskedNode) or mults[k] == 1.0 else u * mults[k]
                for k, u in updates.items()}, state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(cfg, total_steps: int, params: Mapping[str, Any],
                   kinds: Mapping[str, type] | None = None) -> optax.GradientTransformation:
    """`cfg` is the config's `optim` section; `params` the flat (abstract) parameter dict."""
    if cfg.name not in OPTIMIZERS:
        raise ValueError(f"optim.name must be one of {OPTIMIZERS}, got {cfg.name!r}")
    groups = {k: param_group(k) for k in params}
    freeze = set(cfg.freeze)
    mults = {k: float(cfg.lr_mult.get(g, 1.0)) for k, g in groups.items()}
    trainable = [k for k, g in groups.items() if g not in freeze]
    if not trainable:
        raise ValueError(f"optim.freeze={tuple(freeze)} freezes every parameter")
    parts = []
    if cfg.grad_clip_norm and cfg.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(float(cfg.grad_clip_norm)))
    parts.append(optax.scale_by_adam(b1=float(cfg.beta1), b2=float(cfg.beta2), eps=float(cfg.eps)))
    wd = float(cfg.weight_decay) if cfg.name == "adamw" else 0.0   # LAION: adam ⇒ wd = 0
    if wd:
        parts.append(optax.add_decayed_weights(wd, mask=decay_mask(params, kinds)))
    parts.append(optax.scale_by_learning_rate(lr_schedule(float(cfg.lr), int(cfg.warmup_steps), total_steps)))
    parts.append(_scale_per_leaf(mults))
    train = optax.chain(*parts)
    labels = {k: (FROZEN if groups[k] in freeze else "train") for k in params}
    if not freeze:
        return train
    return optax.multi_transform({"train": train, FROZEN: optax.set_to_zero()}, labels)


def frozen_mask(cfg, params: Mapping[str, Any]) -> dict[str, bool]:
    """True for parameters of frozen groups (the step stops their gradients: no backward pass there)."""
    freeze = set(cfg.freeze)
    return {k: param_group(k) in freeze for k in params}


def learning_rate(cfg, total_steps: int, count) -> jax.Array:
    """The base learning rate after `count` updates (for logging)."""
    return lr_schedule(float(cfg.lr), int(cfg.warmup_steps), total_steps)(count)


def clamp_logit_scales(params: dict[str, jax.Array], max_log: float = math.log(100.0)) -> dict[str, jax.Array]:
    """LAION clamps the LOG temperatures to [0, ln 100] after every update (train.py)."""
    out = dict(params)
    for k in ("logit_scale_a", "logit_scale_t"):
        if k in out:
            out[k] = jnp.clip(out[k], 0.0, max_log)
    return out
