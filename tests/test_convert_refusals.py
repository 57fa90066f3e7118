"""Every way `clapjax convert` / `export` refuse a source, and `--verify` failing: each refusal exits 2 (or
raises) with a message naming the problem and writes nothing; a tampered conversion fails verify with 3.

Each source is built once per module by the real PyTorch code (laion_clap's CLAP and PANN, transformers'
ClapModel, small where the layout allows) and every broken variant is derived from it, so the one thing
wrong is the thing tested; an untouched copy is accepted by the same call (the control).
"""
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch

import reference as ref
from clapjax import saved_model
from clapjax.convert import hf
from clapjax.convert import keymap as K
from clapjax.convert import pipeline, verify
from test_cli_errors import refused, run_main
from test_convert_hf_and_cli import hf_model
from test_convert_laion import run_cli


def nothing_written(out) -> bool:
    """No output and no half-written temporary sibling (saved_model.save writes beside it, then renames)."""
    return not os.path.exists(out) and not [p for p in os.listdir(os.path.dirname(out)) if p.startswith(".clapjax")]


# --- the laion layout -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def laion_model():
    # one text layer: every refusal below happens in reading or detection, before the key table that
    # fixes roberta-base's 12 layers (the untouched state dict is detected, as the control shows)
    return ref.laion_clap_model("HTSAT-tiny", "roberta", seed=1, text_layers=1)


@pytest.fixture(scope="module")
def laion_sd(laion_model):
    return ref.torch_state_dict(laion_model)


@pytest.fixture(scope="module")
def pann_sd(laion_sd):
    """laion_clap's own PANN-6 audio branch beside the HTSAT model's text branch."""
    from laion_clap.clap_module.model import CLAPAudioCfp
    from laion_clap.clap_module.pann_model import create_pann_model
    torch.manual_seed(2)
    audio = create_pann_model(CLAPAudioCfp(**ref.laion_model_cfg("PANN-6")["audio_cfg"]))
    sd = {k: v for k, v in laion_sd.items() if not k.startswith("audio_branch.")}
    sd.update({f"audio_branch.{k}": v for k, v in ref.torch_state_dict(audio).items()})
    return sd


def test_laion_file_refusals(capsys, laion_model, tmp_path):
    ok = ref.save_laion_file(laion_model, tmp_path / "ok.pt")
    assert pipeline.detect_config(pipeline.read_source(str(ok))).amodel == "HTSAT-tiny"  # the control
    not_a_dict = "expected a state dict or a dict holding 'state_dict', got list"
    files = {
        "mixed.pt": (lambda p: ref.save_laion_file(laion_model, p, drop=["logit_scale_a"],
                                                   extra={"logit_scale_a": torch.ones(())}),
                     "some keys have DDP's 'module.' prefix and some do not"),
        "number.pt": (lambda p: ref.save_laion_file(laion_model, p, drop=["logit_scale_t"],
                                                    extra={"module.logit_scale_t": 2.5}),
                      "not a state dict of tensors (entries ['module.logit_scale_t'] are not tensors)"),
        "list.pt": (lambda p: torch.save([torch.ones(3)], p), not_a_dict),
        "nested-list.pt": (lambda p: torch.save({"epoch": 3, "state_dict": [torch.ones(3)]}, p), not_a_dict),
    }
    for name, (write, why) in files.items():
        write(tmp_path / name)
        out = tmp_path / f"out-{name}"
        refused(capsys, "convert", tmp_path / name, out, why=f"{tmp_path / name}: {why}")
        assert nothing_written(out), name


def _drop(prefix):
    return lambda sd: {k: v for k, v in sd.items() if not k.startswith(prefix)}


def _replace(key, value):
    return lambda sd: {**sd, key: value(sd[key])}


