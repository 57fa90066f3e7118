"""clapjax.audio.io against librosa.load, LAION's get_audio_features and HF's ClapFeatureExtractor.

LAION and HF draw their crops from NumPy's global RNG; seeding it and handing our functions a
`np.random.RandomState` with the same seed reproduces their draws exactly, call for call.
LAION's fusion path calls torchaudio (absent here) and torchvision's Resize (stubbed here): the
fusion test runs LAION's own get_audio_features with those two replaced by independent stand-ins
(librosa's HTK mel, and F.interpolate bilinear without antialias as torchvision ≤ 0.16 did).
"""
import os
import subprocess
import sys
import types
from unittest import mock

import numpy as np
import pytest
import soundfile as sf

sys.path.insert(0, os.path.dirname(__file__))
import reference  # noqa: E402
from helpers import require_tools  # noqa: E402

from clapjax.audio import frontend as fe  # noqa: E402
from clapjax.audio import io  # noqa: E402

CFG = fe.FrontEndConfig()
SR = 48000
TOL_DB = 1e-4
N = CFG.clip_samples


def report(what, value):
    print(f"[max-abs] {what}: {value:.3g}")
    return value


def noise(n, seed):
    return np.random.default_rng(seed).uniform(-0.9, 0.9, n).astype(np.float32)


# --- files ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("audio")
    t = np.arange(int(0.5 * SR)) / SR
    sf.write(d / "mono48k.wav", (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), SR, subtype="PCM_16")
    sf.write(d / "mono48k.flac", (0.3 * np.sin(2 * np.pi * 700 * t)).astype(np.float32), SR)
    sf.write(d / "mono48k.ogg", (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), SR)
    sf.write(d / "mono48k.mp3", (0.3 * np.sin(2 * np.pi * 500 * t)).astype(np.float32), SR)
    require_tools("sox", "espeak-ng")
    subprocess.run(["sox", "-n", "-r", "48000", "-c", "2", str(d / "stereo48k.wav"), "synth", "0.5",
                    "sine", "440", "sine", "660"], check=True)
    subprocess.run(["sox", "-n", "-r", "44100", "-b", "16", str(d / "tone44k.wav"), "synth", "0.4",
                    "sine", "1000"], check=True)
    subprocess.run(["espeak-ng", "-w", str(d / "speech22k.wav"), "contrastive audio"], check=True)
    (d / "empty.wav").write_bytes(b"")
    (d / "notes.txt").write_text("this is not audio\n" * 20)
    sf.write(d / "zero_frames.wav", np.zeros(0, np.float32), SR)
    bad = np.full(4800, 0.1, np.float32)
    bad[100] = np.nan
    sf.write(d / "nan.wav", bad, SR, subtype="FLOAT")
    return d


DECODABLE = ["mono48k.wav", "mono48k.flac", "mono48k.ogg", "mono48k.mp3", "stereo48k.wav", "tone44k.wav",
             "speech22k.wav"]


@pytest.mark.parametrize("name", DECODABLE)
def test_load_audio_equals_librosa_load(audio_dir, name):
    import librosa
    path = audio_dir / name
    got = io.load_audio(path)
    want, _ = librosa.load(path, sr=48000)
    assert got.dtype == np.float32 and got.ndim == 1
    np.testing.assert_array_equal(got, want)


def test_load_audio_resamples_and_mixes_like_librosa(audio_dir):
    for name, rate in [("tone44k.wav", 44100), ("speech22k.wav", 22050)]:
        path = audio_dir / name
        info = sf.info(path)
        assert info.samplerate == rate
        assert abs(len(io.load_audio(path)) - info.frames * 48000 / rate) <= 1
    path = audio_dir / "stereo48k.wav"
    if path.exists():
        stereo, rate = sf.read(path, dtype="float32")
        assert stereo.shape[1] == 2 and rate == 48000 and not np.allclose(stereo[:, 0], stereo[:, 1])
        # librosa's to_mono is the channel mean (no resampling at 48 kHz)
        np.testing.assert_allclose(io.load_audio(path), stereo.mean(axis=1), atol=1e-7)


@pytest.mark.parametrize("name,problem", [("missing.wav", "no such audio file"), ("empty.wav", "empty"),
                                          ("notes.txt", "cannot decode"), ("zero_frames.wav", "zero samples"),
                                          ("nan.wav", "non-finite")])
