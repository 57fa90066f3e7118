"""The train state to and from the saved-model format (clapjax.saved_model): a fine-tuning run starts
from a whole saved model, and a finished run exports one.

* Start (`init.checkpoint`): a directory written by `clapjax convert` (or a training export,
  `export.model=True`), to fine-tune. The architecture is the checkpoint's (config.model_config);
  every model variable must be in it with its shape and the checkpoint must hold nothing else, or
  the run fails naming the keys. Only the loss's own parameters (SigLIP) start fresh.
* Export (`export.model=True`): the trained model in that format. The starting checkpoint's source
  layout and extra buffers are carried over, so a fine-tuned laion-clap or HF model exports back to
  its own layout (`clapjax export --to laion|hf`).
"""
from __future__ import annotations

import os
import shutil
from typing import Callable, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

from clapjax import saved_model


def _names(keys, limit: int = 10) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" … ({len(keys)} in all)" if len(keys) > limit else "")


def check_checkpoint(directory: str, expected: Mapping[str, tuple]) -> None:
    """Every expected variable present with its shape, nothing else; else ValueError naming the keys."""
    saved = saved_model.saved_shapes(directory)
    problems = []
    missing, unexpected = set(expected) - set(saved), set(saved) - set(expected)
    if missing:
        problems.append(f"missing: {_names(missing)}")
    if unexpected:
        problems.append(f"not in the model: {_names(unexpected)}")
    wrong = [f"{k} {saved[k]} vs model {tuple(expected[k])}" for k in sorted(set(saved) & set(expected))
             if tuple(saved[k]) != tuple(expected[k])]
    if wrong:
        problems.append("shape differs: " + "; ".join(wrong[:10]) + (f" … ({len(wrong)} in all)" if len(wrong) > 10 else ""))
    if problems:
        raise ValueError(f"init.checkpoint {directory} does not fit the model: " + " | ".join(problems))


def load_checkpoint(cfg, setup, state: dict, log: Callable = print) -> dict:
    """The train state with every model variable taken from `cfg.init.checkpoint`, placed on its
    sharding (each process reads only its shards)."""
    directory = cfg.init.checkpoint
    params, stats = dict(state["params"]), dict(state["batch_stats"])
    model_keys = {k: v.shape for k, v in {**setup.abstract["params"], **setup.abstract["batch_stats"]}.items()
                  if k in setup.template.params or k in setup.template.batch_stats}
    check_checkpoint(directory, model_keys)
    where = {**setup.shardings["params"], **setup.shardings["batch_stats"]}
    model = saved_model.restore(directory, sharding=lambda key, shape: where[key])
    for key, var in saved_model.model_variables(model).items():
        group = params if key in params else stats
        group[key] = var.get_value().astype(group[key].dtype)
    fresh = sorted(set(params) - set(model_keys))
    log(f"init.checkpoint {directory}: {len(model_keys)} variables loaded (every model variable)"
        + (f"; fresh: {', '.join(fresh)}" if fresh else ""))
    return {**state, "params": params, "batch_stats": stats}


def export_model(cfg, setup, state: dict, model_cfg, directory: str) -> None:
    """The trained model in the converter's format at `directory` (replacing an earlier export).

    All processes call it (sharded arrays are gathered); process 0 writes. With `init.checkpoint`
    the source layout, its extra buffers and HF config are carried over from that checkpoint."""

    def host(x):
        return np.asarray(x if x.is_fully_addressable else multihost_utils.process_allgather(x, tiled=True))
    values = {k: host(v) for group in ("params", "batch_stats") for k, v in state[group].items()
              if k in setup.template.params or k in setup.template.batch_stats}
    if jax.process_index() != 0:
        return
    model = saved_model.abstract_model(model_cfg)
    for key, var in saved_model.model_variables(model).items():
        var.set_value(values[key])
    source, extras, hf_config = "clapjax-train", {}, None
    if cfg.init.get("checkpoint"):
        src = cfg.init.checkpoint
        source = saved_model.read_config(src)[1] or source
        extras = saved_model.read_extras(src)
        if os.path.isfile(os.path.join(src, saved_model.HF_CONFIG)):
            with open(os.path.join(src, saved_model.HF_CONFIG)) as f:
                hf_config = f.read()
    if os.path.isfile(os.path.join(directory, saved_model.CONFIG)):
        shutil.rmtree(directory)  # an earlier export of this run (a finished run started again)
    saved_model.save(directory, model, source_format=source, extras=extras, hf_config_json=hf_config)
