"""Parity of clapjax.audio.frontend with torchlibrosa, HF's ClapFeatureExtractor, librosa and HTSAT.

Log-mel values are compared in dB with max-abs 1e-4. For pure tones one caveat is structural, not a
tolerance: mel bands deep in a tone's spectral leakage (> 60 dB under the frame's peak band) hold
power at the float32 round-off floor of *any* float32 STFT, torchlibrosa's direct-DFT convolution
included. There the reference itself is ~1e-2 dB away from the exact (float64) value, so the tone
tests compare with torchlibrosa on the bands within 30 dB of the frame peak (where the reference is
accurate to ~1e-5 dB), and with the exact float64 log-mel on all bands within 60 dB.
"""
import json
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import reference  # noqa: E402

from clapjax.audio import frontend as fe  # noqa: E402

CFG = fe.FrontEndConfig()
TOL_DB = 1e-4
SR = 48000


def _tone(freqs_amps, n, phase=0.3):
    t = np.arange(n) / SR
    return sum(a * np.sin(2 * np.pi * f * t + phase) for f, a in freqs_amps).astype(np.float32)


@pytest.fixture(scope="module")
def signals():
    g = np.random.default_rng(0)
    n = 2 * SR  # 2 s keeps the module fast; one full 10 s clip is tested separately
    return {
        "noise": g.uniform(-1, 1, n).astype(np.float32),
        "quiet_noise": (1e-4 * g.standard_normal(n)).astype(np.float32),
        "silence": np.zeros(n, np.float32),
        "tone_1k": _tone([(1000.0, 0.5)], n),
        "two_tones": _tone([(440.0, 0.3), (5123.4, 0.2)], n),
        "low_tone": _tone([(97.3, 0.01)], n),
    }


BROADBAND = ["noise", "quiet_noise", "silence"]
TONES = ["tone_1k", "two_tones", "low_tone"]

_jit_log_mel = jax.jit(fe.log_mel, static_argnums=(1, 2))


def ours(x, cfg=CFG, kind="slaney"):
    return np.asarray(_jit_log_mel(jnp.asarray(np.atleast_2d(x)), cfg, kind))


@pytest.fixture(scope="module")
def torchlibrosa_front():
    from torchlibrosa.stft import LogmelFilterBank, Spectrogram

    def build(cfg):
        # exactly the arguments HTSAT_Swin_Transformer / Cnn14 pass
        spec = Spectrogram(n_fft=cfg.window_size, hop_length=cfg.hop_size, win_length=cfg.window_size,
                           window="hann", center=True, pad_mode="reflect", freeze_parameters=True)
        mel = LogmelFilterBank(sr=cfg.sample_rate, n_fft=cfg.window_size, n_mels=cfg.mel_bins, fmin=cfg.fmin,
                               fmax=cfg.fmax, ref=1.0, amin=1e-10, top_db=None, freeze_parameters=True)
        return spec, mel
    return build


def torchlibrosa_log_mel(build, x, cfg=CFG):
    import torch
    spec, mel = build(cfg)
    with torch.no_grad():
        return mel(spec(torch.from_numpy(np.atleast_2d(x))))[:, 0].numpy()


