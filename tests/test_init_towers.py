"""Tower initialisation from unimodal checkpoints (issue 5): an HF RobertaModel directory and an
HTS-AT AudioSet checkpoint (`state_dict` of `sed_model.*`, as LAION's --pretrained-audio reads it),
both made offline with random weights in the tiny geometry of train/configs/tiny.py. The report
accounts for every tensor; a missing tensor fails naming it; the pooler may stay fresh only when
the config says so.
"""
from __future__ import annotations

import os

import jax
import numpy as np
import pytest
import torch
from flax import nnx

import reference as ref
from helpers import random_roberta
from clapjax import saved_model
from clapjax.convert import keymap as K
from clapjax.model import CLAPModel
from clapjax.train import config as C
from clapjax.train import init_towers, sharding
from clapjax.train import step as S


def _cfg(**init):
    cfg = C.load_config("tiny")
    for k, v in init.items():
        cfg.init[k] = v
    return cfg


@pytest.fixture(scope="module")
def model():
    return nnx.eval_shape(lambda: CLAPModel(C.model_config(_cfg()), nnx.Rngs(0)))


def _roberta(pooler=True):
    """A RobertaModel in the tiny config's text geometry."""
    text = C.model_config(_cfg()).text
    return random_roberta(pooler=pooler, vocab_size=text.vocab_size, hidden_size=text.hidden_size,
                          num_hidden_layers=text.num_hidden_layers, num_attention_heads=text.num_attention_heads,
                          intermediate_size=text.intermediate_size, max_position_embeddings=text.max_position_embeddings)


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("roberta")
    m = _roberta()
    m.save_pretrained(d)
    return str(d), {k: v.detach().numpy() for k, v in m.state_dict().items()}


@pytest.fixture(scope="module")
def htsat_ckpt(tmp_path_factory):
    """LAION's HTSAT_Swin_Transformer in the tiny geometry, saved as the HTS-AT code saves it."""
    ref.laion_clap()
    from laion_clap.clap_module.htsat import HTSAT_Swin_Transformer
    from laion_clap.clap_module.model import CLAPAudioCfp
    a = C.model_config(_cfg()).audio
    fe = a.frontend
    torch.manual_seed(1)
    cfp = CLAPAudioCfp(model_type="HTSAT", model_name="tiny", sample_rate=fe.sample_rate, audio_length=1024,
                       window_size=fe.window_size, hop_size=fe.hop_size, fmin=fe.fmin, fmax=fe.fmax,
                       class_num=a.num_classes, mel_bins=fe.mel_bins, clip_samples=fe.clip_samples)
    htsat = HTSAT_Swin_Transformer(spec_size=a.spec_size, patch_size=a.patch_size, patch_stride=a.patch_stride,
                                   num_classes=a.num_classes, embed_dim=a.embed_dim, depths=list(a.depths),
                                   num_heads=list(a.num_heads), window_size=a.window_size, config=cfp)
    with torch.no_grad():
        htsat.bn0.running_mean.normal_()
    sd = {f"sed_model.{k}": v for k, v in htsat.state_dict().items()}
    path = tmp_path_factory.mktemp("htsat") / "HTSAT_AudioSet_Saved_1.ckpt"
    torch.save({"state_dict": sd, "epoch": 3}, path)
    return str(path), {k: v.numpy() for k, v in sd.items()}


def test_both_towers_load_and_every_tensor_is_reported(model, text_dir, htsat_ckpt):
    (tdir, tsd), (apath, asd) = text_dir, htsat_ckpt
    values, (trep, arep) = init_towers.load_pretrained(_cfg(text=tdir, audio=apath), model)
    # text: every HF tensor loaded, nothing fresh (this RobertaModel has its pooler)
    assert set(trep.report.consumed) == set(tsd) and not trep.report.ignored and trep.fresh == []
    np.testing.assert_array_equal(values["text_branch.embeddings.word_embeddings.embedding"],
                                  tsd["embeddings.word_embeddings.weight"])
    np.testing.assert_array_equal(values["text_branch.encoder.layer.0.intermediate.dense.kernel"],
                                  tsd["encoder.layer.0.intermediate.dense.weight"].T)
    # audio: every tensor loaded or ignored with a reason (front-end buffers checked equal to ours)
    assert set(arep.report.consumed) | set(arep.report.ignored) == set(asd) and arep.fresh == []
    assert arep.report.ignored["sed_model.logmel_extractor.melW"].startswith("torchlibrosa Slaney mel")
    assert "sed_model.bn0.num_batches_tracked" in arep.report.ignored
    np.testing.assert_array_equal(values["audio_branch.layers.0.blocks.0.attn.qkv.kernel"],
                                  asd["sed_model.layers.0.blocks.0.attn.qkv.weight"].T)
    np.testing.assert_array_equal(values["audio_branch.bn0.mean"], asd["sed_model.bn0.running_mean"])
    # every tower variable of the model got a value
    towers = {k for k in saved_model.model_variables(model) if k.startswith(("text_branch.", "audio_branch."))}
    assert towers == set(values)
    assert "loaded" in trep.summary() and "sed_model.head.weight" in arep.report.consumed


