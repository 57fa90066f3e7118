"""Procedural audio–caption pairs: the embedded data set that needs no download.

Every clip is a small composition of named attributes, and its captions name them in varied
wording:

* kind: a pure tone at a named pitch (C3 … C7), a rising or falling chirp, white/pink/brown noise,
  or a click train at 2/4/8/16 clicks per second;
* modulation: none, tremolo (AM) or vibrato (FM; tonal kinds only);
* loudness: quiet / moderately loud / loud (peak level 12 dB apart);
* duration: a short event (10–25 % of the clip) or a long one (70–100 %);
* optionally a quieter second sound of another kind mixed underneath.

What the attributes, captions and zero-shot prompts are called lives in clapjax.synthetic_captions
(its public names are re-exported here).

The split is a property of the generator, not of the seed: a fixed 20 % of the
(kind, modulation, loudness) combinations, stratified by kind, only ever occur in the 'heldout'
split, so every attribute value is seen in training but the held-out combinations never are.

Everything is deterministic: clip `i` of (`seed`, `split`) draws from its own
`np.random.default_rng((seed, split_id, i))`, so any subset renders identically in any order and in
any worker. Rendering is closed-form NumPy per clip (phases, spectral shaping by one FFT, index
arithmetic for clicks), a few milliseconds per 10 s clip; only the active part of a clip is
computed.
"""
from __future__ import annotations

import concurrent.futures as futures
import dataclasses
import functools
import os
import threading
from typing import Sequence

import numpy as np

from clapjax.synthetic_captions import (  # noqa: F401  (re-exported: the set's public names)
    CAPTION_ATTRIBUTES, CHIRP_DIRECTIONS, CLICK_RATES, DURATIONS, KIND_CLASSES, LOUDNESS, MODULATIONS,
    NOISE_COLOURS, NOTES, PARTIAL_CAPTION_PROBABILITY, PROMPT_TEMPLATES, ZERO_SHOT_CLASSES, caption,
    partial_caption_names)

SAMPLE_RATE = 48000
CLIP_SAMPLES = 480000
SPLITS = {"train": 0, "heldout": 1}
HELDOUT_FRACTION = 0.2
_HELDOUT_SEED = 20240611        # fixes which combinations are held out; never the user's seed

_SEMITONE = {"C": -9, "G": -2}  # offset from A in the same octave
CHIRP_RANGE_HZ = (300.0, 3000.0)
LOUDNESS_PEAK_DBFS = {"quiet": -30.0, "moderate": -18.0, "loud": -6.0}
MIX_PROBABILITY = 0.3
MIX_LEVEL = 0.35               # peak of the background sound relative to the foreground's


def note_hz(name: str) -> float:
    """Equal-tempered frequency of 'C3'…'G7' style names (A4 = 440 Hz)."""
    if len(name) != 2 or name[0] not in _SEMITONE or not name[1].isdigit():
        raise ValueError(f"note {name!r}: expected a name like 'C4' or 'G5'")
    return 440.0 * 2.0 ** ((_SEMITONE[name[0]] + 12 * (int(name[1]) - 4)) / 12)


def kind_values() -> list[tuple[str, str]]:
    """Every (kind, value) sound class: ('tone', 'C4'), ('chirp', 'rising'), ('noise', 'pink'), ('clicks', '4')."""
    return ([("tone", n) for n in NOTES] + [("chirp", d) for d in CHIRP_DIRECTIONS]
            + [("noise", c) for c in NOISE_COLOURS] + [("clicks", str(r)) for r in CLICK_RATES])


def allowed_modulations(kind: str) -> tuple[str, ...]:
    return {"tone": MODULATIONS, "chirp": MODULATIONS, "noise": ("none", "tremolo"), "clicks": ("none",)}[kind]


def combinations() -> list[tuple[str, str, str, str]]:
    """All (kind, value, modulation, loudness) combinations the generator can make."""
    return [(k, v, m, lo) for k, v in kind_values() for m in allowed_modulations(k) for lo in LOUDNESS]


