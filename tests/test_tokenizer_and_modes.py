"""Tokenizer wrapper, and tower behaviour beyond parity: train mode, remat, bf16 compute."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clapjax import layers as L
from clapjax import text as T
from clapjax.tokenizer import Tokenizer, train_byte_level_bpe

CAPTIONS = [f"a {c} {s} {w}" for c in ("dog", "cat", "bird", "car", "bell", "drum")
            for s in ("barks", "sings", "rings", "hums", "beeps") for w in ("loudly", "softly", "far away", "nearby")]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    return train_byte_level_bpe(CAPTIONS * 5, tmp_path_factory.mktemp("bpe"), vocab_size=400)


def test_tokenizer_pads_and_truncates_like_laion(bpe_dir):
    from transformers import RobertaTokenizer
    tok = Tokenizer(bpe_dir)
    texts = ["a dog barks loudly", " ".join(["a cat sings softly"] * 40)]
    out = tok(texts)
    assert out["input_ids"].shape == (2, 77) and out["input_ids"].dtype == np.int32
    direct = RobertaTokenizer(vocab=f"{bpe_dir}/vocab.json", merges=f"{bpe_dir}/merges.txt")(
        texts, padding="max_length", truncation=True, max_length=77)
    np.testing.assert_array_equal(out["input_ids"], np.array(direct["input_ids"]))
    np.testing.assert_array_equal(out["attention_mask"], np.array(direct["attention_mask"]))
    row = out["input_ids"][0]
    n = int(out["attention_mask"][0].sum())
    assert row[0] == 0 and row[n - 1] == 2 and (row[n:] == tok.pad_token_id).all() and tok.pad_token_id == 1
    assert out["attention_mask"][1].all() and out["input_ids"][1, -1] == 2  # truncated, still ends with </s>
    assert tok(["a dog barks"])["input_ids"].shape == (1, 77)  # a batch of one stays a batch


def test_tokenizer_round_trips_through_save(bpe_dir, tmp_path):
    tok = Tokenizer(bpe_dir)
    tok.save(tmp_path / "saved")
    again = Tokenizer(tmp_path / "saved")
    np.testing.assert_array_equal(tok(CAPTIONS[:4])["input_ids"], again(CAPTIONS[:4])["input_ids"])


def test_missing_directory_is_an_error_that_says_no_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        Tokenizer(tmp_path / "roberta-base")


def test_incomplete_directory_names_expected_files(tmp_path, bpe_dir):
    (tmp_path / "vocab.json").write_text(open(f"{bpe_dir}/vocab.json").read())
    with pytest.raises(FileNotFoundError, match=r"vocab.json \+ merges.txt \(missing merges.txt\)"):
        Tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        Tokenizer(tmp_path, kind="bert")


def test_empty_vocabulary_is_refused(tmp_path):
    (tmp_path / "vocab.json").write_text(json.dumps({"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(ValueError, match="did not load"):
        Tokenizer(tmp_path)


def test_bert_tokenizer_gives_token_types(tmp_path):
    words = sorted({w for c in CAPTIONS for w in c.split()})
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words * 1) + "\n")
    out = Tokenizer(tmp_path, kind="bert")(["a dog barks"])
    assert out["token_type_ids"].shape == (1, 77) and out["input_ids"][0, 0] == 2


# --- modes --------------------------------------------------------------------------------------

SMALL = {
    "roberta": T.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=40),
    "bart": T.BartConfig(vocab_size=64, d_model=32, encoder_layers=2, encoder_attention_heads=4,
                         encoder_ffn_dim=64, max_position_embeddings=40, attention_dropout=0.1),
    "transformer": T.ClipTextConfig(vocab_size=64, context_length=16, width=32, heads=4, layers=2),
}


def _ids():
    ids = np.random.default_rng(0).integers(3, 60, (2, 16))
    mask = np.ones_like(ids)
    mask[1, 9:] = 0
    ids[1, 9:] = 1
    return ids, mask


@pytest.mark.parametrize("kind", ["roberta", "bart"])
def test_dropout_only_in_train_mode(kind):
    tower = T.text_tower(kind, SMALL[kind], nnx.Rngs(0))
    ids, mask = _ids()
    eval1 = tower(ids, mask).pooled
    eval2 = tower(ids, mask, deterministic=True).pooled
    np.testing.assert_array_equal(eval1, eval2)
    t1 = tower(ids, mask, deterministic=False, rngs=nnx.Rngs(dropout=1)).pooled
    t1b = tower(ids, mask, deterministic=False, rngs=nnx.Rngs(dropout=1)).pooled
    t2 = tower(ids, mask, deterministic=False, rngs=nnx.Rngs(dropout=2)).pooled
    np.testing.assert_array_equal(t1, t1b)
    assert np.abs(np.asarray(t1) - np.asarray(eval1)).max() > 1e-4
    assert np.abs(np.asarray(t1) - np.asarray(t2)).max() > 1e-4


@pytest.mark.parametrize("kind", sorted(SMALL))
def test_remat_changes_nothing_but_memory(kind):
    ids, mask = _ids()
    plain = T.text_tower(kind, SMALL[kind], nnx.Rngs(0))
    remat = T.text_tower(kind, SMALL[kind], nnx.Rngs(0), remat=True)

    def loss(model):
        return jnp.sum(model(ids, mask).pooled ** 2)
    l1, g1 = nnx.jit(nnx.value_and_grad(loss))(plain)
    l2, g2 = nnx.jit(nnx.value_and_grad(loss))(remat)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # XLA reorders recomputed sums: round-off only


@pytest.mark.parametrize("kind", sorted(SMALL))
def test_bf16_compute_keeps_f32_params(kind):
    ids, mask = _ids()
    f32 = T.text_tower(kind, SMALL[kind], nnx.Rngs(0))
    bf16 = T.text_tower(kind, SMALL[kind], nnx.Rngs(0), prec=L.Precision(jnp.bfloat16))
    params = nnx.state(bf16, nnx.Param)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    out = bf16(ids, mask).pooled
    assert out.dtype == jnp.bfloat16
    ref = np.asarray(f32(ids, mask).pooled)
    # bf16 keeps ~3 significant digits: the same function, not bit-equal
    assert np.abs(np.asarray(out, np.float32) - ref).max() < 0.1 * max(1.0, np.abs(ref).max())


def test_unknown_text_model_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown text model 'gpt'"):
        T.default_text_config("gpt")
    with pytest.raises(ValueError, match="position_style"):
        T.BertConfig(position_style="rotary")


def test_each_head_computes_in_its_own_towers_precision():
    """bf16 text with f32 audio: the text projection and transform heads compute in bf16, the audio ones in f32
    (the text transform head once took the audio tower's precision)."""
    from clapjax.model import CLAPConfig, CLAPModel, Precision, TowerPrecision
    cfg = CLAPConfig.from_laion("HTSAT-tiny", "roberta", precision=Precision(text=TowerPrecision(dtype="bfloat16")))
    model = nnx.eval_shape(lambda: CLAPModel(cfg, nnx.Rngs(0)))
    heads = {"audio": (model.audio_projection[0], model.audio_transform.sequential[0]),
             "text": (model.text_projection[0], model.text_transform.sequential[0])}
    assert {side: [jnp.dtype(layer.dtype) for layer in layers] for side, layers in heads.items()} == {
        "audio": [jnp.float32] * 2, "text": [jnp.bfloat16] * 2}
