"""CLAP's projection and transform heads, with PyTorch `nn.Sequential` indices as attribute paths.

`audio_projection` / `text_projection` = Sequential(Linear(d, 512), ReLU, Linear(512, 512)) →
keys `.0.*`, `.2.*`; `audio_transform` / `text_transform` = LAION's `MLPLayers([512, 512, 512])`
= `sequential`: Linear, ReLU, Dropout(0.1), Linear → keys `.sequential.0.*`, `.sequential.3.*`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from clapjax import layers as L


class Act(nnx.Module):
    """A parameter-free activation holding its place in a Sequential (as torch's nn.ReLU does)."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, x):
        return L.activation(self.name)(x)


class Sequential(nnx.List):
    """`torch.nn.Sequential`: children at indices 0, 1, …; dropout layers get the train flags."""

    def __call__(self, x, *, deterministic: bool = True, rngs: nnx.Rngs | None = None):
        for layer in self:
            x = layer(x, deterministic=deterministic, rngs=rngs) if isinstance(layer, nnx.Dropout) else layer(x)
        return x


def projection(din: int, dout: int, rngs: nnx.Rngs, *, act: str = "relu",
               prec: L.Precision = L.Precision()) -> Sequential:
    """Linear(din, dout) → act → Linear(dout, dout)."""
    return Sequential([L.linear(din, dout, ("embed", "joint"), rngs, prec=prec), Act(act),
                       L.linear(dout, dout, ("joint", "joint_out"), rngs, prec=prec)])


class MLPLayers(nnx.Module):
    """LAION's `MLPLayers(units=[d, d, d], dropout=0.1)`: the mlp-loss transform head."""

    def __init__(self, dim: int, rngs: nnx.Rngs, *, dropout: float = 0.1, prec: L.Precision = L.Precision()):
        self.sequential = Sequential([L.linear(dim, dim, ("joint", "joint_out"), rngs, prec=prec), Act("relu"),
                                      nnx.Dropout(dropout),
                                      L.linear(dim, dim, ("joint", "joint_out"), rngs, prec=prec)])

    def __call__(self, x, *, deterministic: bool = True, rngs: nnx.Rngs | None = None):
        return self.sequential(x, deterministic=deterministic, rngs=rngs)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """`torch.nn.functional.normalize(x, dim=-1)`: x / max(‖x‖, eps)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True))
    return (x / jnp.maximum(norm, eps)).astype(x.dtype)
