"""The inference speed-ups change no result: trimmed captions, heads-major attention, grid Swin attention.

Parity of the towers against PyTorch is in test_htsat / test_text_towers; here each fast path is checked
against the slow formulation it replaced, on tiny models.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clapjax import layers as L
from clapjax import text as T
from clapjax.app.api import CLAP
from clapjax.embedding import trimmed_text_length
from clapjax.audio import swin
from clapjax.audio.frontend import FrontEndConfig
from clapjax.audio.htsat import HTSATConfig
from clapjax.model import CLAPConfig, CLAPModel

CONTEXT = 77
VOCAB = 300
TINY_AUDIO = HTSATConfig.tiny(embed_dim=8, spec_size=64, depths=(1, 1), num_heads=(1, 1), num_classes=10,
                              frontend=FrontEndConfig(mel_bins=32, clip_samples=48000))
TINY_TEXT = {
    "roberta": T.BertConfig.roberta_base(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, intermediate_size=64, max_position_embeddings=80),
    "bert": T.BertConfig.bert_base(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=80),
    "transformer": T.ClipTextConfig(vocab_size=VOCAB, width=32, heads=2, layers=2),
    "bart": T.BartConfig.bart_base(vocab_size=VOCAB, d_model=32, encoder_layers=2, encoder_attention_heads=2,
                                   encoder_ffn_dim=64, max_position_embeddings=80),
}
PAD = {"roberta": 1, "bert": 0, "transformer": 0, "bart": 1}


def captions(tmodel: str, lengths, rng) -> dict[str, np.ndarray]:
    """LAION-style (N, 77) batches: `lengths[i]` real tokens then padding (CLIP: EOT = the top id)."""
    n = len(lengths)
    ids = np.full((n, CONTEXT), PAD[tmodel], np.int32)
    mask = np.zeros((n, CONTEXT), np.int32)
    for i, m in enumerate(lengths):
        ids[i, :m] = rng.integers(3, VOCAB - 1, m)
        mask[i, :m] = 1
        if tmodel == "transformer":
            ids[i, m - 1] = VOCAB - 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if tmodel == "bert":
        batch["token_type_ids"] = np.zeros_like(ids)
    return batch


def tiny_clap(tmodel: str) -> tuple[CLAP, list[int]]:
    """A tiny CLAP whose text function records the sequence length of every call."""
    cfg = CLAPConfig(audio=TINY_AUDIO, tmodel=tmodel, text=TINY_TEXT[tmodel], joint_embed_shape=16)
    clap = CLAP(CLAPModel(cfg, nnx.Rngs(0)))
    seen, fn = [], clap._text_fn

    def recording(state, batch):
        seen.append(batch["input_ids"].shape[1])
        return fn(state, batch)
    clap._text_fn = recording
    return clap, seen


@pytest.mark.parametrize("tmodel", ["roberta", "bert", "transformer"])
def test_trimmed_captions_embed_as_untrimmed(tmodel, rng):
    clap, seen = tiny_clap(tmodel)
    batch = captions(tmodel, [5, 12, 20, 9, 1], rng)
    trimmed = clap.get_text_embedding(batch)
    assert seen == [32]  # 20 real tokens → the 32 bucket
    full = np.asarray(clap._text_fn(clap._state, batch))
    assert seen[-1] == CONTEXT
    np.testing.assert_allclose(trimmed, full, rtol=0, atol=1e-6)
    assert np.abs(full).max() > 0.01  # a real embedding, not zeros


def test_bart_is_never_trimmed(rng):
    # LAION pools BART as the mean over all 77 positions, padding included: trimming would change it
    clap, seen = tiny_clap("bart")
    clap.get_text_embedding(captions("bart", [5, 12], rng))
    assert seen == [CONTEXT]


def test_trimmed_text_length_rules(rng):
    b = captions("roberta", [3, 17], rng)
    assert trimmed_text_length(b, "roberta") == 32
    assert trimmed_text_length(captions("roberta", [16], rng), "roberta") == 16
    assert trimmed_text_length(captions("roberta", [70], rng), "roberta") == CONTEXT  # never past the batch
    assert trimmed_text_length(b, "bart") == CONTEXT
    # a row with no real token attends uniformly to every position: keep them all
    b["attention_mask"][0] = 0
    assert trimmed_text_length(b, "roberta") == CONTEXT
    # a hole in the mask: the last real token decides
    hole = captions("bert", [40], rng)
    hole["attention_mask"][0, 10:30] = 0
    assert trimmed_text_length(hole, "bert") == 48
    # CLIP reads the argmax (EOT); its mask is irrelevant
    clip = captions("transformer", [33], rng)
    clip["attention_mask"][:] = 1
    assert trimmed_text_length(clip, "transformer") == 48
    # no ids: refused by name (it used to answer 0, which would have cut every array to 0 columns)
    with pytest.raises(ValueError, match="input_ids"):
        trimmed_text_length({"attention_mask": b["attention_mask"]}, "roberta")


def test_heads_major_attention_equals_einsum(rng):
    q, k, v = (jnp.asarray(rng.normal(size=(3, 11, 4, 8)).astype(np.float32)) for _ in range(3))
    mask = np.ones((3, 11), np.int32)
    mask[1, 7:] = 0
    bias = L.padding_bias(jnp.asarray(mask))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) + bias
    want = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
    got = L.dot_product_attention(q, k, v, bias)
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-6)


def _merge(x, window: int, h: int, w: int):
    """Inverse of `swin._partition`: (B, nW, window², C) → (B, H, W, C)."""
    b, c = x.shape[0], x.shape[-1]
    x = x.reshape(b, h // window, w // window, window, window, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


def _per_window_attention(attn: swin.WindowAttention, windows, mask):
    """LAION's WindowAttention.forward on partitioned windows (B, nW, N, C) → (B, nW, N, C): the oracle for
    `on_grid`, which fuses the partition into the qkv transposes."""
    b, nw, n, c = windows.shape
    h = attn.num_heads
    qkv = attn.qkv(windows).reshape(b, nw, n, 3, h, c // h).transpose(3, 0, 1, 4, 2, 5)
    out = swin.window_attention(qkv, attn.combined_bias(mask), attn.scale)
    return attn.proj(out.transpose(0, 1, 3, 2, 4).reshape(b, nw, n, c))


@pytest.mark.parametrize("shift", [0, 2])
def test_grid_window_attention_equals_per_window_path(shift, rng):
    """`on_grid` = roll → partition → per-window attention → merge → roll back, to round-off."""
    res, window, dim = 8, 4, 12
    attn = swin.WindowAttention(dim, 3, window, nnx.Rngs(1))
    x = jnp.asarray(rng.normal(size=(2, res, res, dim)).astype(np.float32))
    mask = swin.shift_attention_mask(res, res, window, shift)
    y = jnp.roll(x, (-shift, -shift), axis=(1, 2))
    want = _merge(_per_window_attention(attn, swin._partition(y, window), mask), window, res, res)
    want = jnp.roll(want, (shift, shift), axis=(1, 2))
    got = attn.on_grid(x, shift, mask)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-6)
    # and the per-window path itself equals the textbook formulation
    b, nw, n = 2, (res // window) ** 2, window * window
    wins = swin._partition(y, window)
    qkv = np.asarray(attn.qkv(wins)).reshape(b, nw, n, 3, 3, dim // 3)
    logits = np.einsum("bwqhd,bwkhd->bwhqk", qkv[..., 0, :, :] * attn.scale, qkv[..., 1, :, :])
    logits = logits + np.asarray(attn.relative_bias())
    if mask is not None:
        logits = logits + mask[:, None]
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    ref = np.einsum("bwhqk,bwkhd->bwqhd", w, qkv[..., 2, :, :]).reshape(b, nw, n, dim)
    np.testing.assert_allclose(np.asarray(_per_window_attention(attn, wins, mask)), np.asarray(attn.proj(jnp.asarray(ref))),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("tmodel", ["roberta", "bert", "transformer", "bart"])
def test_pooled_only_last_layer_equals_full_tower(tmodel, rng):
    """The last layer may compute only the pooled token (CLS / EOT): same pooled feature."""
    tower = T.text_tower(tmodel, TINY_TEXT[tmodel], nnx.Rngs(2))
    batch = captions(tmodel, [5, 30, 77], rng)
    args = (batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
    full = tower(*args)
    fast = tower(*args, pooled_only=True)
    np.testing.assert_allclose(np.asarray(fast.pooled), np.asarray(full.pooled), rtol=0, atol=1e-6)
    assert np.abs(np.asarray(full.pooled)).max() > 0.01
    if tmodel != "bart":  # BART pools every position, so it keeps them all
        assert fast.last_hidden_state.shape[1] == 1


def test_audio_in_row_groups_equals_one_batch(rng):
    """The API runs audio batches 4 clips per `lax.map` step: same embeddings as one big batch."""
    from clapjax.embedding import embedding_functions
    clap, _ = tiny_clap("roberta")
    plain_audio, _ = embedding_functions(nnx.split(clap.model)[0])
    waves = rng.uniform(-0.5, 0.5, (8, 48000)).astype(np.float32)
    grouped = np.asarray(clap._audio_fn(clap._state, {"waveform": waves}))
    whole = np.asarray(plain_audio(clap._state, {"waveform": waves}))
    assert grouped.shape == (8, 16)
    np.testing.assert_allclose(grouped, whole, rtol=0, atol=1e-6)
    assert not np.allclose(grouped[0], grouped[1])  # rows stay distinct, in order