def exact_log_mel(x, cfg=CFG, kind="slaney"):
    """float64 reference of the same definition (float32 samples, float64 everything else)."""
    xp = np.pad(np.asarray(x, np.float64), cfg.n_fft // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(xp, cfg.n_fft)[::cfg.hop_size]
    power = np.abs(np.fft.rfft(frames * fe.hann_window(cfg.n_fft), axis=-1)) ** 2
    return 10 * np.log10(np.maximum(power @ fe.mel_filterbank(cfg, kind).astype(np.float64), 1e-10))


def near_peak(ref_db, within_db):
    """Entries within `within_db` of their frame's loudest band."""
    return ref_db >= ref_db.max(axis=-1, keepdims=True) - within_db


def report(what, value):
    print(f"[max-abs] {what}: {value:.3g}")
    return value


# --- config -------------------------------------------------------------------------------------

def test_config_from_every_laion_audio_cfg():
    lc = reference.laion_clap()
    cfg_dir = os.path.join(os.path.dirname(lc.__file__), "clap_module", "model_configs")
    seen = {}
    for name in sorted(os.listdir(cfg_dir)):
        with open(os.path.join(cfg_dir, name)) as f:
            audio_cfg = json.load(f).get("audio_cfg")
        if audio_cfg is None:  # open_clip vision leftovers
            continue
        cfg = fe.FrontEndConfig.from_laion(audio_cfg)
        assert (cfg.window_size, cfg.hop_size, cfg.fmax) == (audio_cfg["window_size"], audio_cfg["hop_size"],
                                                             audio_cfg["fmax"])
        seen[name] = cfg
    assert seen["HTSAT-tiny.json"] == fe.FrontEndConfig()
    assert seen["HTSAT-tiny-win-1536.json"].n_fft == 1536
    pann20 = seen["PANN-14-fmax-8k-20s.json"]
    assert (pann20.hop_size, pann20.fmax, pann20.clip_samples, pann20.clip_frames) == (360, 8000.0, 960000, 2667)
    assert len(seen) >= 10
    with pytest.raises(ValueError, match="lacks front-end keys"):
        fe.FrontEndConfig.from_laion({"sample_rate": 48000})
    with pytest.raises(ValueError, match="fmax"):
        fe.FrontEndConfig(fmax=30000.0)
    with pytest.raises(ValueError, match="hop_size"):
        fe.FrontEndConfig(hop_size=0)


# --- constants vs the stored/recomputed reference values ------------------------------------------

@pytest.mark.parametrize("window", [1024, 1536])
def test_stft_kernels_equal_torchlibrosa_conv_weights(torchlibrosa_front, window):
    cfg = fe.FrontEndConfig(window_size=window)
    spec, _ = torchlibrosa_front(cfg)
    real, imag = fe.stft_kernels(cfg)
    want_r, want_i = spec.stft.conv_real.weight.numpy(), spec.stft.conv_imag.weight.numpy()
    assert real.shape == want_r.shape == (window // 2 + 1, 1, window) and real.dtype == np.float32
    assert report(f"stft_kernels real n_fft={window}", np.abs(real - want_r).max()) <= 1e-6
    assert report(f"stft_kernels imag n_fft={window}", np.abs(imag - want_i).max()) <= 1e-6


@pytest.mark.parametrize("cfg", [fe.FrontEndConfig(), fe.FrontEndConfig(hop_size=360, fmax=8000.0),
                                 fe.FrontEndConfig(window_size=1536), fe.FrontEndConfig(fmax=18000.0)],
                         ids=["default", "fmax8k", "win1536", "fmax18k"])
def test_mel_filterbanks_equal_references(torchlibrosa_front, cfg):
    import librosa
    from transformers.audio_utils import mel_filter_bank
    slaney = fe.mel_filterbank(cfg, "slaney")
    htk = fe.mel_filterbank(cfg, "htk")
    assert slaney.shape == htk.shape == (cfg.n_freqs, cfg.mel_bins) and slaney.dtype == np.float32
    melw = torchlibrosa_front(cfg)[1].melW.numpy()
    assert report("slaney bank vs torchlibrosa melW", np.abs(slaney - melw).max()) <= 1e-7
    hf_args = dict(num_frequency_bins=cfg.n_freqs, num_mel_filters=cfg.mel_bins, min_frequency=cfg.fmin,
                   max_frequency=cfg.fmax, sampling_rate=cfg.sample_rate)
    assert np.abs(slaney - mel_filter_bank(**hf_args, norm="slaney", mel_scale="slaney")).max() <= 1e-7
    assert report("htk bank vs HF mel_filters", np.abs(htk - mel_filter_bank(**hf_args, norm=None, mel_scale="htk"))
                  .max()) <= 1e-6
    lib_htk = librosa.filters.mel(sr=cfg.sample_rate, n_fft=cfg.n_fft, n_mels=cfg.mel_bins, fmin=cfg.fmin,
                                  fmax=cfg.fmax, htk=True, norm=None).T
    assert np.abs(htk - lib_htk).max() <= 1e-6
    with pytest.raises(ValueError, match="unknown mel filterbank kind"):
        fe.mel_filterbank(cfg, "mfcc")


# --- log-mel parity ------------------------------------------------------------------------------

def test_full_clip_has_1001_frames_and_matches_torchlibrosa(torchlibrosa_front):
    x = np.random.default_rng(1).uniform(-1, 1, CFG.clip_samples).astype(np.float32)
    got = ours(x)
    assert got.shape == (1, CFG.clip_frames, 64) == (1, 1001, 64)
    want = torchlibrosa_log_mel(torchlibrosa_front, x)
    assert report("log_mel vs torchlibrosa, 10 s noise", np.abs(got - want).max()) <= TOL_DB


@pytest.mark.parametrize("name", BROADBAND)
def test_log_mel_matches_torchlibrosa_broadband(torchlibrosa_front, signals, name):
    got, want = ours(signals[name]), torchlibrosa_log_mel(torchlibrosa_front, signals[name])
    assert got.shape == want.shape
    assert report(f"log_mel vs torchlibrosa, {name}", np.abs(got - want).max()) <= TOL_DB
    if name == "silence":
        np.testing.assert_array_equal(got, -100.0)


@pytest.mark.parametrize("name", TONES)
def test_log_mel_matches_torchlibrosa_tones(torchlibrosa_front, signals, name):
    x = signals[name]
    got, want, exact = ours(x)[0], torchlibrosa_log_mel(torchlibrosa_front, x)[0], exact_log_mel(x)
    d = np.abs(got - want)
    report(f"log_mel vs torchlibrosa, {name}, all bands (float32 floor)", d.max())
    report(f"torchlibrosa vs float64 exact, {name}, all bands", np.abs(want - exact).max())
    assert report(f"log_mel vs torchlibrosa, {name}, within 30 dB of frame peak",
                  d[near_peak(exact, 30)].max()) <= TOL_DB
    assert report(f"log_mel vs float64 exact, {name}, within 60 dB of frame peak",
                  np.abs(got - exact)[near_peak(exact, 60)].max()) <= TOL_DB


@pytest.mark.parametrize("truncation", ["rand_trunc", "fusion"])
def test_log_mel_matches_hf_feature_extractor(signals, truncation):
    from transformers import ClapFeatureExtractor
    # the Hub configs' values (the class default frequency_min=0 matches no checkpoint)
    hf = ClapFeatureExtractor(frequency_min=50, frequency_max=14000, truncation=truncation)
    kind = "slaney" if truncation == "rand_trunc" else "htk"
    x = np.concatenate([signals["noise"], signals["two_tones"], signals["silence"], signals["tone_1k"],
                        signals["quiet_noise"]])[:CFG.clip_samples]  # exactly 10 s: no crop, no fill
    feats = hf(x, sampling_rate=SR, return_tensors="np")["input_features"]
    assert feats.shape == ((1, 1, 1001, 64) if truncation == "rand_trunc" else (1, 4, 1001, 64))
    got, exact = ours(x, kind=kind)[0], exact_log_mel(x, kind=kind)
    for ch in range(feats.shape[1]):
        d = np.abs(got - feats[0, ch])
        # the clip mixes noise (all bands) with tones; the float32 floor bites only deep in leakage
        assert report(f"log_mel vs HF {truncation} ({kind}), within 60 dB of frame peak",
                      d[near_peak(exact, 60)].max()) <= TOL_DB
    report(f"log_mel vs HF {truncation} ({kind}), all bands", np.abs(got - feats[0, 0]).max())
    noise_part = slice(0, 190)  # frames fully inside the leading noise
    assert report(f"log_mel vs HF {truncation} ({kind}), noise frames",
                  np.abs(got[noise_part] - feats[0, 0, noise_part]).max()) <= TOL_DB


@pytest.mark.parametrize("kind", ["slaney", "htk"])
def test_log_mel_matches_librosa(signals, kind):
    import librosa
    for name in BROADBAND + TONES:
        x = signals[name]
        mel = librosa.feature.melspectrogram(y=x, sr=SR, n_fft=1024, hop_length=480, win_length=1024,
                                             window="hann", center=True, pad_mode="reflect", power=2.0,
                                             n_mels=64, fmin=50, fmax=14000, htk=kind == "htk",
                                             norm="slaney" if kind == "slaney" else None)
        want = librosa.power_to_db(mel, ref=1.0, amin=1e-10, top_db=None).T
        got = ours(x, kind=kind)[0]
        mask = near_peak(exact_log_mel(x, kind=kind), 30) if name in TONES else np.ones(got.shape, bool)
        assert report(f"log_mel vs librosa {kind}, {name}", np.abs(got - want)[mask].max()) <= TOL_DB


def test_log_mel_is_batched_and_jittable(signals):
    batch = np.stack([signals["noise"], signals["tone_1k"], signals["silence"]])
    together = ours(batch)
    assert together.shape == (3, 2 * SR // 480 + 1, 64)
    for i in range(3):
        np.testing.assert_allclose(together[i], ours(batch[i])[0], atol=1e-5)
    power = np.asarray(jax.jit(fe.stft_power, static_argnums=1)(batch[:1], CFG))
    assert power.shape == (1, 201, 513) and (power >= 0).all()


def test_log_mel_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(batch, samples\)"):
        fe.log_mel(np.zeros(48000, np.float32), CFG)
    with pytest.raises(ValueError, match="too short"):
        fe.log_mel(np.zeros((1, 300), np.float32), CFG)
    with pytest.raises(ValueError, match="floating point"):
        fe.log_mel(np.zeros((1, 4800), np.int16), CFG)


# --- HTSAT's reshape ------------------------------------------------------------------------------

def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float32 matrix M with M @ x = PyTorch bicubic resize of x, align_corners=True, from
    `fe.bicubic_taps`: the dense oracle for the four-tap stencil the front end runs.

    Source position of output i is i·(n_in−1)/(n_out−1); the four taps floor−1..floor+2 take Keys weights
    (A = −0.75) and taps beyond the edges are clamped onto the border samples, as `upsample_bicubic2d` does.
    PyTorch computes the positions and weights in float32 for HTSAT; float64 positions would move 1001→1024
    outputs by up to 3e-4. Equal sizes give the identity."""
    idx, weights = fe.bicubic_taps(n_in, n_out)
    m = np.zeros((n_out, n_in), dtype=np.float64)
    rows = np.arange(n_out)
    for tap_idx, w in zip(idx, weights):
        np.add.at(m, (rows, tap_idx), w.astype(np.float64))
    return m.astype(np.float32)


@pytest.mark.parametrize("n_in,n_out", [(1001, 1024), (64, 64), (7, 13), (13, 7), (5, 1), (1, 4), (2667, 1024)])
def test_bicubic_matrix_equals_torch_interpolate(n_in, n_out):
    import torch
    x = np.random.default_rng(n_in).standard_normal((2, 3, n_in, 5)).astype(np.float32)
    want = torch.nn.functional.interpolate(torch.from_numpy(x), (n_out, 5), mode="bicubic",
                                           align_corners=True).numpy()
    m = bicubic_matrix(n_in, n_out)
    assert m.shape == (n_out, n_in) and m.dtype == np.float32
    got = np.einsum("ot,bctf->bcof", m.astype(np.float64), x.astype(np.float64))
    assert report(f"bicubic_matrix {n_in}->{n_out} vs torch", np.abs(got - want).max()) <= 1e-6
    # torch's own weights, read off by resizing unit impulses: ours are bit-identical
    eye = torch.eye(n_in, dtype=torch.float32)[None, :, :, None]
    torch_m = torch.nn.functional.interpolate(eye, (n_out, 1), mode="bicubic", align_corners=True)[0, :, :, 0]
    np.testing.assert_array_equal(m, torch_m.numpy().T)
    if n_in == n_out:
        np.testing.assert_array_equal(m, np.eye(n_in, dtype=np.float32))


@pytest.mark.parametrize("shape,spec_size,freq_ratio", [((2, 1, 1001, 64), 256, 4), ((2, 4, 1001, 64), 256, 4),
                                                        ((1, 1, 1024, 64), 256, 4), ((1, 2, 900, 60), 256, 4),
                                                        ((1, 1, 251, 32), 128, 4)])
def test_reshape_wav2img_equals_laion_htsat(shape, spec_size, freq_ratio):
    import torch
    reference.laion_clap()
    from laion_clap.clap_module.htsat import HTSAT_Swin_Transformer
    # the method only reads spec_size and freq_ratio; no need to build a whole Swin model
    owner = types.SimpleNamespace(spec_size=spec_size, freq_ratio=freq_ratio)
    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    with torch.no_grad():
        want = HTSAT_Swin_Transformer.reshape_wav2img(owner, torch.from_numpy(x)).numpy()
    got = np.asarray(jax.jit(fe.reshape_wav2img, static_argnums=(1, 2))(x, spec_size, freq_ratio))
    assert got.shape == want.shape == shape[:2] + (spec_size, spec_size)
    assert report(f"reshape_wav2img {shape} vs laion htsat", np.abs(got - want).max()) <= 1e-6


def test_reshape_wav2img_refuses_what_htsat_asserts():
    with pytest.raises(ValueError, match="exceeds HTSAT"):
        fe.reshape_wav2img(np.zeros((1, 1, 1025, 64), np.float32))
    with pytest.raises(ValueError, match=r"\(B, C, T, F\)"):
        fe.reshape_wav2img(np.zeros((1, 1001, 64), np.float32))