@functools.lru_cache(maxsize=1)
def heldout_combinations() -> frozenset[tuple[str, str, str, str]]:
    """The fixed held-out combinations: HELDOUT_FRACTION of each kind's, at least one per kind,
    chosen so that every single attribute value still occurs in training."""
    rng = np.random.default_rng(_HELDOUT_SEED)
    combos, out = combinations(), set()
    for kind in ("tone", "chirp", "noise", "clicks"):
        mine = [c for c in combos if c[0] == kind]
        want = max(1, round(HELDOUT_FRACTION * len(mine)))
        for i in rng.permutation(len(mine)):
            if len([c for c in out if c[0] == kind]) == want:
                break
            trial = out | {mine[i]}
            train = [c for c in mine if c not in trial]
            # each value, modulation and loudness of this kind keeps a training example
            if all(any(c[j] == x for c in train) for j in (1, 2, 3) for x in {c[j] for c in mine}):
                out = trial
    return frozenset(out)


@dataclasses.dataclass(frozen=True)
class ClipSpec:
    """Everything needed to render one clip; derived from its seed, so never stored."""

    kind: str
    value: str
    modulation: str
    loudness: str
    duration: str
    mix_kind: str | None
    mix_value: str | None
    onset: int              # samples
    length: int             # samples
    peak: float             # linear peak of the final clip
    mod_rate_hz: float
    phase: float
    click_hz: float

    @property
    def combination(self) -> tuple[str, str, str, str]:
        return (self.kind, self.value, self.modulation, self.loudness)

    @property
    def description(self) -> tuple:
        """What a complete caption of the clip names: clips with equal descriptions cannot be told
        apart from their complete captions (onset, exact level, modulation rate and phase go unnamed)."""
        return (self.kind, self.value, self.modulation, self.loudness, self.duration, self.mix_kind, self.mix_value)

    def attributes(self) -> dict:
        return {"kind": self.kind, "value": self.value, "modulation": self.modulation,
                "loudness": self.loudness, "duration": self.duration, "mix_kind": self.mix_kind,
                "mix_value": self.mix_value}


def _draw_spec(rng: np.random.Generator, pool: Sequence[tuple], clip_samples: int, sr: int,
               mix_probability: float) -> ClipSpec:
    kind, value, modulation, loudness = pool[rng.integers(len(pool))]
    duration = DURATIONS[rng.integers(2)]
    frac = rng.uniform(0.1, 0.25) if duration == "short" else rng.uniform(0.7, 1.0)
    length = min(clip_samples, max(int(frac * clip_samples), int(0.05 * sr)))
    onset = int(rng.integers(clip_samples - length + 1))
    mix_kind = mix_value = None
    if rng.random() < mix_probability:
        others = [kv for kv in kind_values() if kv[0] != kind]
        mix_kind, mix_value = others[rng.integers(len(others))]
    peak = 10.0 ** ((LOUDNESS_PEAK_DBFS[loudness] + rng.uniform(-2.0, 2.0)) / 20.0)
    return ClipSpec(kind, value, modulation, loudness, duration, mix_kind, mix_value, onset, length, peak,
                    mod_rate_hz=float(rng.uniform(4.0, 8.0)), phase=float(rng.uniform(0, 1)),
                    click_hz=float(rng.uniform(2000.0, 4000.0)))


# --- rendering ------------------------------------------------------------------------------------
# Speed notes: a fresh NumPy array of a 10 s clip costs more in page faults than the arithmetic on
# it, so rendering works in place in per-thread scratch buffers and writes straight into the output
# row. Phases are 32-bit fixed point (one cycle = 2^32): constant-frequency phases are an exact
# wrapping uint32 multiply, swept/vibrato phases a wrapping uint32 cumulative sum of per-sample
# increments; sines come from a 2^16-entry table (phase error ≤ 2π/2^16: spurs below −80 dB). Noise is cut from a small bank
# of precomputed textures at a random offset, so a clip costs a copy instead of an FFT.
_RAMP_S = 0.005
_TABLE_BITS = 16
_SINE_TABLE = np.sin(2 * np.pi * np.arange(2 ** _TABLE_BITS) / 2 ** _TABLE_BITS).astype(np.float32)
_NOISE_BANK_SIZE = 4
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