def _without(src_dir, dst_dir, key):
    from safetensors.numpy import load_file, save_file
    os.makedirs(dst_dir)
    for name in os.listdir(src_dir):
        if name != "model.safetensors":
            with open(os.path.join(src_dir, name), "rb") as f, open(os.path.join(dst_dir, name), "wb") as g:
                g.write(f.read())
    sd = load_file(os.path.join(src_dir, "model.safetensors"))
    del sd[key]
    save_file(sd, os.path.join(dst_dir, "model.safetensors"), metadata={"format": "pt"})


def test_a_missing_tensor_fails_naming_it(model, text_dir, htsat_ckpt, tmp_path):
    missing = "encoder.layer.0.attention.self.query.weight"
    _without(text_dir[0], tmp_path / "t", missing)
    with pytest.raises(K.KeyMappingError, match=missing.replace(".", r"\.")) as err:
        init_towers.load_pretrained(_cfg(text=str(tmp_path / "t")), model)
    assert err.value.report.missing == [f"{missing} [text_branch.encoder.layer.0.attention.self.query.kernel]"]

    sd = dict(torch.load(htsat_ckpt[0])["state_dict"])
    del sd["sed_model.layers.1.blocks.0.mlp.fc2.weight"]
    torch.save({"state_dict": sd}, tmp_path / "HTSAT_missing.ckpt")
    with pytest.raises(K.KeyMappingError, match=r"sed_model\.layers\.1\.blocks\.0\.mlp\.fc2\.weight"):
        init_towers.load_pretrained(_cfg(audio=str(tmp_path / "HTSAT_missing.ckpt")), model)

    sd = dict(torch.load(htsat_ckpt[0])["state_dict"], **{"sed_model.extra.weight": torch.zeros(2)})
    torch.save({"state_dict": sd}, tmp_path / "HTSAT_extra.ckpt")
    with pytest.raises(K.KeyMappingError, match=r"unexpected \(1\):\n\s+sed_model\.extra\.weight"):
        init_towers.load_pretrained(_cfg(audio=str(tmp_path / "HTSAT_extra.ckpt")), model)


def test_the_pooler_stays_fresh_only_when_the_config_names_it(model, tmp_path):
    d = tmp_path / "no_pooler"
    _roberta(pooler=False).save_pretrained(d)
    values, (rep,) = init_towers.load_pretrained(_cfg(text=str(d)), model)
    assert rep.fresh == ["text_branch.pooler.dense.bias", "text_branch.pooler.dense.kernel"]
    assert "text_branch.pooler.dense.kernel" not in values and "fresh: text_branch.pooler.dense.kernel" in rep.summary()
    with pytest.raises(K.KeyMappingError, match=r"pooler\.dense\.weight"):
        init_towers.load_pretrained(_cfg(text=str(d), fresh_keys=()), model)


def test_apply_to_state_puts_the_values_on_the_states_shardings(text_dir):
    cfg = _cfg(text=text_dir[0])
    setup = S.build_setup(cfg, C.model_config(cfg), sharding.make_mesh({"data": 1, "fsdp": -1}))
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda a: jax.device_put(rng.normal(size=a.shape).astype(a.dtype), a.sharding)
                         if a.dtype.kind == "f" else jax.device_put(np.zeros(a.shape, a.dtype), a.sharding),
                         setup.abstract)
    lines = []
    new = init_towers.apply_to_state(cfg, setup, state, log=lines.append)
    key = "text_branch.encoder.layer.0.output.dense.kernel"
    np.testing.assert_array_equal(np.asarray(new["params"][key]), text_dir[1]["encoder.layer.0.output.dense.weight"].T)
    assert new["params"][key].sharding == setup.shardings["params"][key]
    for k in ("audio_branch.patch_embed.proj.kernel", "audio_projection.0.kernel", "logit_scale_a"):
        assert np.array_equal(np.asarray(new["params"][k]), np.asarray(state["params"][k]))
    assert lines and "text_branch" in lines[0]
