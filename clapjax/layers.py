"""Small building blocks shared by every tower.

Each constructor mirrors a PyTorch layer's defaults (LayerNorm eps 1e-5, exact GELU, exact
variance) so a tower built from them equals its PyTorch twin to float round-off, and tags every
parameter with `logical_axes` metadata that `clapjax.train.sharding` maps to mesh axes through a
rules table. We keep our own metadata key instead of Flax's `out_sharding` so that building a
model never needs a mesh (Flax shards `out_sharding` variables eagerly).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

LOGICAL_AXES = "logical_axes"
Dtype = Any


@dataclasses.dataclass(frozen=True)
class Precision:
    """Compute/param dtypes: bf16 compute with f32 params is the usual training setting."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32


def _axes(names: Sequence[str | None]) -> dict:
    return {LOGICAL_AXES: tuple(names)}


def linear(din: int, dout: int, axes: tuple[str | None, str | None], rngs: nnx.Rngs, *,
           prec: Precision = Precision(), use_bias: bool = True, init_std: float | None = None) -> nnx.Linear:
    """`torch.nn.Linear(din, dout)`; the kernel is stored transposed, (din, dout)."""
    kernel_init = (nnx.initializers.normal(init_std) if init_std is not None
                   else nnx.initializers.lecun_normal())
    return nnx.Linear(din, dout, use_bias=use_bias, dtype=prec.dtype, param_dtype=prec.param_dtype,
                      kernel_init=kernel_init, kernel_metadata=_axes(axes),
                      bias_metadata=_axes(axes[1:]), rngs=rngs)


def layer_norm(dim: int, eps: float, rngs: nnx.Rngs, *, prec: Precision = Precision(),
               axis: str | None = "norm") -> nnx.LayerNorm:
    """`torch.nn.LayerNorm(dim, eps)`: two-pass variance, as PyTorch computes it."""
    return LayerNorm(dim, epsilon=eps, use_fast_variance=False, dtype=prec.dtype,
                     param_dtype=prec.param_dtype, scale_metadata=_axes((axis,)),
                     bias_metadata=_axes((axis,)), rngs=rngs)


class LayerNorm(nnx.LayerNorm):
    """`nnx.LayerNorm` (same parameters, same forward arithmetic) with PyTorch's LayerNorm backward.

    Autodiff of Flax's normalisation makes XLA:CPU write the broadcast `rsqrt(var + eps) · scale`
    and the centred input as full-size arrays in the forward pass of a training step, three
    elementwise passes per LayerNorm beside the matmuls. With the gradient written by hand the
    forward keeps only x, the mean and 1/std per token (benchmarks/RESULTS.md, train step).
    Layouts other than "normalise the last axis, scale and bias, two-pass variance, no mask or
    named axis" use Flax's own path."""

    def __call__(self, x, *, mask: jax.Array | None = None):
        last = (x.ndim - 1,)
        plain = (mask is None and self.axis_name is None and not self.use_fast_variance
                 and self.scale is not None and self.bias is not None
                 and tuple(a % x.ndim for a in _tuple(self.reduction_axes)) == last
                 and tuple(a % x.ndim for a in _tuple(self.feature_axes)) == last)
        if not plain:
            return super().__call__(x, mask=mask)
        x, scale, bias = self.promote_dtype((x, self.scale[...], self.bias[...]), dtype=self.dtype)
        out_dtype = self.dtype or jnp.result_type(x, scale, bias)
        return _layer_norm(x, scale, bias, float(self.epsilon), jnp.dtype(out_dtype))


def _tuple(axes) -> tuple:
    return tuple(axes) if isinstance(axes, (tuple, list)) else (axes,)


