"""Training configuration: `ml_collections` config files, `key=value` overrides, the model config.

A config file is a Python file with `get_config(arg: str | None) -> ConfigDict`, usually starting
from `base_config()` here. It is named on the command line as a path (`train/configs/tiny.py`), a
path with an argument after a colon (`train/configs/tiny.py:fsdp`), or the bare name of a file
in `train/configs/` (`tiny`, `tiny:fsdp`).

Overrides are `dotted.key=value`; the value is read as a Python literal (`3`, `1e-4`, `True`,
`(1, 1)`, `{'a': 1}`) and otherwise kept as a string. A key the config does not have is an error
(a typo must not silently train something else), except below the open sections (`OPEN`), whose
keys belong to their consumer (the tower overrides, the data pipeline).

The resolved config (after overrides) is what the run uses and what every checkpoint stores as
JSON (`to_json`), so a checkpoint says exactly how it was trained.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import math
import os
from typing import Any, Sequence

import ml_collections

from clapjax.model import PRECISION_FIELDS, CLAPConfig, Precision, TowerPrecision
from clapjax.train.losses import LOSSES
from clapjax.train.optim import GROUPS, OPTIMIZERS

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
# sections whose keys are owned by their consumer: any key may be added by an override
OPEN = ("model.audio_overrides", "model.text_overrides", "data", "compiler_options")


def base_config() -> ml_collections.ConfigDict:
    """LAION-CLAP's training defaults (training/params.py) for HTSAT-tiny + RoBERTa."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = dict(
        amodel="HTSAT-tiny", tmodel="roberta", enable_fusion=False, fusion_type="aff_2d",
        joint_embed_shape=512, mlp_act="relu", transform_heads=True,
        audio_overrides={}, text_overrides={},
        dtype="float32",         # compute dtype of both towers ('bfloat16' for mixed precision)
        param_dtype="float32",   # parameters, optimizer state, loss and logit scales stay f32
        remat=False, remat_policy="",  # activation checkpointing per block (jax.checkpoint_policies name)
    )
    c.loss = dict(
        name="clip",             # clip | clip_mlp (LAION --clap-mlploss) | siglip | siglip_ring
        siglip_init_log_t=math.log(10.0), siglip_init_bias=-10.0,  # SigLIP paper's initialisation
    )
    c.optim = dict(
        name="adamw", lr=5e-4, beta1=0.9, beta2=0.999, eps=1e-8,  # params.get_default_params (non-ViT)
        weight_decay=0.2, warmup_steps=10000,                      # --wd, --warmup
        grad_clip_norm=0.0,                                        # 0: no clipping (LAION's default)
        lr_mult=dict(audio_branch=1.0, text_branch=1.0, heads=1.0, logit_scale=1.0),
        freeze=(),               # names from GROUPS whose parameters never change (--freeze-text)
        accum_steps=1,           # GradCache micro-batches per step (every negative kept)
    )
    c.mesh = dict(data=-1, fsdp=1, rules="dp")   # rules: 'dp' (replicate params) | 'fsdp'
    c.train = dict(
        steps=1000, batch_size=64,   # global batch, split over processes and devices
        log_every=1, max_nonfinite_in_row=10,
        # dense peak FLOP/s of one device, for the logged MFU; 0: throughput.PEAK_FLOPS by device kind and
        # compute dtype (it has no CPU entry: MFU is then left out)
        peak_flops_per_device=0.0,
    )
    c.checkpoint = dict(every=1000, keep_last=3, keep_every=0, async_save=True)
    c.data = dict(kind="random")     # 'random' = batches.RandomBatches; other kinds: clapjax.train.data
    # init.checkpoint: a whole model written by `clapjax convert` (or a training export) to fine-tune;
    # its config.json decides the architecture (see model_config). init.text / init.audio: towers only.
    c.init = dict(checkpoint="", text="", text_format="hf", audio="", fresh_keys=(
        "text_branch.pooler.*", "audio_projection.*", "text_projection.*", "audio_transform.*",
        "text_transform.*", "logit_scale_a", "logit_scale_t"))
    # export.model: at the end of the run write WORKDIR/model/ in the converter's format, so that
    # `clapjax eval / embed-audio / zero-shot / export` read the trained model
    c.export = dict(model=False)
    c.distributed = dict(coordinator="", num_processes=0, process_id=-1, initialization_timeout=300)
    c.compilation_cache = ""         # JAX persistent compilation cache directory ('' = off)
    # XLA options for every compile; {'xla_backend_optimization_level': 0} compiles CPU programs ~5×
    # faster (tests, smoke runs) at some run-time cost
    c.compiler_options = {}
    return c


