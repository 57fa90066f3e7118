"""Start training from unimodal pretrained towers, with the converter's strict key accounting.

* Text (`init.text`): a Hugging Face `RobertaModel` / `BertModel` directory (`save_pretrained`:
  config.json + model.safetensors / pytorch_model.bin). Keys may carry the task model's prefix
  (`roberta.` / `bert.`, as RobertaForMaskedLM saves them); the pre-training heads (`lm_head.*`,
  `cls.*`) are ignored with that reason.
* Audio (`init.audio`): an HTS-AT AudioSet classifier checkpoint as LAION's `--pretrained-audio`
  reads it: a torch file whose `state_dict` holds the model under `sed_model.` (the HTS-AT
  training code's Lightning wrapper). Its front-end buffers are checked against ours, not loaded
  (clapjax.convert.audio_keys); keys outside `sed_model.` belong to the wrapper and are ignored
  with that reason.

Every source tensor ends up in the report as loaded (with its target), ignored (with the reason)
or unexpected; every tower variable as loaded or fresh. A variable left fresh is an error unless it
matches one of `init.fresh_keys` (glob patterns over our dotted paths, e.g. `text_branch.pooler.*`);
an unexpected, missing or mis-shaped tensor fails naming it, and nothing is changed.
The projections, transform heads and logit scales are never part of a tower: they stay fresh.
A whole saved model (`init.checkpoint`, fine-tuning) is loaded by clapjax.train.model_io instead.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
from typing import Callable, Mapping, Sequence

import numpy as np
from flax import nnx

from clapjax import saved_model
from clapjax.audio.htsat import HTSAT
from clapjax.convert import keymap as K
from clapjax.model import CLAPModel

TEXT_PREFIXES = ("roberta.", "bert.")
TEXT_HEADS = r"(lm_head|cls)\..*"
SED_PREFIX = "sed_model."


@dataclasses.dataclass
class TowerReport:
    """The converter's report for one tower, plus the variables deliberately left at init."""

    tower: str
    source: str
    report: K.Report
    fresh: list[str]

    def summary(self) -> str:
        lines = [f"{self.tower} from {self.source}: {len(self.report.consumed)} tensors loaded, "
                 f"{len(self.report.ignored)} ignored, {len(self.fresh)} fresh"]
        lines.append(self.report.summary())
        lines.extend(f"  fresh: {k}" for k in self.fresh)
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"tower": self.tower, "source": self.source, "fresh": self.fresh, **json.loads(self.report.to_json())}


def _fresh(target: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(target, p) for p in patterns)


def load_tower(state_dict: Mapping[str, np.ndarray], table: K.KeyTable, target_shapes: Mapping[str, tuple],
               fresh_patterns: Sequence[str], tower: str, source: str) -> tuple[dict[str, np.ndarray], TowerReport]:
    """Match `state_dict` against `table` (targets already carry the tower prefix) and return the
    target values. Targets whose sources are absent are allowed only when `fresh_patterns` name them."""
    fresh = [e.target for e in table.entries
             if _fresh(e.target, fresh_patterns) and any(s not in state_dict for s in e.sources)]
    keep = K.KeyTable([e for e in table.entries if e.target not in fresh], table.ignores, table.required)
    shapes = {k: v for k, v in target_shapes.items() if k not in fresh}
    report, entries = K.match(state_dict, keep, shapes)
    result = TowerReport(tower, source, report, sorted(fresh))
    if not report.ok:
        raise K.KeyMappingError(report)
    values = {t: np.asarray(e.to_target(*[np.asarray(state_dict[s]) for s in e.sources])) for t, e in entries.items()}
    return values, result


# --- sources ---------------------------------------------------------------------------------------

