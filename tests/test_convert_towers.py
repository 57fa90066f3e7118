"""Every LAION tower pair through `convert` → embeddings → `export`, beside HTSAT + RoBERTa
(test_convert_laion.py): PANN-14 + RoBERTa, HTSAT-tiny + BERT / BART / the CLIP transformer, and
PANN-6 / PANN-10 + RoBERTa.

Random weights from laion_clap's own classes (non-trivial BatchNorm statistics), saved as LAION's
training saved them. Conversion and export run in process through `pipeline.convert` /
`pipeline.export`, what the CLI calls (test_convert_laion.py runs the CLI itself): a subprocess would
import jax and torch again for every file. One fixture per pair, shared by its three tests.
"""
import dataclasses
import json
import pathlib
import shutil

import numpy as np
import pytest
import torch

import reference as ref
from clapjax.app.api import CLAP
from clapjax import saved_model
from clapjax.convert import pipeline

SR = 48000
PAIRS = [("PANN-14", "roberta"), ("HTSAT-tiny", "bert"), ("HTSAT-tiny", "bart"), ("HTSAT-tiny", "transformer"),
         ("PANN-6", "roberta"), ("PANN-10", "roberta")]
# LAION's Cnn6 / Cnn10 `forward` hand their whole input dict to the STFT and crash (see test_pann.py):
# their reference embedding is computed from the tower given the waveform tensor itself
TOWER_CALLED_DIRECTLY = ("PANN-6", "PANN-10")


