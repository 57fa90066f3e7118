"""Host-side audio input: decoding, LAION's waveform preprocessing and the fusion mel chunks.

Mirrors LAION-CLAP's `hook.py` + `training/data.py:get_audio_features` ('laion' mode) and HF's
`ClapFeatureExtractor` ('hf' mode). The two differ only in details listed at `get_audio_features`.

Randomness is always explicit. `rng` may be a `np.random.Generator` or a legacy
`np.random.RandomState`; with a RandomState seeded like NumPy's global RNG, the draws are exactly
the ones LAION/HF make (they call `np.random.randint` / `np.random.choice` unseeded, LAION-CLAP
issue #166), in the same order. `crop_mode='start'|'center'` needs no rng at all.
"""
from __future__ import annotations

import os
import warnings
from typing import Literal, Sequence

import numpy as np

from clapjax.audio.frontend import AMIN, FrontEndConfig, MelKind, hann_window, mel_filterbank

Rng = np.random.Generator | np.random.RandomState
FillMode = Literal["repeatpad", "repeat", "pad"]
CropMode = Literal["random", "start", "center"]
Mode = Literal["laion", "hf"]
FUSION_CHUNKS = 4  # [whole clip shrunk, front, middle, back]
_FRAME_BLOCK = 2048


# --- decoding -------------------------------------------------------------------------------

def check_waveform(x, what: str = "waveform") -> np.ndarray:
    """A finite, non-empty 1-D float waveform, or ValueError saying what is wrong with `what`."""
    x = np.asarray(x)
    if x.ndim != 1:
        raise ValueError(f"{what}: expected a 1-D mono waveform, got shape {x.shape}")
    if x.size == 0:
        raise ValueError(f"{what}: has zero samples")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{what}: expected floating-point samples, got {x.dtype}")
    bad = ~np.isfinite(x)
    if bad.any():
        raise ValueError(f"{what}: {int(bad.sum())} non-finite (NaN/inf) samples, first at index "
                         f"{int(np.argmax(bad))}")
    return x


# What a folder of audio means (the CLI's folder arguments, GTZAN's genre folders): the file types
# `load_audio` decodes through libsndfile or audioread. `.au` is GTZAN's.
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".au")


def load_audio(path: str | os.PathLike, sr: int = 48000) -> np.ndarray:
    """Decode any file librosa reads (wav, flac, ogg, mp3 with libsndfile ≥ 1.1, ...) to float32 mono.

    Exactly `librosa.load(path, sr=sr)` (LAION's loader): channels averaged, resampled with
    librosa's default resampler. Raises ValueError naming the file for a missing, empty or
    undecodable file, and for a decoded signal with no samples or non-finite samples.
    """
    import librosa  # heavy import, only when a file is actually read

    name = os.fspath(path)
    if not os.path.isfile(name):
        raise ValueError(f"{name}: no such audio file")
    if os.path.getsize(name) == 0:
        raise ValueError(f"{name}: file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # librosa warns when libsndfile fails and it falls back to audioread; the fallback's
            # own failure is what we report.
            warnings.simplefilter("ignore", FutureWarning)
            warnings.filterwarnings("ignore", "PySoundFile failed", UserWarning)
            y, _ = librosa.load(name, sr=sr)
    except librosa.util.exceptions.ParameterError as err:
        if "not finite" in str(err):  # librosa's own check of the decoded buffer
            raise ValueError(f"{name}: decoded samples are non-finite (NaN/inf)") from err
        raise ValueError(f"{name}: cannot decode as audio ({err})") from err
    except Exception as err:  # soundfile, audioread and librosa each raise their own types
        raise ValueError(f"{name}: cannot decode as audio ({type(err).__name__}: {err})") from err
    return check_waveform(y, name).astype(np.float32, copy=False)


INT16_SCALE = 32767.0   # LAION's: float32_to_int16 multiplies by it, int16_to_float32 divides by it


def quantize_int16(x) -> np.ndarray:
    """LAION's int16 round trip: clip to [-1, 1], ×32767, truncate to int16, ÷32767 (in float64), float32.

    The same operations in the same dtypes as `int16_to_float32(float32_to_int16(x))` up to the division
    (`dequantize_int16`), so the result is bit-identical.
    """
    x = check_waveform(x) if np.ndim(x) == 1 else np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"quantize_int16 expects floating-point samples, got {x.dtype}")
    return dequantize_int16((np.clip(x, -1.0, 1.0) * INT16_SCALE).astype(np.int16))


