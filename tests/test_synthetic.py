"""The procedural audio–caption generator: determinism, the held-out split, the audio matching its
captions, in-place rendering, and the BPE tokenizer trained on its captions."""
import re

import numpy as np
import pytest

from clapjax import synthetic as S
from clapjax.audio.frontend import FrontEndConfig

SR = S.SAMPLE_RATE
ONE_S = SR


def _clips(kind, n=200, seed=0, split="train", clip_samples=ONE_S):
    """Clips of one kind without the background hiss: the sound alone."""
    ds = S.synthetic_dataset(seed, n, split, clip_samples=clip_samples, noise_floor_dbfs=None)
    return ds, [i for i, s in enumerate(ds.specs) if s.kind == kind and s.mix_kind is None]


def _event(ds, i):
    s = ds.specs[i]
    return ds.waveform(i)[s.onset:s.onset + s.length]


def test_deterministic_by_seed_and_independent_of_order():
    a = S.synthetic_dataset(3, 40, clip_samples=ONE_S)
    b = S.synthetic_dataset(3, 40, clip_samples=ONE_S)
    assert a.captions == b.captions and a.specs == b.specs
    w = a.waveforms([7, 2, 30], threads=2)
    np.testing.assert_array_equal(w[0], b.waveform(7))
    np.testing.assert_array_equal(w[1], b.waveform(2))
    np.testing.assert_array_equal(w, a.waveforms([7, 2, 30], threads=1))
    # a longer set starts with the same clips; another seed differs
    assert S.synthetic_dataset(3, 60, clip_samples=ONE_S).captions[:40] == a.captions
    c = S.synthetic_dataset(4, 40, clip_samples=ONE_S)
    assert c.captions != a.captions
    assert not np.array_equal(c.waveforms(range(5)), a.waveforms(range(5)))


def test_heldout_combinations_never_in_training_but_every_value_is():
    held = S.heldout_combinations()
    combos = S.combinations()
    assert 0.15 * len(combos) <= len(held) <= 0.25 * len(combos)
    train = S.synthetic_dataset(0, 3000, "train", clip_samples=ONE_S)
    heldout = S.synthetic_dataset(0, 500, "heldout", clip_samples=ONE_S)
    seen = {s.combination for s in train.specs}
    assert not seen & held
    assert {s.combination for s in heldout.specs} <= held
    assert len({s.combination for s in heldout.specs}) == len(held)  # 500 draws cover all 24
    # each attribute value of every held-out clip occurs in training, alone
    for j, name in enumerate(("kind", "value", "modulation", "loudness")):
        assert {c[j] for c in held} <= {s.combination[j] for s in train.specs}, name
    for kind in ("tone", "chirp", "noise", "clicks"):
        assert any(c[0] == kind for c in held)


# the words a caption may use for each value of each attribute family
_WORDS = {
    "kind": {"tone": (r"\btone",), "chirp": ("chirp", "sweep"), "noise": ("noise",), "clicks": ("click",)},
    "loudness": {"quiet": ("quiet", "soft", "faint"), "moderate": ("moderat", "medium"),
                 "loud": (r"(?<!moderately )loud", "strong", "powerful")},   # not "moderately loud"
    "duration": {"short": ("short", "brief"), "long": (r"\blong", "sustained", "continuous")},
    "modulation": {"none": ("without modulation", "unmodulated"), "tremolo": ("tremolo", "pulsing", "throbbing"),
                   "vibrato": ("vibrato", "wobbling", "warbling")},
}
_VALUE_WORDS = {"rising": ("rising", "upward", "going up"), "falling": ("falling", "downward", "going down"),
                "2": (r"\b2\b", "two"), "4": (r"\b4\b", "four"), "8": (r"\b8\b", "eight"),
                "16": (r"\b16\b", "sixteen")}


def _named(spec, cap) -> set[str]:
    """The attribute families `cap` names (and 'value': the pitch, click rate, direction or colour),
    failing if it names any of them wrongly; for a clip without a background sound."""
    named = set()
    for family, words in _WORDS.items():
        for value, pats in words.items():
            if any(re.search(p, cap) for p in pats):
                assert value == getattr(spec, family), (family, spec, cap)
                named.add(family)
    values = {v: _VALUE_WORDS.get(v, (rf"\b{v}\b",)) for v in [*S.NOTES, *S.CHIRP_DIRECTIONS, *S.NOISE_COLOURS,
                                                      *map(str, S.CLICK_RATES)]}
    for value, pats in values.items():
        if any(re.search(p, cap) for p in pats):
            assert value == spec.value, (spec, cap)
            named.add("value")
    return named