# --- loading --------------------------------------------------------------------------------------

def _split_spec(spec: str) -> tuple[str, str | None]:
    path, arg = spec, None
    if ":" in spec and not os.path.exists(spec):
        path, arg = spec.rsplit(":", 1)
    if not path.endswith(".py") and os.sep not in path:
        path = os.path.join(CONFIGS_DIR, path + ".py")
    return path, arg


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """`get_config(arg)` of the file `spec` names, validated, with `overrides` applied."""
    path, arg = _split_spec(spec)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} not found (from {spec!r})")
    module_spec = importlib.util.spec_from_file_location(f"clapjax_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path} defines no get_config(arg)")
    cfg = module.get_config(arg)
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ValueError(f"{path}: get_config returned {type(cfg).__name__}, expected a ConfigDict")
    apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


def parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _is_open(dotted: str) -> bool:
    return any(dotted == o or dotted.startswith(o + ".") for o in OPEN)


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        value = parse_value(text)
        *parents, leaf = key.split(".")
        node = cfg
        for i, p in enumerate(parents):
            if p not in node:
                if not _is_open(".".join(parents[:i + 1])):
                    raise ValueError(f"override {key!r}: the config has no section {'.'.join(parents[:i + 1])!r}")
                node[p] = {}
            node = node[p]
        if leaf not in node and not _is_open(".".join(parents)):
            raise ValueError(f"override {key!r}: unknown key (known in {'.'.join(parents) or 'the root'}: "
                             f"{sorted(node.keys())})")
        if isinstance(value, list):
            value = tuple(value)
        old = node[leaf] if leaf in node else None
        if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(old, tuple) and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = (value,) if value != "" else ()
        try:
            node[leaf] = value
        except TypeError as err:
            raise ValueError(f"override {key!r}: {err}") from None


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Reject settings that cannot train, naming the key."""
    if cfg.loss.name not in LOSSES:
        raise ValueError(f"loss.name must be one of {tuple(LOSSES)}, got {cfg.loss.name!r}")
    if LOSSES[cfg.loss.name].needs_transform_heads and not cfg.model.transform_heads:
        raise ValueError(f"loss.name={cfg.loss.name!r} needs model.transform_heads=True")
    if cfg.optim.name not in OPTIMIZERS:
        raise ValueError(f"optim.name must be one of {OPTIMIZERS}, got {cfg.optim.name!r}")
    unknown = set(cfg.optim.lr_mult) - set(GROUPS)
    if unknown:
        raise ValueError(f"optim.lr_mult names unknown groups {sorted(unknown)}; groups: {GROUPS}")
    bad = set(cfg.optim.freeze) - set(GROUPS)
    if bad:
        raise ValueError(f"optim.freeze names unknown groups {sorted(bad)}; groups: {GROUPS}")
    if cfg.optim.accum_steps < 1 or cfg.train.batch_size % cfg.optim.accum_steps:
        raise ValueError(f"train.batch_size {cfg.train.batch_size} must be a multiple of "
                         f"optim.accum_steps {cfg.optim.accum_steps} (>= 1)")
    if cfg.mesh.rules not in ("dp", "fsdp"):
        raise ValueError(f"mesh.rules must be 'dp' or 'fsdp', got {cfg.mesh.rules!r}")
    if cfg.train.steps < 1 or cfg.train.max_nonfinite_in_row < 1:
        raise ValueError("train.steps and train.max_nonfinite_in_row must be >= 1")
    if cfg.train.get("peak_flops_per_device", 0.0) < 0:
        raise ValueError(f"train.peak_flops_per_device must be >= 0 (0: from the device table), "
                         f"got {cfg.train.peak_flops_per_device}")
    if cfg.checkpoint.every < 1 or cfg.checkpoint.keep_last < 1 or cfg.checkpoint.keep_every < 0:
        raise ValueError("checkpoint.every and checkpoint.keep_last must be >= 1, keep_every >= 0")
    if cfg.model.dtype not in ("float32", "bfloat16") or cfg.model.param_dtype not in ("float32", "bfloat16"):
        raise ValueError("model.dtype / model.param_dtype must be 'float32' or 'bfloat16'")
    init = cfg.get("init", {})
    if init.get("checkpoint") and (init.get("text") or init.get("audio")):
        raise ValueError("init.checkpoint loads the whole model; leave init.text and init.audio empty "
                         f"(got text={init.get('text')!r}, audio={init.get('audio')!r})")
    if init.get("checkpoint") and not os.path.isfile(os.path.join(init.checkpoint, "config.json")):
        raise ValueError(f"init.checkpoint={init.checkpoint!r}: not a clapjax checkpoint directory (no config.json); "
                         "write one with `clapjax convert SRC OUT_DIR`")


# --- derived --------------------------------------------------------------------------------------

def _numerics(model: ml_collections.ConfigDict, overrides: dict, base: TowerPrecision, where: str) -> TowerPrecision:
    """One tower's precision: the `model` section's dtype / param_dtype (and remat when on) over `base`, then the
    tower's own override keys (`model.audio_overrides.dtype=…`), so audio and text may differ."""
    run = dict(dtype=model.dtype, param_dtype=model.param_dtype)
    if model.remat:
        run.update(remat=True, remat_policy=model.remat_policy or None)
    own = {k: overrides.pop(k) for k in PRECISION_FIELDS if k in overrides}
    try:
        return dataclasses.replace(base, **{**run, **own})
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def _precision(m: ml_collections.ConfigDict, audio: dict, text: dict, base: Precision = Precision()) -> Precision:
    """The run's `precision` section; pops the precision keys out of the tower overrides `audio` and `text`."""
    return Precision(audio=_numerics(m, audio, base.audio, "model (audio tower)"),
                     text=_numerics(m, text, base.text, "model (text tower)"))