def read_hf_text_dir(directory: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json dict, state dict) of a transformers RobertaModel / BertModel directory."""
    from clapjax.convert.hf import read_weights  # the converter's reader: safetensors (sharded) or .bin
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory}: not a Hugging Face model directory (no config.json)")
    with open(path) as f:
        hf_cfg = json.load(f)
    if hf_cfg.get("model_type") not in ("roberta", "bert"):
        raise ValueError(f"{path}: model_type {hf_cfg.get('model_type')!r}; init.text takes a RobertaModel or "
                         "BertModel directory")
    sd = read_weights(directory)
    for prefix in TEXT_PREFIXES:
        if sd and all(k.startswith(prefix) or re_match(TEXT_HEADS, k) for k in sd):
            sd = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}
    return hf_cfg, sd


def re_match(pattern: str, key: str) -> bool:
    import re
    return re.fullmatch(pattern, key) is not None


def read_htsat_checkpoint(path: str) -> dict[str, np.ndarray]:
    """The `state_dict` of an HTS-AT training checkpoint (keys `sed_model.*`)."""
    from clapjax.convert.torch_pickle import load_torch_file
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such HTS-AT checkpoint")
    obj = load_torch_file(path)
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not any(k.startswith(SED_PREFIX) for k in sd):
        raise ValueError(f"{path}: expected an HTS-AT checkpoint with a state_dict of '{SED_PREFIX}*' keys")
    return {k: np.asarray(v) for k, v in sd.items()}


# --- tables ----------------------------------------------------------------------------------------

def text_table(model: CLAPModel) -> K.KeyTable:
    from clapjax.convert.text_keys import tower_table
    from clapjax.text import BertModel
    if not isinstance(model.text_branch, BertModel):
        raise ValueError(f"init.text loads RoBERTa/BERT towers; this model's text tower is "
                         f"{type(model.text_branch).__name__}")
    table = tower_table(model.text_branch).prefixed("text_branch", "")
    return table + K.KeyTable([], [K.Ignore(TEXT_HEADS, "pre-training head of the task model, not the encoder")])


def audio_table(model: CLAPModel) -> K.KeyTable:
    from clapjax.convert.audio_keys import htsat_laion_table
    if not isinstance(model.audio_branch, HTSAT):
        raise ValueError(f"init.audio loads HTS-AT checkpoints; this model's audio tower is "
                         f"{type(model.audio_branch).__name__}")
    table = htsat_laion_table(model.audio_branch).prefixed("audio_branch", SED_PREFIX)
    outside = K.Ignore(r"(?!" + SED_PREFIX.replace(".", r"\.") + r").*",
                       "not part of the HTS-AT model (training wrapper state); LAION skips it too")
    return table + K.KeyTable([], [outside])


def _shapes(model: nnx.Module, prefix: str) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in saved_model.model_variables(model).items() if k.startswith(prefix + ".")}


def load_pretrained(cfg, model: CLAPModel) -> tuple[dict[str, np.ndarray], list[TowerReport]]:
    """Values for the tower variables named by `cfg.init` ({dotted path: array}) and the reports.

    `model` may be abstract (nnx.eval_shape): only its structure and shapes are used.
    """
    fresh = tuple(cfg.init.fresh_keys)
    values: dict[str, np.ndarray] = {}
    reports = []
    if cfg.init.text:
        if cfg.init.get("text_format", "hf") != "hf":
            raise ValueError(f"init.text_format {cfg.init.text_format!r}: only 'hf' directories are supported")
        _, sd = read_hf_text_dir(cfg.init.text)
        v, rep = load_tower(sd, text_table(model), _shapes(model, "text_branch"), fresh, "text_branch", cfg.init.text)
        values.update(v)
        reports.append(rep)
    if cfg.init.audio:
        sd = read_htsat_checkpoint(cfg.init.audio)
        v, rep = load_tower(sd, audio_table(model), _shapes(model, "audio_branch"), fresh, "audio_branch",
                            cfg.init.audio)
        values.update(v)
        reports.append(rep)
    return values, reports


def apply_to_state(cfg, setup, state: dict, log: Callable = print) -> dict:
    """The train state with the pretrained tower values placed on their shardings."""
    from clapjax.train import sharding
    model = nnx.eval_shape(lambda: CLAPModel(setup.template.config, nnx.Rngs(0)))
    values, reports = load_pretrained(cfg, model)
    params, stats = dict(state["params"]), dict(state["batch_stats"])
    for key, value in values.items():
        group, shard = (params, setup.shardings["params"]) if key in params else (stats, setup.shardings["batch_stats"])
        old = group[key]
        group[key] = sharding.place(value.astype(old.dtype), shard[key])
    for rep in reports:
        log(rep.summary())
    return {**state, "params": params, "batch_stats": stats}