def _layer_norm_stats(x, eps):
    xs = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = jnp.mean(xs, axis=-1, keepdims=True)
    var = jnp.mean(jax.lax.square(xs - mean), axis=-1, keepdims=True)
    return mean, jax.lax.rsqrt(var + eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _layer_norm(x, scale, bias, eps, out_dtype):
    """(x - mean) · (rsqrt(var + eps) · scale) + bias over the last axis, in Flax's order of operations."""
    return _layer_norm_fwd(x, scale, bias, eps, out_dtype)[0]


def _layer_norm_fwd(x, scale, bias, eps, out_dtype):
    mean, rstd = _layer_norm_stats(x, eps)
    return ((x - mean) * (rstd * scale) + bias).astype(out_dtype), (x, scale, mean, rstd)


def _layer_norm_bwd(eps, out_dtype, residuals, g):
    x, scale, mean, rstd = residuals
    xhat = (x.astype(mean.dtype) - mean) * rstd
    g = g.astype(mean.dtype)
    batch_axes = tuple(range(x.ndim - 1))
    dscale = jnp.sum(g * xhat, axis=batch_axes)
    dbias = jnp.sum(g, axis=batch_axes)
    dxhat = g * scale.astype(mean.dtype)
    dx = rstd * (dxhat - jnp.mean(dxhat, axis=-1, keepdims=True)
                 - xhat * jnp.mean(dxhat * xhat, axis=-1, keepdims=True))
    return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(scale.dtype)   # promote_dtype gave bias scale's dtype


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def embed(num: int, dim: int, rngs: nnx.Rngs, *, prec: Precision = Precision(),
          axes: tuple[str | None, str | None] = ("vocab", "embed"), init_std: float = 0.02) -> nnx.Embed:
    return nnx.Embed(num, dim, dtype=prec.dtype, param_dtype=prec.param_dtype,
                     embedding_init=nnx.initializers.normal(init_std),
                     embedding_metadata=_axes(axes), rngs=rngs)


def conv2d(cin: int, cout: int, kernel: int | tuple[int, int], rngs: nnx.Rngs, *,
           stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
           use_bias: bool = True, prec: Precision = Precision()) -> nnx.Conv:
    """`torch.nn.Conv2d` on NHWC inputs with explicit symmetric zero padding."""
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    return nnx.Conv(cin, cout, (kh, kw), (sh, sw), padding=((ph, ph), (pw, pw)), use_bias=use_bias,
                    dtype=prec.dtype, param_dtype=prec.param_dtype,
                    kernel_metadata=_axes((None, None, "conv_in", "conv_out")),
                    bias_metadata=_axes(("conv_out",)), rngs=rngs)


def batch_norm(dim: int, rngs: nnx.Rngs, *, eps: float = 1e-5, prec: Precision = Precision()) -> nnx.BatchNorm:
    """`torch.nn.BatchNorm*d(dim)`: torch momentum 0.1 is Flax momentum 0.9; eps 1e-5.

    Running statistics are `nnx.BatchStat` (not trainable). Flax keeps the biased batch variance
    in its running average where PyTorch keeps the unbiased one; that only matters in training.
    """
    return nnx.BatchNorm(dim, momentum=0.9, epsilon=eps, use_fast_variance=False, dtype=prec.dtype,
                         param_dtype=prec.param_dtype, use_running_average=True,
                         scale_metadata=_axes(("norm",)), bias_metadata=_axes(("norm",)), rngs=rngs)


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
    """`torch.nn.GELU()`: the exact erf form (Flax's default is the tanh approximation).

    The value is `jax.nn.gelu(x, approximate=False)`. The gradient is written by hand, as PyTorch's
    GELU backward is: autodiff of the erf form makes the forward pass of a training step compute and
    store erf and exp(-x²/2) as separate full-size arrays (three elementwise passes per MLP that
    cannot fuse into the matmul), where keeping only x and recomputing the derivative inside the
    backward's own pass is one read (benchmarks/RESULTS.md, train step)."""
    return jax.nn.gelu(x, approximate=False)


def _gelu_fwd(x):
    return gelu(x), x


def _gelu_bwd(x, g):
    # d/dx x·Φ(x) = Φ(x) + x·φ(x), in f32 whatever the compute dtype
    xf = x.astype(jnp.float32)
    cdf = 0.5 * (1.0 + jax.lax.erf(xf * (2.0 ** -0.5)))
    pdf = jnp.exp(-0.5 * xf * xf) * ((2.0 * jnp.pi) ** -0.5)
    return ((g.astype(jnp.float32) * (cdf + xf * pdf)).astype(g.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's QuickGELU: x·sigmoid(1.702·x)."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": gelu, "quick_gelu": quick_gelu, "relu": jax.nn.relu, "tanh": jnp.tanh}


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}") from None


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None,
                          dropout: nnx.Dropout | None = None, *, deterministic: bool = True,
                          rngs: nnx.Rngs | None = None) -> jax.Array:
    """Attention over (B, L, H, D) heads; q is already scaled. Softmax runs in f32 always.

    The heads are moved in front of the tokens explicitly so both products are plain batched
    matmuls over (B, H): XLA:CPU runs the equivalent 'bqhd,bkhd->bhqk' einsum ~4× slower
    (benchmarks/PROFILE.md)."""
    qh, vh = jnp.swapaxes(q, 1, 2), jnp.swapaxes(v, 1, 2)           # (B, H, L, D)
    kt = jnp.transpose(k, (0, 2, 3, 1))                               # (B, H, D, L)
    logits = jnp.matmul(qh, kt).astype(jnp.float32)
    if bias is not None:
        logits = logits + bias
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    if dropout is not None:
        weights = dropout(weights, deterministic=deterministic, rngs=rngs)
    return jnp.swapaxes(jnp.matmul(weights, vh), 1, 2)


def multi_head_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None, num_heads: int,
                         dropout: nnx.Dropout | None = None, *, deterministic: bool = True,
                         rngs: nnx.Rngs | None = None) -> jax.Array:
    """Projected q (B, M, D) and k, v (B, N, D) → merged heads (B, M, D), with q scaled by head_dim^-0.5 as HF's
    BERT/RoBERTa/BART and torch's MultiheadAttention do."""
    b, m, d = q.shape
    n, hd = k.shape[1], d // num_heads
    q = q.reshape(b, m, num_heads, hd) * (hd ** -0.5)
    out = dot_product_attention(q, k.reshape(b, n, num_heads, hd), v.reshape(b, n, num_heads, hd), bias,
                                dropout, deterministic=deterministic, rngs=rngs)
    return out.reshape(b, m, d)