def test_load_audio_rejects_bad_files(audio_dir, name, problem):
    with pytest.raises(ValueError, match=problem) as err:
        io.load_audio(audio_dir / name)
    assert name in str(err.value)


def test_bad_arrays_are_refused():
    for arr, problem in [(np.zeros(0, np.float32), "zero samples"), (np.array([0.1, np.nan], np.float32), "non-finite"),
                         (np.array([np.inf, 0.0]), "non-finite"), (np.zeros((2, 5), np.float32), "1-D"),
                         (np.zeros(5, np.int16), "floating")]:
        with pytest.raises(ValueError, match=problem):
            io.get_audio_features(arr, CFG)
    with pytest.raises(ValueError, match="zero samples"):
        io.fill(np.zeros(0, np.float32), 10)


# --- LAION's waveform preprocessing -----------------------------------------------------------------

@pytest.fixture(scope="module")
def laion_data():
    reference.laion_clap()
    from laion_clap.training import data
    return data


def test_quantize_int16_is_bit_identical_to_laion(laion_data):
    x = np.concatenate([np.random.default_rng(0).uniform(-1.3, 1.3, 20000),
                        [-1.0, 1.0, -0.99999, 0.99999, 1 / 32767, -1 / 32767, -0.5 / 32767, 0.0]]).astype(np.float32)
    want = laion_data.int16_to_float32(laion_data.float32_to_int16(x))
    got = io.quantize_int16(x)
    assert got.dtype == want.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    assert io.quantize_int16(np.float32([-0.5 / 32767]))[0] == 0.0  # truncation toward zero


def test_int16_conversions_are_laions_on_every_int16(laion_data):
    every = np.arange(-32768, 32768).astype(np.int16)
    want = laion_data.int16_to_float32(every)
    np.testing.assert_array_equal(io.dequantize_int16(every), want)    # a float32 division = LAION's float64 one
    np.testing.assert_array_equal(io.int16_of_quantized(want), every)  # and back, exactly
    with pytest.raises(ValueError, match="not an int16 round trip"):
        io.int16_of_quantized(np.float32([0.1]))


def _laion_features(data, x, truncating, filling, seed):
    import torch
    np.random.seed(seed)
    out = data.get_audio_features({}, torch.from_numpy(x), N, truncating, filling, _AUDIO_CFG)
    return {k: (v.numpy() if hasattr(v, "numpy") else v) for k, v in out.items()}


_AUDIO_CFG = dict(sample_rate=48000, window_size=1024, hop_size=480, mel_bins=64, fmin=50, fmax=14000,
                  clip_samples=480000, class_num=527)


@pytest.mark.parametrize("length", [1000, 100_000, 333_333, N, N + 1, 700_000])
@pytest.mark.parametrize("filling", ["repeatpad", "repeat", "pad"])
def test_unfused_preprocessing_equals_laion(laion_data, length, filling):
    x = noise(length, length)
    seed = length % 1000
    want = _laion_features(laion_data, x, "rand_trunc", filling, seed)
    got = io.get_audio_features(x, CFG, "rand_trunc", filling, rng=np.random.RandomState(seed))
    assert got["waveform"].shape == (N,) and got["waveform"].dtype == np.float32
    np.testing.assert_array_equal(got["waveform"], want["waveform"])
    assert got["longer"] == bool(want["longer"][0]) == (length > N)


def test_crop_modes_and_range():
    x = noise(N + 3, 1)
    starts = {io.crop(x, N, "random", np.random.default_rng(s))[1] for s in range(200)}
    assert starts == {0, 1, 2, 3}  # uniform over [0, len - max_len], both ends included
    assert io.crop(x, N, "start")[1] == 0 and io.crop(x, N, "center")[1] == 1
    np.testing.assert_array_equal(io.crop(x, N, start=2)[0], x[2:2 + N])
    with pytest.raises(ValueError, match="needs rng"):
        io.crop(x, N, "random")
    with pytest.raises(ValueError, match="out of range"):
        io.crop(x, N, start=4)
    det = io.get_audio_features(noise(600_000, 2), CFG, crop_mode="center")
    np.testing.assert_array_equal(det["waveform"], noise(600_000, 2)[60_000:60_000 + N])


