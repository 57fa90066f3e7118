"""The figures LAION publishes for its released checkpoints, for the benchmark tables to stand beside.

    published.figures("630k-audioset-best", "esc50")["R@1"]   # Figure(value=0.9275, rounding=5e-05, …)
    published.figures("laion/clap-htsat-unfused", "esc50")      # the same checkpoint, converted by HF

A model is named as `clapjax.convert.hub` takes it: a laion-clap release name (with or without .pt) or
a Hugging Face repo id. Metric keys are those of `metrics.zero_shot_ranking_metrics` (zero-shot:
R@1 = top-1 accuracy). Rates are fractions (92.75 % → 0.9275), ranks 1-based.

Every figure names where LAION publishes it: LAION-AI/CLAP's README (read at commit 1fd4c37,
2025-05-15). Left out, each for its reason:
* AudioCaps / Clotho retrieval and UrbanSound8K zero-shot: their figures are in the paper
  (arXiv 2211.06687, Tables 3-4) only, whose text could not be read here; figures quoted from memory
  are not figures. The paper's ESC-50 91.0 % is left out for the same reason, and because which
  release it belongs to is not stated.
* 630k-best and 630k-fusion-best: the README gives no figure for them.
* laion/larger_clap_general, _music, _music_and_speech: LAION's maintainer does not know which
  release each converts (LAION-AI/CLAP#172; the HF team uploaded them), so the README's figures of the
  music releases are not theirs.
Such a model (or benchmark) has no figures: `figures` returns {} for it.
"""
from __future__ import annotations

import dataclasses

from clapjax.convert import hub

BENCHMARKS = ("esc50", "gtzan", "urbansound8k", "audiocaps", "clotho")

_README = "LAION-AI/CLAP README.md (commit 1fd4c37)"
_ESC50_FOLD1 = ("ESC-50 fold 1 (400 clips), zero-shot over the 50 classes: prompt 'This is a sound of ' + class "
                "name (class_labels/ESC50_class_labels_indices_space.json: '_' → ' '), rank by audio·text without "
                "a logit scale, CLAP_Module.get_audio_embedding_from_filelist on the 48 kHz FLACs of LAION's "
                "webdataset copy; figures printed to 4 decimals")
_MUSIC_ESC50 = ("ESC-50 zero-shot top-1 accuracy, printed in % to 2 decimals; the README states no split or prompt "
                "(the release's file name carries the same figure: it was selected on it in training)")
_MUSIC_GTZAN = ("GTZAN zero-shot top-1 accuracy over the 10 genres, prompt 'This audio is a <genre> song.', "
                "printed in whole %; split not stated")


@dataclasses.dataclass(frozen=True)
class Figure:
    value: float        # a fraction for rates (R@1 0.9275 = 92.75 %), 1-based for ranks
    rounding: float     # half a unit of the last published digit: |ours - value| <= rounding agrees with it
    protocol: str       # how LAION measured it: split, prompts, scoring
    source: str         # where LAION publishes it, precisely enough to open
    fold: int | None = None   # the one fold it is measured on (ESC-50's README protocol: 1); None: all clips


def _fold1(numbers: dict[str, float], section: str) -> dict[str, Figure]:
    source = f"{_README}, section 'Zeroshot Classification with ESC50 official split': {section} (added 7e1ba03)"
    return {k: Figure(v, 5e-5, _ESC50_FOLD1, source, fold=1) for k, v in numbers.items()}


def _percent(value: float, decimals: int, protocol: str, sentence: str) -> dict[str, Figure]:
    source = f"{_README}, section 'Pretrained Models', update 2023.4.7: {sentence!r}"
    return {"R@1": Figure(round(value / 100, decimals + 2), 0.5 * 10 ** -(decimals + 2), protocol, source)}


# release → benchmark → metric → Figure
_FIGURES: dict[str, dict[str, dict[str, Figure]]] = {
    # CLAP_Module(enable_fusion=False).load_ckpt() loads 630k-audioset-best.pt (laion_clap.hook.load_ckpt)
    "630k-audioset-best": {"esc50": _fold1(
        {"mean_rank": 1.1450, "median_rank": 1.0, "R@1": 0.9275, "R@5": 0.9975, "R@10": 1.0, "mAP@10": 0.9556},
        "the figures for CLAP_Module(enable_fusion=False)")},
    # CLAP_Module(enable_fusion=True).load_ckpt() loads 630k-audioset-fusion-best.pt
    "630k-audioset-fusion-best": {"esc50": _fold1(
        {"mean_rank": 1.2425, "median_rank": 1.0, "R@1": 0.9050, "R@5": 0.9900, "R@10": 0.9925, "mAP@10": 0.9407},
        "the figures for CLAP_Module(enable_fusion=True)")},
    "music_speech_audioset_epoch_15_esc_89.98": {
        "esc50": _percent(89.98, 2, _MUSIC_ESC50, "The zeroshot ESC50 performance is 89.98%"),
        # GTZAN figure as corrected in 319cc38 ("Fix typo and update GTZAN performance")
        "gtzan": _percent(51, 0, _MUSIC_GTZAN, "the GTZAN performance is 51%")},
    "music_audioset_epoch_15_esc_90.14": {
        "esc50": _percent(90.14, 2, _MUSIC_ESC50, "The zeroshot ESC50 performance is 90.14%"),
        "gtzan": _percent(71, 0, _MUSIC_GTZAN, "the GTZAN performance is 71%")},
    "music_speech_epoch_15_esc_89.25": {
        "esc50": _percent(89.25, 2, _MUSIC_ESC50, "The zeroshot ESC50 performance is 89.25%"),
        "gtzan": _percent(69, 0, _MUSIC_GTZAN, "the GTZAN performance is 69%")},
}

# HF repo → the release it converts, with who says so
HF_CONVERSIONS = {
    "laion/clap-htsat-unfused": ("630k-audioset-best", "LAION-AI/CLAP#123, RetroCirce (LAION), 2023-09-24"),
    "laion/clap-htsat-fused": ("630k-audioset-fusion-best", "LAION-AI/CLAP#123, RetroCirce (LAION), 2023-09-24"),
}


def release_of(model_name: str) -> str | None:
    """The laion release `model_name` is (a release name, with or without .pt) or converts (an HF repo
    in HF_CONVERSIONS); None for any other name hub knows. A name hub does not know is an error."""
    release = hub.release_file(model_name)
    if release is not None:
        return release[:-3]
    if model_name in HF_CONVERSIONS:
        return HF_CONVERSIONS[model_name][0]
    if hub.is_repo_id(model_name):
        return None
    raise ValueError(f"{model_name!r} is neither a laion-clap release name ({', '.join(hub.LAION_RELEASES)}) "
                     "nor a Hugging Face repo id")


def figures(model_name: str, benchmark: str) -> dict[str, Figure]:
    """Metric key → the Figure LAION publishes for `model_name` on `benchmark` (one of BENCHMARKS);
    {} when it publishes none that can be sourced (see the module docstring). For an HF repo the
    figures are its release's, the source naming who says the repo converts it."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}: one of {', '.join(BENCHMARKS)}")
    release = release_of(model_name)
    found = _FIGURES.get(release, {}).get(benchmark, {})
    if model_name in HF_CONVERSIONS:
        who = HF_CONVERSIONS[model_name][1]
        found = {k: dataclasses.replace(f, source=f"{f.source}; {model_name} converts {release} ({who})")
                 for k, f in found.items()}
    return dict(found)


def models() -> tuple[str, ...]:
    """Every model name (releases, then HF repos) that has at least one published figure."""
    return tuple(_FIGURES) + tuple(HF_CONVERSIONS)