def self_attention(query: nnx.Linear, key: nnx.Linear, value: nnx.Linear, x: jax.Array, bias: jax.Array | None,
                   num_heads: int, dropout: nnx.Dropout | None = None, *, deterministic: bool = True,
                   rngs: nnx.Rngs | None = None, pooled_rows: jax.Array | None = None) -> jax.Array:
    """Multi-head self-attention from three projections, (B, N, D) → (B, N, D).

    `pooled_rows` (B, M, D): the pooled-token fast path. When given, they are the rows of `x` whose outputs the
    tower reads, and only they ask queries (keys and values still come from all of `x`): the result is (B, M, D).
    A tower whose output is read at one token needs only that token's query in its last layer."""
    q_in = x if pooled_rows is None else pooled_rows
    return multi_head_attention(query(q_in), key(x), value(x), bias, num_heads, dropout,
                                deterministic=deterministic, rngs=rngs)


def linear_columns(layer: nnx.Linear, x: jax.Array, start: int, stop: int) -> jax.Array:
    """Output features [start, stop) of a Linear, computing only those: for a packed projection (torch's
    MultiheadAttention `in_proj`) of which a caller needs one part for some rows and the rest for others."""
    kernel = layer.kernel[...][:, start:stop]
    bias = None if layer.bias is None else layer.bias[...][start:stop]
    # the layer's own dtype promotion and dot_general, as its __call__ uses them
    x, kernel, bias = layer.promote_dtype((x, kernel, bias), dtype=layer.dtype)
    y = layer.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=layer.precision)
    return y if bias is None else y + bias


def padding_bias(attention_mask: jax.Array) -> jax.Array:
    """(B, L) 1/0 mask → additive (B, 1, 1, L) bias, as HF builds it: (1 - m)·finfo(f32).min."""
    m = attention_mask.astype(jnp.float32)
    return ((1.0 - m) * jnp.finfo(jnp.float32).min)[:, None, None, :]


def maybe_remat(fn, enabled: bool, policy: str | None = None):
    """Wrap a layer call in `nnx.remat` (activation checkpointing) when asked to."""
    if not enabled:
        return fn
    pol = getattr(jax.checkpoint_policies, policy) if policy else None
    return nnx.remat(fn, policy=pol)
