"""RoBERTa and BERT text towers (LAION-CLAP `tmodel='roberta'` / `'bert'`).

Attribute names follow transformers' `RobertaModel` / `BertModel`, so the PyTorch state dict maps
onto this module by name (see `clapjax.convert.text_keys`). The two models differ only in how
position ids are made and whether token types are passed:

- RoBERTa: positions come from the input ids (fairseq's `make_positions`): pads get
  `pad_token_id` (1), real tokens `pad+1, pad+2, …`; LAION passes no token types (all zero).
- BERT: positions `0..L-1`; LAION passes the tokenizer's `token_type_ids`.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from clapjax import layers as L


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Field names match transformers' BertConfig/RobertaConfig so `from_hf` is a copy."""

    vocab_size: int = 50265
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 514
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    position_style: str = "roberta"  # 'roberta' (from input ids) | 'absolute' (BERT)

    def __post_init__(self):
        if self.position_style not in ("roberta", "absolute"):
            raise ValueError(f"position_style must be 'roberta' or 'absolute', got {self.position_style!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}")
        L.activation(self.hidden_act)

    @classmethod
    def roberta_base(cls, **kw) -> "BertConfig":
        """roberta-base as LAION-CLAP loads it (LayerNorm eps 1e-5, 514 positions, 1 token type)."""
        return cls(**kw)

    @classmethod
    def bert_base(cls, **kw) -> "BertConfig":
        """bert-base-uncased."""
        base = dict(vocab_size=30522, max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12,
                    pad_token_id=0, position_style="absolute")
        return cls(**{**base, **kw})

    @classmethod
    def from_hf(cls, hf_config, **kw) -> "BertConfig":
        """From a transformers RobertaConfig / BertConfig / ClapTextConfig."""
        names = [f.name for f in dataclasses.fields(cls) if f.name != "position_style"]
        vals = {n: getattr(hf_config, n) for n in names if hasattr(hf_config, n)}
        style = "absolute" if hf_config.model_type == "bert" else "roberta"
        return cls(**{**vals, "position_style": style, **kw})

    @property
    def output_width(self) -> int:
        """Width of the pooled feature (input of `text_projection`), the same property on every text config."""
        return self.hidden_size


class TextOutput(NamedTuple):
    last_hidden_state: jax.Array  # (B, L, W)
    pooled: jax.Array             # (B, W): what CLAP feeds to text_projection


def roberta_position_ids(input_ids: jax.Array, pad_token_id: int) -> jax.Array:
    not_pad = (input_ids != pad_token_id).astype(jnp.int32)
    return jnp.cumsum(not_pad, axis=1) * not_pad + pad_token_id


class BertEmbeddings(nnx.Module):
    def __init__(self, cfg: BertConfig, rngs: nnx.Rngs, p: L.Precision):
        d = cfg.hidden_size
        self.cfg = cfg
        self.word_embeddings = L.embed(cfg.vocab_size, d, rngs, prec=p, axes=("vocab", "embed"))
        self.position_embeddings = L.embed(cfg.max_position_embeddings, d, rngs, prec=p, axes=("pos", "embed"))
        self.token_type_embeddings = L.embed(cfg.type_vocab_size, d, rngs, prec=p, axes=(None, "embed"))
        self.LayerNorm = L.layer_norm(d, cfg.layer_norm_eps, rngs, prec=p)
        self.dropout = nnx.Dropout(cfg.hidden_dropout_prob)

    def __call__(self, input_ids, token_type_ids=None, *, deterministic=True, rngs=None):
        cfg = self.cfg
        if cfg.position_style == "roberta":
            pos = roberta_position_ids(input_ids, cfg.pad_token_id)
        else:
            pos = jnp.broadcast_to(jnp.arange(input_ids.shape[1])[None], input_ids.shape)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = (self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
             + self.position_embeddings(pos))
        x = self.LayerNorm(x)
        return self.dropout(x, deterministic=deterministic, rngs=rngs)


class BertSelfAttention(nnx.Module):
    def __init__(self, cfg: BertConfig, rngs: nnx.Rngs, p: L.Precision):
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.query = L.linear(d, d, ("embed", "heads"), rngs, prec=p)
        self.key = L.linear(d, d, ("embed", "heads"), rngs, prec=p)
        self.value = L.linear(d, d, ("embed", "heads"), rngs, prec=p)
        self.dropout = nnx.Dropout(cfg.attention_probs_dropout_prob)

    def __call__(self, x, bias, *, deterministic=True, rngs=None, pooled_rows=None):
        return L.self_attention(self.query, self.key, self.value, x, bias, self.num_heads, self.dropout,
                                deterministic=deterministic, rngs=rngs, pooled_rows=pooled_rows)


