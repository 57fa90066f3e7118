"""The saved-model format: an Orbax checkpoint of the variables plus JSON beside it.

    OUT_DIR/
      config.json       CLAPConfig.to_dict() + the source format [+ "provenance": where the source came
                        from (repo, revision, file names and sha256), for a model from the conversion cache]
      key_report.json   the converter's key accounting (consumed / ignored with reasons / …), when converted
      variables/        Orbax checkpoint: params and batch statistics, keyed by module path
      source_extras.npz the source tensors the model does not hold (ignored buffers), kept so that
                        exporting back to the same layout reproduces every tensor bit for bit
      source_hf_config.json  the Hugging Face ClapConfig of an HF source, for exporting back to HF

It is core: the converter writes it, the trainer exports into it, the inference API reads it, and
none of those needs the others to do so.

Writing goes to a temporary sibling directory that is renamed at the end: a failed conversion
leaves nothing behind.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Callable

import jax
import numpy as np
from flax import nnx

from clapjax.model import CLAPConfig, CLAPModel

VARIABLES, CONFIG, REPORT, EXTRAS = "variables", "config.json", "key_report.json", "source_extras.npz"
HF_CONFIG = "source_hf_config.json"
PROVENANCE = "provenance"  # config.json's key for where the source came from
SAVED = (nnx.Param, nnx.BatchStat)  # what a saved model holds: no RNG state, no caches


def model_variables(model: nnx.Module) -> dict[str, nnx.Variable]:
    """Dotted path → variable, for every saved (Param / BatchStat) variable of `model`."""
    return {".".join(str(p) for p in path): v for path, v in nnx.iter_graph(model)
            if isinstance(v, SAVED) and v.get_value() is not None}


def abstract_model(cfg: CLAPConfig) -> CLAPModel:
    """The model with shapes and dtypes but no memory: conversion or restoring fills it."""
    return nnx.eval_shape(lambda: CLAPModel(cfg, nnx.Rngs(0)))


def _nested(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def save(out_dir: str, model: CLAPModel, *, report_json: str | None = None, source_format: str = "",
         extras: dict[str, np.ndarray] | None = None, hf_config_json: str | None = None) -> None:
    """Write `model` to the new or empty `out_dir`, all at once (a failure leaves nothing behind)."""
    import orbax.checkpoint as ocp
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"{out_dir} exists and is not empty; choose a new output directory")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".clapjax-convert-", dir=parent)
    try:
        arrays = {k: np.asarray(v.get_value()) for k, v in model_variables(model).items()}
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(os.path.join(tmp, VARIABLES), _nested(arrays))
        with open(os.path.join(tmp, CONFIG), "w") as f:
            json.dump({"source_format": source_format, **model.config.to_dict()}, f, indent=2)
        for name, text in ((REPORT, report_json), (HF_CONFIG, hf_config_json)):
            if text is not None:
                with open(os.path.join(tmp, name), "w") as f:
                    f.write(text)
        np.savez(os.path.join(tmp, EXTRAS), **(extras or {}))
        if os.path.exists(out_dir):
            os.rmdir(out_dir)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_config(directory: str) -> tuple[CLAPConfig, str]:
    path = os.path.join(directory, CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory}: not a clapjax checkpoint (no {CONFIG}); convert one with "
                                "`clapjax convert SRC OUT_DIR`")
    with open(path) as f:
        d = json.load(f)
    if "source_format" not in d:  # save() always writes it; an HF ClapModel directory also has a config.json
        raise ValueError(f"{directory}: {CONFIG} is not a clapjax checkpoint's config (a Hugging Face model "
                         "directory? convert it with `clapjax convert SRC OUT_DIR`)")
    source = d.pop("source_format")
    d.pop(PROVENANCE, None)  # absent from models saved before it existed
    return CLAPConfig.from_dict(d), source


def read_provenance(directory: str) -> dict | None:
    """Where the model's source came from (see `set_provenance`), or None when that was not recorded."""
    with open(os.path.join(directory, CONFIG)) as f:
        return json.load(f).get(PROVENANCE)


def set_provenance(directory: str, provenance: dict) -> None:
    """Record in config.json where the source came from (the file is replaced whole, never half-written)."""
    path = os.path.join(directory, CONFIG)
    with open(path) as f:
        config = json.load(f)
    config[PROVENANCE] = provenance
    fd, tmp = tempfile.mkstemp(prefix=".config-", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(config, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read_extras(directory: str) -> dict[str, np.ndarray]:
    path = os.path.join(directory, EXTRAS)
    if not os.path.isfile(path):
        return {}
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def saved_shapes(directory: str) -> dict[str, tuple]:
    """{dotted path: shape} of the variables saved in `directory`, from the Orbax metadata (no data read)."""
    import orbax.checkpoint as ocp
    path = os.path.abspath(os.path.join(directory, VARIABLES))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{directory}: no {VARIABLES}/ (not a clapjax checkpoint directory)")
    with ocp.StandardCheckpointer() as ckpt:
        tree = ckpt.metadata(path).item_metadata.tree
    return {k: tuple(v.shape) for k, v in _flat(tree).items()}


Sharding = jax.sharding.Sharding | Callable[[str, tuple[int, ...]], jax.sharding.Sharding] | None


def restore(directory: str, sharding: Sharding = None) -> CLAPModel:
    """The model saved in `directory`, on the default device or placed by `sharding` (one Sharding
    for every variable, or a function (dotted path, shape) → Sharding)."""
    import orbax.checkpoint as ocp
    cfg, _ = read_config(directory)
    model = abstract_model(cfg)
    targets = model_variables(model)
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def place(key, var):
        s = sharding(key, tuple(var.shape)) if callable(sharding) else (sharding or default)
        return jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=s)
    abstract = _nested({k: place(k, v.get_value()) for k, v in targets.items()})
    with ocp.StandardCheckpointer() as ckpt:
        restored = _flat(ckpt.restore(os.path.abspath(os.path.join(directory, VARIABLES)), abstract))
    missing = sorted(set(targets) - set(restored))
    if missing:
        raise ValueError(f"{directory}: checkpoint lacks variables {missing[:10]}")
    for key, var in targets.items():
        var.set_value(restored[key])
    return model
