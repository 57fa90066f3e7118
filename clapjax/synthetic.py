"""Procedural audio–caption pairs: the embedded data set that needs no download.

Every clip is a small composition of named attributes, and its captions name them in varied
wording:

* kind: a pure tone at a named pitch (C3 … C7), a rising or falling chirp, white/pink/brown noise,
  or a click train at 2/4/8/16 clicks per second;
* modulation: none, tremolo (AM) or vibrato (FM; tonal kinds only);
* loudness: quiet / moderately loud / loud (peak level 18 dB apart), over a constant background hiss
  (white noise at NOISE_FLOOR_DBFS under the whole clip);
* duration: a short event (20–35 % of the clip) or a long one (70–100 %);
* optionally a quieter second sound of another kind mixed underneath.

What the attributes, captions and zero-shot prompts are called lives in clapjax.synthetic_captions
(its public names are re-exported here).

The split is a property of the generator, not of the seed: a fixed 20 % of the
(kind, modulation, loudness) combinations, stratified by kind, only ever occur in the 'heldout'
split, so every attribute value is seen in training but the held-out combinations never are.

Everything is deterministic: clip `i` of (`seed`, `split`) draws from its own
`np.random.default_rng((seed, split_id, i))`, so any subset renders identically in any order and in
any worker. Rendering (clapjax.synthetic_render) is closed-form NumPy per clip (phases, spectral
shaping by one FFT, index arithmetic for clicks), a few milliseconds per 10 s clip; only the active
part of a clip is computed.
"""
from __future__ import annotations

import concurrent.futures as futures
import dataclasses
import functools
import os
from typing import Sequence

import numpy as np

from clapjax.synthetic_captions import (  # noqa: F401  (re-exported: the set's public names)
    CAPTION_ATTRIBUTES, CHIRP_DIRECTIONS, CLICK_RATES, DURATIONS, KIND_CLASSES, LOUDNESS, MODULATIONS,
    NOISE_COLOURS, NOTES, PARTIAL_CAPTION_PROBABILITY, PROMPT_TEMPLATES, ZERO_SHOT_CLASSES, caption,
    partial_caption_names)
from clapjax.synthetic_render import CHIRP_RANGE_HZ, MIX_LEVEL, VIBRATO_DEPTH, note_hz, render  # noqa: F401  (re-exported)

SAMPLE_RATE = 48000
CLIP_SAMPLES = 480000
SPLITS = {"train": 0, "heldout": 1}
HELDOUT_FRACTION = 0.2
_HELDOUT_SEED = 20240611        # fixes which combinations are held out; never the user's seed

LOUDNESS_PEAK_DBFS = {"quiet": -42.0, "moderate": -24.0, "loud": -6.0}
# Every recording has a noise floor, and here it is what makes loudness audible: a log-mel image
# shifts as a whole with the level (a tone's spectral leakage scales with it), and the towers'
# LayerNorms are blind to such a shift, so on digital silence a steady quiet tone and a steady loud
# one looked alike to the model (zero-shot loudness 0.64, chance 0.33). A hiss of fixed level gives
# every clip a reference; at −72 dBFS it sits 30 dB under the quietest sound.
NOISE_FLOOR_DBFS = -72.0
MIX_PROBABILITY = 0.3
# A modulation must complete cycles inside the event to be heard: in the demo's 1 s clips a short
# event of 10–25 % at 4–8 Hz held 0.4–2 cycles (about one), and short modulated tones were judged
# unmodulated. 20–35 % at 8–12 Hz holds 1.6–4.2 (long events 5.6–12); 12 Hz is still 8 frames of
# the 10 ms hop, so a cycle spans two HTSAT patches.
SHORT_FRACTION = (0.2, 0.35)
MOD_RATE_HZ = (8.0, 12.0)


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
    frac = rng.uniform(*SHORT_FRACTION) if duration == "short" else rng.uniform(0.7, 1.0)
    length = min(clip_samples, max(int(frac * clip_samples), int(0.05 * sr)))
    onset = int(rng.integers(clip_samples - length + 1))
    mix_kind = mix_value = None
    if rng.random() < mix_probability:
        others = [kv for kv in kind_values() if kv[0] != kind]
        mix_kind, mix_value = others[rng.integers(len(others))]
    peak = 10.0 ** ((LOUDNESS_PEAK_DBFS[loudness] + rng.uniform(-2.0, 2.0)) / 20.0)
    return ClipSpec(kind, value, modulation, loudness, duration, mix_kind, mix_value, onset, length, peak,
                    mod_rate_hz=float(rng.uniform(*MOD_RATE_HZ)), phase=float(rng.uniform(0, 1)),
                    click_hz=float(rng.uniform(2000.0, 4000.0)))


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
    noise_floor_dbfs: float | None = NOISE_FLOOR_DBFS

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
        floor = 0.0 if self.noise_floor_dbfs is None else 10.0 ** (self.noise_floor_dbfs / 20.0)
        return render(self.specs[i], self._rng(i, 2), self.clip_samples, self.sample_rate, out, floor)

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
                      partial_captions: float | None = None,
                      noise_floor_dbfs: float | None = NOISE_FLOOR_DBFS) -> SyntheticSet:
    """`n` clips of `split` ('train' or 'heldout'), deterministic in (seed, split, index).

    `frontend` (a FrontEndConfig) overrides `sample_rate` and `clip_samples`, so a shortened clip
    length in the model's front end gives matching clips. Each clip gets `captions_per_clip`
    differently worded captions (5 gives the Clotho/AudioCaps evaluation protocol).
    `mix_probability` is the share of clips with a background sound (0 makes the task easier).
    `partial_captions` is the share of captions that name only one or two attributes (None: the
    split's default, PARTIAL_CAPTION_PROBABILITY for 'train'; 'heldout' captions always name every
    attribute, which is what makes its description groups, R@1 ceiling and attribute match exact).
    `noise_floor_dbfs` is the peak level of the white hiss under every clip (None: digital silence
    around the sound, for looking at a sound alone).
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
    if noise_floor_dbfs is not None and not -120.0 <= noise_floor_dbfs <= min(LOUDNESS_PEAK_DBFS.values()) - 20:
        raise ValueError(f"synthetic_dataset: noise_floor_dbfs must be None or in [-120, "
                         f"{min(LOUDNESS_PEAK_DBFS.values()) - 20:g}] dBFS (20 dB under the quietest sound), "
                         f"got {noise_floor_dbfs}")
    return SyntheticSet(seed, split, n, sample_rate, clip_samples, captions_per_clip, tuple(specs), tuple(caps),
                        float(mix_probability), noise_floor_dbfs)


def caption_corpus(seed: int = 0, n: int = 4000) -> list[str]:
    """Training-split captions plus the zero-shot prompts: the text a tokenizer should cover."""
    ds = synthetic_dataset(seed, n, "train", clip_samples=int(0.1 * SAMPLE_RATE), captions_per_clip=5)
    prompts = [t.format(c) for classes in ZERO_SHOT_CLASSES.values() for c in classes for t in PROMPT_TEMPLATES]
    return [c for caps in ds.captions for c in caps] + prompts


def train_tokenizer(directory: str | os.PathLike, *, seed: int = 0, n: int = 4000, vocab_size: int = 1000):
    """A byte-level BPE trained on the synthetic captions, saved to `directory`; returns a Tokenizer."""
    from clapjax.tokenizer import Tokenizer, train_byte_level_bpe
    return Tokenizer(train_byte_level_bpe(caption_corpus(seed, n), directory, vocab_size=vocab_size))