def test_captions_name_the_attributes():
    ds = S.synthetic_dataset(1, 300, clip_samples=ONE_S, partial_captions=0.0)
    for spec, caps in zip(ds.specs, ds.captions):
        assert len(caps) == 5 and len(set(caps)) >= 2
        for cap in caps:
            if spec.mix_kind is not None:
                assert any(w in cap for w in ("mixed with", " over ", "together with", "background")), cap
                continue
            assert _named(spec, cap) == {*S.CAPTION_ATTRIBUTES, "value"}, (spec, cap)


def test_partial_captions_name_one_or_two_attributes_in_the_same_words():
    ds = S.synthetic_dataset(1, 300, clip_samples=ONE_S, mix_probability=0.0, partial_captions=1.0)
    counts = []
    for spec, caps in zip(ds.specs, ds.captions):
        for cap in caps:
            named = _named(spec, cap)
            families = named & set(S.CAPTION_ATTRIBUTES)
            assert 1 <= len(families) <= 2 and (("kind" in named) or "value" not in named), (spec, cap)
            assert ("kind" in named) != (re.search(r"(?<!the )\bsound\b(?!:)", cap) is not None), (spec, cap)
            counts.append(len(families))
    assert 0.4 < np.mean(np.array(counts) == 1) < 0.6
    # the one- and two-attribute class names of the zero-shot tasks occur in the demo's training
    # captions word for word (with complete captions only, none of them did)
    train = [c for caps in S.synthetic_dataset(0, 3000, clip_samples=4800, mix_probability=0.0).captions for c in caps]
    for task in ("kind", "pitch", "modulation", "loudness", "duration"):
        missing = [c for c in S.ZERO_SHOT_CLASSES[task] if not any(c in t for t in train)]
        assert not missing, (task, missing)
    # the training split's default share; held-out captions are always complete
    default = S.synthetic_dataset(1, 300, clip_samples=ONE_S, mix_probability=0.0)
    partial = np.mean([len(_named(s, c) & {"kind", "loudness", "duration"}) < 3
                       for s, caps in zip(default.specs, default.captions) for c in caps])
    assert abs(partial - S.PARTIAL_CAPTION_PROBABILITY) < 0.05, partial
    assert S.synthetic_dataset(1, 50, "heldout", clip_samples=ONE_S).captions == S.synthetic_dataset(
        1, 50, "heldout", clip_samples=ONE_S, partial_captions=0.0).captions
    with pytest.raises(ValueError, match="held-out captions name every attribute"):
        S.synthetic_dataset(1, 5, "heldout", partial_captions=0.3)
    with pytest.raises(ValueError, match="partial_captions must be in"):
        S.synthetic_dataset(1, 5, partial_captions=1.5)


def test_tones_sit_at_their_named_pitch():
    ds, idx = _clips("tone")
    assert len(idx) >= 10
    for i in idx[:10]:
        x = _event(ds, i).astype(np.float64)
        spec = np.abs(np.fft.rfft(x * np.hanning(len(x)), 8 * len(x)))
        f_peak = np.argmax(spec) * SR / (8 * len(x))
        f0 = S.note_hz(ds.specs[i].value)
        tol = (S.VIBRATO_DEPTH * f0 if ds.specs[i].modulation == "vibrato" else 0) + SR / len(x)
        assert abs(f_peak - f0) <= tol, (ds.specs[i], f_peak, f0)
    assert S.note_hz("C4") == pytest.approx(261.6256, abs=1e-3)
    with pytest.raises(ValueError, match="note"):
        S.note_hz("H2")


def test_chirps_sweep_in_their_direction():
    ds, idx = _clips("chirp")
    for i in idx[:8]:
        x = _event(ds, i).astype(np.float64)
        half = len(x) // 2

        def centroid(seg):
            p = np.abs(np.fft.rfft(seg)) ** 2
            return (np.fft.rfftfreq(len(seg), 1 / SR) * p).sum() / p.sum()
        up = centroid(x[half:]) > centroid(x[:half])
        assert up == (ds.specs[i].value == "rising"), ds.specs[i]


