"""HF ClapModel → convert → equal to transformers; and every CLI command as a subprocess."""
import json

import numpy as np
import pytest
import torch

from clapjax.app.api import CLAP
from reference import compare, randomize_batch_norms
from clapjax.convert import pipeline
from clapjax.tokenizer import train_byte_level_bpe
from test_convert_laion import CAPTIONS, MAX_ABS, MIN_COS, audio_files, run_cli  # noqa: F401

SMALL_TEXT = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                  layer_norm_eps=1e-5)
SMALL_AUDIO = dict(depths=[1, 1, 2, 1], patch_embeds_hidden_size=32, hidden_size=256, num_attention_heads=[2, 2, 4, 4])


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return train_byte_level_bpe(CAPTIONS, tmp_path_factory.mktemp("bpe"), vocab_size=300)


def hf_model(fusion: bool, seed: int = 0):
    from transformers import ClapConfig, ClapModel
    torch.manual_seed(seed)
    cfg = ClapConfig(text_config=SMALL_TEXT, audio_config=dict(SMALL_AUDIO, enable_fusion=fusion), projection_dim=64)
    model = ClapModel(cfg).eval()
    # non-trivial BatchNorm statistics, so their conversion is really tested
    randomize_batch_norms(model, torch.Generator().manual_seed(seed))
    return model