LAION_DETECTION = {
    "htsat width": (_replace("audio_branch.patch_embed.proj.weight", lambda w: np.zeros((64, *w.shape[1:]), w.dtype)),
                    "audio_branch.patch_embed.proj.weight has width 64, none of HTSAT tiny/base/large"),
    "htsat depths": (_drop("audio_branch.layers.2.blocks.5."),
                     "HTSAT-tiny has block depths (2, 2, 6, 2), the weights have (2, 2, 5, 2)"),
    "front end": (_replace("audio_branch.logmel_extractor.melW", lambda m: m * 1.01),
                  "audio_branch.logmel_extractor.melW match the front end of none of"),
    "no audio": (_drop("audio_branch."), "no audio branch found"),
    "no text": (_drop("text_branch."), "no text branch found"),
}


@pytest.mark.parametrize("case", LAION_DETECTION)
def test_laion_detection_refusals(laion_sd, case, tmp_path):
    change, why = LAION_DETECTION[case]
    assert pipeline.detect_config(pipeline.Source("laion", laion_sd)).amodel == "HTSAT-tiny"  # the control
    with pytest.raises(ValueError, match=re.escape(why)):
        pipeline.convert_source(pipeline.Source("laion", change(laion_sd)), str(tmp_path / "out"),
                                log=lambda s: None)
    assert nothing_written(tmp_path / "out")


def test_laion_pann_block_count(pann_sd, tmp_path):
    assert pipeline.detect_config(pipeline.Source("laion", pann_sd)).amodel == "PANN-6"  # the control
    with pytest.raises(ValueError, match=re.escape("a PANN audio branch with 3 conv blocks "
                                                   "(audio_branch.conv_block<n>.*) is none of Cnn6/10/14")):
        pipeline.convert_source(pipeline.Source("laion", _drop("audio_branch.conv_block4.")(pann_sd)),
                                str(tmp_path / "out"), log=lambda s: None)
    assert nothing_written(tmp_path / "out")


# --- the HF layout --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_src(tmp_path_factory):
    src = tmp_path_factory.mktemp("hf") / "src"
    hf_model(False).save_pretrained(src)
    return src


@pytest.fixture(scope="module")
def hf_sd(hf_src):
    return hf.load_safetensors(str(hf_src / "model.safetensors"))


@pytest.fixture(scope="module")
def converted(hf_src):
    out = hf_src.parent / "converted"
    assert pipeline.convert(str(hf_src), str(out), log=lambda s: None).ok
    return out


def copy_of(hf_src, tmp_path, *, weights=True):
    d = tmp_path / "variant"
    d.mkdir()
    shutil.copy(hf_src / "config.json", d)
    if weights:
        shutil.copy(hf_src / "model.safetensors", d)
    return d


def save_shards(sd, d, ext, save, n=3):
    """transformers' sharded layout: n files and the index naming the shard of every tensor."""
    keys = sorted(sd)
    weight_map = {k: f"part-{i % n}.{ext}" for i, k in enumerate(keys)}
    for name in set(weight_map.values()):
        save({k: sd[k] for k in keys if weight_map[k] == name}, d / name)
    index = d / ("model.safetensors.index.json" if ext == "safetensors" else "pytorch_model.bin.index.json")
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index, weight_map


def save_safetensors(part, path):
    from safetensors.numpy import save_file
    save_file(part, str(path))


def save_bin(part, path):
    torch.save({k: torch.from_numpy(v) for k, v in part.items()}, path)


@pytest.mark.parametrize("layout", ["pytorch_model.bin", "sharded safetensors", "sharded bin"])
def test_hf_weight_layouts_read_the_same_tensors(capsys, hf_src, hf_sd, layout, tmp_path):
    d = copy_of(hf_src, tmp_path, weights=False)
    if layout == "pytorch_model.bin":
        save_bin(hf_sd, d / "pytorch_model.bin")
    else:
        save_shards(hf_sd, d, "safetensors" if "safetensors" in layout else "bin",
                    save_safetensors if "safetensors" in layout else save_bin)
    sd = pipeline.read_source(str(d)).state_dict
    assert set(sd) == set(hf_sd) and all(sd[k].dtype == hf_sd[k].dtype and np.array_equal(sd[k], hf_sd[k])
                                         for k in sd)
    status, out, err = run_main(capsys, "convert", d, tmp_path / "out")
    assert status == 0 and "detected: hf layout" in out, err


