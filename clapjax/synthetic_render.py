"""Rendering one synthetic clip: closed-form NumPy from its ClipSpec (clapjax.synthetic draws the
specs, captions and splits; this module only turns a spec into samples).

Speed notes: a fresh NumPy array of a 10 s clip costs more in page faults than the arithmetic on
it, so rendering works in place in per-thread scratch buffers and writes straight into the output
row. Phases are 32-bit fixed point (one cycle = 2^32): constant-frequency phases are an exact
wrapping uint32 multiply, swept/vibrato phases a wrapping uint32 cumulative sum of per-sample
increments; sines come from a 2^16-entry table (phase error ≤ 2π/2^16: spurs below −80 dB). Noise is cut from a small bank
of precomputed textures at a random offset, so a clip costs a copy instead of an FFT.
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:   # annotations only: clapjax.synthetic imports this module
    from clapjax.synthetic import ClipSpec

_SEMITONE = {"C": -9, "G": -2}  # offset from A in the same octave
CHIRP_RANGE_HZ = (300.0, 3000.0)
MIX_LEVEL = 0.35               # peak of the background sound relative to the foreground's
# ±10 % (1.7 semitones): a tone moves across a whole band of the demo's 32 mel bands (11 % apart
# above 1 kHz); LAION-like ±3 % moved it a third of a band, a 1–4 dB flutter no model here heard
VIBRATO_DEPTH = 0.10


def note_hz(name: str) -> float:
    """Equal-tempered frequency of 'C3'…'G7' style names (A4 = 440 Hz)."""
    if len(name) != 2 or name[0] not in _SEMITONE or not name[1].isdigit():
        raise ValueError(f"note {name!r}: expected a name like 'C4' or 'G5'")
    return 440.0 * 2.0 ** ((_SEMITONE[name[0]] + 12 * (int(name[1]) - 4)) / 12)


_RAMP_S = 0.005
_TABLE_BITS = 16
_SINE_TABLE = np.sin(2 * np.pi * np.arange(2 ** _TABLE_BITS) / 2 ** _TABLE_BITS).astype(np.float32)
_NOISE_BANK_SIZE = 4
_NOISE_BANK_STREAM = 0         # both splits cut from the same textures, seeded as the training split's stream
_NOISE_SLOPE = {"white": 0.0, "pink": 0.5, "brown": 1.0}   # amplitude ∝ f^-slope
_lock = threading.Lock()
_ramps: dict[str, np.ndarray] = {}
_noise_banks: dict[tuple[str, int, int], np.ndarray] = {}
_scratch = threading.local()


def _ramp(dtype, n: int) -> np.ndarray:
    """0, 1, …, n−1 in `dtype` (a shared read-only array, grown on demand)."""
    key = np.dtype(dtype).name
    arr = _ramps.get(key)
    if arr is None or len(arr) < n:
        with _lock:
            arr = np.arange(max(n, 2 * len(arr) if arr is not None else n), dtype=dtype)
            arr.flags.writeable = False
            _ramps[key] = arr
    return arr[:n]


def _buf(name: str, n: int, dtype) -> np.ndarray:
    bufs = getattr(_scratch, "bufs", None)
    if bufs is None:
        bufs = _scratch.bufs = {}
    arr = bufs.get(name)
    if arr is None or len(arr) < n:
        arr = bufs[name] = np.empty(n, dtype)
    return arr[:n]


def _fixed(cycles: float) -> np.uint32:
    return np.uint32(int(round((cycles % 1.0) * 2 ** 32)) % 2 ** 32)


def _table_sine(phase_u32: np.ndarray, dst: np.ndarray) -> np.ndarray:
    np.right_shift(phase_u32, 32 - _TABLE_BITS, out=phase_u32)
    return np.take(_SINE_TABLE, phase_u32, out=dst)


def _steady_sine(freq_hz: float, phase: float, n: int, sr: int, dst: np.ndarray) -> np.ndarray:
    """sin(2π(f·k/sr + phase)) for k < n, into dst."""
    ph = _buf("phase", n, np.uint32)
    np.multiply(_ramp(np.uint32, n), _fixed(freq_hz / sr), out=ph)   # wraps mod 2^32: exact
    np.add(ph, _fixed(phase), out=ph)
    return _table_sine(ph, dst)


def _swept_sine(freq: np.ndarray, phase: float, sr: int, dst: np.ndarray) -> np.ndarray:
    """A sine whose instantaneous frequency (Hz, float32, overwritten) is `freq`, into dst."""
    n = len(freq)
    np.multiply(freq, np.float32(2 ** 32 / sr), out=freq)
    ph = _buf("phase", n, np.uint32)
    np.copyto(ph, freq, casting="unsafe")
    np.cumsum(ph, dtype=np.uint32, out=ph)                             # wraps mod 2^32
    np.add(ph, _fixed(phase), out=ph)
    return _table_sine(ph, dst)


def _bank_length(n: int) -> int:
    """The texture length for cuts of n samples: the power of two ≥ n (≥ 2), a fast FFT size."""
    return 1 << max(n - 1, 1).bit_length()


def _noise_bank(colour: str, length: int, sr: int) -> np.ndarray:
    """(_NOISE_BANK_SIZE, length) peak-normalised noise textures, made once per process."""
    key = (colour, length, sr)
    bank = _noise_banks.get(key)
    if bank is None:
        rng = np.random.default_rng((_NOISE_BANK_STREAM, sr, length, list(_NOISE_SLOPE).index(colour)))
        gain = np.maximum(np.fft.rfftfreq(length, 1.0 / sr), 20.0) ** -_NOISE_SLOPE[colour]
        rows = []
        for _ in range(_NOISE_BANK_SIZE):
            spec = (rng.standard_normal(len(gain)) + 1j * rng.standard_normal(len(gain))) * gain
            x = np.fft.irfft(spec, length)
            rows.append((x / np.max(np.abs(x))).astype(np.float32))
        bank = np.stack(rows)
        bank.flags.writeable = False
        with _lock:
            bank = _noise_banks.setdefault(key, bank)
    return bank


def _render_layer(kind: str, value: str, modulation: str, spec: ClipSpec, sr: int, clip_samples: int,
                  rng: np.random.Generator, dst: np.ndarray) -> None:
    """One sound, peak-normalised to 1, written into dst (float32, the event's length)."""
    n = len(dst)
    if kind in ("tone", "chirp"):
        freq = _buf("freq", n, np.float32)
        if kind == "tone":
            freq.fill(note_hz(value))
        else:   # exponential sweep f(k) = f0·ratio^(k/n)
            lo, hi = CHIRP_RANGE_HZ
            f0, ratio = (lo, hi / lo) if value == "rising" else (hi, lo / hi)
            np.multiply(_ramp(np.float32, n), np.float32(np.log(ratio) / n), out=freq)
            np.exp(freq, out=freq)
            freq *= np.float32(f0)
        if modulation == "vibrato":     # ±VIBRATO_DEPTH frequency deviation at the modulation rate
            mod = _steady_sine(spec.mod_rate_hz, 0.0, n, sr, _buf("mod", n, np.float32))
            mod *= np.float32(VIBRATO_DEPTH)
            mod += np.float32(1.0)
            freq *= mod
        if kind == "tone" and modulation != "vibrato":
            _steady_sine(note_hz(value), spec.phase, n, sr, dst)
        else:
            _swept_sine(freq, spec.phase, sr, dst)
    elif kind == "noise":
        bank = _noise_bank(value, _bank_length(clip_samples), sr)   # an event never outlasts its clip
        _cut_texture(bank, rng, dst)
        if rng.random() < 0.5:
            np.negative(dst, out=dst)
    elif kind == "clicks":
        dst.fill(0.0)
        period = sr / int(value)
        starts = (np.arange(int(np.ceil(n / period))) * period).astype(np.int64)
        k = np.arange(int(0.004 * sr))
        kernel = (np.exp(-k / (0.0008 * sr)) * np.sin(2 * np.pi * spec.click_hz * k / sr)).astype(np.float32)
        idx = starts[:, None] + k[None, :]
        keep = idx < n
        dst[idx[keep]] = np.broadcast_to(kernel, idx.shape)[keep]
    else:
        raise ValueError(f"unknown sound kind {kind!r}")
    if modulation == "tremolo":         # gain 0.1 … 1: 0.55 + 0.45·cos(2π f_m t)
        env = _steady_sine(spec.mod_rate_hz, 0.25, n, sr, _buf("mod", n, np.float32))
        env *= np.float32(0.45)
        env += np.float32(0.55)
        dst *= env
    _normalise_peak(dst, 1.0)


def _normalise_peak(x: np.ndarray, peak: float) -> None:
    p = max(float(x.max()), -float(x.min())) if len(x) else 0.0
    if p > 0:
        x *= np.float32(peak / p)


def render(spec: ClipSpec, rng: np.random.Generator, clip_samples: int, sr: int,
           out: np.ndarray | None = None, floor: float = 0.0) -> np.ndarray:
    """The clip of `spec`: (clip_samples,) float32, into `out` when given (a writable float32 row).
    Outside [onset, onset+length) it is silent, or white noise of peak `floor` (linear) when `floor`
    > 0: the same hiss is then added under the whole clip."""
    out = np.empty(clip_samples, np.float32) if out is None else out
    if out.shape != (clip_samples,) or out.dtype != np.float32:
        raise ValueError(f"render: out must be a float32 array of shape ({clip_samples},), got {out.dtype} {out.shape}")
    n, a = spec.length, spec.onset
    out[:a] = 0.0
    out[a + n:] = 0.0
    seg = out[a:a + n]
    _render_layer(spec.kind, spec.value, spec.modulation, spec, sr, clip_samples, rng, seg)
    if spec.mix_kind is not None:
        mix = _buf("mix", n, np.float32)
        _render_layer(spec.mix_kind, spec.mix_value, "none", spec, sr, clip_samples, rng, mix)
        mix *= np.float32(MIX_LEVEL)
        seg += mix
    ramp = min(int(_RAMP_S * sr), n // 2)
    if ramp > 0:
        r = np.linspace(0.0, 1.0, ramp, dtype=np.float32)
        seg[:ramp] *= r
        seg[n - ramp:] *= r[::-1]
    _normalise_peak(seg, spec.peak)
    if floor > 0:
        _add_floor(out, floor, rng, sr)
    return out


def _add_floor(out: np.ndarray, floor: float, rng: np.random.Generator, sr: int) -> None:
    """White noise of peak `floor` added in place, cut from the shared texture bank."""
    n = len(out)
    hiss = _cut_texture(_noise_bank("white", _bank_length(n), sr), rng, _buf("floor", n, np.float32))
    hiss *= np.float32(floor)
    out += hiss


def _cut_texture(bank: np.ndarray, rng: np.random.Generator, dst: np.ndarray) -> np.ndarray:
    """dst ← a random row of `bank` from a random offset, wrapping round (len(dst) ≤ the row's)."""
    row, off = bank[rng.integers(len(bank))], int(rng.integers(bank.shape[1]))
    m = min(len(dst), len(row) - off)
    dst[:m] = row[off:off + m]
    dst[m:] = row[:len(dst) - m]
    return dst
