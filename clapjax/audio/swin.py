"""Swin-Transformer stages of HTS-AT (LAION-CLAP `clap_module/htsat.py`), NHWC throughout.

Attribute names mirror LAION's modules (`blocks.{j}.norm1`, `attn.qkv`, `attn.proj`,
`attn.relative_position_bias_table`, `norm2`, `mlp.fc1`, `mlp.fc2`, `downsample.{norm,reduction}`)
so `convert.keymap.derive_entries` yields LAION's state-dict keys.

Everything that depends only on the geometry (relative position index, the shifted-window mask)
is a static numpy constant computed from the config, not a variable: the checkpoint's copies of
those buffers are verified against these functions by the key tables instead of being loaded.
Windows are cut with reshapes/transposes and the bias table is expanded with a one-hot matmul, so
the attention itself is batched matmuls with no gathers at run time.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clapjax import layers as L

# Swin marks pairs of tokens from different regions of a shifted window with a large negative
# bias (not -inf), exactly as LAION/HF/Microsoft do.
MASK_VALUE = -100.0


# --- static geometry ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def relative_position_index(window: int) -> np.ndarray:
    """(N, N) int64, N = window², index (Δrow + w-1)·(2w-1) + (Δcol + w-1) into the bias table."""
    rows, cols = np.divmod(np.arange(window * window), window)
    d_row = rows[:, None] - rows[None, :] + window - 1
    d_col = cols[:, None] - cols[None, :] + window - 1
    out = (d_row * (2 * window - 1) + d_col).astype(np.int64)
    out.setflags(write=False)
    return out


@functools.lru_cache(maxsize=None)
def _bias_expansion(window: int) -> np.ndarray:
    """One-hot (N·N, (2w-1)²) float32: table → per-pair bias as a matmul instead of a gather."""
    idx = relative_position_index(window).reshape(-1)
    onehot = np.zeros((idx.size, (2 * window - 1) ** 2), np.float32)
    onehot[np.arange(idx.size), idx] = 1.0
    onehot.setflags(write=False)
    return onehot


def _partition(x: np.ndarray | jax.Array, window: int):
    """(B, H, W, C) → (B, nW, window², C), windows row-major, tokens row-major inside a window."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // window) * (w // window), window * window, c)


@functools.lru_cache(maxsize=None)
def shift_attention_mask(height: int, width: int, window: int, shift: int) -> np.ndarray | None:
    """(nW, N, N) float32 of 0 / -100 for a cyclic shift of `shift`; None when there is no shift.

    After rolling by -shift, the last `window` rows/cols hold tokens from up to three regions
    (slices [0:-window], [-window:-shift], [-shift:] per axis); tokens may only attend within
    their own region.
    """
    if shift == 0:
        return None

    def regions(n):
        return (np.arange(n) >= n - window).astype(np.int64) + (np.arange(n) >= n - shift)
    label = (regions(height)[:, None] * 3 + regions(width)[None, :]).astype(np.float32)
    windows = _partition(label[None, :, :, None], window)[0, :, :, 0]  # (nW, N)
    diff = windows[:, None, :] - windows[:, :, None]
    out = np.where(diff != 0, np.float32(MASK_VALUE), np.float32(0.0)).astype(np.float32)
    out.setflags(write=False)
    return out


