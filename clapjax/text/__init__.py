"""Text towers: RoBERTa / BERT (`bert.py`), BART encoder (`bart.py`), CLIP transformer (`clip.py`).

Every tower is built as `tower(cfg, rngs, prec=, remat=, remat_policy=)` (the numerics are
`CLAPConfig.precision`'s, not the architecture's), exposes the width of its pooled feature as
`cfg.output_width`, is called as `tower(input_ids, attention_mask, token_type_ids, deterministic=, rngs=)`
and returns `TextOutput(last_hidden_state, pooled)`, where `pooled` is exactly what LAION-CLAP's
`encode_text` feeds to `text_projection` for that `tmodel`.
"""
from __future__ import annotations

import dataclasses

from flax import nnx

from clapjax.text.bart import BartConfig, BartModel
from clapjax.text.bert import BertConfig, BertModel, TextOutput
from clapjax.text.clip import ClipTextConfig, ClipTextTransformer

# LAION-CLAP's `tmodel` names → (config class, default config factory, tower class)
TOWERS = {
    "roberta": (BertConfig, BertConfig.roberta_base, BertModel),
    "bert": (BertConfig, BertConfig.bert_base, BertModel),
    "bart": (BartConfig, BartConfig.bart_base, BartModel),
    "transformer": (ClipTextConfig, ClipTextConfig, ClipTextTransformer),
}

TextConfig = BertConfig | BartConfig | ClipTextConfig


def _kind(model_type: str):
    try:
        return TOWERS[model_type]
    except KeyError:
        raise ValueError(f"unknown text model {model_type!r}; expected one of {sorted(TOWERS)}") from None


def default_text_config(model_type: str, **overrides) -> TextConfig:
    """The configuration LAION-CLAP builds for `tmodel=model_type`, with overrides."""
    return _kind(model_type)[1](**overrides)


def text_config_from_dict(model_type: str, fields: dict) -> TextConfig:
    cls = _kind(model_type)[0]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(fields) - known
    if unknown:
        raise ValueError(f"unknown {model_type} text config fields: {sorted(unknown)}")
    return cls(**fields)


def text_tower(model_type: str, cfg: TextConfig, rngs: nnx.Rngs, **numerics) -> nnx.Module:
    """The tower of `model_type`; `numerics` are every tower's `prec`, `remat` and `remat_policy` keywords."""
    cls, _, tower = _kind(model_type)
    if not isinstance(cfg, cls):
        raise TypeError(f"{model_type} needs a {cls.__name__}, got {type(cfg).__name__}")
    return tower(cfg, rngs, **numerics)


__all__ = ["BartConfig", "BartModel", "BertConfig", "BertModel", "ClipTextConfig", "ClipTextTransformer",
           "TextConfig", "TextOutput", "TOWERS", "default_text_config", "text_config_from_dict",
           "text_tower"]
