"""The CLI with a model name, offline, against the Hub cache of tests/hub_cache.py: a text command, `convert
NAME OUT_DIR` (the converted model keeps its source, so its own tokenizer is found again), `download NAME`
when cached, and the message when not."""
import json
import os

import numpy as np
import pytest

import docs_snippets
import hub_cache
from clapjax import saved_model
from clapjax.app import cli
from clapjax.app.api import CLAP
from clapjax.convert import pipeline
from test_hub import REPO, bpe_dir, clap_repo, hub_root  # noqa: F401  (fixtures)

NO_CACHE = ("--compilation-cache", "")  # leaves this process's JAX settings alone


@pytest.fixture
def conversion_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CLAPJAX_CACHE", str(tmp_path / "clapjax-cache"))
    return tmp_path / "clapjax-cache"


def run_main(capsys, *args):
    status = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_text_command_with_a_repo_id_and_a_revision(capsys, clap_repo, conversion_cache, tmp_path):
    texts = ["a dog barks", "rain"]
    for revision, model in ((None, clap_repo["model"]), (clap_repo["old_commit"], clap_repo["old"])):
        out = tmp_path / f"text-{revision}.npy"
        status, _, err = run_main(capsys, "embed-text", REPO, *texts, "--out", out, *NO_CACHE,
                                  *(["--revision", revision] if revision else []))
        assert status == 0, err
        api = CLAP.from_pretrained(REPO, revision=revision, compilation_cache=None)  # the repo's own tokenizer
        np.testing.assert_array_equal(np.load(out), api.get_text_embedding(texts))
    assert not np.allclose(np.load(tmp_path / "text-None.npy"), np.load(tmp_path / f"text-{revision}.npy"))
    assert len(os.listdir(conversion_cache / "converted")) == 2


def test_convert_a_name_records_its_source(capsys, clap_repo, hub_root, tmp_path):
    status, out, err = run_main(capsys, "convert", REPO, tmp_path / "out")
    assert status == 0, err
    record = saved_model.read_provenance(str(tmp_path / "out"))
    assert record["repo_id"] == REPO and record["revision"] == clap_repo["commit"] and record["name"] == REPO
    snapshot = os.path.join(hub_cache.repo_dir(hub_root, REPO), "snapshots", clap_repo["commit"])
    clap = CLAP.from_pretrained(str(tmp_path / "out"), compilation_cache=None)
    assert clap.tokenizer is not None and clap.tokenizer.directory == snapshot


def test_download_fills_the_conversion_cache_and_says_where(capsys, clap_repo, conversion_cache, monkeypatch):
    calls = []
    real = pipeline.convert
    monkeypatch.setattr(pipeline, "convert", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    status, out, err = run_main(capsys, "download", REPO)
    assert status == 0, err
    [entry] = os.listdir(conversion_cache / "converted")
    assert f"converted model: {conversion_cache / 'converted' / entry}" in out and str(conversion_cache) in out
    assert run_main(capsys, "download", REPO)[0] == 0 and len(calls) == 1  # the second converts nothing


def test_download_of_what_is_not_cached_offline_names_repo_file_and_remedy(capsys, hub_root, conversion_cache):
    status, out, err = run_main(capsys, "download", "630k-audioset-fusion-best")
    assert status == 2 and out == ""
    assert ("error: 630k-audioset-fusion-best.pt of the Hugging Face repo lukewys/laion_clap is not in the local "
            "Hub cache") in err and "`clapjax download 630k-audioset-fusion-best`" in err
    assert not conversion_cache.exists()


def test_eval_takes_a_name_and_the_models_own_tokenizer(capsys, clap_repo, conversion_cache, tmp_path):
    status, out, err = run_main(capsys, "eval", REPO, "synthetic:heldout:8", "--json", tmp_path / "m.json")
    assert status == 0, err
    metrics = json.load(open(tmp_path / "m.json"))["metrics"]
    assert 0.0 <= metrics["text_to_audio_R@1"] <= 1.0 and 0.0 <= metrics["audio_to_text_R@1"] <= 1.0, metrics
    assert len(os.listdir(conversion_cache / "converted")) == 1
    status, out, err = run_main(capsys, "eval", "630k-audioset-fusion-best", "synthetic:heldout:8")
    assert status == 2 and "lukewys/laion_clap is not in the local Hub cache" in err  # one line, no traceback
    small = docs_snippets.write_small_checkpoint(tmp_path / "small")  # trained by clapjax: no source recorded
    status, out, err = run_main(capsys, "eval", small, "synthetic:heldout:8")
    assert status == 2 and f"error: {small} has no tokenizer of its own" in err and "pass --tokenizer DIR" in err