class BertSelfOutput(nnx.Module):
    """dense → dropout → LayerNorm(· + residual); also BertOutput with `din` = intermediate size."""

    def __init__(self, cfg: BertConfig, din: int, axes: tuple[str, str], rngs: nnx.Rngs, p: L.Precision):
        self.dense = L.linear(din, cfg.hidden_size, axes, rngs, prec=p)
        self.LayerNorm = L.layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs, prec=p)
        self.dropout = nnx.Dropout(cfg.hidden_dropout_prob)

    def __call__(self, x, residual, *, deterministic=True, rngs=None):
        x = self.dropout(self.dense(x), deterministic=deterministic, rngs=rngs)
        return self.LayerNorm(x + residual)


class BertAttention(nnx.Module):
    def __init__(self, cfg: BertConfig, rngs: nnx.Rngs, p: L.Precision):
        # `self` mirrors transformers' attribute name (`attention.self.query`), so keys map by name.
        self.self = BertSelfAttention(cfg, rngs, p)
        self.output = BertSelfOutput(cfg, cfg.hidden_size, ("heads", "embed"), rngs, p)

    def __call__(self, x, bias, *, deterministic=True, rngs=None, pooled_rows=None):
        a = self.self(x, bias, deterministic=deterministic, rngs=rngs, pooled_rows=pooled_rows)
        return self.output(a, x if pooled_rows is None else pooled_rows, deterministic=deterministic, rngs=rngs)


class BertIntermediate(nnx.Module):
    def __init__(self, cfg: BertConfig, rngs: nnx.Rngs, p: L.Precision):
        self.dense = L.linear(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), rngs, prec=p)
        self.act = L.activation(cfg.hidden_act)

    def __call__(self, x):
        return self.act(self.dense(x))


class BertLayer(nnx.Module):
    def __init__(self, cfg: BertConfig, rngs: nnx.Rngs, p: L.Precision):
        self.attention = BertAttention(cfg, rngs, p)
        self.intermediate = BertIntermediate(cfg, rngs, p)
        self.output = BertSelfOutput(cfg, cfg.intermediate_size, ("mlp", "embed"), rngs, p)

    def __call__(self, x, bias, *, deterministic=True, rngs=None, pooled_rows=None):
        """(B, L, D) → (B, L, D); with `pooled_rows` (B, M, D), rows of `x`, only those rows' outputs."""
        a = self.attention(x, bias, deterministic=deterministic, rngs=rngs, pooled_rows=pooled_rows)
        return self.output(self.intermediate(a), a, deterministic=deterministic, rngs=rngs)


class BertEncoder(nnx.Module):
    def __init__(self, cfg: BertConfig, rngs: nnx.Rngs, p: L.Precision, remat: bool, remat_policy: str | None):
        self.remat, self.remat_policy = remat, remat_policy
        self.layer = nnx.List([BertLayer(cfg, rngs, p) for _ in range(cfg.num_hidden_layers)])

    def __call__(self, x, bias, *, deterministic=True, rngs=None, pooled_only=False):
        """With `pooled_only` the last layer computes only token 0 (what the pooler reads):
        its other rows feed nothing downstream, so the result is (B, 1, D)."""
        def run(layer, x, bias, rngs):
            return layer(x, bias, deterministic=deterministic, rngs=rngs)
        run = L.maybe_remat(run, self.remat, self.remat_policy)
        last = len(self.layer) - 1
        for i, layer in enumerate(self.layer):
            if pooled_only and i == last:
                x = layer(x, bias, deterministic=deterministic, rngs=rngs, pooled_rows=x[:, :1])
            else:
                x = run(layer, x, bias, rngs)
        return x


class BertPooler(nnx.Module):
    def __init__(self, cfg: BertConfig, rngs: nnx.Rngs, p: L.Precision):
        self.dense = L.linear(cfg.hidden_size, cfg.hidden_size, ("embed", "hidden"), rngs, prec=p)

    def __call__(self, x):
        return jnp.tanh(self.dense(x[:, 0]))


class BertModel(nnx.Module):
    """RobertaModel / BertModel with its pooler; `pooled` is the pooler output CLAP projects. `prec` sets the
    compute and parameter dtypes, `remat` / `remat_policy` checkpoint each layer's activations."""

    def __init__(self, cfg: BertConfig, rngs: nnx.Rngs, *, prec: L.Precision = L.Precision(), remat: bool = False,
                 remat_policy: str | None = None):
        self.cfg = cfg
        self.embeddings = BertEmbeddings(cfg, rngs, prec)
        self.encoder = BertEncoder(cfg, rngs, prec, remat, remat_policy)
        self.pooler = BertPooler(cfg, rngs, prec)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, deterministic=True,
                 rngs=None, pooled_only: bool = False) -> TextOutput:
        """`pooled_only`: skip the last layer's work on every token but the first (the pooled one);
        `last_hidden_state` is then (B, 1, W)."""
        input_ids = jnp.asarray(input_ids)
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids, deterministic=deterministic, rngs=rngs)
        x = self.encoder(x, L.padding_bias(attention_mask), deterministic=deterministic, rngs=rngs,
                         pooled_only=pooled_only)
        return TextOutput(x, self.pooler(x))
