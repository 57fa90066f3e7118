"""The CLAP model: LAION-CLAP's `CLAP` module (clap_module/model.py) in Flax NNX.

`CLAPConfig` is the architecture (`audio`, `text`, heads) plus one `precision` section: each tower's compute
dtype, parameter dtype and activation checkpointing, which the towers and their heads are built with.

Attribute names are LAION's (`audio_branch`, `text_branch`, `audio_projection`, `text_projection`,
`audio_transform`, `text_transform`, `logit_scale_a`, `logit_scale_t`) so a LAION state dict maps
by name. Embeddings are L2-normalised with eps 1e-12 as `F.normalize` does.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from clapjax import layers as L
from clapjax import text as T
from clapjax.audio.frontend import FrontEndConfig
from clapjax.audio.htsat import HTSAT, HTSATConfig
from clapjax.audio.pann import PANN, PANNConfig
from clapjax.heads import MLPLayers, l2_normalize, projection

_FRONT = dict(sample_rate=48000, mel_bins=64, fmin=50, fmax=14000, window_size=1024, hop_size=480,
              clip_samples=480000, class_num=527)
# laion_clap/clap_module/model_configs/*.json that have an audio tower (the vision ones are unusable)
LAION_AUDIO_CONFIGS: dict[str, dict] = {
    "HTSAT-tiny": dict(_FRONT, model_type="HTSAT", model_name="tiny"),
    "HTSAT-tiny-win-1536": dict(_FRONT, model_type="HTSAT", model_name="tiny", window_size=1536),
    "HTSAT-base": dict(_FRONT, model_type="HTSAT", model_name="base"),
    "HTSAT-large": dict(_FRONT, model_type="HTSAT", model_name="large"),
    "PANN-6": dict(_FRONT, model_type="PANN", model_name="Cnn6"),
    "PANN-10": dict(_FRONT, model_type="PANN", model_name="Cnn10"),
    "PANN-14": dict(_FRONT, model_type="PANN", model_name="Cnn14"),
    "PANN-14-fmax-18k": dict(_FRONT, model_type="PANN", model_name="Cnn14", fmax=18000),
    "PANN-14-fmax-8k-20s": dict(_FRONT, model_type="PANN", model_name="Cnn14", fmax=8000, hop_size=360,
                                clip_samples=960000),
    "PANN-14-win-1536": dict(_FRONT, model_type="PANN", model_name="Cnn14", window_size=1536),
    "PANN-14-tiny-transformer": dict(_FRONT, model_type="PANN", model_name="Cnn14"),
}
# their text_cfg (used only by tmodel='transformer')
LAION_TEXT_CFG = dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=12)
LAION_TEXT_LAYERS = {"PANN-14-tiny-transformer": 4}
LOGIT_SCALE_INIT = math.log(1 / 0.07)
# LAION's audio `model_type` → (architecture config, tower); every tower takes the same input mapping
AUDIO_TOWERS = {"HTSAT": (HTSATConfig, HTSAT), "PANN": (PANNConfig, PANN)}


@dataclasses.dataclass(frozen=True)
class TowerPrecision:
    """One tower's numerics (its heads' too): compute dtype, parameter dtype, activation checkpointing per block.

    bf16 compute with f32 parameters is the usual mixed-precision setting; `remat_policy` names a
    `jax.checkpoint_policies` member (None: recompute everything) and only matters with `remat`."""

    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    remat_policy: str | None = None

    def __post_init__(self):
        for name in ("dtype", "param_dtype"):
            try:
                jnp.dtype(getattr(self, name))
            except TypeError:
                raise ValueError(f"precision {name}={getattr(self, name)!r} is not a dtype name") from None
        if self.remat_policy is not None and not hasattr(jax.checkpoint_policies, self.remat_policy):
            raise ValueError(f"precision remat_policy={self.remat_policy!r} is not a jax.checkpoint_policies name")

    @property
    def layers(self) -> L.Precision:
        """The layer-level dtypes every module takes as `prec`."""
        return L.Precision(jnp.dtype(self.dtype), jnp.dtype(self.param_dtype))

    def tower_kwargs(self) -> dict[str, Any]:
        """The keywords every audio and text tower is built with."""
        return dict(prec=self.layers, remat=self.remat, remat_policy=self.remat_policy)


@dataclasses.dataclass(frozen=True)
class Precision:
    """The `precision` section of `CLAPConfig`: audio and text may differ (e.g. bf16 text, f32 audio)."""

    audio: TowerPrecision = TowerPrecision()
    text: TowerPrecision = TowerPrecision()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Precision":
        unknown = set(d) - {"audio", "text"}
        if unknown:
            raise ValueError(f"precision: unknown sections {sorted(unknown)}; expected 'audio' and 'text'")
        return cls(**{side: _tower_precision(f"precision.{side}", d[side]) for side in ("audio", "text") if side in d})


PRECISION_FIELDS = tuple(f.name for f in dataclasses.fields(TowerPrecision))


def _tower_precision(where: str, fields: Mapping[str, Any]) -> TowerPrecision:
    unknown = set(fields) - set(PRECISION_FIELDS)
    if unknown:
        raise ValueError(f"{where}: unknown fields {sorted(unknown)}; expected some of {list(PRECISION_FIELDS)}")
    return TowerPrecision(**fields)


def _precision_from_saved(d: dict, audio: dict, text: dict) -> Precision:
    """The `precision` section of a saved config, popping the tower-level fields of the layout before it (each
    tower config held its own dtype / param_dtype / remat / remat_policy). Both layouts may be present only where
    they agree: a config that says two things about one tower's numerics is refused, naming both fields."""
    section = dict(d.pop("precision", None) or {})
    for side, tower in (("audio", audio), ("text", text)):
        legacy = {k: tower.pop(k) for k in PRECISION_FIELDS if k in tower}
        given = dict(section.get(side, {}))
        clashes = [f"{side}.{k}={v!r} but precision.{side}.{k}={given[k]!r}" for k, v in legacy.items()
                   if k in given and given[k] != v]
        if clashes:
            raise ValueError(f"config contradicts itself: {'; '.join(clashes)}")
        if legacy or given:
            section[side] = {**legacy, **given}
    return Precision.from_dict(section)


