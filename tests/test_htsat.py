"""HTSAT (tiny/base/large, unfused and aff_2d) against LAION-CLAP's and transformers' PyTorch code.

Random weights with non-identity LayerNorm/BatchNorm affines, random biases and random BN running
statistics (bn0's are the per-bin moments of the test spectrograms, so the Swin stack sees
unit-scale inputs). Weights go torch → ours through the key tables under test, forwards run
through `jax.jit`, fp32, eval mode, max-abs ≤ 1e-5.
"""
from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clapjax import layers as L
from clapjax import saved_model
from clapjax.audio import frontend as fe
from clapjax.audio import swin
from clapjax.audio.htsat import HTSAT, HTSATConfig
from clapjax.convert import keymap
from clapjax.convert.audio_keys import hf_absent_targets, htsat_hf_table, htsat_laion_table
from helpers import TOL
from reference import (laion_audio_tower, laion_clap, laion_log_mel, laion_model_cfg, randomize_batch_norms,
                       torch_state_dict, tower_holding)

torch = pytest.importorskip("torch")
B = 3
LONGER = np.array([True, False, True])  # a mixed batch


# --- builders -----------------------------------------------------------------------------------

def _randomize(ref, mel: np.ndarray, seed: int = 1) -> None:
    """Non-trivial norms, biases and BN statistics; bn0's running stats are `mel`'s per-bin moments."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in ref.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.uniform_(0.5, 1.5, generator=g)
                mod.bias.normal_(0.0, 0.2, generator=g)
            elif isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) and mod.bias is not None:
                mod.bias.normal_(0.0, 0.05, generator=g)
        randomize_batch_norms(ref, g, mel, input_norms=("bn0", "audio_encoder.batch_norm"))
        for name, p in ref.named_parameters():
            if name.endswith("relative_position_bias_table"):  # HF initialises these to zero
                p.normal_(0.0, 0.5, generator=g)


def _ours(config: HTSATConfig, state_dict, table_fn) -> HTSAT:
    return tower_holding(lambda: HTSAT(config, rngs=nnx.Rngs(0)), state_dict, table_fn)


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, inputs):
    return nnx.merge(graphdef, state)(inputs)


def _run(model: HTSAT, **inputs) -> dict[str, np.ndarray]:
    """The eval forward through jax.jit (split/merge)."""
    graphdef, state = nnx.split(model)
    return jax.tree.map(np.asarray, _apply(graphdef, state, inputs))


def _waveforms(batch: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(480000) / 48000.0
    tones = sum(np.sin(2 * np.pi * rng.uniform(100, 8000, (batch, 1)) * t) * rng.uniform(0.05, 0.3, (batch, 1))
                for _ in range(3))
    return (tones + 0.05 * rng.standard_normal((batch, 480000))).astype(np.float32)


def _mel_fusion(batch: int, seed: int) -> np.ndarray:
    """(B, 4, 1001, 64) HTK dB mels of four different clips per row (LAION's fusion input kind)."""
    wav = _waveforms(4 * batch, seed)
    mel = np.array(fe.log_mel(wav, fe.FrontEndConfig(), "htk"))
    return mel.reshape(batch, 4, *mel.shape[1:])


def _max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _report(label: str, **errs: float) -> None:
    print(f"\n[htsat parity] {label}: " + ", ".join(f"{k} {v:.3g}" for k, v in errs.items()))


# --- shared LAION HTSAT-tiny (unfused) -------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _tiny():
    ref = laion_audio_tower("HTSAT-tiny", False)
    wav = _waveforms(B, seed=0)
    _randomize(ref, laion_log_mel(ref, wav))
    return ref, wav, torch_state_dict(ref)


def _tiny_config(**kw) -> HTSATConfig:
    return HTSATConfig.from_laion(laion_model_cfg("HTSAT-tiny")["audio_cfg"], **kw)


@functools.lru_cache(maxsize=None)
def _abstract_tiny():
    """An abstract tiny tower and its LAION table, shared by the key tests (failed loads write nothing)."""
    model = nnx.eval_shape(lambda: HTSAT(_tiny_config(), rngs=nnx.Rngs(0)))
    return model, htsat_laion_table(model)


def _loaded_keys() -> list[str]:
    return sorted(_abstract_tiny()[1].source_keys())


def pytest_generate_tests(metafunc):
    if "dropped_key" in metafunc.fixturenames:
        metafunc.parametrize("dropped_key", _loaded_keys())


# --- parity against LAION ----------------------------------------------------------------------------

def _compare_laion(ref, ours, label, **inputs):
    """Tower outputs against LAION's on the same log-mel. From a waveform, LAION's tower is handed
    clapjax's log-mel (its `logmel_extractor` is bypassed for the call): torchlibrosa computes the
    STFT as a float32 DFT convolution whose rounding depends on the CPU's kernels (AVX2 vs
    AVX-512) — up to 2.5e-4 dB in leakage bands, which twelve Swin blocks carry to ~1.2e-5 at the
    output on an AVX2 host, while each fp32 implementation is ~1.2e-4 from the float64 result.
    The front end's own parity is `test_frontend.py` (1e-4 dB, with the float32 floor analysed)."""
    torch_in = {"waveform": torch.from_numpy(inputs["waveform"])} if "waveform" in inputs else {
        "waveform": torch.zeros(inputs["mel_fusion"].shape[0], 480000),
        "mel_fusion": torch.from_numpy(inputs["mel_fusion"]), "longer": torch.from_numpy(inputs["longer"])[:, None]}
    if "waveform" in inputs:
        mel = np.array(fe.log_mel(jnp.asarray(inputs["waveform"]), ours.cfg.frontend, "slaney"))  # writable for torch
        want_mel = laion_log_mel(ref, inputs["waveform"])
        assert _max_abs(mel, want_mel) <= 1e-3, "front ends disagree beyond the fp32 STFT floor"
        ref.logmel_extractor.forward = lambda _spec: torch.from_numpy(mel)[:, None]
    try:
        with torch.no_grad():
            want = ref(torch_in, device="cpu")
    finally:
        ref.logmel_extractor.__dict__.pop("forward", None)
    got = _run(ours, **inputs)
    errs = {k: _max_abs(got[k], want[k].numpy()) for k in
            ("embedding", "clipwise_output", "framewise_output", "fine_grained_embedding")}
    _report(label, **errs)
    assert max(errs.values()) <= TOL, errs
    return got


def test_tiny_unfused_matches_laion():
    ref, wav, sd = _tiny()
    ours = _ours(_tiny_config(), sd, htsat_laion_table)
    got = _compare_laion(ref, ours, "LAION tiny unfused", waveform=wav)
    assert got["embedding"].shape == (B, 768) and got["last_hidden_state"].shape == (B, 64, 768)
    assert got["framewise_output"].shape == (B, 1024, 527)


def test_tiny_aff2d_mixed_batch_matches_laion():
    mel = _mel_fusion(B, seed=1)
    ref = laion_audio_tower("HTSAT-tiny", True)
    _randomize(ref, mel)
    ours = _ours(_tiny_config(enable_fusion=True, fusion_type="aff_2d"), torch_state_dict(ref), htsat_laion_table)
    mixed = _compare_laion(ref, ours, "LAION tiny aff_2d, longer=[T,F,T]", mel_fusion=mel, longer=LONGER)
    # LAION's eval branch for a batch with no longer row
    short = _compare_laion(ref, ours, "LAION tiny aff_2d, no longer row", mel_fusion=mel, longer=np.zeros(B, bool))
    np.testing.assert_array_equal(mixed["embedding"][1], short["embedding"][1])  # row 1 never fused
    assert _max_abs(mixed["embedding"][0], short["embedding"][0]) > 1e-3       # row 0 was


@pytest.mark.parametrize("size", ["base", "large"])
def test_base_and_large_unfused_match_laion(size):
    ref = laion_audio_tower(f"HTSAT-{size}", False)
    wav = _waveforms(2, seed=2)
    _randomize(ref, laion_log_mel(ref, wav))
    config = HTSATConfig.from_laion(laion_model_cfg(f"HTSAT-{size}")["audio_cfg"])
    assert config == getattr(HTSATConfig, size)(num_classes=527)
    ours = _ours(config, torch_state_dict(ref), htsat_laion_table)
    got = _compare_laion(ref, ours, f"LAION {size} unfused", waveform=wav)
    assert got["embedding"].shape == (2, config.num_features)


# --- parity against transformers' ClapAudioModel ----------------------------------------------------

def _hf_audio(fusion: bool, mel: np.ndarray):
    from transformers import ClapAudioConfig, ClapAudioModel
    torch.manual_seed(0)
    hf = ClapAudioModel(ClapAudioConfig(enable_fusion=fusion)).eval()
    _randomize(hf, mel)
    return hf


@pytest.mark.parametrize("fusion", [False, True], ids=["unfused", "aff_2d"])
def test_tiny_matches_hf(fusion):
    from transformers import ClapAudioConfig
    if fusion:
        features, longer = _mel_fusion(B, seed=3), LONGER
        inputs = dict(mel_fusion=features, longer=longer)
    else:
        wav = _waveforms(B, seed=3)
        features, longer = np.asarray(fe.log_mel(wav, fe.FrontEndConfig()))[:, None], None
        inputs = dict(waveform=wav)  # HF takes the spectrogram; ours computes the same one in-model
    hf = _hf_audio(fusion, features)
    config = HTSATConfig.from_hf(ClapAudioConfig(enable_fusion=fusion))
    assert config == _tiny_config(enable_fusion=fusion, fusion_type="aff_2d" if fusion else "None", sed_head=False,
                                  drop_path_rate=0.0)  # HF's default; LAION trains with 0.1
    ours = _ours(config, torch_state_dict(hf), htsat_hf_table)
    with torch.no_grad():
        want = hf(input_features=torch.from_numpy(features),
                  is_longer=None if longer is None else torch.from_numpy(longer)[:, None])
    got = _run(ours, **inputs)
    # HF's last_hidden_state is LAION's regrouped (B, D, 2, 32) map: column k·8+t, row f holds
    # token (k·2+f, t) of the 8×8 grid; put it back in grid order
    lhs = want.last_hidden_state.numpy()
    grid = lhs.reshape(B, lhs.shape[1], 2, 4, 8).transpose(0, 3, 2, 4, 1).reshape(B, 64, -1)
    errs = {"pooler_output": _max_abs(got["embedding"], want.pooler_output.numpy()),
            "last_hidden_state": _max_abs(got["last_hidden_state"], grid)}
    _report(f"HF ClapAudioModel tiny {'aff_2d [T,F,T]' if fusion else 'unfused'}", **errs)
    assert errs["pooler_output"] <= TOL and errs["last_hidden_state"] <= TOL, errs
    assert "clipwise_output" not in got  # no SED head in HF


# --- strict key tables ---------------------------------------------------------------------------------

def test_dropping_any_loaded_key_fails_naming_it(dropped_key):
    _, _, sd = _tiny()
    model, table = _abstract_tiny()
    assert dropped_key in sd
    partial = {k: v for k, v in sd.items() if k != dropped_key}
    with pytest.raises(keymap.KeyMappingError) as err:
        keymap.load_state_dict(model, partial, table)
    assert err.value.report.missing and all(m.startswith(dropped_key + " [") for m in err.value.report.missing)
    assert dropped_key in str(err.value)


def test_laion_table_accounts_for_every_key():
    _, _, sd = _tiny()
    model = nnx.eval_shape(lambda: HTSAT(_tiny_config(), rngs=nnx.Rngs(0)))
    targets = {k: tuple(v.shape) for k, v in saved_model.model_variables(model).items()}
    rep, _ = keymap.match(sd, htsat_laion_table(model), targets)
    assert rep.ok and set(rep.consumed) | set(rep.ignored) == set(sd)
    ignored = sorted(rep.ignored)
    assert sum("attn_mask" in k for k in ignored) == 5  # odd blocks of stages 0-2
    assert sum("relative_position_index" in k for k in ignored) == 12
    assert {"logmel_extractor.melW", "spectrogram_extractor.stft.conv_real.weight",
            "spectrogram_extractor.stft.conv_imag.weight", "bn0.num_batches_tracked"} <= set(ignored)
    with pytest.raises(keymap.KeyMappingError, match="layers.0.blocks.0.attn.surprise"):
        keymap.load_state_dict(model, {**sd, "layers.0.blocks.0.attn.surprise": np.zeros(3)},
                               htsat_laion_table(model))


@pytest.mark.parametrize("key,change", [
    ("logmel_extractor.melW", lambda v: v * 1.01),  # e.g. a different fmax
    ("spectrogram_extractor.stft.conv_real.weight", lambda v: v + 1e-5),
    ("spectrogram_extractor.stft.conv_imag.weight", lambda v: v[:, :, ::-1]),
    ("layers.1.blocks.1.attn_mask", lambda v: np.zeros_like(v)),
    ("layers.2.blocks.0.attn.relative_position_index", lambda v: v[::-1]),
])
def test_recomputed_buffers_are_checked(key, change):
    _, _, sd = _tiny()
    model, table = _abstract_tiny()
    with pytest.raises(keymap.KeyMappingError) as err:
        keymap.load_state_dict(model, {**sd, key: change(sd[key])}, table)
    assert err.value.report.invalid and err.value.report.invalid[0].startswith(key + ":")


def test_buffers_equal_our_constants():
    _, _, sd = _tiny()
    np.testing.assert_array_equal(sd["layers.0.blocks.0.attn.relative_position_index"],
                                  swin.relative_position_index(8))
    np.testing.assert_array_equal(sd["layers.2.blocks.3.attn_mask"], swin.shift_attention_mask(16, 16, 8, 4))
    assert swin.shift_attention_mask(8, 8, 8, 0) is None and swin.block_geometry(8, 8, 1) == (8, 0)


def test_laion_export_round_trip():
    ref, _, sd = _tiny()
    ours = _ours(_tiny_config(), sd, htsat_laion_table)
    out = keymap.export_state_dict(ours, htsat_laion_table(ours))
    missing = set(torch_state_dict(ref)) - set(out)
    assert all(k.endswith(("attn_mask", "relative_position_index", "num_batches_tracked", "melW", "conv_real.weight",
                           "conv_imag.weight")) for k in missing)
    for k, v in out.items():
        np.testing.assert_array_equal(v, sd[k], err_msg=k)


def test_hf_table_and_the_sed_head():
    from transformers import ClapAudioConfig, ClapAudioModel
    torch.manual_seed(0)
    hf_sd = torch_state_dict(ClapAudioModel(ClapAudioConfig(enable_fusion=True)))
    with_head = nnx.eval_shape(lambda: HTSAT(_tiny_config(enable_fusion=True, fusion_type="aff_2d"),
                                             rngs=nnx.Rngs(0)))
    assert hf_absent_targets(with_head) == {"tscam_conv.kernel", "tscam_conv.bias", "head.kernel", "head.bias"}
    with pytest.raises(keymap.KeyMappingError) as err:
        keymap.load_state_dict(with_head, hf_sd, htsat_hf_table(with_head))
    assert sorted(err.value.report.missing) == sorted(f"<no table entry> [{t}]" for t in hf_absent_targets(with_head))

    ours = HTSAT(_tiny_config(enable_fusion=True, fusion_type="aff_2d"), rngs=nnx.Rngs(0))
    head_before = np.asarray(ours.tscam_conv.kernel[...])
    rep = keymap.load_state_dict(ours, hf_sd, htsat_hf_table(ours, keep_sed_head=True))
    assert rep.ok and not rep.unexpected
    np.testing.assert_array_equal(ours.tscam_conv.kernel[...], head_before)
    query = "audio_encoder.layers.2.blocks.3.attention.self.query.weight"
    np.testing.assert_array_equal(np.asarray(ours.layers[2].blocks[3].attn.qkv.kernel[...])[:, :384],
                                  hf_sd[query].T)
    out = keymap.export_state_dict(ours, htsat_hf_table(ours, keep_sed_head=True))
    assert set(out) == set(rep.consumed)
    for k, v in out.items():
        np.testing.assert_array_equal(v, hf_sd[k], err_msg=k)

    headless = nnx.eval_shape(lambda: HTSAT(_tiny_config(sed_head=False), rngs=nnx.Rngs(0)))
    _, _, sd = _tiny()
    rep = keymap.load_state_dict(headless, sd, htsat_laion_table(headless))  # LAION → headless: head ignored
    assert {k for k in rep.ignored if k.startswith(("tscam_conv", "head"))} == {
        "tscam_conv.weight", "tscam_conv.bias", "head.weight", "head.bias"}


# --- config ----------------------------------------------------------------------------------------------

def test_config_variants_and_json_round_trip():
    for name in ("tiny", "base", "large"):
        cfg = HTSATConfig.from_laion(laion_model_cfg(f"HTSAT-{name}")["audio_cfg"], True, "aff_2d")
        assert cfg.fused and cfg.num_features == {"tiny": 768, "base": 1024, "large": 2048}[name]
        back = HTSATConfig(**json.loads(json.dumps(dataclasses.asdict(cfg))))
        assert back == cfg and hash(back) == hash(cfg)
    for other in ("daf_2d", "iaff_2d", "aff_1d", "channel_map"):
        with pytest.raises(NotImplementedError, match=other):
            HTSATConfig.tiny(enable_fusion=True, fusion_type=other)
    with pytest.raises(ValueError, match="fusion_type"):
        HTSATConfig.tiny(enable_fusion=True, fusion_type="aff_3d")
    with pytest.raises(ValueError, match="model_name"):
        HTSATConfig.from_laion({**laion_model_cfg()["audio_cfg"], "model_name": "huge"})
    with pytest.raises(ValueError, match="heads"):
        HTSATConfig.tiny(num_heads=(5, 8, 16, 32))


# --- training mode (small tower: the code paths do not depend on width) ---------------------------------

SMALL = dict(embed_dim=16, depths=(2, 2, 2, 1), num_heads=(1, 2, 2, 4))


def _small(abstract: bool = False, *, prec: L.Precision = L.Precision(), remat: bool = False, **kw) -> HTSAT:
    def build():
        return HTSAT(HTSATConfig.tiny(**{**SMALL, **kw}), rngs=nnx.Rngs(0), prec=prec, remat=remat)
    return nnx.eval_shape(build) if abstract else build()


@nnx.jit(static_argnames="deterministic")
def _call(model, inputs, rngs=None, deterministic=True):
    return model(inputs, deterministic=deterministic, rngs=rngs)


def test_bad_inputs_are_refused():
    model = _small(abstract=True)  # every refusal happens before any compute
    with pytest.raises(ValueError, match="needs rngs"):
        model({"waveform": _waveforms(1, 0)}, deterministic=False)
    with pytest.raises(ValueError, match="waveform"):
        model({})
    with pytest.raises(TypeError, match="mapping"):
        model(_waveforms(1, 0))
    with pytest.raises(ValueError, match="only for a fused"):
        model({"waveform": _waveforms(1, 0), "mel_fusion": np.zeros((1, 4, 1001, 64), np.float32),
               "longer": np.ones(1, bool)})
    fused = _small(abstract=True, enable_fusion=True, fusion_type="aff_2d")
    with pytest.raises(ValueError, match="mel_fusion"):
        fused({"waveform": _waveforms(1, 0)})
    with pytest.raises(ValueError, match="one flag per row"):
        fused({"mel_fusion": np.zeros((2, 4, 1001, 64), np.float32), "longer": np.ones(3, bool)})


def test_spec_augment_stripes():
    cfg = HTSATConfig.tiny()
    x = jnp.ones((64, 4, 1001, 64))
    y = np.asarray(fe.spec_augment(x, jax.random.key(0), time_width=cfg.time_drop_width,
                                   time_stripes=cfg.time_stripes_num, freq_width=cfg.freq_drop_width,
                                   freq_stripes=cfg.freq_stripes_num))
    assert (y == y[:, :1]).all()  # the same stripes on every channel of a row
    t_kept, f_kept = y[:, 0].max(axis=2), y[:, 0].max(axis=1)
    assert ((t_kept == 0).sum(axis=1) <= 2 * (cfg.time_drop_width - 1)).all()
    assert ((f_kept == 0).sum(axis=1) <= 2 * (cfg.freq_drop_width - 1)).all()
    assert (t_kept == 0).any() and (f_kept == 0).any()
    assert not np.array_equal(y[0], y[1])


def test_train_mode_is_random_updates_bn0_and_remat_is_transparent():
    inputs = {"waveform": _waveforms(2, 5)}
    plain, remat = _small(drop_path_rate=0.5), _small(drop_path_rate=0.5, remat=True)
    mean_before = np.asarray(plain.bn0.mean[...])
    x = _call(plain, inputs, nnx.Rngs(dropout=3, augment=4), deterministic=False)["embedding"]
    assert not np.array_equal(np.asarray(plain.bn0.mean[...]), mean_before)  # running stats moved
    y = _call(remat, inputs, nnx.Rngs(dropout=3, augment=4), deterministic=False)["embedding"]
    assert _max_abs(x, y) < 1e-5
    z = _call(plain, inputs, nnx.Rngs(dropout=5, augment=4), deterministic=False)["embedding"]
    assert not np.allclose(x, z, atol=1e-3)  # drop-path draws from the dropout stream
    w = _call(plain, inputs, nnx.Rngs(dropout=3, augment=6), deterministic=False)["embedding"]
    assert not np.allclose(x, w, atol=1e-3)  # SpecAugment from the augment stream


def test_remat_gradients_equal_plain_ones():
    """Gradients through a rematerialised Swin stage (one stage: compiling a whole tower's backward is slow)."""
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 32))

    def stage(remat):
        return swin.BasicLayer(32, 16, 2, 2, 8, [0.0, 0.0], nnx.Rngs(0), downsample=True, remat=remat)

    def loss(layer):
        return jnp.sum(layer(x) ** 2)
    grads = [nnx.to_flat_state(nnx.jit(nnx.grad(loss))(stage(r))) for r in (False, True)]
    assert len(grads[0]) == len(grads[1]) > 10
    for (path, a), (_, b) in zip(*grads):
        assert np.abs(np.asarray(a[...])).max() > 0, path
        np.testing.assert_allclose(a[...], b[...], rtol=1e-5, atol=1e-6, err_msg=str(path))