def _noise_bank(colour: str, length: int, sr: int) -> np.ndarray:
    """(_NOISE_BANK_SIZE, length) peak-normalised noise textures, made once per process."""
    key = (colour, length, sr)
    bank = _noise_banks.get(key)
    if bank is None:
        rng = np.random.default_rng((SPLITS["train"], sr, length, list(_NOISE_SLOPE).index(colour)))
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
        if modulation == "vibrato":     # ±3 % frequency deviation at the modulation rate
            mod = _steady_sine(spec.mod_rate_hz, 0.0, n, sr, _buf("mod", n, np.float32))
            mod *= np.float32(0.03)
            mod += np.float32(1.0)
            freq *= mod
        if kind == "tone" and modulation != "vibrato":
            _steady_sine(note_hz(value), spec.phase, n, sr, dst)
        else:
            _swept_sine(freq, spec.phase, sr, dst)
    elif kind == "noise":
        length = 1 << max(n - 1, 1).bit_length()
        bank = _noise_bank(value, max(length, 1 << max(clip_samples - 1, 1).bit_length()), sr)
        row, off = bank[rng.integers(len(bank))], int(rng.integers(bank.shape[1]))
        m = min(n, len(row) - off)
        dst[:m] = row[off:off + m]
        dst[m:] = row[:n - m]
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
           out: np.ndarray | None = None) -> np.ndarray:
    """The clip of `spec`: (clip_samples,) float32, silent outside [onset, onset+length); into `out`
    when given (a writable float32 row)."""
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
    return out


# --- the data set ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SyntheticSet:
    """`n` clips of one split. Metadata is computed eagerly (cheap); audio on demand."""

    seed: int
    split: str
    n: int
    sample_rate: int
    clip_samples: int
    captions_per_clip: int
    specs: tuple[ClipSpec, ...] = dataclasses.field(repr=False)
    captions: tuple[tuple[str, ...], ...] = dataclasses.field(repr=False)
    mix_probability: float = MIX_PROBABILITY

    def __len__(self) -> int:
        return self.n

    def key(self, i: int) -> str:
        return f"synthetic-{self.split}-{self.seed}-{i:07d}"

    def _rng(self, i: int, stream: int) -> np.random.Generator:
        return np.random.default_rng((self.seed, SPLITS[self.split], int(i), stream))

    def waveform(self, i: int) -> np.ndarray:
        if not 0 <= i < self.n:
            raise IndexError(f"clip {i} out of range for {self.n} clips")
        return self.render_into(i, np.empty(self.clip_samples, np.float32))

    def render_into(self, i: int, out: np.ndarray) -> np.ndarray:
        return render(self.specs[i], self._rng(i, 2), self.clip_samples, self.sample_rate, out)

    def waveforms(self, indices: Sequence[int] | None = None, *, threads: int | None = None) -> np.ndarray:
        """(len(indices), clip_samples) float32; NumPy releases the GIL, so threads render in parallel."""
        idx = list(range(self.n)) if indices is None else [int(i) for i in indices]
        out = np.empty((len(idx), self.clip_samples), np.float32)
        threads = threads or min(8, os.cpu_count() or 1)

        def fill(j):
            if not 0 <= idx[j] < self.n:
                raise IndexError(f"clip {idx[j]} out of range for {self.n} clips")
            self.render_into(idx[j], out[j])
        if threads == 1 or len(idx) < 4:
            for j in range(len(idx)):
                fill(j)
        else:
            with futures.ThreadPoolExecutor(threads) as pool:
                list(pool.map(fill, range(len(idx))))
        return out

    @property
    def attributes(self) -> list[dict]:
        return [s.attributes() for s in self.specs]

    def description_groups(self) -> np.ndarray:
        """(n,) int: clips with the same id are described identically by their captions (ids
        number the descriptions in sorted order)."""
        names = sorted({s.description for s in self.specs}, key=repr)
        ids = {d: i for i, d in enumerate(names)}
        return np.array([ids[s.description] for s in self.specs], np.int32)

    def labels(self, task: str) -> np.ndarray:
        """(n,) int class index into ZERO_SHOT_CLASSES[task]; -1 where the task does not apply
        (a mixture for 'kind' and 'modulation', a non-tone for 'pitch', a non-click clip for
        'click_rate')."""
        if task not in ZERO_SHOT_CLASSES:
            raise ValueError(f"unknown zero-shot task {task!r}; expected one of {sorted(ZERO_SHOT_CLASSES)}")
        out = np.full(self.n, -1, np.int32)
        for i, s in enumerate(self.specs):
            if task == "loudness":
                out[i] = LOUDNESS.index(s.loudness)
            elif task == "duration":
                out[i] = DURATIONS.index(s.duration)
            elif s.mix_kind is not None:
                continue
            elif task == "kind":
                out[i] = _kind_class(s)
            elif task == "modulation":
                out[i] = MODULATIONS.index(s.modulation)
            elif task == "pitch" and s.kind == "tone":
                out[i] = NOTES.index(s.value)
            elif task == "click_rate" and s.kind == "clicks":
                out[i] = CLICK_RATES.index(int(s.value))
        return out