@dataclasses.dataclass(frozen=True)
class CLAPConfig:
    audio: HTSATConfig | PANNConfig
    tmodel: str
    text: T.TextConfig
    amodel: str = ""                 # LAION's config name, informational ('HTSAT-tiny', …)
    joint_embed_shape: int = 512
    mlp_act: str = "relu"
    transform_heads: bool = True     # LAION's mlp-loss heads; HF's ClapModel has none
    precision: Precision = Precision()

    def __post_init__(self):
        expected = T.TOWERS.get(self.tmodel, (None,))[0]
        if expected is None:
            raise ValueError(f"unknown tmodel {self.tmodel!r}; expected one of {sorted(T.TOWERS)}")
        if not isinstance(self.text, expected):
            raise TypeError(f"tmodel {self.tmodel!r} needs a {expected.__name__}, got {type(self.text).__name__}")
        if AUDIO_TOWERS.get(getattr(self.audio, "model_type", None), (None,))[0] is not type(self.audio):
            raise TypeError(f"audio must be one of {[c.__name__ for c, _ in AUDIO_TOWERS.values()]}, "
                            f"got {type(self.audio).__name__}")
        if not isinstance(self.precision, Precision):
            raise TypeError(f"precision must be a Precision, got {type(self.precision).__name__}")

    @property
    def audio_width(self) -> int:
        return self.audio.output_width

    @property
    def enable_fusion(self) -> bool:
        return bool(self.audio.enable_fusion)

    @property
    def frontend(self) -> FrontEndConfig:
        return self.audio.frontend

    @classmethod
    def from_laion(cls, amodel: str = "HTSAT-tiny", tmodel: str = "roberta", enable_fusion: bool = False,
                   fusion_type: str = "aff_2d", *, audio_overrides: Mapping | None = None,
                   text_overrides: Mapping | None = None, **kw) -> "CLAPConfig":
        """What `laion_clap.CLAP_Module(enable_fusion, amodel=, tmodel=)` builds."""
        if amodel not in LAION_AUDIO_CONFIGS:
            raise ValueError(f"unknown amodel {amodel!r}; expected one of {sorted(LAION_AUDIO_CONFIGS)}")
        acfg = LAION_AUDIO_CONFIGS[amodel]
        ftype = fusion_type if enable_fusion else "None"
        builder = AUDIO_TOWERS[acfg["model_type"]][0]
        audio = builder.from_laion(acfg, enable_fusion, ftype, **dict(audio_overrides or {}))
        if tmodel == "transformer":
            tcfg = dict(LAION_TEXT_CFG, layers=LAION_TEXT_LAYERS.get(amodel, 12))
            text = T.ClipTextConfig.from_laion(tcfg, **dict(text_overrides or {}))
        else:
            text = T.default_text_config(tmodel, **dict(text_overrides or {}))
        return cls(audio=audio, tmodel=tmodel, text=text, amodel=amodel, **kw)

    def to_dict(self) -> dict[str, Any]:
        audio = dataclasses.asdict(self.audio)
        audio["model_type"] = self.audio.model_type
        return {"amodel": self.amodel, "tmodel": self.tmodel, "joint_embed_shape": self.joint_embed_shape,
                "mlp_act": self.mlp_act, "transform_heads": self.transform_heads,
                "precision": dataclasses.asdict(self.precision), "audio": audio, "text": dataclasses.asdict(self.text)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CLAPConfig":
        """`to_dict`'s layout, or the one before the `precision` section (dtypes and remat in each tower)."""
        d = dict(d)
        audio, text = dict(d.pop("audio")), dict(d.pop("text"))
        kind = audio.pop("model_type", None)
        if kind not in AUDIO_TOWERS:
            raise ValueError(f"audio.model_type must be one of {sorted(AUDIO_TOWERS)}, got {kind!r}")
        precision = _precision_from_saved(d, audio, text)
        audio["frontend"] = FrontEndConfig(**audio["frontend"])
        audio_cfg = AUDIO_TOWERS[kind][0](**audio)
        return cls(audio=audio_cfg, text=T.text_config_from_dict(d["tmodel"], text), precision=precision, **d)


class LogitScale(nnx.Param):
    """A log temperature (exp'ed at use); excluded from weight decay by name and type."""


class CLAPModel(nnx.Module):
    def __init__(self, cfg: CLAPConfig, rngs: nnx.Rngs):
        self.config = cfg
        audio_prec, text_prec = cfg.precision.audio, cfg.precision.text
        tower = AUDIO_TOWERS[cfg.audio.model_type][1]
        self.audio_branch = tower(cfg.audio, rngs=rngs, **audio_prec.tower_kwargs())
        self.text_branch = T.text_tower(cfg.tmodel, cfg.text, rngs, **text_prec.tower_kwargs())
        joint = cfg.joint_embed_shape
        self.audio_projection = projection(cfg.audio_width, joint, rngs, act=cfg.mlp_act, prec=audio_prec.layers)
        self.text_projection = projection(cfg.text.output_width, joint, rngs, act=cfg.mlp_act, prec=text_prec.layers)
        if cfg.transform_heads:
            self.audio_transform = MLPLayers(joint, rngs, prec=audio_prec.layers)
            self.text_transform = MLPLayers(joint, rngs, prec=text_prec.layers)
        else:
            self.audio_transform = self.text_transform = None
        self.logit_scale_a = LogitScale(jnp.asarray(LOGIT_SCALE_INIT, jnp.float32), logical_axes=())
        self.logit_scale_t = LogitScale(jnp.asarray(LOGIT_SCALE_INIT, jnp.float32), logical_axes=())

    # --- LAION's methods ---------------------------------------------------------------------------
    def encode_audio(self, audio: Mapping[str, jax.Array], *, deterministic: bool = True,
                     rngs: nnx.Rngs | None = None) -> dict[str, jax.Array]:
        """`audio`: the towers' input mapping (`audio.io.model_audio_input` builds it): {'waveform': (B, N)}
        unfused; {'mel_fusion': (B, 4, T, M), 'longer': (B,)} fused."""
        return self.audio_branch(audio, deterministic=deterministic, rngs=rngs)

    def encode_text(self, text: Mapping[str, jax.Array], *, deterministic: bool = True,
                    rngs: nnx.Rngs | None = None, pooled_only: bool = False) -> jax.Array:
        """Projected, un-normalised text features (LAION's `encode_text` includes the projection).
        `pooled_only`: the tower's last layer computes only the token it pools (same result)."""
        out = self.text_branch(text["input_ids"], text.get("attention_mask"), text.get("token_type_ids"),
                               deterministic=deterministic, rngs=rngs, pooled_only=pooled_only)
        return self.text_projection(out.pooled)

    def get_audio_embedding(self, audio: Mapping[str, jax.Array]) -> jax.Array:
        return l2_normalize(self.audio_projection(self.encode_audio(audio)["embedding"]))

    def get_text_embedding(self, text: Mapping[str, jax.Array]) -> jax.Array:
        return l2_normalize(self.encode_text(text, pooled_only=True))

    def __call__(self, audio, text, *, deterministic: bool = True, rngs: nnx.Rngs | None = None):
        """LAION's forward: (audio_f, text_f, audio_f_mlp, text_f_mlp, exp(scale_a), exp(scale_t))."""
        a = l2_normalize(self.audio_projection(
            self.encode_audio(audio, deterministic=deterministic, rngs=rngs)["embedding"]))
        t = l2_normalize(self.encode_text(text, deterministic=deterministic, rngs=rngs))
        a_mlp = t_mlp = None
        if self.audio_transform is not None:
            a_mlp = self.audio_transform(a, deterministic=deterministic, rngs=rngs)
            t_mlp = self.text_transform(t, deterministic=deterministic, rngs=rngs)
        return a, t, a_mlp, t_mlp, jnp.exp(self.logit_scale_a[...]), jnp.exp(self.logit_scale_t[...])