def test_noise_colours_have_their_spectral_slope():
    ds, idx = _clips("noise", n=300)
    ratios = {}
    for i in idx:
        x = _event(ds, i).astype(np.float64)
        p = np.abs(np.fft.rfft(x)) ** 2
        f = np.fft.rfftfreq(len(x), 1 / SR)
        low, high = p[(f > 100) & (f < 400)].mean(), p[(f > 4000) & (f < 16000)].mean()
        ratios.setdefault(ds.specs[i].value, []).append(10 * np.log10(low / high))
    med = {c: np.median(v) for c, v in ratios.items()}
    assert set(med) == set(S.NOISE_COLOURS)
    assert abs(med["white"]) < 3 and 10 < med["pink"] < 25 and med["brown"] > med["pink"] + 10, med


def test_click_trains_click_at_their_rate_and_loudness_is_its_peak():
    ds, idx = _clips("clicks", n=400, clip_samples=4 * ONE_S)
    checked = 0
    for i in idx:
        s = ds.specs[i]
        if s.modulation != "none" or s.length < ONE_S:
            continue
        x = _event(ds, i)
        onsets = np.flatnonzero((np.abs(x[1:]) > 0.01 * s.peak) & (np.abs(x[:-1]) <= 0.01 * s.peak)
                                & (np.abs(x[:-1]) == 0))
        expected = int(np.ceil(len(x) / (SR / int(s.value))))
        assert abs(len(onsets) - expected) <= 1, (s, len(onsets), expected)
        checked += 1
    assert checked >= 5
    for spec, w in zip(ds.specs[:40], ds.waveforms(range(40))):
        peak_db = 20 * np.log10(np.abs(w).max())
        assert abs(peak_db - S.LOUDNESS_PEAK_DBFS[spec.loudness]) <= 2.01, spec
        assert not w[:spec.onset].any() and not w[spec.onset + spec.length:].any()


