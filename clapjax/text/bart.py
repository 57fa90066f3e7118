"""BART text tower (LAION-CLAP `tmodel='bart'`): the encoder of transformers' `BartModel`.

CLAP pools BART as the mean over all positions (padding included, no mask) of the *encoder's*
last hidden state. LAION calls the whole `BartModel`, whose decoder runs but whose output is
discarded, so the decoder cannot change a CLAP embedding: we do not port it, and the converter
ignores `decoder.*` with that reason. Attribute names follow `BartModel` (`shared`,
`encoder.layers.N.self_attn.q_proj`, …); the encoder's `embed_tokens` is tied to `shared`.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from clapjax import layers as L
from clapjax.text.bert import TextOutput

POSITION_OFFSET = 2  # BartLearnedPositionalEmbedding: position p is row p + 2


@dataclasses.dataclass(frozen=True)
class BartConfig:
    vocab_size: int = 50265
    d_model: int = 768
    encoder_layers: int = 6
    encoder_attention_heads: int = 12
    encoder_ffn_dim: int = 3072
    activation_function: str = "gelu"
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    max_position_embeddings: int = 1024
    scale_embedding: bool = False
    layer_norm_eps: float = 1e-5  # torch.nn.LayerNorm's default, which BART uses
    pad_token_id: int = 1

    def __post_init__(self):
        if self.d_model % self.encoder_attention_heads:
            raise ValueError(f"d_model {self.d_model} is not a multiple of heads {self.encoder_attention_heads}")
        L.activation(self.activation_function)

    @classmethod
    def bart_base(cls, **kw) -> "BartConfig":
        """facebook/bart-base's encoder."""
        return cls(**kw)

    @classmethod
    def from_hf(cls, hf_config, **kw) -> "BartConfig":
        names = [f.name for f in dataclasses.fields(cls) if f.name != "layer_norm_eps"]
        return cls(**{**{n: getattr(hf_config, n) for n in names if hasattr(hf_config, n)}, **kw})

    @property
    def output_width(self) -> int:
        """Width of the pooled feature (input of `text_projection`), the same property on every text config."""
        return self.d_model


class BartAttention(nnx.Module):
    def __init__(self, cfg: BartConfig, rngs: nnx.Rngs, p: L.Precision):
        d = cfg.d_model
        self.num_heads = cfg.encoder_attention_heads
        self.k_proj = L.linear(d, d, ("embed", "heads"), rngs, prec=p)
        self.v_proj = L.linear(d, d, ("embed", "heads"), rngs, prec=p)
        self.q_proj = L.linear(d, d, ("embed", "heads"), rngs, prec=p)
        self.out_proj = L.linear(d, d, ("heads", "embed"), rngs, prec=p)
        self.dropout = nnx.Dropout(cfg.attention_dropout)

    def __call__(self, x, bias, *, deterministic=True, rngs=None):
        return self.out_proj(L.self_attention(self.q_proj, self.k_proj, self.v_proj, x, bias, self.num_heads,
                                              self.dropout, deterministic=deterministic, rngs=rngs))


class BartEncoderLayer(nnx.Module):
    """Post-LN: x = LN(x + attn(x)); x = LN(x + fc2(act(fc1(x))))."""

    def __init__(self, cfg: BartConfig, rngs: nnx.Rngs, p: L.Precision):
        d = cfg.d_model
        self.self_attn = BartAttention(cfg, rngs, p)
        self.self_attn_layer_norm = L.layer_norm(d, cfg.layer_norm_eps, rngs, prec=p)
        self.fc1 = L.linear(d, cfg.encoder_ffn_dim, ("embed", "mlp"), rngs, prec=p)
        self.fc2 = L.linear(cfg.encoder_ffn_dim, d, ("mlp", "embed"), rngs, prec=p)
        self.final_layer_norm = L.layer_norm(d, cfg.layer_norm_eps, rngs, prec=p)
        self.act = L.activation(cfg.activation_function)
        self.dropout = nnx.Dropout(cfg.dropout)
        self.activation_dropout = nnx.Dropout(cfg.activation_dropout)

    def __call__(self, x, bias, *, deterministic=True, rngs=None):
        kw = dict(deterministic=deterministic, rngs=rngs)
        x = self.self_attn_layer_norm(x + self.dropout(self.self_attn(x, bias, **kw), **kw))
        h = self.activation_dropout(self.act(self.fc1(x)), **kw)
        return self.final_layer_norm(x + self.dropout(self.fc2(h), **kw))


class BartEncoder(nnx.Module):
    def __init__(self, cfg: BartConfig, rngs: nnx.Rngs, p: L.Precision, remat: bool, remat_policy: str | None):
        self.remat, self.remat_policy = remat, remat_policy
        self.embed_positions = L.embed(cfg.max_position_embeddings + POSITION_OFFSET, cfg.d_model, rngs,
                                       prec=p, axes=("pos", "embed"))
        self.layers = nnx.List([BartEncoderLayer(cfg, rngs, p) for _ in range(cfg.encoder_layers)])
        self.layernorm_embedding = L.layer_norm(cfg.d_model, cfg.layer_norm_eps, rngs, prec=p)
        self.dropout = nnx.Dropout(cfg.dropout)

    def __call__(self, tokens_embedded, attention_mask, *, deterministic=True, rngs=None):
        n = tokens_embedded.shape[1]
        x = tokens_embedded + self.embed_positions(jnp.arange(n) + POSITION_OFFSET)[None]
        x = self.dropout(self.layernorm_embedding(x), deterministic=deterministic, rngs=rngs)

        def run(layer, x, bias, rngs):
            return layer(x, bias, deterministic=deterministic, rngs=rngs)
        run = L.maybe_remat(run, self.remat, self.remat_policy)
        bias = L.padding_bias(attention_mask)
        for layer in self.layers:
            x = run(layer, x, bias, rngs)
        return x


class BartModel(nnx.Module):
    """`shared` token embedding + encoder; `pooled` = mean over all positions (CLAP's pooling). `prec` sets the
    compute and parameter dtypes, `remat` / `remat_policy` checkpoint each layer's activations."""

    def __init__(self, cfg: BartConfig, rngs: nnx.Rngs, *, prec: L.Precision = L.Precision(), remat: bool = False,
                 remat_policy: str | None = None):
        self.cfg = cfg
        self.shared = L.embed(cfg.vocab_size, cfg.d_model, rngs, prec=prec)
        self.encoder = BartEncoder(cfg, rngs, prec, remat, remat_policy)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, deterministic=True,
                 rngs=None, pooled_only: bool = False) -> TextOutput:
        # BART has no token types; `pooled_only` changes nothing (the pooled feature is the mean of
        # every position); both are accepted so every text tower has one signature
        del token_type_ids, pooled_only
        input_ids = jnp.asarray(input_ids)
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        x = self.shared(input_ids)
        if self.cfg.scale_embedding:
            x = x * (self.cfg.d_model ** 0.5)
        x = self.encoder(x, attention_mask, deterministic=deterministic, rngs=rngs)
        return TextOutput(x, jnp.mean(x, axis=1))
