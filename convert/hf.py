"""Hugging Face `ClapModel` checkpoints: read a model directory (config.json + safetensors or
pytorch_model.bin, either possibly sharded) and the key table between HF's layout and ours.

HF's layout (transformers models/clap): `text_model.*` (a RoBERTa), `audio_model.audio_encoder.*`
(HTSAT with split q/k/v and renamed layers, no front-end tensors, no SED head),
`{text,audio}_projection.linear{1,2}.*`, `logit_scale_{a,t}`. It has no mlp-loss transform heads, so
a model converted from HF is built with `transform_heads=False` and `sed_head=False`.
"""
from __future__ import annotations

import json
import os

import numpy as np

from clapjax import text as T
from clapjax.audio.htsat import HTSATConfig
from clapjax.convert import keymap as K
from clapjax.convert.audio_keys import htsat_hf_table
from clapjax.convert.laion import require_tensors
from clapjax.convert.text_keys import tower_table
from clapjax.convert.torch_pickle import load_torch_file
from clapjax.model import CLAPConfig, CLAPModel

HF_SIZES = {96: "HTSAT-tiny", 128: "HTSAT-base", 256: "HTSAT-large"}


def is_hf_layout(sd) -> bool:
    return any(k.startswith(("text_model.", "audio_model.")) for k in sd)


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")  # in transformers' order of preference


