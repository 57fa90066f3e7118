"""Streaming, parallel embedding of files (issue 17 item 1): the same rows as decoding everything first; bounded
memory; `embed-audio` resumes, lists bad files, splits over processes and merges."""
import json
import os

import numpy as np
import pytest
import soundfile as sf

from clapjax.app import api, cli
from clapjax.audio import io as audio_io
from docs_snippets import write_small_checkpoint, write_tokenizer

BATCHES = (2, 4)   # small batch sizes, so a dozen files make several batches
NO_CACHE = ("--compilation-cache", "")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_small_checkpoint(tmp_path_factory.mktemp("model") / "tiny")


def load(directory, batch_sizes=BATCHES):
    return api.CLAP.from_pretrained(str(directory), tokenizer=False, compilation_cache=None, batch_sizes=batch_sizes)


@pytest.fixture(scope="module")
def clap(model_dir):
    return load(model_dir)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """11 clips at mixed rates (44.1 kHz among them), shorter and longer than the tiny model's 1 s clip."""
    d = tmp_path_factory.mktemp("audio")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(11):
        sr = (44100, 48000, 32000)[i % 3]
        seconds = (0.4, 1.0, 2.3, 1.7)[i % 4]
        path = d / f"clip{i:02d}.{'flac' if i % 2 else 'wav'}"
        sf.write(path, rng.uniform(-0.5, 0.5, int(sr * seconds)).astype(np.float32), sr)
        paths.append(str(path))
    return paths


@pytest.fixture
def bad_files(tmp_path):
    (tmp_path / "notes.wav").write_text("not audio")
    (tmp_path / "empty.flac").write_bytes(b"")
    return [str(tmp_path / "notes.wav"), str(tmp_path / "empty.flac")]


def sequential(clap, paths, rng):
    """Today's path before streaming: decode every file, then embed the waveforms."""
    sr = clap.config.frontend.sample_rate
    return clap.get_audio_embedding_from_data([audio_io.load_audio(p, sr) for p in paths], rng)


@pytest.mark.parametrize("workers", [0, 3])
@pytest.mark.parametrize("seed", [None, "generator", "randomstate"])
def test_streamed_rows_are_bit_identical_to_decoding_first(clap, files, workers, seed):
    def rng():
        return {None: None, "generator": np.random.default_rng(4), "randomstate": np.random.RandomState(4)}[seed]
    ours = clap.get_audio_embedding_from_filelist(files, rng(), workers=workers)
    assert np.array_equal(ours, sequential(clap, files, rng()))


def test_fused_seeded_rows_are_bit_identical(files, tmp_path):
    fused = load(write_small_checkpoint(tmp_path / "fused", fusion=True))
    assert fused.config.enable_fusion
    ours = fused.get_audio_embedding_from_filelist(files[:6], rng=3, workers=2)
    assert np.array_equal(ours, sequential(fused, files[:6], np.random.default_rng(3)))


def test_memory_is_bounded_by_the_window(clap, files):
    """A generator of 60 paths: never more than window + one assembling + one computing batch read and not
    yet handed back."""
    read, handed, worst = [0], [0], [0]

    def source():
        for i in range(60):
            read[0] += 1
            yield files[i % len(files)]
    step = BATCHES[-1]
    for batch in clap.iter_audio_embeddings(source(), workers=2, window_batches=2):
        worst[0] = max(worst[0], read[0] - handed[0])
        handed[0] += batch.inputs
    assert handed[0] == 60
    assert worst[0] <= (2 + 2) * step


def test_bad_files_raise_or_are_listed(clap, files, bad_files):
    mixed = files[:3] + [bad_files[0]] + files[3:5] + [bad_files[1]]
    with pytest.raises(ValueError, match="notes.wav: cannot decode"):
        clap.get_audio_embedding_from_filelist(mixed)
    batches = list(clap.iter_audio_embeddings(mixed, rng=2, skip_bad=True, workers=2))
    embedded = [p for b in batches for p in b.paths]
    failed = [f for b in batches for f in b.failed]
    assert embedded == files[:5] and [f.item for f in failed] == bad_files
    assert "empty (0 bytes)" in failed[1].reason
    assert sum(b.inputs for b in batches) == len(mixed)
    rows = np.concatenate([b.embeddings for b in batches])
    assert np.array_equal(rows, sequential(clap, files[:5], np.random.default_rng(2)))  # a bad file draws nothing


# --- the command line ---------------------------------------------------------------------------------------

@pytest.fixture
def shared_model(monkeypatch, clap):
    """The commands get the module's model instead of loading (and compiling) their own each time."""
    monkeypatch.setattr(cli, "_load", lambda args: clap)


def embed(tmp_path, model_dir, *inputs, out="e.npy", extra=()):
    return cli.main(["embed-audio", str(model_dir), *map(str, inputs), "--out", str(tmp_path / out), *NO_CACHE,
                     *extra])


def reference(clap, paths, seed=None):
    return sequential(clap, paths, None if seed is None else np.random.default_rng(seed))