def test_fused_train_mode_uses_longer_rows_only():
    """Non-longer rows' local crops must not touch the output or the AFF statistics, in training too."""
    mel = _mel_fusion(3, seed=6)
    # row 1 is not longer: its crops must be ignored. Reverse them in time, which keeps the
    # per-bin moments that training-mode bn0 takes over every row and channel (as LAION's does)
    other = mel.copy()
    other[1, 1:] = mel[1, 1:, ::-1]
    longer = np.array([True, False, True])
    outs, stats = [], []
    kw = dict(enable_fusion=True, fusion_type="aff_2d", spec_augment=False, drop_path_rate=0.0)
    for m in (mel, other):
        model = _small(**kw)
        outs.append(_call(model, {"mel_fusion": m, "longer": longer}, nnx.Rngs(0), deterministic=False)["embedding"])
        stats.append(np.asarray(model.patch_embed.fusion_model.local_att[1].mean[...]))
    # equal up to bn0's summation order; AFF statistics over all rows would move them by ~0.1
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)
    np.testing.assert_allclose(stats[0], stats[1], atol=1e-6)
    # no longer row in training: LAION flags a random one, so the fusion weights still learn
    model = _small(**kw)
    before = np.asarray(model.patch_embed.fusion_model.local_att[1].mean[...])
    _call(model, {"mel_fusion": mel, "longer": np.zeros(3, bool)}, nnx.Rngs(0), deterministic=False)
    assert not np.array_equal(np.asarray(model.patch_embed.fusion_model.local_att[1].mean[...]), before)