def block_geometry(resolution: int, window_size: int, block_index: int) -> tuple[int, int]:
    """(window, shift) of block j in a stage of `resolution`² tokens, LAION's rule.

    Odd blocks shift by window/2, but a stage no larger than the window has one window and
    no shift (HTSAT's last stage: 8×8 tokens, window 8).
    """
    if resolution <= window_size:
        return resolution, 0
    return window_size, (0 if block_index % 2 == 0 else window_size // 2)


# --- stochastic depth ---------------------------------------------------------------------------

def drop_path(x: jax.Array, rate: float, *, deterministic: bool, rngs: nnx.Rngs | None) -> jax.Array:
    """Per-sample stochastic depth (timm's DropPath): drop a row's residual branch with prob `rate`."""
    if deterministic or rate == 0.0:
        return x
    if rngs is None:
        raise ValueError("drop-path with deterministic=False needs rngs")
    keep = 1.0 - rate
    u = jax.random.uniform(rngs.dropout(), (x.shape[0],) + (1,) * (x.ndim - 1), dtype=jnp.float32)
    return x / keep * jnp.floor(keep + u).astype(x.dtype)


# --- attention inside windows -----------------------------------------------------------------

def _attention(qkv: jax.Array, bias: jax.Array, scale: float) -> tuple[jax.Array, jax.Array]:
    """Output and softmax weights. Plain batched matmuls over the leading (B, nW, heads) axes:
    XLA:CPU lowers an einsum whose head axis sits between the token and feature axes (bwqhd) with
    extra copies around each tiny matmul, ~3× the attention itself at Swin's shapes (PROFILE.md)."""
    q, k, v = qkv[0], qkv[1], qkv[2]
    logits = jnp.matmul(q * scale, jnp.swapaxes(k, -1, -2)).astype(jnp.float32) + bias
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.matmul(weights, v), weights


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def window_attention(qkv: jax.Array, bias: jax.Array, scale: float) -> jax.Array:
    """softmax(q·scale·kᵀ + bias)·v for stacked heads-major qkv (3, B, nW, heads, N, d) and a float32
    bias (1 or nW, heads, N, N) → (B, nW, heads, N, d); softmax in float32.

    The gradient is written by hand (the standard attention backward, as PyTorch's autograd
    computes it): the residuals are qkv, the bias and the softmax weights, and the backward returns
    the three gradients already stacked. Autodiff of the same forward materialises the broadcast
    softmax denominator as a full-size array in the forward pass and, in the backward, pads dq, dk,
    dv into three (3, …) arrays and adds them — the largest non-matmul cost of HTSAT's training
    step on XLA:CPU (benchmarks/RESULTS.md)."""
    return _attention(qkv, bias, scale)[0]


def _window_attention_fwd(qkv, bias, scale):
    out, weights = _attention(qkv, bias, scale)
    return out, (qkv, bias, weights)


def _window_attention_bwd(scale, residuals, g):
    qkv, bias, weights = residuals
    q, k, v = qkv[0], qkv[1], qkv[2]
    dv = jnp.matmul(jnp.swapaxes(weights, -1, -2), g.astype(weights.dtype))
    dw = jnp.matmul(g, jnp.swapaxes(v, -1, -2)).astype(jnp.float32)
    p = weights.astype(jnp.float32)
    dlogits = p * (dw - jnp.sum(dw * p, axis=-1, keepdims=True))      # softmax backward, f32
    dbias = jnp.sum(dlogits, axis=0)                                   # bias broadcasts over B
    if dbias.shape[0] != bias.shape[0]:                                # … and over windows
        dbias = jnp.sum(dbias, axis=0, keepdims=True)
    ds = dlogits.astype(q.dtype)
    dq = jnp.matmul(ds, k) * scale
    dk = jnp.matmul(jnp.swapaxes(ds, -1, -2), q * scale)
    return jnp.stack([dq, dk, dv.astype(q.dtype)]).astype(qkv.dtype), dbias.astype(bias.dtype)


window_attention.defvjp(_window_attention_fwd, _window_attention_bwd)


# --- modules -------------------------------------------------------------------------------------

class WindowAttention(nnx.Module):
    """Multi-head self-attention inside (shifted) windows with a learnt relative position bias."""

    def __init__(self, dim: int, num_heads: int, window: int, rngs: nnx.Rngs, *,
                 qkv_bias: bool = True, prec: L.Precision = L.Precision()):
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not a multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.window = window
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = L.linear(dim, 3 * dim, ("embed", "heads"), rngs, prec=prec, use_bias=qkv_bias, init_std=0.02)
        self.proj = L.linear(dim, dim, ("heads", "embed"), rngs, prec=prec, init_std=0.02)
        table = nnx.initializers.truncated_normal(0.02)(rngs.params(), ((2 * window - 1) ** 2, num_heads),
                                                          prec.param_dtype)
        self.relative_position_bias_table = nnx.Param(table, **{L.LOGICAL_AXES: (None, "heads")})

    def relative_bias(self) -> jax.Array:
        """(heads, N, N) float32 bias, expanded from the table by a one-hot matmul."""
        n = self.window * self.window
        onehot = jnp.asarray(_bias_expansion(self.window))
        table = self.relative_position_bias_table[...].astype(jnp.float32)
        bias = jnp.matmul(onehot, table, precision=jax.lax.Precision.HIGHEST)  # exact: one term per row
        return bias.reshape(n, n, self.num_heads).transpose(2, 0, 1)

    def combined_bias(self, mask: np.ndarray | None) -> jax.Array:
        """(1 or nW, heads, N, N) float32: relative bias with the shift mask pre-added, so the
        logits take one broadcast add of a block-constant array instead of two."""
        bias = self.relative_bias()[None]
        return bias if mask is None else bias + jnp.asarray(mask)[:, None]

    def on_grid(self, x: jax.Array, shift: int, mask: np.ndarray | None) -> jax.Array:
        """Shifted-window attention of a whole (B, H, W, C) token grid → (B, H, W, C).

        Same result as roll → partition into windows → attention per window → merge → roll back (LAION's
        order; tests/test_fast_paths.py keeps that path as the oracle), but the qkv and output projections act
        per token, so they run on the grid; the windows and the heads are then cut out of the qkv tensor with
        one transpose, and put back with one."""
        b, hh, ww, c = x.shape
        w, h = self.window, self.num_heads
        qkv = self.qkv(x)
        if shift:
            qkv = jnp.roll(qkv, (-shift, -shift), axis=(1, 2))
        # (b, rows, w, cols, w, 3, heads, d) → (3, b, rows, cols, heads, w, w, d)
        qkv = qkv.reshape(b, hh // w, w, ww // w, w, 3, h, c // h).transpose(5, 0, 1, 3, 6, 2, 4, 7)
        qkv = qkv.reshape(3, b, (hh // w) * (ww // w), h, w * w, c // h)
        out = window_attention(qkv, self.combined_bias(mask), self.scale)
        out = out.reshape(b, hh // w, ww // w, h, w, w, c // h).transpose(0, 1, 4, 2, 5, 3, 6).reshape(b, hh, ww, c)
        if shift:
            out = jnp.roll(out, (shift, shift), axis=(1, 2))
        return self.proj(out)


class Mlp(nnx.Module):
    def __init__(self, dim: int, hidden: int, rngs: nnx.Rngs, *, prec: L.Precision = L.Precision()):
        self.fc1 = L.linear(dim, hidden, ("embed", "mlp"), rngs, prec=prec, init_std=0.02)
        self.fc2 = L.linear(hidden, dim, ("mlp", "embed"), rngs, prec=prec, init_std=0.02)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(L.gelu(self.fc1(x)))


class SwinTransformerBlock(nnx.Module):
    """x + Attn(LN(x)) then x + MLP(LN(x)), on a (B, H, W, C) token grid."""

    def __init__(self, dim: int, resolution: int, num_heads: int, window: int, shift: int,
                 rngs: nnx.Rngs, *, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path: float = 0.0,
                 eps: float = 1e-5, prec: L.Precision = L.Precision()):
        if resolution % window or not 0 <= shift < window:
            raise ValueError(f"bad Swin geometry: resolution {resolution}, window {window}, shift {shift}")
        self.resolution = resolution
        self.window = window
        self.shift = shift
        self.drop_path = drop_path
        self.norm1 = L.layer_norm(dim, eps, rngs, prec=prec)
        self.attn = WindowAttention(dim, num_heads, window, rngs, qkv_bias=qkv_bias, prec=prec)
        self.norm2 = L.layer_norm(dim, eps, rngs, prec=prec)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), rngs, prec=prec)

    def attention_mask(self) -> np.ndarray | None:
        return shift_attention_mask(self.resolution, self.resolution, self.window, self.shift)

    def __call__(self, x: jax.Array, *, deterministic: bool = True, rngs: nnx.Rngs | None = None) -> jax.Array:
        _, h, w, _ = x.shape
        if (h, w) != (self.resolution, self.resolution):
            raise ValueError(f"Swin block built for {self.resolution}² tokens got {h}×{w}")
        y = self.attn.on_grid(self.norm1(x), self.shift, self.attention_mask())
        x = x + drop_path(y, self.drop_path, deterministic=deterministic, rngs=rngs)
        y = self.mlp(self.norm2(x))
        return x + drop_path(y, self.drop_path, deterministic=deterministic, rngs=rngs)


class PatchMerging(nnx.Module):
    """2×2 neighbours → channels in Swin's order (0,0),(1,0),(0,1),(1,1) → LN(4C) → Linear(4C→2C)."""

    def __init__(self, dim: int, rngs: nnx.Rngs, *, eps: float = 1e-5, prec: L.Precision = L.Precision()):
        self.norm = L.layer_norm(4 * dim, eps, rngs, prec=prec)
        self.reduction = L.linear(4 * dim, 2 * dim, ("embed", "embed_out"), rngs, prec=prec, use_bias=False,
                                  init_std=0.02)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"PatchMerging needs an even token grid, got {h}×{w}")
        # (b, i, row parity, j, col parity, c) → (b, i, j, col parity, row parity, c): the channel
        # blocks then run (r0,c0), (r1,c0), (r0,c1), (r1,c1), LAION's concatenation order.
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 4, 2, 5).reshape(b, h // 2, w // 2, 4 * c)
        return self.reduction(self.norm(x))


class BasicLayer(nnx.Module):
    """One Swin stage: `blocks` then an optional `downsample` (PatchMerging)."""

    def __init__(self, dim: int, resolution: int, depth: int, num_heads: int, window_size: int,
                 drop_paths: list[float], rngs: nnx.Rngs, *, downsample: bool, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, eps: float = 1e-5, remat: bool = False, remat_policy: str | None = None,
                 prec: L.Precision = L.Precision()):
        self.remat = remat
        self.remat_policy = remat_policy
        blocks = []
        for j in range(depth):
            window, shift = block_geometry(resolution, window_size, j)
            blocks.append(SwinTransformerBlock(dim, resolution, num_heads, window, shift, rngs,
                                               mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path=drop_paths[j],
                                               eps=eps, prec=prec))
        self.blocks = nnx.List(blocks)
        self.downsample = PatchMerging(dim, rngs, eps=eps, prec=prec) if downsample else None

    def __call__(self, x: jax.Array, *, deterministic: bool = True, rngs: nnx.Rngs | None = None) -> jax.Array:
        def run(block, x, rngs):
            return block(x, deterministic=deterministic, rngs=rngs)
        run = L.maybe_remat(run, self.remat, self.remat_policy)
        for block in self.blocks:
            x = run(block, x, rngs)
        if self.downsample is not None:
            x = self.downsample(x)
        return x