def test_fill_modes_by_hand():
    x = np.float32([1, 2, 3])
    np.testing.assert_array_equal(io.fill(x, 8, "repeatpad"), [1, 2, 3, 1, 2, 3, 0, 0])
    np.testing.assert_array_equal(io.fill(x, 8, "repeat"), [1, 2, 3, 1, 2, 3, 1, 2])
    np.testing.assert_array_equal(io.fill(x, 8, "pad"), [1, 2, 3, 0, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="unknown fill mode"):
        io.fill(x, 8, "mirror")
    with pytest.raises(ValueError, match="longer than max_len"):
        io.fill(x, 2)


# --- fusion ---------------------------------------------------------------------------------------

def _torchaudio_standin():
    """librosa-backed MelSpectrogram / AmplitudeToDB with torchaudio's signatures (HTK, no norm)."""
    import librosa
    import torch

    class MelSpectrogram:
        def __init__(self, sample_rate, n_fft, win_length, hop_length, center, pad_mode, power, norm, onesided,
                     n_mels, f_min, f_max):
            assert (center, pad_mode, power, norm, onesided) == (True, "reflect", 2.0, None, True)
            self.kw = dict(sr=sample_rate, n_fft=n_fft, win_length=win_length, hop_length=hop_length,
                           n_mels=n_mels, fmin=f_min, fmax=f_max)

        def to(self, device):
            return self

        def __call__(self, audio):
            mel = librosa.feature.melspectrogram(y=audio.numpy(), center=True, pad_mode="reflect", power=2.0,
                                                 htk=True, norm=None, **self.kw)
            return torch.from_numpy(mel)

    class AmplitudeToDB:
        def __init__(self, top_db=None):
            assert top_db is None

        def __call__(self, x):
            return 10.0 * torch.log10(torch.clamp(x, min=1e-10))

    return types.SimpleNamespace(transforms=types.SimpleNamespace(MelSpectrogram=MelSpectrogram,
                                                                  AmplitudeToDB=AmplitudeToDB))


def _resize_without_antialias(size):
    import torch.nn.functional as F
    return lambda img: F.interpolate(img[None], size=list(size), mode="bilinear", align_corners=False,
                                     antialias=False)[0]


@pytest.mark.parametrize("length", [700_000, N + 100, N + 480, N + 960, 200_000, N])
def test_laion_fusion_mode_equals_laion_get_audio_features(laion_data, length):
    x = noise(length, length + 7)
    seed = 11
    with mock.patch.object(laion_data, "torchaudio", _torchaudio_standin()), \
            mock.patch.object(laion_data.torchvision.transforms, "Resize", _resize_without_antialias):
        want = _laion_features(laion_data, x, "fusion", "repeatpad", seed)
    got = io.get_audio_features(x, CFG, "fusion", "repeatpad", rng=np.random.RandomState(seed), mode="laion")
    assert got["mel_fusion"].shape == want["mel_fusion"].shape == (4, 1001, 64)
    assert got["longer"] == bool(want["longer"][0]) == (length >= N + 480)  # one more frame than a clip
    np.testing.assert_array_equal(got["waveform"], want["waveform"])  # same crop draw, after the chunk draws
    assert report(f"laion fusion mel_fusion vs LAION get_audio_features, {length} samples",
                  np.abs(got["mel_fusion"] - want["mel_fusion"]).max()) <= TOL_DB


def test_fusion_chunk_layout_by_hand():
    total = 1500
    ramp = np.arange(total, dtype=np.float64)[:, None] + 0.01 * np.arange(64)[None, :]  # mel[t, f] = t + f/100
    parts = np.array_split(np.arange(total - 1001 + 1), 3)
    starts = io.fusion_chunk_starts(total, 1001, "random", np.random.default_rng(0))
    assert all(s in p for s, p in zip(starts, parts))
    assert io.fusion_chunk_starts(total, 1001, "start") == (0, 167, 334)
    assert io.fusion_chunk_starts(total, 1001, "center") == (83, 250, 417)
    assert io.fusion_chunk_starts(1002, 1001, "start") == (0, 1, 0)  # empty third part → start 0
    for mode in ("laion", "hf"):
        fused, longer = io.fusion_mel(ramp, CFG, mode=mode, starts=(5, 200, 499))
        assert longer and fused.shape == (4, 1001, 64)
        for ch, s in zip((1, 2, 3), (5, 200, 499)):
            np.testing.assert_array_equal(fused[ch], ramp[s:s + 1001].astype(np.float32))
        # bilinear of a ramp is the ramp at the half-pixel source position (clamped at both ends)
        src = np.clip((np.arange(1001) + 0.5) * total / 1001 - 0.5, 0, total - 1)
        # (to float32 resolution: torch placed the sources in float32)
        np.testing.assert_allclose(fused[0], src[:, None] + 0.01 * np.arange(64)[None, :], rtol=0, atol=5e-4)
    same, longer = io.fusion_mel(ramp[:1001], CFG)
    assert not longer and all(np.array_equal(same[i], ramp[:1001].astype(np.float32)) for i in range(4))
    with pytest.raises(ValueError, match="shorter than one clip"):
        io.fusion_mel(ramp[:900], CFG)
    with pytest.raises(ValueError, match="needs rng"):
        io.fusion_mel(ramp, CFG)


def test_bilinear_matrix_equals_torch_interpolate():
    import torch
    for dtype, tdtype in [(np.float32, torch.float32), (np.float64, torch.float64)]:
        for n_in in (1002, 1500, 3001):
            eye = torch.eye(n_in, dtype=tdtype)[None, :, :, None]
            want = torch.nn.functional.interpolate(eye, (1001, 1), mode="bilinear", align_corners=False)[0, :, :, 0]
            assert np.abs(io.bilinear_matrix(n_in, 1001, dtype) - want.numpy().T).max() <= 1e-12


def test_host_log_mel_equals_device_log_mel():
    x = noise(300_000, 5)
    for kind in ("slaney", "htk"):
        host = io.host_log_mel(x, CFG, kind)
        dev = np.asarray(fe.log_mel(x[None], CFG, kind))[0]
        assert host.shape == dev.shape == (626, 64)
        assert report(f"host_log_mel vs frontend.log_mel ({kind})", np.abs(host - dev).max()) <= TOL_DB


@pytest.mark.parametrize("truncation", ["rand_trunc", "fusion"])
@pytest.mark.parametrize("lengths", [(700_000, 150_000, N), (200_000, 90_000)], ids=["mixed", "all_short"])
def test_hf_mode_equals_clap_feature_extractor(truncation, lengths):
    from transformers import ClapFeatureExtractor
    hf = ClapFeatureExtractor(frequency_min=50, frequency_max=14000, truncation=truncation, padding="repeatpad")
    clips = [noise(n, n + 3) for n in lengths]
    seed = 5
    np.random.seed(seed)
    want = hf(clips, sampling_rate=SR, return_tensors="np")
    got = io.batch_audio_features(clips, CFG, truncation, "repeatpad", rng=np.random.RandomState(seed), mode="hf")
    np.testing.assert_array_equal(got["longer"], want["is_longer"][:, 0])
    if truncation == "fusion":
        assert got["mel_fusion"].shape == want["input_features"].shape == (len(clips), 4, 1001, 64)
        assert report(f"hf fusion mel_fusion vs ClapFeatureExtractor {lengths}",
                      np.abs(got["mel_fusion"] - want["input_features"]).max()) <= TOL_DB
        if all(n <= N for n in lengths):
            assert got["longer"].sum() == 1  # HF's forced is_longer
    else:
        mel = np.asarray(fe.log_mel(got["waveform"], CFG, "slaney"))
        assert report(f"hf rand_trunc log_mel vs ClapFeatureExtractor {lengths}",
                      np.abs(mel - want["input_features"][:, 0]).max()) <= TOL_DB


def test_laion_mode_leaves_short_fused_batches_unforced():
    clips = [noise(200_000, 1), noise(90_000, 2)]
    got = io.batch_audio_features(clips, CFG, "fusion", rng=np.random.default_rng(0), mode="laion")
    assert got["longer"].tolist() == [False, False]
    assert got["mel_fusion"].shape == (2, 4, 1001, 64)
    np.testing.assert_array_equal(got["mel_fusion"][:, 0], got["mel_fusion"][:, 3])
    with pytest.raises(ValueError, match="empty batch"):
        io.batch_audio_features([], CFG)
    with pytest.raises(ValueError, match="unknown preprocessing mode"):
        io.get_audio_features(clips[0], CFG, mode="torch")