def test_embed_audio_lists_bad_files_and_exits_non_zero(tmp_path, model_dir, clap, shared_model, files, bad_files,
                                                        capsys):
    assert embed(tmp_path, model_dir, *files[:3], bad_files[0], files[3]) == cli.BAD_FILES_EXIT
    err = capsys.readouterr().err
    assert "1 file(s) could not be read" in err and "--allow-bad-files" in err
    paths = json.loads((tmp_path / "e.paths.json").read_text())
    assert paths == [os.path.abspath(p) for p in files[:4]]
    failed = json.loads((tmp_path / "e.failed.json").read_text())
    assert [(f["index"], f["path"]) for f in failed] == [(3, bad_files[0])] and "cannot decode" in failed[0]["reason"]
    assert np.array_equal(np.load(tmp_path / "e.npy"), reference(clap, files[:4]))
    assert not (tmp_path / "e.partial").exists()
    assert embed(tmp_path, model_dir, *files[:3], bad_files[0], files[3], extra=["--allow-bad-files"]) == 0
    assert embed(tmp_path, model_dir, *files[:3]) == 0
    assert not (tmp_path / "e.failed.json").exists()  # the earlier run's list of bad files does not linger


def test_interrupted_seeded_run_resumes_without_redoing_files(tmp_path, model_dir, clap, shared_model, files,
                                                               monkeypatch):
    decoded = []
    real_load = audio_io.load_audio

    def counting_load(path, sr=48000):
        decoded.append(path)
        return real_load(path, sr)
    monkeypatch.setattr(audio_io, "load_audio", counting_load)
    finish, calls = api.CLAP._finish, [0]

    def dying_finish(self, *a):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt  # killed after two batches were written
        return finish(self, *a)
    monkeypatch.setattr(api.CLAP, "_finish", dying_finish)
    with pytest.raises(KeyboardInterrupt):
        embed(tmp_path, model_dir, *files, extra=["--seed", "5", "--workers", "0"])
    state = json.loads((tmp_path / "e.partial" / "state.json").read_text())
    assert state["done"] == state["rows"] > 0
    monkeypatch.setattr(api.CLAP, "_finish", finish)
    decoded.clear()
    # a different seed is another run: refused, the partial run kept
    assert embed(tmp_path, model_dir, *files, extra=["--seed", "6"]) == 2
    assert embed(tmp_path, model_dir, *files, extra=["--seed", "5", "--workers", "0"]) == 0
    assert sorted(decoded) == sorted(files[state["done"]:])   # the finished files were not decoded again
    # the same rows as one uninterrupted run
    np.testing.assert_array_equal(np.load(tmp_path / "e.npy"), reference(clap, files, seed=5))


def test_split_over_processes_and_merge(tmp_path, model_dir, clap, shared_model, files, bad_files, capsys):
    inputs = files[:5] + [bad_files[0]] + files[5:8]
    assert cli.main(["merge-embeddings", str(tmp_path / "e.npy")]) == 2
    for index in (0, 2):
        assert embed(tmp_path, model_dir, *inputs, extra=["--process-index", str(index), "--process-count", "3",
                                                           "--allow-bad-files"]) == 0
    capsys.readouterr()
    assert cli.main(["merge-embeddings", str(tmp_path / "e.npy")]) == 2
    assert "parts [1] of 3 are missing" in capsys.readouterr().err
    assert embed(tmp_path, model_dir, *inputs, extra=["--process-index", "1", "--process-count", "3"]) == 1
    assert cli.main(["merge-embeddings", str(tmp_path / "e.npy")]) == cli.BAD_FILES_EXIT
    good = files[:8]
    assert json.loads((tmp_path / "e.paths.json").read_text()) == [os.path.abspath(p) for p in good]
    assert [f["index"] for f in json.loads((tmp_path / "e.failed.json").read_text())] == [5]
    # each part is its own run (its own batches): the merged rows are the parts' rows in order
    parts = [inputs[0:3], [p for p in inputs[3:6] if p not in bad_files], inputs[6:9]]
    np.testing.assert_array_equal(np.load(tmp_path / "e.npy"), np.concatenate([reference(clap, p) for p in parts]))


def test_split_defaults_from_the_launch_environment(tmp_path, model_dir, files, monkeypatch):
    """Through the real model loading (the other command tests share one model)."""
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "node1")
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    assert embed(tmp_path, model_dir, *files[:4]) == 0
    part = tmp_path / "e.part-00001-of-00002.npy"
    np.testing.assert_array_equal(np.load(part), reference(load(model_dir, api.BATCH_SIZES), files[2:4]))


def test_zero_shot_prints_the_readable_files_and_names_the_bad_ones(tmp_path, model_dir, files, bad_files, capsys,
                                                                   monkeypatch):
    with_text = api.CLAP.from_pretrained(str(model_dir), tokenizer=write_tokenizer(str(tmp_path / "tok")),
                                         compilation_cache=None, batch_sizes=BATCHES)
    monkeypatch.setattr(cli, "_load", lambda args, need_tokenizer=False: with_text)
    args = ["zero-shot", str(model_dir), files[0], bad_files[0], files[1], "--labels", "dog,rain", *NO_CACHE]
    assert cli.main(args) == cli.BAD_FILES_EXIT
    out, err = capsys.readouterr()
    assert [line for line in out.splitlines() if not line.startswith(" ")] == files[:2]
    assert f"{bad_files[0]}: cannot decode" in err
    assert cli.main(args + ["--allow-bad-files"]) == 0


def test_more_processes_than_files(tmp_path, model_dir, clap, shared_model, files):
    for index in range(3):   # part 0 of 2 files in 3 parts is empty
        assert embed(tmp_path, model_dir, *files[:2], extra=["--process-index", str(index), "--process-count", "3"]) == 0
    assert np.load(tmp_path / "e.part-00000-of-00003.npy").shape == (0, clap.config.joint_embed_shape)
    assert cli.main(["merge-embeddings", str(tmp_path / "e.npy")]) == 0
    assert json.loads((tmp_path / "e.paths.json").read_text()) == [os.path.abspath(p) for p in files[:2]]
    assert len(np.load(tmp_path / "e.npy")) == 2