def _kind_class(s: ClipSpec) -> int:
    if s.kind == "tone":
        return 0
    if s.kind == "chirp":
        return 1 + CHIRP_DIRECTIONS.index(s.value)
    if s.kind == "noise":
        return 3 + NOISE_COLOURS.index(s.value)
    return 6


def synthetic_dataset(seed: int, n: int, split: str = "train", *, sample_rate: int = SAMPLE_RATE,
                      clip_samples: int = CLIP_SAMPLES, captions_per_clip: int = 5,
                      frontend=None, mix_probability: float = MIX_PROBABILITY,
                      partial_captions: float | None = None) -> SyntheticSet:
    """`n` clips of `split` ('train' or 'heldout'), deterministic in (seed, split, index).

    `frontend` (a FrontEndConfig) overrides `sample_rate` and `clip_samples`, so a shortened clip
    length in the model's front end gives matching clips. Each clip gets `captions_per_clip`
    differently worded captions (5 gives the Clotho/AudioCaps evaluation protocol).
    `mix_probability` is the share of clips with a background sound (0 makes the task easier).
    `partial_captions` is the share of captions that name only one or two attributes (None: the
    split's default, PARTIAL_CAPTION_PROBABILITY for 'train'; 'heldout' captions always name every
    attribute, which is what makes its description groups, R@1 ceiling and attribute match exact).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'heldout'")
    if frontend is not None:
        sample_rate, clip_samples = frontend.sample_rate, frontend.clip_samples
    for name, v in (("n", n), ("sample_rate", sample_rate), ("clip_samples", clip_samples),
                    ("captions_per_clip", captions_per_clip)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise ValueError(f"synthetic_dataset: {name} must be a positive int, got {v!r}")
    if not 0.0 <= mix_probability <= 1.0:
        raise ValueError(f"synthetic_dataset: mix_probability must be in [0, 1], got {mix_probability}")
    if partial_captions is None:
        partial_captions = PARTIAL_CAPTION_PROBABILITY if split == "train" else 0.0
    if not 0.0 <= partial_captions <= 1.0:
        raise ValueError(f"synthetic_dataset: partial_captions must be in [0, 1], got {partial_captions}")
    if split == "heldout" and partial_captions:
        raise ValueError("synthetic_dataset: held-out captions name every attribute (its R@1 ceiling and "
                         f"attribute match rely on it); got partial_captions={partial_captions}")
    if clip_samples < int(0.1 * sample_rate):
        raise ValueError(f"synthetic_dataset: clip_samples={clip_samples} is shorter than 0.1 s at {sample_rate} Hz")
    held = heldout_combinations()
    pool = sorted(held) if split == "heldout" else [c for c in combinations() if c not in held]
    specs, caps = [], []
    for i in range(n):
        rng = np.random.default_rng((seed, SPLITS[split], i, 0))
        spec = _draw_spec(rng, pool, clip_samples, sample_rate, mix_probability)
        crng = np.random.default_rng((seed, SPLITS[split], i, 1))
        specs.append(spec)
        caps.append(tuple(caption(spec, crng, partial_caption_names(crng, spec) if partial_captions
                                  and crng.random() < partial_captions else None)
                          for _ in range(captions_per_clip)))
    return SyntheticSet(seed, split, n, sample_rate, clip_samples, captions_per_clip, tuple(specs), tuple(caps),
                        float(mix_probability))


def caption_corpus(seed: int = 0, n: int = 4000) -> list[str]:
    """Training-split captions plus the zero-shot prompts: the text a tokenizer should cover."""
    ds = synthetic_dataset(seed, n, "train", clip_samples=int(0.1 * SAMPLE_RATE), captions_per_clip=5)
    prompts = [t.format(c) for classes in ZERO_SHOT_CLASSES.values() for c in classes for t in PROMPT_TEMPLATES]
    return [c for caps in ds.captions for c in caps] + prompts


def train_tokenizer(directory: str | os.PathLike, *, seed: int = 0, n: int = 4000, vocab_size: int = 1000):
    """A byte-level BPE trained on the synthetic captions, saved to `directory`; returns a Tokenizer."""
    from clapjax.tokenizer import Tokenizer, train_byte_level_bpe
    return Tokenizer(train_byte_level_bpe(caption_corpus(seed, n), directory, vocab_size=vocab_size))
