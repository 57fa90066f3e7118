"""What the synthetic clips are called: the attribute values, the captions that name them, and the
zero-shot class prompts (clapjax.synthetic draws, renders and collects the clips; it re-exports
these names).

A held-out caption names every attribute; a share of the training captions names only one or two
("a loud sound", "a pure tone at C4 with vibrato"), so one-attribute zero-shot prompts read like
training text.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    from clapjax.synthetic import ClipSpec

# ≥ a fourth apart: each note's strongest mel band is a different one with 64 bands and still with
# the demo's 32 (50 Hz–14 kHz: bands 0, 1, 2, 3, 6, 8, 12, 15), so pitch is readable at either
NOTES = ("C3", "C4", "G4", "C5", "G5", "C6", "G6", "C7")
CHIRP_DIRECTIONS = ("rising", "falling")
NOISE_COLOURS = ("white", "pink", "brown")
CLICK_RATES = (2, 4, 8, 16)
MODULATIONS = ("none", "tremolo", "vibrato")
LOUDNESS = ("quiet", "moderate", "loud")
DURATIONS = ("short", "long")

# --- zero-shot class lists ----------------------------------------------------------------------
KIND_CLASSES = ("a pure tone", "a rising chirp", "a falling chirp", "white noise", "pink noise",
                "brown noise", "a click train")
# one task per attribute family the captions name (kind with its chirp direction / noise colour,
# pitch, click rate, modulation, loudness, duration); class lists follow the tuples above. A class
# prompt names one attribute, so the training split has partial captions (PARTIAL_CAPTION_PROBABILITY)
# that name one or two, with the same words: with complete captions only, a prompt like "a pure
# tone" was out of the text tower's training distribution and zero-shot kind reached 0.29 (chance
# 0.14) while the top retrieved clip had the caption's kind for 100 % of captions.
ZERO_SHOT_CLASSES = {
    "kind": KIND_CLASSES,
    "pitch": tuple(f"a pure tone at {n}" for n in NOTES),
    "click_rate": tuple(f"a click train at {r} clicks per second" for r in CLICK_RATES),
    "modulation": ("a sound without modulation", "a sound with tremolo", "a sound with vibrato"),
    "loudness": ("a quiet sound", "a moderately loud sound", "a loud sound"),
    "duration": ("a short sound", "a long sound"),
}
PROMPT_TEMPLATES = ("the sound of {}", "{}", "a recording of {}", "you can hear {}")


# --- captions -------------------------------------------------------------------------------------
_LOUD_WORDS = {"quiet": ("quiet", "soft", "faint"), "moderate": ("moderately loud", "medium-level", "moderate"),
               "loud": ("loud", "strong", "powerful")}
_DUR_WORDS = {"short": ("short", "brief"), "long": ("long", "sustained", "continuous")}
# a complete caption always names the modulation, its absence too, so that a caption without a
# modulation phrase is always a partial one (it used to mean "unmodulated" in complete captions and
# "unsaid" in partial ones)
_MOD_PHRASES = {"none": ("without modulation", "unmodulated"), "tremolo": ("with tremolo", "pulsing in volume", "with a throbbing level"),
                "vibrato": ("with vibrato", "wobbling in pitch", "with a warbling pitch")}
_NUMBER_WORDS = {2: "two", 4: "four", 8: "eight", 16: "sixteen"}


def _noun(rng, kind: str, value: str, name_value: bool = True) -> str:
    """A noun phrase for one sound class, without article or adjectives; without the pitch or click
    rate when not `name_value` (a chirp's direction and a noise's colour are its kind: always named)."""
    # "tone" names only the steady kind (a chirp is never a "tone gliding upward"): a caption's
    # kind word must tell the kinds apart for "a pure tone" to mean something zero-shot
    if kind == "tone":
        forms = (("pure tone at {v}", "{v} sine tone", "tone pitched at {v}", "tone at {v}", "{v} pure tone")
                 if name_value else ("pure tone", "sine tone", "steady tone"))
    elif kind == "chirp":
        up = value == "rising"
        forms = ((f"{value} chirp", "upward sweep", "rising sweep", "chirp going up", "chirp gliding upward")
                 if up else (f"{value} chirp", "downward sweep", "falling sweep", "chirp going down",
                             "chirp gliding downward"))
    elif kind == "noise":
        forms = ("{v} noise", "burst of {v} noise", "{v} noise hiss")
    elif not name_value:
        forms = ("click train", "series of clicks", "train of clicks")
    else:
        rate = int(value)
        r = value if rng.random() < 0.5 else _NUMBER_WORDS[rate]
        forms = (f"click train at {r} clicks per second", f"series of clicks, {r} per second",
                 f"ticking at {r} clicks per second", f"clicking at {r} per second")
    return forms[rng.integers(len(forms))].format(v=value)


def _article(phrase: str) -> str:
    if phrase.split(" ", 1)[0] in ("white", "pink", "brown"):  # mass noun: "white noise"
        return phrase
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _pick(rng, options: Sequence[str]) -> str:
    return options[rng.integers(len(options))]


# what a caption can name; a partial caption names one or two of these (and the kind's pitch or
# click rate only sometimes), so that one-attribute zero-shot prompts like "a pure tone" or "a loud
# sound" read like captions the text tower was trained on
CAPTION_ATTRIBUTES = ("kind", "loudness", "duration", "modulation")
PARTIAL_CAPTION_PROBABILITY = 0.3   # the training split's share of partial captions (held out: 0)


def partial_caption_names(rng, spec: ClipSpec) -> frozenset[str]:
    k = int(rng.integers(1, 3))
    names = {CAPTION_ATTRIBUTES[j] for j in rng.permutation(len(CAPTION_ATTRIBUTES))[:k]}
    if "kind" in names and (spec.kind not in ("tone", "clicks") or rng.random() < 0.5):
        names.add("value")
    return frozenset(names)


def caption(spec: ClipSpec, rng: np.random.Generator, names: frozenset[str] | None = None) -> str:
    """One caption of `spec`, in one of several sentence shapes, naming every attribute (`names`
    None) or only those in `names` (of CAPTION_ATTRIBUTES, 'value' for the pitch or click rate and
    'mix' for the background sound); a caption that names no kind calls it "a sound"."""
    full = names is None
    names = frozenset((*CAPTION_ATTRIBUTES, "value", "mix")) if full else names
    noun = _noun(rng, spec.kind, spec.value, "value" in names) if "kind" in names else "sound"
    loud, dur = _pick(rng, _LOUD_WORDS[spec.loudness]), _pick(rng, _DUR_WORDS[spec.duration])
    mod = f" {_pick(rng, _MOD_PHRASES[spec.modulation])}" if "modulation" in names else ""
    mix = ""
    if spec.mix_kind is not None and "mix" in names:
        other = _article(_noun(rng, spec.mix_kind, spec.mix_value))
        mix = _pick(rng, (f", mixed with {other}", f" over {other}", f" together with {other}",
                          f" with {other} in the background"))
    adjs = (loud, dur) if rng.random() < 0.5 else (dur, loud)
    adjs = [a for a in adjs if (a == loud and "loudness" in names) or (a == dur and "duration" in names)]
    shape = rng.integers(5)
    if shape == 1 and adjs:
        return f"{noun}{mod}, {' and '.join(adjs)}{mix}"
    if shape == 2 and adjs:
        return f"the sound of {_article(' '.join([adjs[0], noun]))}{mod}{''.join(f' that is {a}' for a in adjs[1:])}{mix}"
    if shape == 3 and "loudness" in names and "kind" in names:
        return f"{_article(f'{loud} sound')}: {_article(' '.join([*adjs[adjs.index(loud) + 1:], *adjs[:adjs.index(loud)], noun]))}{mod}{mix}"
    if shape == 4:
        return f"you can hear {_article(' '.join([*adjs, noun]))}{mod}{mix}"
    return f"{_article(' '.join([*adjs, noun]))}{mod}{mix}"
