"""CLIP text transformer (LAION-CLAP `tmodel='transformer'`).

LAION builds it from pieces that live on the CLAP module itself (`token_embedding`,
`positional_embedding`, `ln_final`, the causal `attn_mask` buffer) plus `text_branch =
Transformer(width, layers, heads)` of pre-LN `ResidualAttentionBlock`s. We keep the pieces together
in one tower with the same attribute names; the CLAP-level key table moves the three top-level keys
into it. The pooled feature is the token at the highest id of each row (CLIP's EOT token).
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import nnx

from clapjax import layers as L
from clapjax.text.bert import TextOutput


@dataclasses.dataclass(frozen=True)
class ClipTextConfig:
    """LAION's `text_cfg` for `tmodel='transformer'` (width 512, 12 layers, 8 heads, 77 tokens)."""

    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    heads: int = 8
    layers: int = 12
    act: str = "gelu"  # 'gelu' (LAION's default, exact) or 'quick_gelu' (OpenAI's CLIP)
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not a multiple of heads {self.heads}")
        if self.act not in ("gelu", "quick_gelu"):
            raise ValueError(f"act must be 'gelu' or 'quick_gelu', got {self.act!r}")

    @classmethod
    def from_laion(cls, text_cfg: dict, quick_gelu: bool = False, **kw) -> "ClipTextConfig":
        return cls(vocab_size=text_cfg["vocab_size"], context_length=text_cfg["context_length"],
                   width=text_cfg["width"], heads=text_cfg["heads"], layers=text_cfg["layers"],
                   act="quick_gelu" if quick_gelu else "gelu", **kw)

    @property
    def output_width(self) -> int:
        """Width of the pooled feature (input of `text_projection`), the same property on every text config."""
        return self.width


class MultiheadAttention(nnx.Module):
    """`torch.nn.MultiheadAttention` (batch_first=False in torch; we are batch-major): the packed
    `in_proj` holds q, k, v stacked on the output axis, as torch's `in_proj_weight` does."""

    def __init__(self, width: int, heads: int, rngs: nnx.Rngs, prec: L.Precision):
        self.num_heads = heads
        self.in_proj = L.linear(width, 3 * width, ("embed", "qkv"), rngs, prec=prec)
        self.out_proj = L.linear(width, width, ("heads", "embed"), rngs, prec=prec)

    def __call__(self, x, bias, pooled_rows=None):
        """(B, L, D) → (B, L, D); with `pooled_rows` (B, M, D) (rows of `x`), only their outputs (B, M, D): they
        alone ask queries, so only their part of the packed projection is computed for them, and only the key and
        value parts for `x`."""
        d = x.shape[-1]
        if pooled_rows is None:
            q, k, v = jnp.split(self.in_proj(x), 3, axis=-1)
        else:
            q = L.linear_columns(self.in_proj, pooled_rows, 0, d)
            k, v = jnp.split(L.linear_columns(self.in_proj, x, d, 3 * d), 2, axis=-1)
        return self.out_proj(L.multi_head_attention(q, k, v, bias, self.num_heads))


class Mlp(nnx.Module):
    def __init__(self, width: int, act: str, rngs: nnx.Rngs, prec: L.Precision):
        self.c_fc = L.linear(width, 4 * width, ("embed", "mlp"), rngs, prec=prec)
        self.c_proj = L.linear(4 * width, width, ("mlp", "embed"), rngs, prec=prec)
        self.act = L.activation(act)

    def __call__(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class ResidualAttentionBlock(nnx.Module):
    def __init__(self, cfg: ClipTextConfig, rngs: nnx.Rngs, p: L.Precision):
        self.ln_1 = L.layer_norm(cfg.width, cfg.layer_norm_eps, rngs, prec=p)
        self.attn = MultiheadAttention(cfg.width, cfg.heads, rngs, p)
        self.ln_2 = L.layer_norm(cfg.width, cfg.layer_norm_eps, rngs, prec=p)
        self.mlp = Mlp(cfg.width, cfg.act, rngs, p)

    def __call__(self, x, bias, pooled_rows=None):
        """(B, L, D) → (B, L, D); with `pooled_rows` (B, M, D), rows of `x`, only those rows' outputs (B, M, D)
        (`bias` then holds just their query rows). LayerNorm is per row, so ln_1 of the rows is ln_1(x)'s rows."""
        y = self.ln_1(x)
        if pooled_rows is None:
            x = x + self.attn(y, bias)
        else:
            x = pooled_rows + self.attn(y, bias, self.ln_1(pooled_rows))
        return x + self.mlp(self.ln_2(x))


def causal_bias(n: int) -> np.ndarray:
    """LAION's `attn_mask`: −inf strictly above the diagonal, 0 elsewhere, (n, n)."""
    return np.triu(np.full((n, n), -np.inf, dtype=np.float32), k=1)


class ClipTextTransformer(nnx.Module):
    """`prec` sets the compute and parameter dtypes, `remat` / `remat_policy` checkpoint each block's activations."""

    def __init__(self, cfg: ClipTextConfig, rngs: nnx.Rngs, *, prec: L.Precision = L.Precision(), remat: bool = False,
                 remat_policy: str | None = None):
        p = prec
        self.cfg = cfg
        self.compute_dtype = p.dtype
        self.remat, self.remat_policy = remat, remat_policy
        self.token_embedding = L.embed(cfg.vocab_size, cfg.width, rngs, prec=p, init_std=0.02)
        self.positional_embedding = nnx.Param(
            nnx.initializers.normal(0.01)(rngs.params(), (cfg.context_length, cfg.width), p.param_dtype),
            logical_axes=("pos", "embed"))
        self.resblocks = nnx.List([ResidualAttentionBlock(cfg, rngs, p) for _ in range(cfg.layers)])
        self.ln_final = L.layer_norm(cfg.width, cfg.layer_norm_eps, rngs, prec=p)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, deterministic=True,
                 rngs=None, pooled_only: bool = False) -> TextOutput:
        """`pooled_only`: the last block computes only the EOT row (the one read); `last_hidden_state`
        is then (B, 1, W)."""
        # LAION's CLIP tower uses neither a padding mask nor token types: the causal mask already
        # hides everything after the EOT token, which is where the feature is read.
        del attention_mask, token_type_ids, deterministic, rngs
        input_ids = jnp.asarray(input_ids)
        n = input_ids.shape[1]
        if n > self.cfg.context_length:
            raise ValueError(f"{n} tokens exceed the context length {self.cfg.context_length}")
        x = self.token_embedding(input_ids) + self.positional_embedding[...][:n].astype(self.compute_dtype)
        bias = jnp.asarray(causal_bias(n))[None, None]

        def run(block, x):
            return block(x, bias)
        run = L.maybe_remat(run, self.remat, self.remat_policy)
        eot = jnp.argmax(input_ids, axis=-1)
        last = len(self.resblocks) - 1
        for i, block in enumerate(self.resblocks):
            if pooled_only and i == last:
                # the EOT query row of the causal mask: keys up to the EOT token
                x = block(x, jnp.asarray(causal_bias(n))[eot][:, None, None, :],
                          pooled_rows=jnp.take_along_axis(x, eot[:, None, None], axis=1))
            else:
                x = run(block, x)
        x = self.ln_final(x)
        if pooled_only:
            return TextOutput(x, x[:, 0])
        return TextOutput(x, jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0])
