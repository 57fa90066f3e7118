"""Text towers vs the PyTorch reference (transformers / laion_clap), fp32, random weights."""
import functools

import numpy as np
import pytest
import torch
from flax import nnx

import reference as ref
from helpers import TOL
from clapjax import text as T
from clapjax.convert import keymap as K
from clapjax.convert import text_keys
from clapjax.heads import l2_normalize, projection



def padded_batch(rng, n, length=77, vocab=50265, pad=1, bos=0, eos=2, lengths=None):
    """Token rows of varied real lengths, padded with `pad` to `length` (as the tokenizer pads)."""
    lengths = lengths or [int(x) for x in rng.integers(3, length + 1, n)]
    ids = np.full((n, length), pad, np.int64)
    mask = np.zeros((n, length), np.int64)
    for i, k in enumerate(lengths):
        ids[i, :k] = rng.integers(5, vocab, k)
        ids[i, 0], ids[i, k - 1] = bos, eos
        mask[i, :k] = 1
    return ids, mask


def load(tower, torch_module):
    K.load_state_dict(tower, ref.torch_state_dict(torch_module), text_keys.tower_table(tower))
    return tower


def maxabs(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# --- RoBERTa / BERT ---------------------------------------------------------------------------

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)


@functools.lru_cache(maxsize=None)
def bert_family(kind, size_items):
    """(hf config, torch model, our model loaded through the key table), built once per size."""
    from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel
    size = dict(size_items)
    torch.manual_seed(0)
    if kind == "roberta":
        hf = RobertaConfig(**{**ref.ROBERTA_BASE, **size})
        tm = RobertaModel(hf).eval()
    else:
        hf = BertConfig(**{**ref.BERT_BASE, **size})
        tm = BertModel(hf).eval()
    return hf, tm, load(T.BertModel(T.BertConfig.from_hf(hf), nnx.Rngs(1)), tm)


@pytest.mark.parametrize("kind,size", [("roberta", {}), ("roberta", TINY), ("bert", {})],
                         ids=["roberta-base", "roberta-tiny", "bert-base"])
@pytest.mark.parametrize("batch", [1, 3])
def test_bert_family_parity(kind, size, batch):
    hf, tm, ours = bert_family(kind, tuple(sorted(size.items())))
    assert ours.cfg.layer_norm_eps == hf.layer_norm_eps
    rng = np.random.default_rng(batch)
    ids, mask = padded_batch(rng, batch, vocab=hf.vocab_size, pad=hf.pad_token_id,
                             lengths=[5, 77, 30][:batch])
    tt = None
    if kind == "bert":
        tt = (rng.integers(0, 2, ids.shape) * mask).astype(np.int64)
    with torch.no_grad():
        o = tm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
               token_type_ids=None if tt is None else torch.tensor(tt))
    out = nnx.jit(lambda m, i, a, t: m(i, a, t))(ours, ids, mask, tt)
    assert maxabs(out.last_hidden_state, o.last_hidden_state) <= TOL
    assert maxabs(out.pooled, o.pooler_output) <= TOL


def test_roberta_positions_skip_padding():
    ids = np.array([[0, 7, 8, 2, 1, 1]])
    assert np.asarray(T.bert.roberta_position_ids(ids, 1)).tolist() == [[2, 3, 4, 5, 1, 1]]


# --- BART ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bart_base():
    from transformers import BartConfig, BartModel
    torch.manual_seed(0)
    hf = BartConfig(**ref.BART_BASE)
    tm = BartModel(hf).eval()
    return hf, tm, load(T.BartModel(T.BartConfig.from_hf(hf), nnx.Rngs(1)), tm)


@pytest.mark.parametrize("batch", [1, 3])
def test_bart_parity_clap_pooling(bart_base, batch):
    hf, tm, ours = bart_base
    ids, mask = padded_batch(np.random.default_rng(batch), batch, lengths=[9, 77, 40][:batch])
    with torch.no_grad():
        o = tm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
        enc = o.encoder_last_hidden_state
        pooled = torch.mean(enc, axis=1)  # laion_clap encode_text, tmodel='bart'
    out = nnx.jit(lambda m, i, a: m(i, a))(ours, ids, mask)
    assert maxabs(out.last_hidden_state, enc) <= TOL
    assert maxabs(out.pooled, pooled) <= TOL


# --- CLIP transformer, against laion_clap's own CLAP ----------------------------------------

@pytest.fixture(scope="module")
def laion_transformer_clap():
    model = ref.laion_clap_model("HTSAT-tiny", "transformer")
    cfg = T.ClipTextConfig.from_laion(ref.laion_model_cfg("HTSAT-tiny", "transformer")["text_cfg"])
    assert (cfg.width, cfg.layers, cfg.heads) == (512, 12, 8)
    return model, cfg


