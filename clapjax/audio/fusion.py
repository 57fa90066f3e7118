"""Attentional feature fusion (AFF, 2-D) of LAION-CLAP's fused HTS-AT (`feature_fusion.AFF`).

`local_att` and `global_att` are `nnx.List`s indexed like LAION's `nn.Sequential`s, parameter-free
steps included (ReLU at local_att.2 / global_att.3, the global average pool at global_att.0), so
checkpoint keys line up: local_att.{0,3} conv, .{1,4} BN; global_att.{1,4} conv, .{2,5} BN.

out = 2·g·w + 2·l·(1−w), w = σ(local_att(g+l) + global_att(g+l)) — the factor 2 is LAION's.

Training-mode BatchNorm: LAION runs AFF on the sub-batch of "longer" clips only. We run it on every
row (static shapes) and pass `mask` so that batch statistics come from the selected rows only.
LAION duplicates a sub-batch of one row before the BNs (PyTorch refuses batch statistics over a
single value); a duplicated row has the same mean and biased variance as the row itself, so the
masked statistics equal LAION's (only PyTorch's unbiased running-variance update differs, which
our BatchNorm does not reproduce anyway, see `layers.batch_norm`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from clapjax import layers as L


def force_one_longer(longer: jax.Array, key: jax.Array) -> jax.Array:
    """LAION's training rule for fused batches: when no row is longer than a clip, one random row is flagged
    as longer, so that the fusion weights always receive a gradient. (B,) bool → (B,) bool."""
    b = longer.shape[0]
    pick = jax.random.randint(key, (), 0, b)
    return jnp.where(jnp.any(longer), longer, jnp.arange(b) == pick)


class ReLU(nnx.Module):
    """Parameter-free placeholder so List indices match torch's Sequential."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(x)


class GlobalAvgPool(nnx.Module):
    """`nn.AdaptiveAvgPool2d(1)` on NHWC: (B, H, W, C) → (B, 1, 1, C)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.mean(x, axis=(1, 2), keepdims=True)


class AFF(nnx.Module):
    def __init__(self, channels: int, rngs: nnx.Rngs, *, r: int = 4, prec: L.Precision = L.Precision()):
        inter = channels // r
        if inter < 1:
            raise ValueError(f"AFF: channels {channels} // r {r} leaves no bottleneck channels")

        def branch():
            return [L.conv2d(channels, inter, 1, rngs, prec=prec), L.batch_norm(inter, rngs, prec=prec), ReLU(),
                    L.conv2d(inter, channels, 1, rngs, prec=prec), L.batch_norm(channels, rngs, prec=prec)]
        self.local_att = nnx.List(branch())
        self.global_att = nnx.List([GlobalAvgPool()] + branch())

    @staticmethod
    def _run(seq, x, *, train: bool, mask):
        for layer in seq:
            if isinstance(layer, nnx.BatchNorm):
                x = layer(x, use_running_average=not train, mask=mask if train else None)
            else:
                x = layer(x)
        return x

    def __call__(self, x: jax.Array, residual: jax.Array, *, deterministic: bool = True,
                 rows: jax.Array | None = None) -> jax.Array:
        """x, residual (B, H, W, C) NHWC; `rows` (B,) bool: rows whose statistics count in training."""
        xa = x + residual
        mask = None if rows is None else rows[:, None, None, None]
        xl = self._run(self.local_att, xa, train=not deterministic, mask=mask)
        xg = self._run(self.global_att, xa, train=not deterministic, mask=mask)
        w = jax.nn.sigmoid(xl + xg)
        return 2 * x * w + 2 * residual * (1 - w)