def _set_model_type(d):
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))


def _truncate(path, size=1000):
    with open(path, "r+b") as f:
        f.truncate(size)


HF_DIRECTORY = {
    "no config.json": (lambda d: os.remove(d / "config.json"),
                       "{d}: not a Hugging Face model directory (no config.json)"),
    "config not json": (lambda d: (d / "config.json").write_text("{ not json"), "{d}/config.json: not valid JSON"),
    "model_type": (_set_model_type, "{d}/config.json: model_type 'bert', expected 'clap' (a ClapModel)"),
    "no weights": (lambda d: os.remove(d / "model.safetensors"),
                   "{d}: no weights (none of model.safetensors, model.safetensors.index.json, pytorch_model.bin"),
    "corrupt safetensors": (lambda d: _truncate(d / "model.safetensors"),
                            "{d}/model.safetensors: not a readable safetensors file"),
}


def test_hf_untouched_copy_converts(capsys, hf_src, tmp_path):  # the control of the refusals below
    status, _, err = run_main(capsys, "convert", copy_of(hf_src, tmp_path), tmp_path / "out")
    assert status == 0, err


@pytest.mark.parametrize("case", HF_DIRECTORY)
def test_hf_directory_refusals(capsys, hf_src, case, tmp_path):
    d = copy_of(hf_src, tmp_path)
    damage, why = HF_DIRECTORY[case]
    damage(d)
    refused(capsys, "convert", d, tmp_path / "out", why=why.format(d=d))
    assert nothing_written(tmp_path / "out")


def _bin_with_a_number(sd, d):
    torch.save({**{k: torch.from_numpy(v) for k, v in sd.items()}, "note": 3}, d / "pytorch_model.bin")
    return "{d}/pytorch_model.bin: not a state dict of tensors (entries ['note'] are not tensors)"


def _bin_of_a_list(sd, d):
    torch.save([torch.from_numpy(v) for v in sd.values()], d / "pytorch_model.bin")
    return "{d}/pytorch_model.bin: expected a state dict, got list"


def _missing_shard(sd, d):
    save_shards(sd, d, "safetensors", save_safetensors)
    os.remove(d / "part-1.safetensors")
    return "{d}/model.safetensors.index.json places tensors in part-1.safetensors, which is missing"


def _no_weight_map(sd, d):
    save_shards(sd, d, "safetensors", save_safetensors)
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    return "{d}/model.safetensors.index.json: not a sharded-checkpoint index (no 'weight_map'"


def _unlisted_tensor(sd, d):
    index, weight_map = save_shards(sd, d, "safetensors", save_safetensors)
    key = sorted(weight_map)[0]
    index.write_text(json.dumps({"weight_map": {k: v for k, v in weight_map.items() if k != key}}))
    return f"{{d}}/{weight_map[key]} holds ['{key}'], which {{d}}/model.safetensors.index.json does not place there"


def _unheld_tensor(sd, d):
    index, weight_map = save_shards(sd, d, "safetensors", save_safetensors)
    index.write_text(json.dumps({"weight_map": {**weight_map, "text_model.extra": "part-0.safetensors"}}))
    return "{d}/model.safetensors.index.json lists tensors that no shard holds: ['text_model.extra']"


WEIGHT_FILE_DAMAGE = [_bin_with_a_number, _bin_of_a_list, _missing_shard, _no_weight_map, _unlisted_tensor,
                      _unheld_tensor]


@pytest.mark.parametrize("damage", WEIGHT_FILE_DAMAGE, ids=lambda f: f.__name__.strip("_"))
def test_hf_weight_file_refusals(capsys, hf_src, hf_sd, damage, tmp_path):
    d = copy_of(hf_src, tmp_path, weights=False)
    why = damage(hf_sd, d).format(d=d)
    refused(capsys, "convert", d, tmp_path / "out", why=why)
    assert nothing_written(tmp_path / "out")