def test_fused_train_mode_matches_laion_batch_statistics():
    """Training-mode BatchNorms (bn0 over all rows, AFF over the single longer row) against LAION."""
    mel = _mel_fusion(3, seed=7)
    longer = np.array([False, True, False])  # one longer row: LAION's duplicate-the-row path
    ref = laion_audio_tower("HTSAT-tiny", True)
    _randomize(ref, mel)
    config = _tiny_config(enable_fusion=True, fusion_type="aff_2d", spec_augment=False, drop_path_rate=0.0)
    ours = _ours(config, torch_state_dict(ref), htsat_laion_table)
    ref.train()
    ref.spec_augmenter = torch.nn.Identity()
    for mod in ref.modules():
        if type(mod).__name__ == "DropPath":
            mod.drop_prob = 0.0
    with torch.no_grad():
        want = ref({"mel_fusion": torch.from_numpy(mel), "longer": torch.from_numpy(longer)[:, None],
                    "waveform": torch.zeros(3, 480000)}, device="cpu")
    got = nnx.jit(lambda m, x, lg: m({"mel_fusion": x, "longer": lg}, deterministic=False, rngs=nnx.Rngs(0)))(
        ours, mel, longer)
    errs = {k: _max_abs(got[k], want[k].numpy()) for k in ("embedding", "clipwise_output")}
    errs["bn0.running_mean"] = _max_abs(ours.bn0.mean[...], ref.bn0.running_mean.numpy())
    errs["local_att.1.running_mean"] = _max_abs(ours.patch_embed.fusion_model.local_att[1].mean[...],
                                                ref.patch_embed.fusion_model.local_att[1].running_mean.numpy())
    _report("LAION tiny aff_2d train-mode BN, longer=[F,T,F]", **errs)
    assert max(errs.values()) <= TOL, errs