def test_every_clip_sits_on_the_same_background_hiss():
    """The fixed-level hiss that makes loudness audible: white noise at NOISE_FLOOR_DBFS under the
    whole clip, the sound itself unchanged above it, and refused where it would reach the sound."""
    ds = S.synthetic_dataset(0, 40, clip_samples=ONE_S, mix_probability=0.0)
    bare = S.synthetic_dataset(0, 40, clip_samples=ONE_S, mix_probability=0.0, noise_floor_dbfs=None)
    floor = 10 ** (S.NOISE_FLOOR_DBFS / 20)
    for spec, w, b in zip(ds.specs, ds.waveforms(), bare.waveforms()):
        hiss = (w - b).astype(np.float64)
        assert np.abs(hiss).max() <= floor * (1 + 1e-4) and np.abs(hiss).max() > 0.5 * floor, spec
        assert abs(np.mean(hiss[:len(hiss) // 2] ** 2) / np.mean(hiss[len(hiss) // 2:] ** 2) - 1) < 0.2
        outside = np.concatenate([w[:spec.onset], w[spec.onset + spec.length:]])
        if len(outside) > 4800:
            assert 20 * np.log10(np.abs(outside).max()) == pytest.approx(S.NOISE_FLOOR_DBFS, abs=3.0)
        # the level's ±2 dB jitter, plus what the hiss can add to the quietest peak
        quietest = 10 ** ((min(S.LOUDNESS_PEAK_DBFS.values()) - 2) / 20)
        assert abs(20 * np.log10(np.abs(w).max()) - S.LOUDNESS_PEAK_DBFS[spec.loudness]) <= (
            2 + 20 * np.log10(1 + floor / quietest)), spec
    with pytest.raises(ValueError, match="noise_floor_dbfs must be None or in"):
        S.synthetic_dataset(0, 2, clip_samples=ONE_S, noise_floor_dbfs=-40.0)


def test_description_groups_are_what_the_captions_name():
    ds = S.synthetic_dataset(1, 200, "heldout", clip_samples=ONE_S, mix_probability=0.0)
    groups = ds.description_groups()
    assert groups.shape == (200,) and len(np.unique(groups)) == len({s.description for s in ds.specs})
    for i, j in [(0, k) for k in range(1, 200)]:
        assert (groups[i] == groups[j]) == (ds.specs[i].description == ds.specs[j].description)
    # what a group's captions leave unnamed still differs between its clips: onset and level
    same = np.flatnonzero(groups == groups[0])
    assert len(same) > 1 and len({ds.specs[i].onset for i in same}) > 1
    assert np.array_equal(groups, S.synthetic_dataset(1, 200, "heldout", clip_samples=ONE_S,
                                                      mix_probability=0.0).description_groups())


def test_frontend_sets_the_clip_length_and_bad_arguments_fail():
    fe = FrontEndConfig(clip_samples=2 * ONE_S)
    ds = S.synthetic_dataset(0, 3, "heldout", frontend=fe)
    assert ds.waveforms().shape == (3, 2 * ONE_S) and ds.waveforms().dtype == np.float32
    assert ds.key(2) == "synthetic-heldout-0-0000002"
    with pytest.raises(ValueError, match="split"):
        S.synthetic_dataset(0, 3, "test")
    with pytest.raises(ValueError, match="n must be a positive int"):
        S.synthetic_dataset(0, 0)
    with pytest.raises(ValueError, match="shorter than 0.1 s"):
        S.synthetic_dataset(0, 2, clip_samples=100)
    with pytest.raises(IndexError):
        ds.waveform(3)


def test_zero_shot_labels():
    ds = S.synthetic_dataset(0, 300, "heldout", clip_samples=ONE_S)
    for task, classes in S.ZERO_SHOT_CLASSES.items():
        lab = ds.labels(task)
        assert lab.shape == (300,) and lab.max() < len(classes)
    kind = ds.labels("kind")
    for s, k in zip(ds.specs, kind):
        if s.mix_kind is not None:
            assert k == -1
        else:
            cls = S.KIND_CLASSES[k]
            assert (s.value in cls) or (s.kind == "tone" and "tone" in cls) or (s.kind == "clicks" and "click" in cls)
    assert (ds.labels("loudness") >= 0).all()
    pitch = ds.labels("pitch")
    assert all((p >= 0) == (s.kind == "tone" and s.mix_kind is None) for s, p in zip(ds.specs, pitch))
    for s, mod, dur in zip(ds.specs, ds.labels("modulation"), ds.labels("duration")):
        assert mod == (-1 if s.mix_kind is not None else S.MODULATIONS.index(s.modulation))
        assert S.ZERO_SHOT_CLASSES["duration"][dur] == f"a {s.duration} sound"
    with pytest.raises(ValueError, match="zero-shot task"):
        ds.labels("colour")


def test_rendering_works_in_place_on_the_active_part_only():
    """What makes rendering cheap (a few ms per 10 s clip), asserted without a clock: once the
    scratch buffers exist, rendering into a given row allocates at most 13 bytes per sample of the
    event (np.take's int64 copy of the sine-table indices and one float32 temporary), never
    clip-sized arrays for the silence around it nor the float64 temporaries of a plain NumPy
    formula (two of them: 16 bytes per sample)."""
    import tracemalloc
    ds = S.synthetic_dataset(0, 100)
    out = np.empty(S.CLIP_SAMPLES, np.float32)
    for i in range(100):
        ds.render_into(i, out)        # scratch buffers and the noise bank are made once
    worst = []
    for i in range(100):
        tracemalloc.start()
        ds.render_into(i, out)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        worst.append((peak - 13 * ds.specs[i].length, peak, ds.specs[i]))
    excess, peak, spec = max(worst, key=lambda w: w[0])
    assert excess <= 16 * 1024, f"{peak} bytes allocated for a {spec.length}-sample event: {spec}"
    assert min(s.length for s in ds.specs) < S.CLIP_SAMPLES // 4   # short events were among them


def test_tokenizer_trained_on_captions(tmp_path):
    tok = S.train_tokenizer(tmp_path / "tok", n=500, vocab_size=600)
    ds = S.synthetic_dataset(9, 50, "heldout", clip_samples=ONE_S)
    texts = [c for caps in ds.captions for c in caps]
    enc = tok(texts)
    assert enc["input_ids"].shape == (len(texts), 77) and enc["input_ids"].dtype == np.int32
    assert not (enc["input_ids"] == 3).any()  # <unk>: byte-level BPE covers everything
    # the vocabulary learned whole attribute words
    assert (enc["attention_mask"].sum(1) < 40).all()
    prompt = tok(["the sound of a pure tone at C4"])
    assert prompt["attention_mask"].sum() <= 14


def test_mix_probability_controls_background_sounds():
    none = S.synthetic_dataset(2, 200, clip_samples=ONE_S, mix_probability=0.0)
    default = S.synthetic_dataset(2, 200, clip_samples=ONE_S)
    assert not any(s.mix_kind for s in none.specs)
    assert 0.2 < np.mean([s.mix_kind is not None for s in default.specs]) < 0.4
    # the rest of each clip's draw is unchanged
    assert [s.combination for s in none.specs] == [s.combination for s in default.specs]
    with pytest.raises(ValueError, match="mix_probability"):
        S.synthetic_dataset(0, 2, mix_probability=1.5)
