"""`clapjax` commands given bad input: exit status 2, a message naming the problem, nothing written.

The commands run in this process through `cli.main` (argparse's own exits arrive as SystemExit with the
status the command would return); test_convert_refusals has the subprocess check of a real exit.
"""
import json
import os
import wave

import numpy as np
import pytest

from clapjax.app import cli
from clapjax.convert import pipeline
from test_convert_hf_and_cli import hf_model, tok_dir  # noqa: F401  (tok_dir: a fixture)


def run_main(capsys, *args):
    """`clapjax ARGS` in this process → (exit status, stdout, stderr)."""
    try:
        status = cli.main([str(a) for a in args])
    except SystemExit as exit_:  # argparse: usage errors exit 2, as the command does
        status = exit_.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def refused(capsys, *args, why: str) -> str:
    status, _, err = run_main(capsys, *args)
    assert status == 2 and why in err, (status, err)
    return err


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A real converted checkpoint, so that the one thing wrong in each call is the thing tested."""
    d = tmp_path_factory.mktemp("cli")
    hf_model(False).save_pretrained(d / "src")
    pipeline.convert(str(d / "src"), str(d / "ckpt"), log=lambda s: None)
    return d / "ckpt"


@pytest.fixture
def clip(tmp_path):
    path = tmp_path / "clip.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(48000)
        w.writeframes(np.zeros(4800, np.int16).tobytes())
    return path


NO_CACHE = ("--compilation-cache", "")  # leaves this process's JAX settings alone


def test_embed_audio_folder_without_audio(capsys, ckpt, tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("no audio here")
    refused(capsys, "embed-audio", ckpt, folder, "--out", tmp_path / "e.npy", *NO_CACHE,
            why=f"{folder}: no audio files (.wav, .flac")
    assert not (tmp_path / "e.npy").exists() and not (tmp_path / "e.paths.json").exists()


def test_embed_audio_missing_input(capsys, ckpt, clip, tmp_path):
    refused(capsys, "embed-audio", ckpt, clip, tmp_path / "gone.wav", "--out", tmp_path / "e.npy", *NO_CACHE,
            why=f"{tmp_path / 'gone.wav'}: no such file or folder")
    assert not (tmp_path / "e.npy").exists()


def test_missing_checkpoint(capsys, tok_dir, tmp_path):
    refused(capsys, "embed-text", tmp_path / "nowhere", "--tokenizer", tok_dir, "rain", "--out", tmp_path / "t.npy",
            *NO_CACHE, why=f"{str(tmp_path / 'nowhere')!r}: no such file or directory, not a laion-clap release name")
    assert not (tmp_path / "t.npy").exists()


def test_hf_model_directory_given_as_a_model_is_converted_into_the_cache(capsys, tok_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CLAPJAX_CACHE", str(tmp_path / "cache"))
    hf_model(False).save_pretrained(tmp_path / "hf")
    status, out, err = run_main(capsys, "embed-text", tmp_path / "hf", "--tokenizer", tok_dir, "rain",
                                "--out", tmp_path / "t.npy", *NO_CACHE)
    assert status == 0, err
    assert np.load(tmp_path / "t.npy").shape[0] == 1 and len(os.listdir(tmp_path / "cache" / "converted")) == 1


@pytest.mark.parametrize("command", ["embed-text", "zero-shot", "retrieve"])
def test_text_commands_need_a_tokenizer(capsys, ckpt, clip, tmp_path, command):
    np.save(tmp_path / "a.npy", np.eye(2, 64, dtype=np.float32))
    (tmp_path / "a.paths.json").write_text(json.dumps(["x.wav", "y.wav"]))
    rest = {"embed-text": ["rain", "--out", tmp_path / "t.npy"], "zero-shot": [clip, "--labels", "dog,rain"],
            "retrieve": [tmp_path / "a.npy", "rain"]}[command]
    refused(capsys, command, ckpt, *rest, *NO_CACHE,
            why=f"{ckpt} has no tokenizer of its own (a model trained or converted by clapjax from a local file "
                "records none): this command needs one, pass --tokenizer DIR")
    assert not (tmp_path / "t.npy").exists()


def test_tokenizer_directory_that_does_not_exist(capsys, ckpt, tmp_path):
    refused(capsys, "embed-text", ckpt, "--tokenizer", tmp_path / "no-tok", "rain", "--out", tmp_path / "t.npy",
            *NO_CACHE, why=f"tokenizer directory '{tmp_path / 'no-tok'}' does not exist")
    assert not (tmp_path / "t.npy").exists()


@pytest.mark.parametrize("template,why", [
    ("a sound of dogs", "--template must contain '{}' where the label goes, got 'a sound of dogs'"),
    ("{} and {}", "--template must hold one '{}' for the label and no other braces"),
    ("{} in {place}", "--template must hold one '{}' for the label and no other braces"),
])
def test_zero_shot_template(capsys, ckpt, tok_dir, clip, template, why):
    refused(capsys, "zero-shot", ckpt, "--tokenizer", tok_dir, clip, "--labels", "dog,rain", "--template", template,
            *NO_CACHE, why=why)


def test_retrieve_index_missing_or_mismatched(capsys, ckpt, tok_dir, tmp_path):
    emb = tmp_path / "audio.npy"
    args = (ckpt, "--tokenizer", tok_dir, emb, "a dog barks", *NO_CACHE)
    refused(capsys, "retrieve", *args, why=f"{emb}: no such file (write it with `clapjax embed-audio`)")
    np.save(emb, np.eye(3, 64, dtype=np.float32))
    refused(capsys, "retrieve", *args,
            why=f"{tmp_path / 'audio.paths.json'}: the path index written by `clapjax embed-audio` is missing")
    (tmp_path / "audio.paths.json").write_text(json.dumps(["a.wav", "b.wav"]))
    refused(capsys, "retrieve", *args, why=f"{tmp_path / 'audio.paths.json'} lists 2 paths for 3 embeddings")


@pytest.mark.parametrize("argv,why", [
    (["embed-text", "CKPT", "rain", "--out", "OUT", "--bogus"], "unrecognized arguments: --bogus"),
    (["convert", "CKPT", "OUT", "surplus"], "unrecognized arguments: surplus"),
    (["export", "CKPT", "--to", "onnx", "OUT"], "argument --to: invalid choice: 'onnx'"),
    (["frobnicate", "CKPT"], "invalid choice: 'frobnicate'"),
    (["embed-audio", "CKPT", "x.wav"], "the following arguments are required: --out"),
])
def test_unknown_or_missing_arguments(capsys, ckpt, tmp_path, argv, why):
    out = tmp_path / "out"
    argv = [{"CKPT": ckpt, "OUT": out}.get(a, a) for a in argv]
    err = refused(capsys, *argv, why=why)
    assert err.startswith("usage: clapjax") and not out.exists()