@pytest.fixture(scope="module")
def hf_unfused(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    model = hf_model(False)
    model.save_pretrained(d / "src")
    out = d / "converted"
    proc = run_cli("convert", d / "src", out, "--verify")
    assert "detected: hf layout" in proc.stdout and "→ OK" in proc.stdout
    return model, d / "src", out


def processor(tok_dir):
    """As the Hub checkpoints' preprocessor_config.json sets it: fmin 50 (the class default, 0, matches
    no released checkpoint)."""
    from transformers import ClapFeatureExtractor, ClapProcessor, RobertaTokenizer
    return ClapProcessor(ClapFeatureExtractor(frequency_min=50, frequency_max=14000), RobertaTokenizer(vocab=f"{tok_dir}/vocab.json",
                                                                  merges=f"{tok_dir}/merges.txt"))


def test_hf_unfused_equals_transformers(hf_unfused, tok_dir):
    model, _, out = hf_unfused
    clap = CLAP.from_pretrained(str(out), tokenizer=tok_dir, compilation_cache=None)
    rng = np.random.default_rng(0)
    waves = [rng.uniform(-0.6, 0.6, n).astype(np.float32) for n in (480000, 130000, 300000)]
    inputs = processor(tok_dir)(audio=waves, sampling_rate=48000, truncation="rand_trunc", padding="repeatpad",
                                return_tensors="pt")
    with torch.no_grad():
        theirs = model.get_audio_features(input_features=inputs["input_features"]).pooler_output.numpy()
    # HF's extractor does not quantize to int16; neither do we here
    max_abs, cos = compare(clap.get_audio_embedding_from_data(waves, quantize=False), theirs)
    print(f"HF unfused audio: max-abs {max_abs:.3g}, min cos {cos:.8f}")
    assert max_abs <= MAX_ABS and cos >= MIN_COS
    texts = ["a dog barks", "birds sing in the morning"]
    t_in = processor(tok_dir)(text=texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        theirs_t = model.get_text_features(input_ids=t_in["input_ids"],
                                           attention_mask=t_in["attention_mask"]).pooler_output.numpy()
    max_abs, cos = compare(clap.get_text_embedding(texts), theirs_t)
    assert max_abs <= MAX_ABS and cos >= MIN_COS


def test_hf_fused_equals_transformers(tok_dir, tmp_path):
    model = hf_model(True, seed=1)
    model.save_pretrained(tmp_path / "src")
    report = pipeline.convert(str(tmp_path / "src"), str(tmp_path / "out"), log=lambda s: None)
    assert report.ok
    clap = CLAP.from_pretrained(str(tmp_path / "out"), compilation_cache=None)
    rng = np.random.default_rng(1)
    waves = [rng.uniform(-0.6, 0.6, n).astype(np.float32) for n in (700000, 200000, 480000)]
    np.random.seed(0)
    inputs = processor(tok_dir)(audio=waves, sampling_rate=48000, return_tensors="pt")  # fusion by default
    longer = inputs["is_longer"].numpy().reshape(-1)
    assert longer.any() and not longer.all()
    with torch.no_grad():
        theirs = model.get_audio_features(input_features=inputs["input_features"],
                                          is_longer=inputs["is_longer"]).pooler_output.numpy()
    ours = clap._run(clap._audio_fn, {"mel_fusion": inputs["input_features"].numpy(), "longer": longer})
    max_abs, cos = compare(ours, theirs)
    print(f"HF fused audio: max-abs {max_abs:.3g}, min cos {cos:.8f}")
    assert max_abs <= MAX_ABS and cos >= MIN_COS


def test_hf_export_round_trip_is_bit_exact(hf_unfused, tmp_path):
    from safetensors.numpy import load_file
    _, src, out = hf_unfused
    run_cli("export", out, "--to", "hf", tmp_path / "back")
    a, b = load_file(str(src / "model.safetensors")), load_file(str(tmp_path / "back" / "model.safetensors"))
    assert set(a) == set(b)
    assert all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)
    from transformers import ClapModel
    ClapModel.from_pretrained(str(tmp_path / "back"))  # transformers reads it back


def test_embed_zero_shot_and_retrieve_commands(hf_unfused, tok_dir, audio_files, tmp_path):
    _, _, ckpt = hf_unfused
    folder = str(audio_files[0]).rsplit("/", 1)[0]
    cache = ["--compilation-cache", tmp_path / "cache"]
    proc = run_cli("embed-audio", ckpt, folder, "--out", tmp_path / "audio.npy", *cache)
    emb = np.load(tmp_path / "audio.npy")
    paths = json.loads((tmp_path / "audio.paths.json").read_text())
    assert emb.shape == (len(audio_files), 64) and sorted(paths) == sorted(audio_files)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    # the same clips through the Python API give the same rows (the CLI adds nothing of its own)
    clap = CLAP.from_pretrained(str(ckpt), tokenizer=tok_dir, compilation_cache=None)
    np.testing.assert_allclose(emb, clap.get_audio_embedding_from_filelist(paths), atol=1e-6)

    run_cli("embed-text", ckpt, "--tokenizer", tok_dir, "a dog barks", "rain", "--out", tmp_path / "t.npy", *cache)
    np.testing.assert_allclose(np.load(tmp_path / "t.npy"), clap.get_text_embedding(["a dog barks", "rain"]),
                               atol=1e-6)

    proc = run_cli("zero-shot", ckpt, "--tokenizer", tok_dir, *audio_files[:2], "--labels", "dog,rain,bell",
                   "--top-k", "2", *cache)
    lines = proc.stdout.splitlines()
    assert lines[0] == audio_files[0] and lines[1].lstrip().startswith("1. ") and len(lines) == 6

    proc = run_cli("retrieve", ckpt, "--tokenizer", tok_dir, tmp_path / "audio.npy", "a dog barks", "--top-k", "3",
                   *cache)
    ranked = [line.split()[-1] for line in proc.stdout.splitlines()]
    assert len(ranked) == 3 and set(ranked) <= set(paths)
    assert any((tmp_path / "cache").iterdir()), "the persistent compilation cache stayed empty"


@pytest.mark.parametrize("command", ["convert", "download", "export", "embed-audio", "embed-text", "zero-shot",
                                     "retrieve", "train", "eval", "merge-embeddings", "prepare"])
def test_every_command_has_help(command):
    proc = run_cli(command, "--help")
    assert "usage: clapjax " + command in proc.stdout


def test_zero_shot_without_labels_is_a_clear_error(hf_unfused, tok_dir, audio_files):
    proc = run_cli("zero-shot", hf_unfused[2], "--tokenizer", tok_dir, audio_files[0], check=False)
    assert proc.returncode == 2 and "--labels" in proc.stderr


def test_restore_onto_a_sharding(hf_unfused):
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from clapjax import saved_model
    _, _, out = hf_unfused
    mesh = Mesh(np.array(jax.devices()).reshape(8), ("fsdp",))

    def fsdp(path, shape):  # shard the first dimension that 8 divides, else replicate
        dims = [i for i, n in enumerate(shape) if n % 8 == 0]
        spec = [None] * len(shape)
        if dims:
            spec[dims[0]] = "fsdp"
        return NamedSharding(mesh, P(*spec))
    one = saved_model.model_variables(saved_model.restore(str(out)))
    sharded = saved_model.model_variables(saved_model.restore(str(out), sharding=fsdp))
    kernel = sharded["text_branch.encoder.layer.0.intermediate.dense.kernel"].get_value()
    assert kernel.sharding.spec == P("fsdp", None) and len(kernel.addressable_shards) == 8
    assert kernel.addressable_shards[0].data.shape == (kernel.shape[0] // 8, kernel.shape[1])
    for key, var in one.items():
        np.testing.assert_array_equal(np.asarray(var.get_value()), np.asarray(sharded[key].get_value()))