def clips() -> list[np.ndarray]:
    """Two clips shorter than the 10 s LAION pads every clip to (the repeat-pad path), of different lengths."""
    rng = np.random.default_rng(0)
    out = []
    for seconds, freq in [(1.0, 440.0), (2.5, 1700.0)]:
        t = np.arange(int(SR * seconds)) / SR
        out.append((0.3 * np.sin(2 * np.pi * freq * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32))
    return out


def token_batch(tmodel: str) -> dict[str, np.ndarray]:
    """Three captions' ids as each tower's tokenizer lays them out, 5, 77 (the whole context) and 30
    tokens long: BERT's with token types (LAION's BERT branch passes them), CLIP's ending in EOT (its
    largest id, which CLIP pools) then zeros."""
    rng = np.random.default_rng(1)
    lengths = (5, 77, 30)
    if tmodel == "transformer":
        sot, eot = 49406, 49407
        ids = np.zeros((3, 77), np.int64)
        for i, k in enumerate(lengths):
            ids[i, :k] = rng.integers(1, sot, k)
            ids[i, 0], ids[i, k - 1] = sot, eot
        return {"input_ids": ids}
    vocab, pad, bos, eos = (30522, 0, 101, 102) if tmodel == "bert" else (50265, 1, 0, 2)
    ids = np.full((3, 77), pad, np.int64)
    mask = np.zeros_like(ids)
    for i, k in enumerate(lengths):
        ids[i, :k] = rng.integers(999, vocab, k)
        ids[i, 0], ids[i, k - 1] = bos, eos
        mask[i, :k] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if tmodel == "bert":
        batch["token_type_ids"] = rng.integers(0, 2, ids.shape) * mask
    return batch


@dataclasses.dataclass
class Converted:
    amodel: str
    tmodel: str
    model: torch.nn.Module  # the laion_clap CLAP the file was saved from
    source: pathlib.Path
    out: pathlib.Path
    log: list[str]


@pytest.fixture(scope="module", params=PAIRS, ids=lambda p: "+".join(p))
def converted(request, tmp_path_factory):
    amodel, tmodel = request.param
    model = ref.laion_clap_model(amodel, tmodel, seed=3)
    audio = model.audio_branch
    with torch.no_grad():  # bn0's statistics from the test audio, so the tower sees unit-scale inputs
        mel = audio.logmel_extractor(audio.spectrogram_extractor(torch.from_numpy(clips()[1])[None]))[:, 0].numpy()
    ref.randomize_batch_norms(audio, torch.Generator().manual_seed(4), mel)
    d = tmp_path_factory.mktemp(f"{amodel}-{tmodel}")
    source = ref.save_laion_file(model, d / "laion.pt")
    log = []
    pipeline.convert(str(source), str(d / "converted"), log=log.append)
    yield Converted(amodel, tmodel, model, source, d / "converted", log)
    shutil.rmtree(d)  # ~1-2 GB of files per pair: gone before the next pair's are written


def source_state_dict(path) -> dict[str, torch.Tensor]:
    saved = torch.load(path, weights_only=False, mmap=True)["state_dict"]
    return {k.removeprefix("module."): v for k, v in saved.items()}


def test_every_source_key_is_loaded_or_ignored_for_its_reason(converted):
    c = converted
    assert c.log[0].startswith(f"detected: laion layout; audio {c.amodel} (") and f"; text {c.tmodel} (" in c.log[0]
    report = json.loads((c.out / "key_report.json").read_text())
    assert report["ok"]
    keys = set(source_state_dict(c.source))
    consumed, ignored = set(report["consumed"]), set(report["ignored"])
    assert consumed | ignored == keys and not consumed & ignored
    # every variable of the converted model is filled, each from its own source tensor
    cfg, _ = saved_model.read_config(str(c.out))
    _, target_shapes = pipeline._plan(cfg, "laion")
    assert sorted(report["consumed"].values()) == sorted(target_shapes)
    # what is ignored is exactly what LAION's model does not train: its saved buffers but the BatchNorm
    # statistics, the frozen front end, transformers' position_ids; and BART's decoder and tied
    # embedding copies (CLAP pools the encoder)
    frozen = {n for n, p in c.model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    buffers = {n for n, _ in c.model.named_buffers() if n in keys and not n.endswith(("running_mean", "running_var"))}
    expected = frozen | buffers | {k for k in keys if k.endswith("embeddings.position_ids")}
    if c.tmodel == "bart":
        expected |= {k for k in keys if k.startswith(("text_branch.decoder.", "text_branch.encoder.embed_tokens."))}
    assert ignored == expected, sorted(ignored ^ expected)[:10]


def test_embeddings_equal_laion_clap(converted):
    c = converted
    clap = CLAP.from_pretrained(str(c.out), compilation_cache=None, batch_sizes=(2, 4))
    waves = clips()
    ours = clap.get_audio_embedding_from_data(waves)
    padded = torch.from_numpy(clap.audio_batch(waves)["waveform"])  # LAION's quantize + repeat-pad, as ours
    with torch.no_grad():
        if c.amodel in TOWER_CALLED_DIRECTLY:
            theirs = torch.nn.functional.normalize(
                c.model.audio_projection(c.model.audio_branch(padded)["embedding"]), dim=-1)
        else:
            theirs = c.model.get_audio_embedding([{"waveform": w, "longer": torch.tensor([False])} for w in padded])
    max_abs, cos = ref.compare(ours, theirs.numpy())
    print(f"{c.amodel}+{c.tmodel} audio: max-abs {max_abs:.3g}, min cos {cos:.8f}")
    assert max_abs <= ref.END_TO_END_MAX_ABS and cos >= ref.END_TO_END_MIN_COS

    tokens = token_batch(c.tmodel)
    with torch.no_grad():
        if c.tmodel == "transformer":  # laion_clap's get_text_embedding iterates a dict; CLIP ids are a tensor
            theirs = torch.nn.functional.normalize(
                c.model.encode_text(torch.from_numpy(tokens["input_ids"]), device="cpu"), dim=-1)
        else:
            theirs = c.model.get_text_embedding({k: torch.from_numpy(v) for k, v in tokens.items()})
    max_abs, cos = ref.compare(clap.get_text_embedding(tokens), theirs.numpy())
    print(f"{c.amodel}+{c.tmodel} text: max-abs {max_abs:.3g}, min cos {cos:.8f}")
    assert max_abs <= ref.END_TO_END_MAX_ABS and cos >= ref.END_TO_END_MIN_COS


def test_export_gives_back_the_source_bit_for_bit(converted):
    dest = converted.source.parent / "exported.pt"
    pipeline.export(str(converted.out), "laion", str(dest))
    a, b = source_state_dict(converted.source), source_state_dict(dest)
    assert sorted(a) == sorted(b)
    differ = [k for k in a if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]
    assert not differ, differ[:10]
