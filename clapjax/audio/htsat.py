"""HTS-AT, LAION-CLAP's audio tower (`clap_module/htsat.py`), in Flax NNX.

Module names mirror LAION's (`bn0`, `patch_embed.{proj,norm,mel_conv2d,fusion_model}`,
`layers.{i}.blocks.{j}`, `layers.{i}.downsample`, `norm`, `tscam_conv`, `head`) so the PyTorch
state dict maps by name (`convert.audio_keys`). Differences from LAION that are deliberate:

* The STFT kernels and mel filterbank are not variables: `clapjax.audio.frontend` recomputes them
  (checkpoint copies are checked against it on load). The Swin masks and relative position index are
  static constants (`clapjax.audio.swin`).
* Layout is NHWC after `reshape_wav2img`.
* Fusion (`aff_2d`) runs the local branch and AFF on every row and keeps the result only for rows
  with `longer`, so shapes are static and a jitted call accepts any mix of longer / not-longer rows.
  In eval this equals LAION exactly. In training the AFF BatchNorms take their statistics from the
  longer rows only (a `mask`), as LAION's sub-batch does; see `clapjax.audio.fusion` for why LAION's
  duplicate-a-single-row trick needs no counterpart.

`deterministic=False` is LAION's `train()`: BatchNorm on batch statistics (updating the running
ones), SpecAugment, drop-path and, for fused models, flagging one random row as longer when none is.
Randomness comes from `rngs`: stream `dropout` for drop-path, `augment` for SpecAugment and the
forced longer row (either falls back to `default`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clapjax import layers as L
from clapjax.audio import frontend as fe
from clapjax.audio.fusion import AFF, force_one_longer
from clapjax.audio.swin import BasicLayer

SUPPORTED_FUSION = ("aff_2d",)
LAION_FUSION_TYPES = ("daf_1d", "aff_1d", "iaff_1d", "daf_2d", "iaff_2d", "channel_map")
_SIZES = {  # create_htsat_model's hard-coded variants
    "tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(4, 8, 16, 32)),
    "base": dict(embed_dim=128, depths=(2, 2, 12, 2), num_heads=(4, 8, 16, 32)),
    "large": dict(embed_dim=256, depths=(2, 2, 12, 2), num_heads=(4, 8, 16, 32)),
}


@dataclasses.dataclass(frozen=True)
class HTSATConfig:
    """The architecture; the numerics (dtypes, remat) are the tower's constructor arguments (`CLAPConfig.precision`)."""

    model_type: ClassVar[str] = "HTSAT"
    frontend: fe.FrontEndConfig = fe.FrontEndConfig()
    spec_size: int = 256
    patch_size: int = 4
    patch_stride: tuple[int, int] = (4, 4)
    in_chans: int = 1
    num_classes: int = 527
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (4, 8, 16, 32)
    window_size: int = 8
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.1
    layer_norm_eps: float = 1e-5
    enable_fusion: bool = False
    fusion_type: str = "None"
    aff_r: int = 4
    sed_head: bool = True  # tscam_conv + head (LAION has them; HF's ClapAudioModel does not)
    spec_augment: bool = True
    time_drop_width: int = 64
    time_stripes_num: int = 2
    freq_drop_width: int = 8
    freq_stripes_num: int = 2

    def __post_init__(self):
        # accept the JSON form (dict front end, lists) and keep the config hashable
        if isinstance(self.frontend, Mapping):
            object.__setattr__(self, "frontend", fe.FrontEndConfig(**self.frontend))
        for name in ("patch_stride", "depths", "num_heads"):
            v = getattr(self, name)
            object.__setattr__(self, name, (v, v) if name == "patch_stride" and isinstance(v, int) else tuple(v))
        if self.enable_fusion and self.fusion_type not in SUPPORTED_FUSION:
            if self.fusion_type in LAION_FUSION_TYPES:
                raise NotImplementedError(f"HTSAT fusion_type {self.fusion_type!r} is not implemented (only "
                                          f"{SUPPORTED_FUSION}; it is the only one with released weights)")
            raise ValueError(f"unknown fusion_type {self.fusion_type!r}")
        if len(self.depths) != len(self.num_heads) or not self.depths:
            raise ValueError(f"depths {self.depths} and num_heads {self.num_heads} must be equally long")
        if self.spec_size % self.frontend.mel_bins:
            raise ValueError(f"spec_size {self.spec_size} is not a multiple of mel_bins {self.frontend.mel_bins}")
        if self.patch_stride[0] != self.patch_stride[1] or self.spec_size % self.patch_stride[0]:
            raise ValueError(f"patch_stride {self.patch_stride} must be square and divide spec_size")
        grid, n = self.grid, len(self.depths)
        if grid % 2 ** (n - 1):
            raise ValueError(f"a {grid}² patch grid cannot be halved {n - 1} times")
        for i, h in enumerate(self.num_heads):
            res = grid // 2 ** i
            if (self.embed_dim * 2 ** i) % h or (res > self.window_size and res % self.window_size):
                raise ValueError(f"stage {i}: width {self.embed_dim * 2 ** i}, {h} heads, {res}² tokens "
                                 f"do not fit window {self.window_size}")
        if (self.final_grid // self.freq_ratio) < 1 or self.final_grid % self.freq_ratio:
            raise ValueError(f"final {self.final_grid}² grid cannot be regrouped by freq_ratio {self.freq_ratio}")

    # --- variants -------------------------------------------------------------------------------
    @classmethod
    def tiny(cls, **kw) -> "HTSATConfig":
        return cls(**{**_SIZES["tiny"], **kw})

    @classmethod
    def base(cls, **kw) -> "HTSATConfig":
        return cls(**{**_SIZES["base"], **kw})

    @classmethod
    def large(cls, **kw) -> "HTSATConfig":
        return cls(**{**_SIZES["large"], **kw})

    @classmethod
    def from_laion(cls, audio_cfg: Mapping, enable_fusion: bool = False, fusion_type: str = "None",
                   **kw) -> "HTSATConfig":
        """As `create_htsat_model(audio_cfg, enable_fusion, fusion_type)` builds it."""
        if audio_cfg.get("model_type", "HTSAT") != "HTSAT":
            raise ValueError(f"audio_cfg is for {audio_cfg.get('model_type')!r}, not HTSAT")
        name = audio_cfg.get("model_name")
        if name not in _SIZES:
            raise ValueError(f"HTSAT model_name must be one of {sorted(_SIZES)}, got {name!r}")
        return cls(**{**_SIZES[name], "frontend": fe.FrontEndConfig.from_laion(audio_cfg),
                      "num_classes": int(audio_cfg.get("class_num", 527)), "enable_fusion": bool(enable_fusion),
                      "fusion_type": fusion_type if enable_fusion else "None", **kw})

    @classmethod
    def from_hf(cls, hf_config: Any, **kw) -> "HTSATConfig":
        """From a transformers `ClapAudioConfig` (no SED head: HF's audio model has none).

        HF keeps sample rate / STFT / fmin / fmax in `ClapFeatureExtractor`, not in the model config;
        the front end takes LAION's values (those of every released checkpoint) unless `frontend=`.
        """
        if hf_config.enable_fusion and hf_config.fusion_type == "channel_map":
            raise NotImplementedError("HF fusion_type 'channel_map' has no forward path; not implemented")
        stride = hf_config.patch_stride
        return cls(**{"frontend": fe.FrontEndConfig(mel_bins=hf_config.num_mel_bins),
                      "spec_size": hf_config.spec_size, "patch_size": hf_config.patch_size,
                      "patch_stride": stride, "in_chans": hf_config.patch_embed_input_channels,
                      "num_classes": hf_config.num_classes, "embed_dim": hf_config.patch_embeds_hidden_size,
                      "depths": hf_config.depths, "num_heads": hf_config.num_attention_heads,
                      "window_size": hf_config.window_size, "mlp_ratio": hf_config.mlp_ratio,
                      "qkv_bias": hf_config.qkv_bias, "drop_path_rate": hf_config.drop_path_rate,
                      "layer_norm_eps": hf_config.layer_norm_eps, "enable_fusion": hf_config.enable_fusion,
                      "fusion_type": "aff_2d" if hf_config.enable_fusion else "None",
                      "aff_r": hf_config.aff_block_r, "sed_head": False, **kw})

    # --- derived --------------------------------------------------------------------------------
    @property
    def freq_ratio(self) -> int:
        return self.spec_size // self.frontend.mel_bins

    @property
    def grid(self) -> int:
        """Side of the patch grid entering stage 0 (64)."""
        return self.spec_size // self.patch_stride[0]

    @property
    def final_grid(self) -> int:
        return self.grid // 2 ** (len(self.depths) - 1)

    @property
    def num_features(self) -> int:
        return self.embed_dim * 2 ** (len(self.depths) - 1)

    @property
    def output_width(self) -> int:
        """Width of the `embedding` output (what CLAP projects), the same property on every audio tower config."""
        return self.num_features

    @property
    def fused(self) -> bool:
        return self.enable_fusion and self.fusion_type == "aff_2d"


# --- modules -------------------------------------------------------------------------------------

class PatchEmbed(nnx.Module):
    """Conv patches of channel 0 (+ for aff_2d: `mel_conv2d` on channels 1.. fused by AFF) → LN."""

    def __init__(self, cfg: HTSATConfig, rngs: nnx.Rngs, prec: L.Precision):
        p, e = prec, cfg.embed_dim
        k, s = cfg.patch_size, cfg.patch_stride
        pad = ((k - s[0]) // 2, (k - s[1]) // 2)
        self.fused = cfg.fused
        self.proj = L.conv2d(cfg.in_chans, e, k, rngs, stride=s, padding=pad, prec=p)
        self.norm = L.layer_norm(e, cfg.layer_norm_eps, rngs, prec=p)
        if cfg.fused:
            self.mel_conv2d = L.conv2d(cfg.in_chans, e, (k, 3 * k), rngs, stride=(s[0], 3 * s[1]), padding=pad,
                                       prec=p)
            self.fusion_model = AFF(e, rngs, r=cfg.aff_r, prec=p)

    def __call__(self, img: jax.Array, longer: jax.Array | None = None, *,
                 deterministic: bool = True) -> jax.Array:
        """img (B, H, W, C) NHWC → (B, h, w, E) token grid (after `norm`)."""
        x = self.proj(img[..., :1] if self.fused else img)
        if self.fused:
            b, h, w, e = x.shape
            n_local = img.shape[-1] - 1
            local = jnp.moveaxis(img[..., 1:], -1, 1).reshape(b * n_local, *img.shape[1:3], 1)
            local = self.mel_conv2d(local)                                 # (B·3, h, w', E)
            wl = local.shape[2]
            # LAION lays the three local crops side by side along time: column c·w' + t
            local = local.reshape(b, n_local, h, wl, e).transpose(0, 2, 1, 3, 4).reshape(b, h, n_local * wl, e)
            if n_local * wl < w:
                local = jnp.pad(local, ((0, 0), (0, 0), (0, w - n_local * wl), (0, 0)))
            else:
                local = local[:, :, :w]
            fused = self.fusion_model(x, local, deterministic=deterministic, rows=longer)
            x = jnp.where(longer[:, None, None, None], fused, x)
        return self.norm(x)


class HTSAT(nnx.Module):
    """LAION's `HTSAT_Swin_Transformer`: the audio towers' input mapping ({'waveform'} unfused, {'mel_fusion',
    'longer'} fused: `frontend.tower_input`) → dict of embeddings and SED outputs. `prec` sets the compute and
    parameter dtypes, `remat` / `remat_policy` checkpoint each Swin block's activations (`CLAPConfig.precision`).

    Output keys: `embedding` (B, D) = mean of the final tokens (what CLAP projects);
    `last_hidden_state` (B, h·w, D) final-LN tokens, row-major over the 8×8 grid (rows: the
    frequency-stacked image axis, columns: time); `fine_grained_embedding` (B, 1024, D); with the SED
    head also `clipwise_output` (B, classes) and `framewise_output` (B, 1024, classes), sigmoided.
    """

    def __init__(self, cfg: HTSATConfig, rngs: nnx.Rngs, *, prec: L.Precision = L.Precision(), remat: bool = False,
                 remat_policy: str | None = None):
        self.cfg = cfg
        self.compute_dtype = prec.dtype
        p, eps = prec, cfg.layer_norm_eps
        # bn0 normalises dB values (tens of dB): kept in float32 whatever the compute dtype
        self.bn0 = L.batch_norm(cfg.frontend.mel_bins, rngs, prec=L.Precision(jnp.float32, p.param_dtype))
        self.patch_embed = PatchEmbed(cfg, rngs, p)
        rates = np.linspace(0.0, cfg.drop_path_rate, sum(cfg.depths)).tolist()
        layers, start = [], 0
        for i, (depth, heads) in enumerate(zip(cfg.depths, cfg.num_heads)):
            layers.append(BasicLayer(cfg.embed_dim * 2 ** i, cfg.grid // 2 ** i, depth, heads, cfg.window_size,
                                     rates[start:start + depth], rngs, downsample=i < len(cfg.depths) - 1,
                                     mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, eps=eps, remat=remat,
                                     remat_policy=remat_policy, prec=p))
            start += depth
        self.layers = nnx.List(layers)
        self.norm = L.layer_norm(cfg.num_features, eps, rngs, prec=p)
        if cfg.sed_head:
            sf = cfg.final_grid // cfg.freq_ratio
            self.tscam_conv = L.conv2d(cfg.num_features, cfg.num_classes, (sf, 3), rngs, padding=(0, 1), prec=p)
            # LAION builds `head` but never calls it; kept so checkpoints load and export whole
            self.head = L.linear(cfg.num_classes, cfg.num_classes, (None, None), rngs, prec=p, init_std=0.02)
        else:
            self.tscam_conv = None
            self.head = None

    def __call__(self, inputs: Mapping[str, jax.Array], *, deterministic: bool = True,
                 rngs: nnx.Rngs | None = None) -> dict[str, jax.Array]:
        cfg = self.cfg
        randomised = cfg.drop_path_rate > 0 or cfg.spec_augment or cfg.fused
        if not deterministic and randomised and rngs is None:
            raise ValueError("deterministic=False (training) needs rngs for drop-path / SpecAugment")
        x, longer = fe.tower_input(inputs, cfg.frontend, cfg.fused, "HTSAT")
        if longer is None:
            x = x[:, None]                                            # (B, 1, T, F): one channel
        x = self.bn0(x.astype(jnp.float32), use_running_average=deterministic)  # BN over mel bins
        if not deterministic and cfg.spec_augment:
            x = fe.spec_augment(x, rngs.augment(), time_width=cfg.time_drop_width, time_stripes=cfg.time_stripes_num,
                                freq_width=cfg.freq_drop_width, freq_stripes=cfg.freq_stripes_num)
        if longer is not None and not deterministic:
            longer = force_one_longer(longer, rngs.augment())
        img = fe.reshape_wav2img(x, cfg.spec_size, cfg.freq_ratio)   # (B, C, S, S)
        img = jnp.transpose(img, (0, 2, 3, 1)).astype(self.compute_dtype)
        x = self.patch_embed(img, longer, deterministic=deterministic)
        for layer in self.layers:
            x = layer(x, deterministic=deterministic, rngs=rngs)
        x = self.norm(x)                                              # (B, h, w, D)
        return self._heads(x)

    def _heads(self, x: jax.Array) -> dict[str, jax.Array]:
        cfg = self.cfg
        b, h, w, d = x.shape
        chunks = cfg.freq_ratio
        # LAION's "group 2D CNN": the image rows are `chunks` time chunks stacked over frequency;
        # put them back side by side along time → (B, h/chunks, chunks·w, D)
        grouped = x.reshape(b, chunks, h // chunks, w, d).transpose(0, 2, 1, 3, 4).reshape(b, h // chunks, -1, d)
        upsample = 8 * cfg.patch_stride[1]  # LAION's hard-coded `interpolate` ratio (32)
        out = {
            "embedding": jnp.mean(grouped, axis=(1, 2)),
            "last_hidden_state": x.reshape(b, h * w, d),
            "fine_grained_embedding": jnp.repeat(jnp.mean(grouped, axis=1), upsample, axis=1),
        }
        if self.tscam_conv is not None:
            logits = self.tscam_conv(grouped)[:, 0]                   # (B, time, classes)
            out["framewise_output"] = jnp.repeat(jax.nn.sigmoid(logits), upsample, axis=1)
            out["clipwise_output"] = jax.nn.sigmoid(jnp.mean(logits, axis=1))
        return out