def clip_ids(rng, n, length=77, vocab=49408):
    """CLIP-style rows: <sot> tokens <eot> then zeros; the EOT (49407) is each row's maximum."""
    ids = np.zeros((n, length), np.int64)
    for i, k in enumerate([4, 77, 20][:n]):
        ids[i, :k] = rng.integers(1, vocab - 2, k)
        ids[i, 0], ids[i, k - 1] = vocab - 2, vocab - 1
    return ids


@pytest.mark.parametrize("batch", [1, 3])
def test_clip_transformer_parity(laion_transformer_clap, batch):
    model, cfg = laion_transformer_clap
    class Half(nnx.Module):
        def __init__(self, rngs):
            self.text_branch = T.ClipTextTransformer(cfg, rngs)
            self.text_projection = projection(cfg.width, 512, rngs)
    ours = Half(nnx.Rngs(2))
    sd = {k: v for k, v in ref.torch_state_dict(model).items()
          if k.startswith(("text_branch.", "text_projection.", "token_embedding.", "positional_embedding",
                           "ln_final."))}
    table = text_keys.laion_text_table(ours.text_branch) + K.KeyTable(
        K.derive_entries(ours.text_projection)).prefixed("text_projection", "text_projection.")
    K.load_state_dict(ours, sd, table)
    ids = clip_ids(np.random.default_rng(batch), batch)
    t = torch.tensor(ids)
    with torch.no_grad():
        x = (model.token_embedding(t) + model.positional_embedding).permute(1, 0, 2)
        hidden = model.ln_final(model.text_branch(x, attn_mask=model.attn_mask).permute(1, 0, 2))
        projected = model.encode_text(t, device="cpu")
    out = nnx.jit(lambda m, i: m(i))(ours.text_branch, ids)
    assert maxabs(out.last_hidden_state, hidden) <= TOL
    assert maxabs(ours.text_projection(out.pooled), projected) <= TOL


def test_clip_quick_gelu_parity():
    ref.laion_clap()
    from laion_clap.clap_module.model import QuickGELU, Transformer
    torch.manual_seed(3)
    tr = Transformer(width=64, layers=2, heads=4, act_layer=QuickGELU).eval()
    cfg = T.ClipTextConfig(vocab_size=100, context_length=12, width=64, heads=4, layers=2, act="quick_gelu")
    ours = T.ClipTextTransformer(cfg, nnx.Rngs(0))
    sd = ref.torch_state_dict(tr)
    sd.update({"token_embedding.weight": np.random.default_rng(0).normal(size=(100, 64)).astype(np.float32),
               "positional_embedding": np.random.default_rng(1).normal(size=(12, 64)).astype(np.float32),
               "ln_final.weight": np.full(64, 1.5, np.float32), "ln_final.bias": np.full(64, 0.1, np.float32)})
    K.load_state_dict(ours, sd, text_keys.tower_table(ours))
    ids = np.array([[98, 5, 6, 99, 0, 0, 0, 0, 0, 0, 0, 0]])
    x = torch.tensor(sd["token_embedding.weight"])[torch.tensor(ids)] + torch.tensor(sd["positional_embedding"])
    mask = torch.full((12, 12), float("-inf")).triu_(1)
    with torch.no_grad():
        h = torch.nn.functional.layer_norm(tr(x.permute(1, 0, 2), attn_mask=mask).permute(1, 0, 2), (64,),
                                           torch.tensor(sd["ln_final.weight"]), torch.tensor(sd["ln_final.bias"]))
    out = ours(ids)
    assert maxabs(out.last_hidden_state, h) <= TOL
    assert maxabs(out.pooled, h[:, 3]) <= TOL


# --- the CLAP text embedding of a random-init laion_clap model ------------------------------

def test_laion_clap_text_embedding():
    model = ref.laion_clap_model("HTSAT-tiny", "roberta")
    class Half(nnx.Module):
        def __init__(self, rngs):
            self.text_branch = T.BertModel(T.BertConfig.roberta_base(), rngs)
            self.text_projection = projection(768, 512, rngs)
    ours = Half(nnx.Rngs(0))
    sd = {k: v for k, v in ref.torch_state_dict(model).items() if k.startswith(("text_branch.", "text_projection."))}
    # released checkpoints carry the buffer that broke strict loading in transformers >= 4.31
    sd["text_branch.embeddings.position_ids"] = np.arange(514)[None]
    table = text_keys.laion_text_table(ours.text_branch) + K.KeyTable(
        K.derive_entries(ours.text_projection)).prefixed("text_projection", "text_projection.")
    report = K.load_state_dict(ours, sd, table)
    assert list(report.ignored) == ["text_branch.embeddings.position_ids"]
    assert "recomputed from the input ids" in report.ignored["text_branch.embeddings.position_ids"]
    ids, mask = padded_batch(np.random.default_rng(7), 3, lengths=[6, 77, 21])
    with torch.no_grad():
        want = model.get_text_embedding({"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)})
    got = l2_normalize(ours.text_projection(ours.text_branch(ids, mask).pooled))
    assert maxabs(got, want) <= TOL
    # different prompts give different embeddings (a text branch that did not load would not)
    assert maxabs(got[0], got[1]) > 1e-3
