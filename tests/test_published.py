"""train/published.py: every figure names its source and protocol, every model is a name convert/hub.py
resolves, and the metric keys are those the metrics code returns."""
import numpy as np
import pytest

from clapjax.convert import hub
from clapjax.train import metrics as M
from clapjax.train import published as P

RATES = {"R@1", "R@5", "R@10", "mAP@10"}


def _all():
    for name in P.models():
        for bench in P.BENCHMARKS:
            for key, fig in P.figures(name, bench).items():
                yield name, bench, key, fig


def test_every_figure_is_sourced_and_sane():
    seen = list(_all())
    assert len(seen) >= 12
    for name, bench, key, fig in seen:
        where = f"{name} {bench} {key}"
        assert fig.source.startswith("LAION-AI/CLAP README.md (commit 1fd4c37)"), where
        assert len(fig.protocol) > 30 and 0 < fig.rounding <= 0.005, where
        assert (0 <= fig.value <= 1) if key in RATES else fig.value >= 1, where
        assert fig.fold == (1 if "fold 1" in fig.protocol else None), where   # which row it stands beside


def test_every_model_is_a_name_hub_knows():
    for name in P.models():
        assert hub.release_file(name) is not None or (hub.is_repo_id(name) and name.startswith("laion/")), name
    for repo, (release, who) in P.HF_CONVERSIONS.items():
        assert hub.release_file(release) == f"{release}.pt" and "LAION-AI/CLAP#" in who
        ours, theirs = P.figures(repo, "esc50"), P.figures(release, "esc50")
        assert {k: f.value for k, f in ours.items()} == {k: f.value for k, f in theirs.items()} != {}
        assert all(repo in f.source and who in f.source for f in ours.values())
    # the .pt spelling is the same release; a known name with nothing published gives {}
    assert P.figures("630k-audioset-best.pt", "esc50") == P.figures("630k-audioset-best", "esc50")
    assert P.figures("630k-best", "esc50") == {} and P.figures("laion/larger_clap_general", "clotho") == {}
    with pytest.raises(ValueError, match="unknown benchmark"):
        P.figures("630k-best", "esc-50")
    with pytest.raises(ValueError, match="neither a laion-clap release"):
        P.figures("not a model", "esc50")


def test_release_names_carry_their_esc50_figure():
    """The music releases' file names record the ESC-50 accuracy the README quotes."""
    for name in hub.LAION_RELEASES:
        if "_esc_" in name:
            assert P.figures(name, "esc50")["R@1"].value == pytest.approx(float(name.split("_esc_")[1]) / 100)


def test_keys_are_the_metrics_keys():
    rng = np.random.default_rng(0)
    audio, classes = rng.standard_normal((4, 3)), rng.standard_normal((5, 3))
    keys = set(M.zero_shot_ranking_metrics(audio, classes, np.arange(4)))
    assert {key for _, _, key, _ in _all()} <= keys
