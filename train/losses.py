"""Contrastive losses in float32 on global, batch-sharded embeddings.

Scale conventions (as LAION's code passes them):
* `clip_loss` / `clip_mlp_loss` take the *exp'ed* logit scales, exactly what `CLAPModel.__call__`
  returns (LAION's `ClipLoss.forward(audio, text, logit_scale_a=exp(..), logit_scale_t=exp(..))`).
  The clamp of the *log* scales to [0, ln 100] belongs to the train step (after the update), as
  in LAION's train loop; the losses never clamp.
* `siglip_loss` / `siglip_ring_loss` take the *log* temperature `log_t` and the bias `b`
  (SigLIP: logits = exp(t')·⟨a, x⟩ + b), the parametrisation SigLIP learns.

All inputs are cast to float32 (bf16 towers still get an f32 loss and f32 gradients).

Sharding: embeddings are (B, D) with the batch over the mesh's batch axes. The InfoNCE and the
all-gather SigLIP losses constrain every logits matrix to (local rows × global columns), so each
device holds b×B logits and XLA all-gathers the (B, D) columns; the ring SigLIP loss keeps the
columns sharded too and passes them around the ring with `ppermute`, so no device ever holds more
than b×b logits (the backward pass recomputes each block instead of storing it). Without a mesh
(argument or `jax.set_mesh` context) they are plain single-device functions.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from clapjax.train import sharding

ROWS = ("batch", None)


def _f32_pair(a: jax.Array, b: jax.Array, what: str) -> tuple[jax.Array, jax.Array]:
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"{what}: expected two (batch, dim) arrays of one shape, got {a.shape} and {b.shape}")
    return a.astype(jnp.float32), b.astype(jnp.float32)


def _scalar_f32(x, what: str) -> jax.Array:
    x = jnp.asarray(x, jnp.float32)
    if x.size != 1:
        raise ValueError(f"{what} must be a scalar, got shape {x.shape}")
    return x.reshape(())


def _diag_mask(n_rows: int, n_cols: int, row_offset=0) -> jax.Array:
    """Boolean (rows, cols) mask of the positives; built from iotas so it partitions like logits."""
    rows = jax.lax.broadcasted_iota(jnp.int32, (n_rows, n_cols), 0) + row_offset
    cols = jax.lax.broadcasted_iota(jnp.int32, (n_rows, n_cols), 1)
    return rows == cols


def _cross_entropy_diag(logits: jax.Array, mesh) -> jax.Array:
    """mean_i CE(logits[i], label i) with each device holding its rows of `logits` only."""
    logits = sharding.constrain(logits, ROWS, mesh)
    positive = jnp.sum(jnp.where(_diag_mask(*logits.shape), logits, 0.0), axis=1)
    return jnp.mean(jax.nn.logsumexp(logits, axis=1) - positive)


def _infonce(x: jax.Array, y: jax.Array, scale: jax.Array, mesh) -> jax.Array:
    """(CE(scale·x yᵀ) + CE(scale·y xᵀ)) / 2: both directions, each computed row-sharded.

    The second direction is its own product (not a transpose of the first), as LAION computes
    it, so that it too is laid out as local rows × global columns.
    """
    x, y = sharding.constrain(x, ROWS, mesh), sharding.constrain(y, ROWS, mesh)
    per_x = _cross_entropy_diag(scale * (x @ y.T), mesh)
    per_y = _cross_entropy_diag(scale * (y @ x.T), mesh)
    return (per_x + per_y) / 2


def clip_loss(audio: jax.Array, text: jax.Array, logit_scale_a, *, mesh: Mesh | None = None) -> jax.Array:
    """LAION's `ClipLoss` (mlp_loss=False): logit_scale_a in both directions, mean of the two CEs.

    `audio`, `text`: L2-normalised (B, D) embeddings; `logit_scale_a` = exp(log scale).
    """
    a, t = _f32_pair(audio, text, "clip_loss")
    return _infonce(a, t, _scalar_f32(logit_scale_a, "logit_scale_a"), mesh)


def clip_mlp_loss(audio: jax.Array, text: jax.Array, audio_mlp: jax.Array, text_mlp: jax.Array,
                  logit_scale_a, logit_scale_t, *, mesh: Mesh | None = None) -> jax.Array:
    """LAION's `ClipLoss(mlp_loss=True)`: mean of four CEs.

    audio vs text_mlp with logit_scale_a (both directions) and audio_mlp vs text with
    logit_scale_t (both directions); the scales are exp'ed.
    """
    a, t = _f32_pair(audio, text, "clip_mlp_loss")
    a_mlp, t_mlp = _f32_pair(audio_mlp, text_mlp, "clip_mlp_loss (mlp features)")
    if a_mlp.shape != a.shape:
        raise ValueError(f"clip_mlp_loss: mlp features {a_mlp.shape} differ from features {a.shape}")
    scale_a = _scalar_f32(logit_scale_a, "logit_scale_a")
    scale_t = _scalar_f32(logit_scale_t, "logit_scale_t")
    return (_infonce(a, t_mlp, scale_a, mesh) + _infonce(a_mlp, t, scale_t, mesh)) / 2


# --- SigLIP -----------------------------------------------------------------------------------------
def _sigmoid_block(a: jax.Array, x: jax.Array, scale: jax.Array, bias: jax.Array,
                   positives: jax.Array | None) -> jax.Array:
    """-Σ log σ(z·(scale·a xᵀ + bias)) over one block; z = +1 on `positives`, −1 elsewhere."""
    logits = scale * (a @ x.T) + bias
    z = -1.0 if positives is None else jnp.where(positives, 1.0, -1.0)
    return -jnp.sum(jax.nn.log_sigmoid(z * logits))


def siglip_loss(audio: jax.Array, text: jax.Array, log_t, bias, *, mesh: Mesh | None = None) -> jax.Array:
    """SigLIP's sigmoid loss, all-gather form: -1/B Σ_ij log σ(z_ij (exp(log_t)·a_i·x_j + bias)).

    z_ij = 1 for i = j else −1; normalised by the batch size as in the SigLIP paper. Each device
    holds its b rows against all B columns.
    """
    a, t = _f32_pair(audio, text, "siglip_loss")
    scale = jnp.exp(_scalar_f32(log_t, "log_t"))
    bias = _scalar_f32(bias, "bias")
    a, t = sharding.constrain(a, ROWS, mesh), sharding.constrain(t, ROWS, mesh)
    logits = sharding.constrain(scale * (a @ t.T) + bias, ROWS, mesh)
    z = jnp.where(_diag_mask(*logits.shape), 1.0, -1.0)
    return -jnp.sum(jax.nn.log_sigmoid(z * logits)) / a.shape[0]


def siglip_ring_loss(audio: jax.Array, text: jax.Array, log_t, bias, mesh: Mesh,
                     axis: str | tuple[str, ...] = ("data", "fsdp")) -> jax.Array:
    """SigLIP's loss with the text chunks passed around a ring of devices (`shard_map` + `ppermute`).

    Device k holds audio rows and text rows k; at step s it scores its audio against the text
    chunk of device k−s, so after n−1 shifts every pair was seen, and the largest logits array
    any device holds is b×b. Each block is rematerialised in the backward pass (jax.checkpoint),
    so the b×b blocks are not stored either. Equal to `siglip_loss` up to summation order.
    """
    a, t = _f32_pair(audio, text, "siglip_ring_loss")
    axis = (axis,) if isinstance(axis, str) else tuple(axis)
    missing = [name for name in axis if name not in mesh.shape]
    if missing:
        raise ValueError(f"ring axis {missing} not in mesh axes {tuple(mesh.shape)}")
    n = math.prod(mesh.shape[name] for name in axis)
    batch = a.shape[0]
    if batch % n:
        raise ValueError(f"siglip_ring_loss: batch {batch} is not divisible by the ring size {n}")
    log_t, bias = _scalar_f32(log_t, "log_t"), _scalar_f32(bias, "bias")
    shift = [(i, (i + 1) % n) for i in range(n)]
    block = jax.checkpoint(_sigmoid_block)

    def local(a_local, t_local, log_t, bias):
        scale = jnp.exp(log_t)
        b = a_local.shape[0]
        loss = block(a_local, t_local, scale, bias, _diag_mask(b, b))

        def step(carry, _):
            t_chunk, acc = carry
            t_chunk = jax.lax.ppermute(t_chunk, axis, perm=shift)
            return (t_chunk, acc + block(a_local, t_chunk, scale, bias, None)), None

        (_, loss), _ = jax.lax.scan(step, (t_local, loss), None, length=n - 1)
        return jax.lax.psum(loss, axis) / batch

    rows = P(axis)
    ring = sharding.shard_map(local, mesh, in_specs=(rows, rows, P(), P()), out_specs=P())
    return ring(a, t, log_t, bias)


# --- the registry: the one place that knows the loss names -------------------------------------------
# Each takes the f32 features from the train-mode forward ((audio, text) or (audio, text, audio_mlp,
# text_mlp)), the flat params (log logit scales, the loss's own parameters) and the mesh.
SIGLIP_PARAMS = ("loss.siglip_log_t", "loss.siglip_bias")   # SigLIP's learnt log temperature and bias


def _clip(feats, params, mesh):
    return clip_loss(feats[0], feats[1], jnp.exp(params["logit_scale_a"]), mesh=mesh)


def _clip_mlp(feats, params, mesh):
    if len(feats) < 4:
        raise ValueError("loss 'clip_mlp' needs a model with transform heads")
    return clip_mlp_loss(feats[0], feats[1], feats[2], feats[3], jnp.exp(params["logit_scale_a"]),
                         jnp.exp(params["logit_scale_t"]), mesh=mesh)


def _siglip(feats, params, mesh):
    return siglip_loss(feats[0], feats[1], *(params[k] for k in SIGLIP_PARAMS), mesh=mesh)


def _siglip_ring(feats, params, mesh):
    return siglip_ring_loss(feats[0], feats[1], *(params[k] for k in SIGLIP_PARAMS), mesh,
                            axis=sharding.batch_axes(mesh))


@dataclasses.dataclass(frozen=True)
class Loss:
    fn: Callable[[tuple, dict, Mesh | None], jax.Array]
    own_params: tuple[str, ...] = ()      # learnt parameters the loss adds beside the model's
    needs_transform_heads: bool = False   # LAION's mlp-loss reads the transform heads' features


LOSSES = {"clip": Loss(_clip), "clip_mlp": Loss(_clip_mlp, needs_transform_heads=True),
          "siglip": Loss(_siglip, SIGLIP_PARAMS), "siglip_ring": Loss(_siglip_ring, SIGLIP_PARAMS)}