def dequantize_int16(pcm: np.ndarray) -> np.ndarray:
    """int16 samples → float32 as LAION's `int16_to_float32` gives them (÷32767 in float64, then float32).
    One correctly rounded float32 division gives the same value for every int16 (all 65536 are checked in
    tests/test_audio_io.py) at a fraction of the cost."""
    out = np.asarray(pcm, np.int16).astype(np.float32)
    out /= np.float32(INT16_SCALE)
    return out


def int16_of_quantized(q: np.ndarray, *, check: bool = True) -> np.ndarray:
    """The int16 samples behind `quantize_int16`'s output (its exact inverse: q·32767 is within 0.005 of
    an integer in float32). `check` verifies that `q` is such an output, at the cost of one more pass."""
    pcm = np.rint(np.asarray(q, np.float32) * np.float32(INT16_SCALE)).astype(np.int16)
    if check and not np.array_equal(dequantize_int16(pcm), q):
        raise ValueError("samples are not an int16 round trip's output; cannot store them as int16")
    return pcm


# --- filling and cropping -------------------------------------------------------------------

def fill(x, max_len: int, mode: FillMode = "repeatpad") -> np.ndarray:
    """Bring a clip of at most `max_len` samples to exactly `max_len`, as LAION does.

    'repeatpad': tile ⌊max_len/len⌋ times, then zero-pad the tail; 'repeat': tile ⌊max_len/len⌋+1
    times and cut; 'pad': zero-pad only. A clip of exactly `max_len` is returned unchanged.
    """
    x = check_waveform(x)
    n = len(x)
    if n > max_len:
        raise ValueError(f"fill: clip of {n} samples is longer than max_len={max_len}; crop it instead")
    if n == max_len:
        return x
    reps = max_len // n  # int(max_len / n) for the sizes audio has
    if mode == "repeatpad":
        x = np.tile(x, reps)
    elif mode == "repeat":
        return np.tile(x, reps + 1)[:max_len]
    elif mode != "pad":
        raise ValueError(f"unknown fill mode {mode!r}; expected 'repeatpad', 'repeat' or 'pad'")
    return np.pad(x, (0, max_len - len(x)))


def _randint(rng: Rng, high: int) -> int:
    """Uniform integer in [0, high): `randint` on a RandomState (LAION's draw), `integers` otherwise."""
    if isinstance(rng, np.random.RandomState):
        return int(rng.randint(0, high))
    if isinstance(rng, np.random.Generator):
        return int(rng.integers(0, high))
    raise ValueError(f"rng must be a numpy Generator or RandomState, got {type(rng).__name__}")


def _need_rng(rng: Rng | None, what: str) -> Rng:
    if rng is None:
        raise ValueError(f"{what} with mode 'random' needs rng (a numpy Generator or RandomState); "
                         f"pass one, or use crop_mode='start' / 'center' for a deterministic choice")
    return rng


def crop_start(length: int, max_len: int, mode: CropMode = "random", rng: Rng | None = None) -> int:
    """Start of a `max_len` window in `length` samples: uniform in [0, length-max_len] (LAION's
    rand_trunc, inclusive), 0, or the centre (floor)."""
    overflow = length - max_len
    if overflow < 0:
        raise ValueError(f"cannot crop {max_len} samples out of {length}")
    if mode == "random":
        return _randint(_need_rng(rng, "crop"), overflow + 1)
    if mode == "start":
        return 0
    if mode == "center":
        return overflow // 2
    raise ValueError(f"unknown crop mode {mode!r}; expected 'random', 'start' or 'center'")


def crop(x, max_len: int, mode: CropMode = "random", rng: Rng | None = None,
         start: int | None = None) -> tuple[np.ndarray, int]:
    """A `max_len`-sample window of `x` and its start; `start=` overrides `mode`/`rng`."""
    x = check_waveform(x)
    if start is None:
        start = crop_start(len(x), max_len, mode, rng)
    elif not 0 <= start <= len(x) - max_len:
        raise ValueError(f"crop start {start} out of range [0, {len(x) - max_len}]")
    return x[start:start + max_len], int(start)