def test_bf16_compute_keeps_f32_params():
    inputs = {"waveform": _waveforms(1, 8)}
    model = _small(prec=L.Precision(jnp.bfloat16))
    out = _call(model, inputs)["embedding"]
    assert out.dtype == jnp.bfloat16
    assert model.layers[0].blocks[0].attn.qkv.kernel[...].dtype == jnp.float32
    f32 = nnx.merge(nnx.graphdef(_small(abstract=True)), nnx.state(model))  # same weights, f32 compute
    ref = _call(f32, inputs)["embedding"]
    assert ref.dtype == jnp.float32
    assert _max_abs(out, ref) < 0.1 * float(np.abs(np.asarray(ref)).max())


def test_swin_stage_gradients_match_laion():
    """Training parity: a two-block Swin stage (plain + shifted windows, PatchMerging) against LAION's
    `BasicLayer`, backward included. Our window attention and GELU have hand-written VJPs
    (`swin.window_attention`, `layers.gelu`); every parameter gradient and the input gradient must
    equal torch autograd's."""
    laion_clap()
    from laion_clap.clap_module.htsat import BasicLayer, PatchMerging
    dim, res, heads, window, b = 32, 16, 2, 8, 2
    torch.manual_seed(0)
    ref = BasicLayer(dim, (res, res), 2, heads, window, downsample=PatchMerging).train()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.normal_(0.0, 0.5, generator=g)
            elif name.endswith("bias") or p.ndim == 1:
                p.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.2, generator=g)
    ours = swin.BasicLayer(dim, res, 2, heads, window, [0.0, 0.0], nnx.Rngs(0), downsample=True)
    sd = {k: v.detach().numpy() for k, v in ref.named_parameters()}
    for path, var in nnx.to_flat_state(nnx.state(ours, nnx.Param)):
        *mod, leaf = (str(p) for p in path)
        name = ".".join(mod + [{"kernel": "weight", "scale": "weight"}.get(leaf, leaf)])
        value = sd.pop(name)
        var.set_value(jnp.asarray(value.T if leaf == "kernel" else value))
    assert not sd, f"torch parameters not loaded: {sorted(sd)}"

    rng = np.random.default_rng(0)
    x = rng.normal(size=(b, res, res, dim)).astype(np.float32)
    cot = rng.normal(size=(b, res // 2, res // 2, 2 * dim)).astype(np.float32) * 0.1
    xt = torch.from_numpy(x.reshape(b, res * res, dim)).requires_grad_()
    out, _ = ref(xt)
    (out * torch.from_numpy(cot.reshape(b, -1, 2 * dim))).sum().backward()

    graphdef, params, rest = nnx.split(ours, nnx.Param, ...)

    def loss(params, x):
        return jnp.sum(nnx.merge(graphdef, params, rest)(x) * cot)
    gp, gx = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, jnp.asarray(x))
    errs = {"input": _max_abs(gx.reshape(b, -1, dim), xt.grad.numpy())}
    torch_grads = {k: v.grad.numpy() for k, v in ref.named_parameters()}
    for path, var in nnx.to_flat_state(gp):
        *mod, leaf = (str(p) for p in path)
        name = ".".join(mod + [{"kernel": "weight", "scale": "weight"}.get(leaf, leaf)])
        want = torch_grads.pop(name)
        assert np.abs(want).max() > 1e-3, name                        # a gradient that could be wrong
        errs[name] = _max_abs(var[...].T if leaf == "kernel" else var[...], want)
    assert not torch_grads
    worst = max(errs, key=errs.get)
    _report("swin stage gradients", worst=errs[worst], input=errs["input"])
    assert errs[worst] <= TOL, (worst, errs[worst])
