"""A Hugging Face Hub cache built on disk in huggingface_hub's own layout, holding small stand-ins of the
repos clapjax resolves names from (no network, no real weights):

    <root>/models--ORG--NAME/blobs/<etag>                      file contents (LFS files: their sha256;
                                                               git files: their git blob sha1)
    <root>/models--ORG--NAME/snapshots/<commit>/<file>         relative symlinks to ../../blobs/<etag>
    <root>/models--ORG--NAME/refs/main                         the commit `main` points at

Every file is written by the real code that writes it (transformers' save_pretrained, torch.save,
safetensors, tokenizers), under the real repos' file names.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np

LFS_SUFFIXES = (".safetensors", ".bin", ".pt")  # stored in git LFS on the Hub: the etag is the sha256
SEP = "--"


def repo_dir(root, repo_id: str) -> str:
    return os.path.join(str(root), "models" + SEP + SEP.join(repo_id.split("/")))


def _etag(filename: str, data: bytes) -> str:
    if filename.endswith(LFS_SUFFIXES):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def add_commit(root, repo_id: str, files: dict[str, str], *, ref: str | None = "main") -> str:
    """Put `files` ({repo file name: local source file}) in the cache as one commit of `repo_id`; `ref`
    (a branch) then points at it. Returns the commit hash."""
    base = repo_dir(root, repo_id)
    blobs = os.path.join(base, "blobs")
    os.makedirs(blobs, exist_ok=True)
    listing = hashlib.sha1(repo_id.encode())
    etags = {}
    for name in sorted(files):
        with open(files[name], "rb") as f:
            data = f.read()
        etags[name] = _etag(name, data)
        listing.update(f"{name}\0{etags[name]}\0".encode())
        blob = os.path.join(blobs, etags[name])
        if not os.path.exists(blob):
            with open(blob, "wb") as f:
                f.write(data)
    commit = listing.hexdigest()
    snapshot = os.path.join(base, "snapshots", commit)
    os.makedirs(snapshot, exist_ok=True)
    for name, etag in etags.items():
        link = os.path.join(snapshot, name)
        if not os.path.lexists(link):
            os.symlink(os.path.relpath(os.path.join(blobs, etag), snapshot), link)
    if ref is not None:
        os.makedirs(os.path.join(base, "refs"), exist_ok=True)
        with open(os.path.join(base, "refs", ref), "w") as f:
            f.write(commit)  # as huggingface_hub writes it: no newline
    return commit


def mark_missing(root, repo_id: str, commit: str, filename: str) -> None:
    """What huggingface_hub records after the Hub answered 'no such file' (`.no_exist/<commit>/<file>`)."""
    path = os.path.join(repo_dir(root, repo_id), ".no_exist", commit, filename)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "w").close()


# --- the repos' files ------------------------------------------------------------------------------------

# laion/clap-htsat-*'s config.json sets these (sizes shrunk); everything else is transformers' default
TINY_TEXT = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128,
                 vocab_size=300, max_position_embeddings=514, layer_norm_eps=1e-5, type_vocab_size=1,
                 pad_token_id=1, bos_token_id=0, eos_token_id=2, model_type="clap_text_model")
TINY_AUDIO = dict(depths=[1, 1, 1, 1], patch_embeds_hidden_size=16, hidden_size=128, num_attention_heads=[1, 2, 2, 4],
                  enable_fusion=False, model_type="clap_audio_model")


def write_clap_repo_files(directory, tokenizer_dir: str, *, seed: int, bin_seed: int | None = None,
                          max_shard_size: str | None = None) -> dict:
    """A tiny ClapModel as the laion/clap-* repos hold it: config.json (the fields they set), model.safetensors
    (or, with `max_shard_size`, transformers' shards and their index; and a pytorch_model.bin of `bin_seed`'s
    weights, when given), preprocessor_config.json and the tokenizer files ClapProcessor's RobertaTokenizer
    saves. Returns {repo file name: path} and the model."""
    import torch
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, RobertaTokenizer
    os.makedirs(directory, exist_ok=True)
    config = {"architectures": ["ClapModel"], "model_type": "clap", "projection_dim": 32,
              "projection_hidden_act": "relu", "logit_scale_init_value": 14.285714285714285,
              "initializer_factor": 1.0, "text_config": TINY_TEXT, "audio_config": TINY_AUDIO,
              "torch_dtype": "float32", "transformers_version": "4.27.0.dev0"}
    files = {"config.json": os.path.join(directory, "config.json")}
    with open(files["config.json"], "w") as f:
        json.dump(config, f, indent=2)

    def model(s):
        torch.manual_seed(s)
        return ClapModel(ClapConfig.from_json_file(files["config.json"])).eval()
    weights = os.path.join(directory, "weights")
    clap = model(seed)
    clap.save_pretrained(weights, **({} if max_shard_size is None else {"max_shard_size": max_shard_size}))
    files.update({n: os.path.join(weights, n) for n in os.listdir(weights) if "safetensors" in n})
    if bin_seed is not None:
        files["pytorch_model.bin"] = os.path.join(directory, "pytorch_model.bin")
        torch.save(model(bin_seed).state_dict(), files["pytorch_model.bin"])
    files["preprocessor_config.json"] = os.path.join(directory, "preprocessor_config.json")
    ClapFeatureExtractor(frequency_min=50, frequency_max=14000).to_json_file(files["preprocessor_config.json"])
    saved = os.path.join(directory, "tokenizer")
    RobertaTokenizer(vocab=f"{tokenizer_dir}/vocab.json", merges=f"{tokenizer_dir}/merges.txt").save_pretrained(saved)
    shutil.copy(f"{tokenizer_dir}/vocab.json", saved)
    shutil.copy(f"{tokenizer_dir}/merges.txt", saved)
    files.update({n: os.path.join(saved, n) for n in os.listdir(saved)})
    return files, clap


def write_laion_release(path, model) -> str:
    """A laion-clap training checkpoint as the released files are: `state_dict` with DDP's `module.` prefix
    and the `position_ids` buffer, the AdamW state (here for two parameters), NumPy scalars in the pickle."""
    import torch
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    sd["module.text_branch.embeddings.position_ids"] = torch.arange(514)[None]
    names = ["logit_scale_a", "logit_scale_t"]
    state = {i: {"step": torch.tensor(10.0), "exp_avg": torch.zeros_like(sd[f"module.{n}"]),
                 "exp_avg_sq": torch.zeros_like(sd[f"module.{n}"])} for i, n in enumerate(names)}
    optimizer = {"state": state, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8,
                                                   "weight_decay": 0.0, "amsgrad": False, "params": [0, 1]}]}
    torch.save({"epoch": np.int64(45), "name": "2022_12_20-laion-630k", "state_dict": sd, "optimizer": optimizer,
                "lr": np.float64(1e-4)}, str(path))
    return str(path)