def load_safetensors(path: str) -> dict[str, np.ndarray]:
    """A `.safetensors` file's tensors; a damaged file is an error naming it, not safetensors' traceback."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    try:
        return dict(load_file(path))
    except (SafetensorError, TypeError) as err:  # TypeError: a dtype NumPy lacks (bfloat16)
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from None


def _read_file(path: str) -> dict[str, np.ndarray]:
    if path.endswith(".safetensors"):
        return load_safetensors(path)
    obj = load_torch_file(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
    require_tensors(obj, path)
    return dict(obj)


def weight_map(index: str) -> dict[str, str]:
    """transformers' sharded layout: the index's weight_map, tensor name → the shard file holding it."""
    with open(index) as f:
        try:
            placed = json.load(f).get("weight_map")
        except (ValueError, AttributeError):  # not JSON (or not text), or JSON but not an object
            placed = None
    if not isinstance(placed, dict) or not all(isinstance(v, str) for v in placed.values()):
        raise ValueError(f"{index}: not a sharded-checkpoint index (no 'weight_map' of tensor name → shard file)")
    return placed


def shard_names(index: str) -> list[str]:
    """The shard files a sharded index places tensors in, sorted."""
    return sorted(set(weight_map(index).values()))


def weight_file(directory: str) -> str | None:
    """The weights file transformers would read in `directory` (WEIGHT_FILES' order), None when it has none."""
    return next((n for n in WEIGHT_FILES if os.path.isfile(os.path.join(directory, n))), None)


def _read_sharded(index: str) -> dict[str, np.ndarray]:
    placed = weight_map(index)
    sd: dict[str, np.ndarray] = {}
    for name in shard_names(index):
        shard = os.path.join(os.path.dirname(index), name)
        if not os.path.isfile(shard):
            raise FileNotFoundError(f"{index} places tensors in {name}, which is missing")
        part = _read_file(shard)
        misplaced = sorted(k for k in part if placed.get(k) != name)
        if misplaced:  # a tensor the index does not know, or one that is in two shards
            raise ValueError(f"{shard} holds {misplaced[:5]}, which {index} does not place there")
        sd.update(part)
    unheld = sorted(set(placed) - set(sd))
    if unheld:
        raise ValueError(f"{index} lists tensors that no shard holds: {unheld[:5]}")
    return sd


def read_weights(directory: str) -> dict[str, np.ndarray]:
    name = weight_file(directory)
    if name is None:
        raise FileNotFoundError(f"{directory}: no weights (none of {', '.join(WEIGHT_FILES)})")
    path = os.path.join(directory, name)
    return _read_sharded(path) if name.endswith(".index.json") else _read_file(path)


def read_hf_dir(directory: str):
    """(transformers ClapConfig, state dict) of a `save_pretrained` directory."""
    from transformers import ClapConfig
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory}: not a Hugging Face model directory (no config.json)")
    try:
        hf = ClapConfig.from_json_file(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if hf.model_type != "clap":
        raise ValueError(f"{path}: model_type {hf.model_type!r}, expected 'clap' (a ClapModel)")
    sd = read_weights(directory)
    if not sd:
        raise ValueError(f"{directory}: the weights file holds no tensors")
    return hf, sd


def hf_clap_config(hf) -> CLAPConfig:
    """Our config for a transformers `ClapConfig` (sizes, eps, fusion all from the config)."""
    a = hf.audio_config
    audio = HTSATConfig.from_hf(a)
    amodel = HF_SIZES.get(a.patch_embeds_hidden_size, "HTSAT-custom")
    text = T.BertConfig.from_hf(hf.text_config)
    return CLAPConfig(audio=audio, tmodel="roberta", text=text, amodel=amodel,
                      joint_embed_shape=hf.projection_dim, mlp_act=hf.projection_hidden_act,
                      transform_heads=False)


def hf_config_from_weights(sd, where: str):
    """A ClapConfig for an HF-layout state dict with no config.json: sizes from the tensors,
    everything else transformers' defaults (e.g. text LayerNorm eps 1e-12)."""
    from transformers import ClapConfig

    def count(prefix):
        return len({k[len(prefix):].split(".", 1)[0] for k in sd if k.startswith(prefix)})

    def shape(key):
        if key not in sd:
            raise ValueError(f"{where}: an HF-layout state dict without {key} (the model's sizes are read from it)")
        return sd[key].shape
    vocab, width = shape("text_model.embeddings.word_embeddings.weight")
    embed = shape("audio_model.audio_encoder.patch_embed.proj.weight")[0]
    stages = count("audio_model.audio_encoder.layers.")
    depths = [count(f"audio_model.audio_encoder.layers.{i}.blocks.") for i in range(stages)]
    heads = [shape(f"audio_model.audio_encoder.layers.{i}.blocks.0.attention.self.relative_position_bias_table")[1]
             for i in range(stages)]
    text = dict(vocab_size=vocab, hidden_size=width, num_attention_heads=width // 64,
                num_hidden_layers=count("text_model.encoder.layer."),
                intermediate_size=shape("text_model.encoder.layer.0.intermediate.dense.weight")[0],
                max_position_embeddings=shape("text_model.embeddings.position_embeddings.weight")[0])
    audio = dict(patch_embeds_hidden_size=embed, depths=depths, num_attention_heads=heads,
                 hidden_size=embed * 2 ** (stages - 1),
                 enable_fusion="audio_model.audio_encoder.patch_embed.mel_conv2d.weight" in sd)
    return ClapConfig(text_config=text, audio_config=audio,
                      projection_dim=shape("text_projection.linear2.weight")[0])


def _projection_table(model, name: str) -> K.KeyTable:
    def rename(key):  # nn.Sequential indices 0 / 2 are HF's linear1 / linear2
        return key.replace("0.", "linear1.", 1) if key.startswith("0.") else key.replace("2.", "linear2.", 1)
    return K.KeyTable(K.derive_entries(getattr(model, name), rename)).prefixed(name, f"{name}.")


def hf_table(model: CLAPModel) -> K.KeyTable:
    if model.audio_transform is not None:
        raise ValueError("HF's ClapModel has no mlp-loss transform heads: build with transform_heads=False")
    if model.config.tmodel != "roberta":
        raise ValueError(f"HF's ClapModel has a RoBERTa text model, not {model.config.tmodel}")
    table = (tower_table(model.text_branch).prefixed("text_branch", "text_model.")
             + htsat_hf_table(model.audio_branch).prefixed("audio_branch", "audio_model.")
             + _projection_table(model, "audio_projection") + _projection_table(model, "text_projection"))
    return table + K.copied("logit_scale_a", "logit_scale_t")
