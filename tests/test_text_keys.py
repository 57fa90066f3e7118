"""Strict text key tables: every key must be consumed or ignored for a written reason."""
import numpy as np
import pytest
import torch
from flax import nnx

import reference as ref
from helpers import random_roberta
from clapjax import saved_model
from clapjax import text as T
from clapjax.convert import keymap as K
from clapjax.convert import text_keys


def _roberta():
    hf = random_roberta(vocab_size=120, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=40)
    sd = ref.torch_state_dict(hf)
    sd["embeddings.position_ids"] = np.arange(40)[None]  # as checkpoints saved before transformers 4.31 hold it
    return T.BertModel(T.BertConfig.from_hf(hf.config), nnx.Rngs(0)), sd


def _bert():
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    hf = BertConfig(**{**ref.BERT_BASE, "vocab_size": 120, "hidden_size": 16, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 40})
    sd = ref.torch_state_dict(BertModel(hf))
    sd["embeddings.token_type_ids"] = np.zeros((1, 40), np.int64)
    return T.BertModel(T.BertConfig.from_hf(hf), nnx.Rngs(0)), sd


def _bart():
    from transformers import BartConfig, BartModel
    torch.manual_seed(0)
    hf = BartConfig(**{**ref.BART_BASE, "vocab_size": 120, "d_model": 16, "encoder_layers": 1, "decoder_layers": 1,
                       "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 32,
                       "decoder_ffn_dim": 32, "max_position_embeddings": 40})
    return T.BartModel(T.BartConfig.from_hf(hf), nnx.Rngs(0)), ref.torch_state_dict(BartModel(hf))


def _clip():
    ref.laion_clap()
    from laion_clap.clap_module.model import Transformer
    torch.manual_seed(0)
    sd = ref.torch_state_dict(Transformer(width=16, layers=2, heads=2))
    r = np.random.default_rng(0)
    sd.update({"token_embedding.weight": r.normal(size=(50, 16)).astype(np.float32),
               "positional_embedding": r.normal(size=(8, 16)).astype(np.float32),
               "ln_final.weight": np.ones(16, np.float32), "ln_final.bias": np.zeros(16, np.float32)})
    cfg = T.ClipTextConfig(vocab_size=50, context_length=8, width=16, heads=2, layers=2)
    return T.ClipTextTransformer(cfg, nnx.Rngs(0)), sd


BUILDERS = {"roberta": _roberta, "bert": _bert, "bart": _bart, "transformer": _clip}
CASES = {name: b() for name, b in BUILDERS.items()}


def _all_keys():
    return [(name, key) for name, (_, sd) in CASES.items() for key in sorted(sd)]


@pytest.mark.parametrize("name", sorted(CASES))
def test_full_state_dict_loads_and_accounts_for_every_key(name):
    tower, sd = CASES[name]
    report = K.load_state_dict(tower, sd, text_keys.tower_table(tower))
    assert set(report.consumed) | set(report.ignored) == set(sd)
    assert report.ok
    # every target variable was written with the source values (not left at its random init)
    exported = K.export_state_dict(tower, text_keys.tower_table(tower))
    for key, value in exported.items():
        np.testing.assert_array_equal(value, sd[key])


@pytest.mark.parametrize("name,key", _all_keys())
def test_dropping_any_key_fails_naming_it(name, key):
    tower, sd = CASES[name]
    table = text_keys.tower_table(tower)
    before = {k: np.array(v.get_value()) for k, v in saved_model.model_variables(tower).items()}
    broken = {k: v for k, v in sd.items() if k != key}
    if any(i.matches(key) for i in table.ignores):
        # recomputed buffers and the unused BART decoder may be absent (transformers >= 4.31 drops them)
        K.load_state_dict(tower, broken, table)
        return
    with pytest.raises(K.KeyMappingError) as err:
        K.load_state_dict(tower, broken, table)
    assert key in str(err.value)
    after = {k: np.array(v.get_value()) for k, v in saved_model.model_variables(tower).items()}
    assert all(np.array_equal(before[k], after[k]) for k in before), "a failed load changed the model"


@pytest.mark.parametrize("name", sorted(CASES))
def test_renamed_and_reshaped_keys_fail(name):
    tower, sd = CASES[name]
    table = text_keys.tower_table(tower)
    key = next(k for k in sorted(sd) if sd[k].ndim == 2 and not any(i.matches(k) for i in table.ignores))
    renamed = dict(sd)
    renamed[key + "_renamed"] = renamed.pop(key)
    with pytest.raises(K.KeyMappingError) as err:
        K.load_state_dict(tower, renamed, table)
    assert key in str(err.value) and key + "_renamed" in str(err.value)
    reshaped = dict(sd)
    reshaped[key] = np.zeros((sd[key].shape[0] + 1, sd[key].shape[1]), np.float32)
    with pytest.raises(K.KeyMappingError, match="mismatched") as err:
        K.load_state_dict(tower, reshaped, table)
    assert key in str(err.value)


def test_wrong_recomputed_buffer_is_refused():
    tower, sd = CASES["roberta"]
    bad = dict(sd)
    bad["embeddings.position_ids"] = np.arange(40)[None] + 1
    with pytest.raises(K.KeyMappingError, match="embeddings.position_ids: position_ids: differs"):
        K.load_state_dict(tower, bad, text_keys.tower_table(tower))


def test_bart_untied_embedding_is_refused():
    tower, sd = CASES["bart"]
    bad = dict(sd)
    bad["encoder.embed_tokens.weight"] = sd["encoder.embed_tokens.weight"] + 1
    with pytest.raises(K.KeyMappingError, match="encoder.embed_tokens.weight"):
        K.load_state_dict(tower, bad, text_keys.tower_table(tower))


def test_bart_ignores_decoder_with_reason():
    tower, sd = CASES["bart"]
    report = K.load_state_dict(tower, sd, text_keys.tower_table(tower))
    decoder = [k for k in sd if k.startswith("decoder.") and "embed_tokens" not in k]
    assert decoder and all("decoder" in report.ignored[k] for k in decoder)


def test_every_parameter_has_logical_axes():
    for name, (tower, _) in CASES.items():
        for path, var in saved_model.model_variables(tower).items():
            axes = var.get_metadata().get("logical_axes")
            assert axes is not None and len(axes) == var.get_value().ndim, (name, path, axes)