def model_config(cfg: ml_collections.ConfigDict) -> CLAPConfig:
    """The CLAPConfig the run trains (LAION's `create_model` with our overrides).

    With `init.checkpoint` the architecture is the checkpoint's (its config.json): the `model`
    section then contributes only precision and remat (dtype, param_dtype, remat, remat_policy) and
    `audio_overrides` / `text_overrides` applied on top (settings such as drop_path_rate; a change of
    shape fails when the weights are loaded, naming the key). `model.tmodel` must name the
    checkpoint's text tower, because the data pipeline picks the tokenizer's kind from it."""
    m = cfg.model
    if cfg.get("init", {}).get("checkpoint"):
        return _checkpoint_model_config(cfg)
    audio, text = _plain(m.audio_overrides), _plain(m.text_overrides)
    precision = _precision(m, audio, text)
    return CLAPConfig.from_laion(m.amodel, m.tmodel, m.enable_fusion, m.fusion_type, audio_overrides=audio,
                                 text_overrides=text, joint_embed_shape=m.joint_embed_shape, mlp_act=m.mlp_act,
                                 transform_heads=m.transform_heads, precision=precision)


def _replace(dc, overrides: dict, where: str):
    """A dataclass with `overrides` applied (nested dataclasses take dicts), unknown names refused."""
    fields = {f.name for f in dataclasses.fields(dc)}
    changes = {}
    for k, v in overrides.items():
        if k not in fields:
            raise ValueError(f"{where}.{k}: {type(dc).__name__} has no such setting")
        old = getattr(dc, k)
        changes[k] = _replace(old, v, f"{where}.{k}") if dataclasses.is_dataclass(old) and isinstance(v, dict) else v
    return dataclasses.replace(dc, **changes)


def _checkpoint_model_config(cfg: ml_collections.ConfigDict) -> CLAPConfig:
    from clapjax.saved_model import read_config
    m = cfg.model
    saved, _ = read_config(cfg.init.checkpoint)
    if m.tmodel != saved.tmodel:
        raise ValueError(f"model.tmodel={m.tmodel!r} but init.checkpoint {cfg.init.checkpoint} holds a {saved.tmodel!r} "
                         f"text tower; set model.tmodel={saved.tmodel} (the tokenizer's kind follows it)")
    audio, text = _plain(m.audio_overrides), _plain(m.text_overrides)
    # the precision keys always come from the run; other overrides only when given
    precision = _precision(m, audio, text, saved.precision)
    return dataclasses.replace(saved, audio=_replace(saved.audio, audio, "model.audio_overrides"),
                               text=_replace(saved.text, text, "model.text_overrides"), precision=precision)


def _plain(x):
    """ConfigDict / tuples → plain dicts (tower configs take dicts and tuples)."""
    if isinstance(x, ml_collections.ConfigDict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return x


def to_dict(cfg: ml_collections.ConfigDict) -> dict:
    return json.loads(to_json(cfg))


def to_json(cfg: ml_collections.ConfigDict) -> str:
    return json.dumps(_plain(cfg.to_dict()), indent=2, sort_keys=True, default=list)


def from_json(text: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(json.loads(text))
