"""laion-clap checkpoints → `clapjax convert` → embeddings equal to laion_clap's, and back."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import reference as ref
from helpers import require_tools
from clapjax.app.api import CLAP
from clapjax.convert import keymap as K
from clapjax.convert import pipeline
from clapjax.tokenizer import Tokenizer, train_byte_level_bpe

MAX_ABS, MIN_COS = ref.END_TO_END_MAX_ABS, ref.END_TO_END_MIN_COS
CAPTIONS = ["a dog barks", "rain falls on a tin roof while thunder rolls far away", "a bell rings twice",
            "birds sing"] * 30


def run_cli(*args, check=True):
    env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "clapjax.app.cli", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"clapjax {args[0]} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return train_byte_level_bpe(CAPTIONS, tmp_path_factory.mktemp("bpe"), vocab_size=300)


@pytest.fixture(scope="module")
def audio_files(tmp_path_factory):
    """Real files of mixed rates, channel counts and lengths, made with sox and espeak-ng."""
    require_tools("sox", "espeak-ng")
    d = tmp_path_factory.mktemp("audio")
    cmds = {
        "speech_22k.wav": ["espeak-ng", "-w", d / "speech_22k.wav", "a dog barks loudly in the distance"],
        "pink_stereo_44k.flac": ["sox", "-n", "-r", "44100", "-c", "2", d / "pink_stereo_44k.flac", "synth", "3",
                                 "pinknoise", "vol", "0.5"],
        "brown_long_16k.ogg": ["sox", "-n", "-r", "16000", "-c", "1", d / "brown_long_16k.ogg", "synth", "12.5",
                               "brownnoise", "vol", "0.4"],
        "white_48k.wav": ["sox", "-n", "-r", "48000", "-c", "1", d / "white_48k.wav", "synth", "10", "whitenoise",
                          "vol", "0.3"],
    }
    for cmd in cmds.values():
        subprocess.run([str(c) for c in cmd], check=True, capture_output=True)
    return [str(d / name) for name in cmds]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = ref.laion_clap_model("HTSAT-tiny", "roberta", seed=1)
    path = ref.save_laion_file(model, tmp_path_factory.mktemp("ckpt") / "tiny.pt")
    return model, path


def laion_hook(path, tok_dir, fusion=False, amodel="HTSAT-tiny"):
    """laion_clap's own CLAP_Module with our file loaded by its own (strict) loader."""
    from transformers import RobertaTokenizer
    lc = ref.laion_clap()
    with ref.offline_roberta():
        hook = lc.CLAP_Module(enable_fusion=fusion, amodel=amodel, tmodel="roberta", device="cpu")
    hook.load_ckpt(ckpt=str(path), verbose=False)
    hook.tokenize = RobertaTokenizer(vocab=f"{tok_dir}/vocab.json", merges=f"{tok_dir}/merges.txt")
    return hook


def test_tiny_end_to_end_through_the_cli(tiny, tok_dir, audio_files, tmp_path):
    _, path = tiny
    out = tmp_path / "converted"
    proc = run_cli("convert", path, out)
    assert "detected: laion layout; audio HTSAT-tiny" in proc.stdout
    report = json.loads((out / "key_report.json").read_text())
    assert report["ok"] and len(report["consumed"]) + len(report["ignored"]) == 418
    assert set(report["by_branch"]) >= {"audio_branch", "text_branch", "logit_scale_a"}

    hook = laion_hook(path, tok_dir)
    clap = CLAP.from_pretrained(str(out), tokenizer=tok_dir, compilation_cache=None)
    np.random.seed(5)  # LAION crops long clips with the global RNG; replay its draws
    theirs = hook.get_audio_embedding_from_filelist(audio_files)
    ours = clap.get_audio_embedding_from_filelist(audio_files, rng=np.random.RandomState(5))
    max_abs, cos = ref.compare(ours, theirs)
    print(f"HTSAT-tiny audio from files: max-abs {max_abs:.3g}, min cos {cos:.8f}")
    assert max_abs <= MAX_ABS and cos >= MIN_COS
    texts = ["a dog barks", "rain falls on a tin roof while thunder rolls far away", "birds"]
    max_abs, cos = ref.compare(clap.get_text_embedding(texts), hook.get_text_embedding(texts))
    print(f"HTSAT-tiny text: max-abs {max_abs:.3g}, min cos {cos:.8f}")
    assert max_abs <= MAX_ABS and cos >= MIN_COS
    one = clap.get_text_embedding(["a dog barks"])  # a batch of one stays a batch
    assert one.shape == (1, 512)

    # export back: every tensor bit for bit, and laion_clap's strict loader takes the file
    dest = tmp_path / "exported.pt"
    run_cli("export", out, "--to", "laion", dest)
    a = torch.load(path, weights_only=False)["state_dict"]
    b = torch.load(dest, weights_only=False)["state_dict"]
    assert set(a) == set(b)
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    laion_hook(dest, tok_dir)


