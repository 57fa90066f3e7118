"""`clapjax convert` and `clapjax export`: source file → strict key check → Orbax, and back."""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Callable

import numpy as np

from clapjax import saved_model
from clapjax.convert import hf, laion
from clapjax.convert import keymap as K
from clapjax.model import CLAPConfig

@dataclasses.dataclass
class Source:
    fmt: str                      # 'laion' | 'hf'
    state_dict: dict[str, np.ndarray]
    hf_config: object | None = None  # transformers ClapConfig for 'hf'


def read_source(src: str) -> Source:
    """A laion-clap `.pt`, an HF ClapModel directory, or a single `.safetensors` file (either layout)."""
    if os.path.isdir(src):
        cfg, sd = hf.read_hf_dir(src)
        return Source("hf", sd, cfg)
    if not os.path.exists(src):
        raise FileNotFoundError(f"{src}: no such file or directory")
    if src.endswith(".safetensors"):
        sd = hf.load_safetensors(src)
        if hf.is_hf_layout(sd):
            return Source("hf", sd, hf.hf_config_from_weights(sd, src))
        return Source("laion", laion.unwrap_state_dict(sd, src))
    return Source("laion", laion.read_state_dict(src))


@functools.lru_cache(maxsize=16)
def _plan(cfg: CLAPConfig, fmt: str) -> tuple[K.KeyTable, dict[str, tuple[int, ...]]]:
    """Key table and target shapes of a configuration (cached: checking needs no model of its own)."""
    model = saved_model.abstract_model(cfg)
    table = laion.laion_table(model) if fmt == "laion" else hf.hf_table(model)
    return table, {k: tuple(v.shape) for k, v in saved_model.model_variables(model).items()}


def detect_config(src: Source, *, amodel=None, tmodel=None, fusion=None) -> CLAPConfig:
    """The configuration the weights describe; the overrides must agree with it."""
    if src.fmt == "laion":
        cfg = laion.detect(src.state_dict, amodel=amodel, tmodel=tmodel, fusion=fusion)
    else:
        cfg = hf.hf_clap_config(src.hf_config)
        problems = []
        if amodel is not None and amodel != cfg.amodel:
            problems.append(f"--amodel {amodel} but the weights are {cfg.amodel}")
        if tmodel is not None and tmodel != "roberta":
            problems.append(f"--tmodel {tmodel} but HF's ClapModel has a roberta text model")
        if fusion is not None and fusion != cfg.enable_fusion:
            problems.append(f"--fusion {fusion} but the config says enable_fusion={cfg.enable_fusion}")
        if problems:
            raise ValueError("the weights contradict the options: " + "; ".join(problems))
    return cfg


def describe(cfg: CLAPConfig, fmt: str) -> str:
    a, t = cfg.audio, cfg.text
    front = a.frontend
    return (f"detected: {fmt} layout; audio {cfg.amodel} ({type(a).__name__}, fusion "
            f"{a.fusion_type if cfg.enable_fusion else 'none'}; n_fft {front.window_size}, hop {front.hop_size}, "
            f"fmax {front.fmax:g}); text {cfg.tmodel} ({type(t).__name__}); joint {cfg.joint_embed_shape}; "
            f"mlp-loss heads {'yes' if cfg.transform_heads else 'no'}")


def convert(src_path: str, out_dir: str, *, amodel=None, tmodel=None, fusion=None,
            log: Callable[[str], None] = print) -> K.Report:
    """Convert or raise (KeyMappingError carries the report); nothing is written on failure."""
    return convert_source(read_source(src_path), out_dir, amodel=amodel, tmodel=tmodel, fusion=fusion, log=log)


def convert_source(src: Source, out_dir: str, *, amodel=None, tmodel=None, fusion=None,
                   log: Callable[[str], None] = print) -> K.Report:
    """Convert or raise. Once its tensors are copied into the model, `src` lets go of its state dict
    (a Source is converted once), so the weights are not held twice while the model is saved."""
    cfg = detect_config(src, amodel=amodel, tmodel=tmodel, fusion=fusion)
    log(describe(cfg, src.fmt))
    table, shapes = _plan(cfg, src.fmt)
    report, entries = K.match(src.state_dict, table, shapes)
    if not report.ok:  # checked on shapes alone, before any tensor is copied
        raise K.KeyMappingError(report)
    model = saved_model.abstract_model(cfg)  # a fresh one: the cached plan's entries are pure functions of the sources
    K.fill(model, src.state_dict, entries)
    extras = {k: src.state_dict[k] for k in report.ignored}
    src.state_dict = {}
    saved_model.save(out_dir, model, report_json=report.to_json(), source_format=src.fmt, extras=extras,
                     hf_config_json=None if src.hf_config is None else src.hf_config.to_json_string())
    return report


# --- export -------------------------------------------------------------------------------------

def export(ckpt_dir: str, to: str, dest: str) -> dict[str, np.ndarray]:
    """Write a converted model back as a laion-clap `.pt` (`to='laion'`) or an HF directory (`'hf'`)."""
    if to not in ("laion", "hf"):
        raise ValueError(f"--to must be 'laion' or 'hf', got {to!r}")
    # everything that can refuse is checked before the model is restored
    _, source = saved_model.read_config(ckpt_dir)
    if to != source:
        raise ValueError(f"{ckpt_dir} was converted from the {source!r} layout; exporting it as {to} is not "
                         "supported (the layouts hold different heads: LAION's mlp-loss transforms and SED "
                         "head have no place in HF's ClapModel and vice versa)")
    if to == "laion" and os.path.exists(dest):
        raise FileExistsError(f"{dest} exists; choose a new file name")
    if to == "hf" and os.path.exists(dest) and (not os.path.isdir(dest) or os.listdir(dest)):
        raise FileExistsError(f"{dest} exists and is not an empty directory; choose a new directory")
    model = saved_model.restore(ckpt_dir)
    table = laion.laion_table(model) if to == "laion" else hf.hf_table(model)
    sd = K.export_state_dict(model, table)
    sd.update(saved_model.read_extras(ckpt_dir))  # the source's buffers, verbatim
    if to == "laion":
        _write_laion(sd, dest)
    else:
        _write_hf(sd, dest, os.path.join(ckpt_dir, saved_model.HF_CONFIG))
    return sd


def _write_laion(sd: dict[str, np.ndarray], dest: str) -> None:
    try:
        import torch
    except ImportError:
        raise RuntimeError("exporting to a laion-clap .pt needs PyTorch (pip install 'clapjax[reference]')") from None
    state = {f"module.{k}": torch.from_numpy(np.array(v, order="C")) for k, v in sd.items()}
    torch.save({"epoch": 0, "name": "clapjax-export", "state_dict": state}, dest)


def _write_hf(sd: dict[str, np.ndarray], dest: str, config_path: str) -> None:
    from safetensors.numpy import save_file
    os.makedirs(dest, exist_ok=True)
    with open(config_path) as f:
        config = json.load(f)
    with open(os.path.join(dest, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_file({k: np.array(v, order="C") for k, v in sd.items()}, os.path.join(dest, "model.safetensors"),
              metadata={"format": "pt"})