def test_single_safetensors_file_refusals(capsys, hf_sd, tmp_path):
    whole, part = tmp_path / "whole.safetensors", tmp_path / "part.safetensors"
    save_safetensors(hf_sd, whole)
    status, _, err = run_main(capsys, "convert", whole, tmp_path / "control")  # the control: config from weights
    assert status == 0, err
    key = "text_model.encoder.layer.0.intermediate.dense.weight"
    save_safetensors({k: v for k, v in hf_sd.items() if k != key}, part)
    refused(capsys, "convert", part, tmp_path / "out", why=f"{part}: an HF-layout state dict without {key}")
    _truncate(whole)
    refused(capsys, "convert", whole, tmp_path / "out", why=f"{whole}: not a readable safetensors file")
    assert nothing_written(tmp_path / "out")


def test_corrupt_safetensors_as_a_command(hf_src, tmp_path):
    """The real process: exit status 2 and one line of error, no traceback."""
    d = copy_of(hf_src, tmp_path)
    _truncate(d / "model.safetensors")
    proc = run_cli("convert", d, tmp_path / "out", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"error: {d}/model.safetensors: not a readable safetensors file" in proc.stderr
    assert nothing_written(tmp_path / "out")


# --- overwriting and export -----------------------------------------------------------------------

def test_convert_refuses_a_non_empty_output(capsys, hf_src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    refused(capsys, "convert", hf_src, out, why=f"{out} exists and is not empty; choose a new output directory")
    assert os.listdir(out) == ["mine.txt"] and (out / "mine.txt").read_text() == "keep me"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".clapjax")]


def test_export_refusals(capsys, converted, tmp_path):
    refused(capsys, "export", converted, "--to", "laion", tmp_path / "x.pt",
            why=f"{converted} was converted from the 'hf' layout; exporting it as laion is not supported")
    assert not (tmp_path / "x.pt").exists()
    with pytest.raises(ValueError, match="--to must be 'laion' or 'hf', got 'onnx'"):
        pipeline.export(str(converted), "onnx", str(tmp_path / "y"))
    refused(capsys, "export", tmp_path / "nowhere", "--to", "hf", tmp_path / "z",
            why=f"{tmp_path / 'nowhere'}: not a clapjax checkpoint (no config.json)")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep me")
    (tmp_path / "file").write_text("keep me")
    for dest in (tmp_path / "taken", tmp_path / "file"):
        refused(capsys, "export", converted, "--to", "hf", dest,
                why=f"{dest} exists and is not an empty directory; choose a new directory")
    assert os.listdir(tmp_path / "taken") == ["mine.txt"] and (tmp_path / "file").read_text() == "keep me"
    assert not {"y", "z"} & set(os.listdir(tmp_path))


# --- --verify -------------------------------------------------------------------------------------

def test_verify_fails_on_weights_tampered_after_the_key_check(capsys, hf_src, tmp_path, monkeypatch):
    """The key check passes, then one text-projection weight is changed before the checkpoint is saved:
    the reference built from the source disagrees in the text embedding only, and the command exits 3."""
    real_fill = K.fill

    def fill_then_tamper(model, state_dict, entries):
        real_fill(model, state_dict, entries)
        bias = saved_model.model_variables(model)["text_projection.2.bias"]
        value = np.array(bias.get_value())
        value[0] += 0.1
        bias.set_value(value)
    monkeypatch.setattr(K, "fill", fill_then_tamper)
    status, out, err = run_main(capsys, "convert", hf_src, tmp_path / "out", "--verify")
    assert status == 3, (out, err)
    line = next(s for s in out.splitlines() if s.startswith("verify:"))
    assert line.endswith("→ FAILED"), line
    audio, text = (float(re.search(rf"{what} max-abs (\S+)", line).group(1)) for what in ("audio", "text"))
    assert audio <= verify.MAX_ABS < 1e-2 < text, line  # the tampered tower, and only it, is out of tolerance