# --- host log-mel and fusion chunks -----------------------------------------------------------

def host_log_mel(waveform, cfg: FrontEndConfig, kind: MelKind = "htk") -> np.ndarray:
    """(T, mel_bins) dB log-mel of one clip in float64 NumPy (the data-pipeline mel, like LAION's
    `get_mel` and HF's numpy extractor): same definition as `frontend.log_mel`, but on the host
    so clips of any length need no recompilation. Returned as float32."""
    x = check_waveform(waveform).astype(np.float64)
    pad = cfg.n_fft // 2
    if len(x) <= pad:
        raise ValueError(f"waveform of {len(x)} samples is too short for reflect padding by {pad}")
    x = np.pad(x, pad, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(x, cfg.n_fft)[::cfg.hop_size]  # a view
    window, bank = hann_window(cfg.n_fft), mel_filterbank(cfg, kind).astype(np.float64)
    out = np.empty((len(frames), cfg.mel_bins), dtype=np.float32)
    for i in range(0, len(frames), _FRAME_BLOCK):  # blocks bound the memory of hour-long clips
        spec = np.fft.rfft(frames[i:i + _FRAME_BLOCK] * window, axis=-1)
        mel = (spec.real ** 2 + spec.imag ** 2) @ bank
        out[i:i + _FRAME_BLOCK] = 10.0 * np.log10(np.maximum(mel, AMIN))
    return out


def bilinear_matrix(n_in: int, n_out: int, position_dtype=np.float64) -> np.ndarray:
    """(n_out, n_in) float64 matrix of PyTorch's linear resize with align_corners=False, no antialias.

    Half-pixel centres: source = (i + 0.5)·n_in/n_out − 0.5, clamped at 0 below; the upper tap is
    clamped to the last sample. This is `F.interpolate(..., mode='bilinear')` per axis (HF's shrink),
    and torchvision's tensor `Resize` before antialiasing became its default in 0.17 (LAION's).
    PyTorch computes positions and weights in the input's dtype (float32 for both LAION's
    torchaudio mel and HF's NumPy mel, which `spectrogram()` returns as float32); its x86-64 build fuses scale·(i+0.5) − 0.5 into one FMA,
    which we round once too, so float32 weights are bit-identical to torch's.
    """
    if n_in < 1 or n_out < 1:
        raise ValueError(f"bilinear_matrix needs positive sizes, got n_in={n_in}, n_out={n_out}")
    dt = np.dtype(position_dtype).type
    scale = dt(n_in) / dt(n_out)
    centres = np.arange(n_out).astype(dt) + dt(0.5)
    src = (np.float64(scale) * centres.astype(np.float64) - 0.5).astype(dt)  # one rounding, as the FMA
    src = np.maximum(src, dt(0))
    lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    frac = np.clip(src - lo.astype(dt), dt(0), dt(1)).astype(dt)
    hi = np.minimum(lo + 1, n_in - 1)
    m = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    np.add.at(m, (rows, lo), (dt(1) - frac).astype(np.float64))
    np.add.at(m, (rows, hi), frac.astype(np.float64))
    return m


def fusion_chunk_starts(total_frames: int, chunk_frames: int, mode: CropMode = "random",
                        rng: Rng | None = None) -> tuple[int, int, int]:
    """Front/middle/back chunk starts: [0, total−chunk] split in 3 contiguous parts
    (`np.array_split`), one start drawn from each (an empty part means start 0), as LAION/HF do.
    'start'/'center' take the first/middle index of each part instead of a random one."""
    parts = [p.tolist() for p in np.array_split(np.arange(total_frames - chunk_frames + 1), 3)]
    parts = [p if p else [0] for p in parts]
    if mode == "random":
        rng = _need_rng(rng, "fusion chunk choice")
        # rng.choice on the same lists as LAION, so a seeded RandomState reproduces its draws
        return tuple(int(rng.choice(p)) for p in parts)
    if mode == "start":
        return tuple(p[0] for p in parts)
    if mode == "center":
        return tuple(p[len(p) // 2] for p in parts)
    raise ValueError(f"unknown crop mode {mode!r}; expected 'random', 'start' or 'center'")


def fusion_mel(mel_or_waveform, cfg: FrontEndConfig, rng: Rng | None = None, mode: Mode = "laion",
               crop_mode: CropMode = "random",
               starts: Sequence[int] | None = None) -> tuple[np.ndarray, bool]:
    """The 4-channel fusion input of one clip, (4, clip_frames, mel_bins) float32, and `longer`.

    Takes the whole clip's HTK log-mel (T_total, mel_bins), or a 1-D waveform (its mel is
    computed here). T_total == clip_frames: 4 copies, longer=False (a clip shorter than a hop
    past 10 s, or a filled short clip). Otherwise [shrink, front, middle, back]: the whole mel
    bilinearly resized to clip_frames (no antialias) and three clip_frames-long chunks, longer=True.
    `starts=` fixes the three chunk starts. The 'laion' and 'hf' modes build it identically; the
    batch-level difference (HF's forced is_longer) lives in `hf_force_longer`.
    """
    if mode not in ("laion", "hf"):
        raise ValueError(f"unknown preprocessing mode {mode!r}; expected 'laion' or 'hf'")
    arr = np.asarray(mel_or_waveform)
    mel = host_log_mel(arr, cfg, "htk") if arr.ndim == 1 else arr
    if mel.ndim != 2 or mel.shape[1] != cfg.mel_bins:
        raise ValueError(f"fusion_mel expects a (T, {cfg.mel_bins}) mel or a 1-D waveform, got shape {arr.shape}")
    chunk, total = cfg.clip_frames, mel.shape[0]
    if total < chunk:
        raise ValueError(f"mel of {total} frames is shorter than one clip ({chunk} frames); fill the "
                         f"waveform to clip_samples first")
    if total == chunk:
        return np.repeat(mel[None].astype(np.float32), FUSION_CHUNKS, axis=0), False
    if starts is None:
        starts = fusion_chunk_starts(total, chunk, crop_mode, rng)
    if len(starts) != 3 or not all(0 <= s <= total - chunk for s in starts):
        raise ValueError(f"fusion chunk starts {tuple(starts)} must be 3 values in [0, {total - chunk}]")
    # both resize a float32 mel (torchaudio's; HF's spectrogram() returns float32), so torch
    # computed the source positions in float32
    shrink = bilinear_matrix(total, chunk, np.float32) @ mel.astype(np.float64)
    chunks = [mel[s:s + chunk] for s in starts]
    return np.stack([shrink] + chunks).astype(np.float32), True


def hf_force_longer(longer: Sequence[bool], rng: Rng | None = None) -> np.ndarray:
    """HF's batch rule for fused models: if no clip is longer, mark one at random (np.random.randint
    over the batch) as longer. Returns a new (B,) bool array."""
    flags = np.array(longer, dtype=bool).reshape(-1)
    if flags.size and not flags.any():
        flags[_randint(_need_rng(rng, "HF's forced is_longer"), flags.size)] = True
    return flags


# --- per-clip and batch features -------------------------------------------------------------

def get_audio_features(waveform, cfg: FrontEndConfig = FrontEndConfig(), truncating: str = "rand_trunc",
                       filling: FillMode = "repeatpad", rng: Rng | None = None, mode: Mode = "laion",
                       crop_mode: CropMode = "random") -> dict:
    """One clip → {'waveform': (clip_samples,) float32, 'longer': bool[, 'mel_fusion': (4, T, mel)]}.

    'laion' (= `training/data.py:get_audio_features`): a long clip is `longer`; with 'fusion' its
    whole-clip mel gives the 4 chunks (draws: 3 chunk starts) and the waveform is then cropped anyway
    (draw: 1 start); a short/equal clip is filled, and with 'fusion' its mel is copied 4×.
    'hf' (= `ClapFeatureExtractor._get_input_mel`): the same, except that a long fusion clip's
    waveform is not cropped by HF (it only returns the mel), so we crop it at the start without a
    draw, keeping the rng stream equal to HF's; apply `hf_force_longer` per batch (or use
    `batch_audio_features`). Quantization (`quantize_int16`) is left to the caller, as in LAION.
    """
    if mode not in ("laion", "hf"):
        raise ValueError(f"unknown preprocessing mode {mode!r}; expected 'laion' or 'hf'")
    if truncating not in ("rand_trunc", "fusion"):
        raise ValueError(f"unknown truncating {truncating!r}; expected 'rand_trunc' or 'fusion'")
    x = check_waveform(waveform).astype(np.float32, copy=False)
    max_len = cfg.clip_samples
    out: dict = {}
    if len(x) > max_len:
        longer = True
        if truncating == "fusion":
            out["mel_fusion"], longer = fusion_mel(x, cfg, rng, mode, crop_mode)
        wave_crop = "start" if (mode == "hf" and truncating == "fusion") else crop_mode
        x, _ = crop(x, max_len, wave_crop, rng)
    else:
        x = fill(x, max_len, filling)
        if truncating == "fusion":
            out["mel_fusion"], _ = fusion_mel(x, cfg)
        longer = False
    out["waveform"] = np.ascontiguousarray(x, dtype=np.float32)
    out["longer"] = bool(longer)
    return out


def batch_audio_features(waveforms: Sequence, cfg: FrontEndConfig = FrontEndConfig(),
                         truncating: str = "rand_trunc", filling: FillMode = "repeatpad",
                         rng: Rng | None = None, mode: Mode = "laion",
                         crop_mode: CropMode = "random") -> dict:
    """`get_audio_features` over a batch, stacked: waveform (B, N), longer (B,) bool[, mel_fusion
    (B, 4, T, mel)]. In 'hf' mode with fusion, HF's forced is_longer is applied (one more draw)."""
    if len(waveforms) == 0:
        raise ValueError("batch_audio_features: empty batch")
    items = [get_audio_features(w, cfg, truncating, filling, rng, mode, crop_mode) for w in waveforms]
    out = {k: np.stack([it[k] for it in items]) for k in items[0]}
    out["longer"] = np.array([it["longer"] for it in items], dtype=bool)
    if mode == "hf" and truncating == "fusion":
        out["longer"] = hf_force_longer(out["longer"], rng)
    return out


def audio_input_keys(fused: bool) -> tuple[str, ...]:
    """The keys of every audio tower's input mapping: ('waveform',) unfused, ('mel_fusion', 'longer') fused
    (a fused tower reads only the 4-chunk mel and the flags, as LAION's)."""
    return ("mel_fusion", "longer") if fused else ("waveform",)


def clip_features(waveform, cfg: FrontEndConfig, fused: bool, rng: Rng | None = None, *,
                  filling: FillMode = "repeatpad", crop_mode: CropMode = "random") -> dict:
    """LAION's features of one prepared clip for a fused or unfused tower (`get_audio_features` in 'laion'
    mode, truncating 'fusion' or 'rand_trunc'): {'waveform', 'longer'[, 'mel_fusion']}."""
    return get_audio_features(waveform, cfg, "fusion" if fused else "rand_trunc", filling, rng=rng, mode="laion",
                              crop_mode=crop_mode)


def stack_audio_input(features: Sequence[dict], fused: bool) -> dict[str, np.ndarray]:
    """Per-clip features (`clip_features`) → the towers' input mapping: exactly `audio_input_keys(fused)`,
    float32 arrays and (B,) bool flags."""
    if len(features) == 0:
        raise ValueError("no audio given")
    return {k: np.array([f[k] for f in features], dtype=bool) if k == "longer"
            else np.stack([f[k] for f in features]).astype(np.float32, copy=False)
            for k in audio_input_keys(fused)}


def model_audio_input(waveforms: Sequence, cfg: FrontEndConfig, fused: bool, rng: Rng | None = None, *,
                      quantize: bool = True) -> dict[str, np.ndarray]:
    """LAION's inference preprocessing of 48 kHz mono clips → the audio towers' input mapping: {'waveform' (B, N)}
    unfused, {'mel_fusion' (B, 4, T, mel), 'longer' (B,)} fused. Clips go through LAION's int16 round trip
    unless `quantize=False`; `rng=None` crops deterministically from the start (LAION's crops are random)."""
    crop_mode = "random" if rng is not None else "start"
    clips = [quantize_int16(w) if quantize else check_waveform(w) for w in waveforms]
    return stack_audio_input([clip_features(c, cfg, fused, rng, crop_mode=crop_mode) for c in clips], fused)