@pytest.mark.parametrize("amodel,fusion", [("HTSAT-base", False), ("HTSAT-tiny", True)])
def test_base_and_fused_end_to_end(amodel, fusion, tok_dir, audio_files, tmp_path):
    model = ref.laion_clap_model(amodel, "roberta", fusion=fusion, seed=2)
    path = ref.save_laion_file(model, tmp_path / "m.pt")
    report = pipeline.convert(str(path), str(tmp_path / "out"), log=lambda s: None)
    assert report.ok
    clap = CLAP.from_pretrained(str(tmp_path / "out"), tokenizer=tok_dir, compilation_cache=None)
    assert clap.config.amodel == amodel and clap.config.enable_fusion == fusion
    if not fusion:
        hook = laion_hook(path, tok_dir, amodel=amodel)
        np.random.seed(9)
        theirs = hook.get_audio_embedding_from_filelist(audio_files)
        ours = clap.get_audio_embedding_from_filelist(audio_files, rng=np.random.RandomState(9))
    else:
        # laion_clap's fusion preprocessing needs torchaudio (not installable beside CPU torch here):
        # give its model the mel chunks our 'laion' mode makes (checked against LAION's rules in
        # test_audio_io), with a mix of longer and not-longer clips
        from clapjax.audio.io import load_audio
        waves = [load_audio(p) for p in audio_files]
        batch = clap.audio_batch(waves, rng=np.random.default_rng(3))
        assert batch["longer"].any() and not batch["longer"].all()
        ours = clap._run(clap._audio_fn, batch)
        with torch.no_grad():
            theirs = model.get_audio_embedding([
                {"waveform": torch.zeros(480000), "longer": torch.tensor([bool(lg)]),
                 "mel_fusion": torch.from_numpy(m)} for lg, m in zip(batch["longer"], batch["mel_fusion"])]).numpy()
    max_abs, cos = ref.compare(ours, theirs)
    print(f"{amodel} fusion={fusion} audio: max-abs {max_abs:.3g}, min cos {cos:.8f}")
    assert max_abs <= MAX_ABS and cos >= MIN_COS
    tok = Tokenizer(tok_dir)(["a bell rings twice", "birds sing"])
    with torch.no_grad():
        theirs_t = model.get_text_embedding({k: torch.from_numpy(v.astype(np.int64)) for k, v in tok.items()}).numpy()
    max_abs, cos = ref.compare(clap.get_text_embedding(tok), theirs_t)
    print(f"{amodel} fusion={fusion} text: max-abs {max_abs:.3g}, min cos {cos:.8f}")
    assert max_abs <= MAX_ABS and cos >= MIN_COS


# --- strictness ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_sd(tiny):
    model, path = tiny
    return pipeline.read_source(str(path)).state_dict


def _variants():
    model = ref.laion_clap_model("HTSAT-tiny", "roberta", seed=1)
    keys = sorted(model.state_dict()) + ["text_branch.embeddings.position_ids"]
    return [(k, how) for k in keys for how in ("drop", "rename", "reshape")]


