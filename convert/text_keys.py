"""Key tables for the text towers: transformers' layout (RoBERTa / BERT / BART) and LAION's CLIP
transformer, at tower level (`tower_table`) and inside a LAION CLAP state dict (`laion_text_table`).

What is ignored, and why (nothing else is):
- `embeddings.position_ids`: a buffer holding `arange(max_positions)`; transformers ≥ 4.31 stopped
  saving it (the LAION loading bug) and RoBERTa computes positions from the input ids anyway.
- `embeddings.token_type_ids`: a zeros buffer HF uses when no token types are passed.
- BART `encoder.embed_tokens.weight` / `decoder.embed_tokens.weight`: tied copies of `shared.weight`
  (checked equal); `decoder.*`: CLAP's BART pooling reads only the encoder's output, so the decoder
  cannot change an embedding. The model holds neither; export to LAION writes both back verbatim from
  the checkpoint's `source_extras.npz` (the decoder is kept, not rebuilt).
"""
from __future__ import annotations

import numpy as np
from flax import nnx

from clapjax.convert import keymap as K
from clapjax.text import BartModel, BertModel, ClipTextTransformer


def _bert_ignores(cfg) -> list[K.Ignore]:
    n = cfg.max_position_embeddings
    return [
        K.Ignore(r"embeddings\.position_ids",
                 "buffer arange(max_positions): positions are recomputed from the input ids",
                 K.expect_equal(lambda k, sd: np.arange(n)[None], "position_ids")),
        K.Ignore(r"embeddings\.token_type_ids",
                 "buffer of zeros HF uses when no token types are passed: recomputed",
                 K.expect_equal(lambda k, sd: np.zeros((1, n), np.int64), "token_type_ids")),
    ]


def _equal_to_shared(key, sd):
    if "shared.weight" not in sd:
        raise ValueError("tied embedding present but shared.weight is missing")
    return sd["shared.weight"]


BART_IGNORES = [
    K.Ignore(r"(encoder|decoder)\.embed_tokens\.weight", "tied to shared.weight (checked equal)",
             K.expect_equal(_equal_to_shared, "tied embedding")),
    K.Ignore(r"decoder\..*", "BART decoder: CLAP pools the encoder's last hidden state, the decoder "
             "output is never used"),
]


def _clip_rename(key: str) -> str:
    # torch.nn.MultiheadAttention stores its packed projection as bare parameters.
    return key.replace("attn.in_proj.weight", "attn.in_proj_weight").replace("attn.in_proj.bias",
                                                                             "attn.in_proj_bias")


def tower_table(tower: nnx.Module) -> K.KeyTable:
    """Source keys as the PyTorch tower's own `state_dict()` names them (no prefix)."""
    if isinstance(tower, BertModel):
        return K.KeyTable(K.derive_entries(tower), _bert_ignores(tower.cfg))
    if isinstance(tower, BartModel):
        return K.KeyTable(K.derive_entries(tower), list(BART_IGNORES))
    if isinstance(tower, ClipTextTransformer):
        # LAION's Transformer module holds only `resblocks`; the other pieces sit on CLAP itself.
        return K.KeyTable(K.derive_entries(tower, _clip_rename))
    raise TypeError(f"no key table for {type(tower).__name__}")


_CLIP_TOP_LEVEL = ("token_embedding.", "positional_embedding", "ln_final.")


def laion_text_table(tower: nnx.Module, target_prefix: str = "text_branch") -> K.KeyTable:
    """The tower inside a LAION CLAP state dict: `text_branch.*`, and for the CLIP transformer the
    top-level `token_embedding`, `positional_embedding`, `ln_final` that LAION keeps on CLAP."""
    table = tower_table(tower).prefixed(target_prefix, "text_branch.")
    if isinstance(tower, ClipTextTransformer):
        def move(src: str) -> str:
            inner = src[len("text_branch."):]
            return inner if inner.startswith(_CLIP_TOP_LEVEL) else src
        table = K.KeyTable([K.Entry(e.target, tuple(move(s) for s in e.sources), e.to_target, e.to_source)
                            for e in table.entries], table.ignores)
    return table