@pytest.mark.parametrize("key,how", _variants())
def test_every_key_dropped_renamed_or_reshaped_fails_naming_it(tiny_sd, key, how, tmp_path):
    sd = dict(tiny_sd)
    value = sd.pop(key)
    renamed = key + "_renamed"
    if how == "rename":
        sd[renamed] = value
    elif how == "reshape":
        sd[key] = np.zeros(value.shape + (2,), value.dtype) if value.ndim else np.zeros((2,), value.dtype)
    if how == "drop" and key == "text_branch.embeddings.position_ids":
        # the one optional buffer: transformers >= 4.31 stopped saving it (LAION-CLAP's loading bug)
        pipeline.convert_source(pipeline.Source("laion", sd), str(tmp_path / "ok"), log=lambda s: None)
        return
    out = tmp_path / "out"
    with pytest.raises(ValueError) as err:
        pipeline.convert_source(pipeline.Source("laion", sd), str(out), log=lambda s: None)
    msg = str(err.value)
    named = re.search(rf"(?<![\w.]){re.escape(key)}(?![\w])", msg)  # the key itself, not a longer name
    if how == "rename" and key == "text_branch.embeddings.position_ids":
        named = renamed in msg  # an optional buffer: only its unexpected new name is wrong
    assert named, msg
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".clapjax")]


def test_cli_failure_names_the_key_and_writes_nothing(tiny, tmp_path):
    model, _ = tiny
    bad = ref.save_laion_file(model, tmp_path / "bad.pt", drop=["audio_branch.layers.2.blocks.3.mlp.fc1.bias"])
    proc = run_cli("convert", bad, tmp_path / "out", check=False)
    assert proc.returncode != 0
    assert "audio_branch.layers.2.blocks.3.mlp.fc1.bias" in proc.stderr and "nothing was written" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_overrides_must_agree_with_the_weights(tiny_sd, tmp_path):
    src = pipeline.Source("laion", dict(tiny_sd))
    with pytest.raises(ValueError, match="--amodel HTSAT-base but the weights are HTSAT-tiny"):
        pipeline.convert_source(src, str(tmp_path / "a"), amodel="HTSAT-base", log=lambda s: None)
    with pytest.raises(ValueError, match="--fusion True but the weights are unfused"):
        pipeline.convert_source(src, str(tmp_path / "b"), fusion=True, log=lambda s: None)
    with pytest.raises(ValueError, match="--tmodel bert"):
        pipeline.convert_source(src, str(tmp_path / "c"), tmodel="bert", log=lambda s: None)


# --- unsafe and broken files ----------------------------------------------------------------------

class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {"logit_scale_a": torch.ones(())}, "x": _Evil(marker)}, tmp_path / "evil.pt")
    proc = run_cli("convert", tmp_path / "evil.pt", tmp_path / "out", check=False)
    assert proc.returncode == 2 and "system" in proc.stderr and "Traceback" not in proc.stderr and "refusing" in proc.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_truncated_text_and_empty_files_give_clear_errors(tiny, tmp_path):
    _, path = tiny
    (tmp_path / "trunc.pt").write_bytes(open(path, "rb").read(200_000))
    (tmp_path / "notes.pt").write_text("this is not a checkpoint\n")
    torch.save({"state_dict": {}}, tmp_path / "empty.pt")
    for name, why in [("trunc.pt", "not a PyTorch checkpoint"), ("notes.pt", "not a PyTorch checkpoint"),
                      ("empty.pt", "state dict is empty")]:
        proc = run_cli("convert", tmp_path / name, tmp_path / f"out-{name}", check=False)
        assert proc.returncode == 2 and why in proc.stderr, (name, proc.stderr)
        assert not (tmp_path / f"out-{name}").exists()


def test_key_report_groups_by_branch(tiny_sd):
    table, shapes = pipeline._plan(pipeline.detect_config(pipeline.Source("laion", tiny_sd)), "laion")
    report, _ = K.match(tiny_sd, table, shapes)
    groups = report.by_branch()
    assert groups["audio_branch"]["ignored"] == 21 and groups["text_branch"]["ignored"] == 1
    assert sum(g["consumed"] for g in groups.values()) == 396
