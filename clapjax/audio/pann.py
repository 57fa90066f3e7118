"""PANN audio towers (Cnn6, Cnn10, Cnn14, and Cnn14 with aff_2d fusion), as LAION-CLAP builds them.

Attribute names mirror `laion_clap/clap_module/pann_model.py` (`bn0`, `conv_blockN.conv1/bn1/...`,
`fc1`, `fc_audioset`, `mel_conv2d.{0,1}`, `fusion_model.*`) so `convert.pann_keys` derives the
state-dict keys from the module tree. Inside the convolutions the layout is NHWC with H = time
frames and W = mel bins (PyTorch: NCHW with the same H/W meaning).

Deliberate deviations from LAION's code (bugs we do not reproduce):
- Cnn6 / Cnn10 `forward` hand the whole input dict to the spectrogram extractor and crash; only
  Cnn14 reads `input['waveform']`. All three towers read `inputs['waveform']` here.
- Cnn14's fusion branch flags a random sample as `longer` whenever none is, in eval too, so eval
  outputs of an all-short batch depend on torch's RNG. We do that only in training
  (`deterministic=False`), where it is meant to keep the fusion weights in the gradient; in eval
  the flags are used as given.
- LAION hard-codes `bn0 = BatchNorm2d(64)`; we size it with `mel_bins` (64 in every config).
Randomness in training comes from `rngs`, as in `clapjax.audio.htsat`: stream `dropout` for dropout,
`augment` for SpecAugment and the forced longer row (either falls back to `default`).
Not ported: spectrogram mixup (`mixup_lambda`, never wired into LAION's training loop) and the
fusion types without released weights (daf/iaff, *_1d, channel_map).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from clapjax import layers
from clapjax.audio.frontend import FrontEndConfig, fusion_flags, spec_augment, tower_input
from clapjax.audio.fusion import AFF, ReLU, force_one_longer

# LAION's Cnn6/10/14: conv block type, output channels per block, time upsampling of the
# fine-grained embedding (undoes the blocks' 2x time pooling: 2^4 = 16, 2^5 = 32).
ARCHITECTURES = {
    "Cnn6": dict(block="5x5", channels=(64, 128, 256, 512), upsample=16),
    "Cnn10": dict(block="3x3", channels=(64, 128, 256, 512, 1024), upsample=32),
    "Cnn14": dict(block="3x3", channels=(64, 128, 256, 512, 1024, 2048), upsample=32),
}
FUSION_TYPES = ("None", "aff_2d")  # the only fusion type with released (HTSAT) weights
# torchlibrosa SpecAugmentation as LAION configures it: 2 time stripes < 64 frames, 2 mel stripes < 8 bins.
SPEC_AUGMENT = dict(time_width=64, time_stripes=2, freq_width=8, freq_stripes=2)
# model_configs/PANN-14.json's audio_cfg front end (PANN-6 / PANN-10 use the same).
LAION_PANN_AUDIO = dict(sample_rate=48000, window_size=1024, hop_size=480, mel_bins=64, fmin=50, fmax=14000,
                        clip_samples=480000)


@dataclasses.dataclass(frozen=True)
class PANNConfig:
    """The architecture; the numerics (dtypes) are the tower's constructor arguments (`CLAPConfig.precision`)."""

    model_type: ClassVar[str] = "PANN"
    model_name: str = "Cnn14"
    frontend: FrontEndConfig = dataclasses.field(default_factory=lambda: FrontEndConfig.from_laion(LAION_PANN_AUDIO))
    class_num: int = 527
    enable_fusion: bool = False
    fusion_type: str = "None"
    block_dropout: float = 0.2   # after every conv block (training only)
    head_dropout: float = 0.5    # around fc1 (training only)
    spec_augment: bool = True    # SpecAugment in training, as LAION does

    def __post_init__(self):
        if self.model_name not in ARCHITECTURES:
            raise ValueError(f"unknown PANN model_name {self.model_name!r}; expected one of {sorted(ARCHITECTURES)}")
        if self.enable_fusion:
            if self.fusion_type not in FUSION_TYPES[1:]:
                raise ValueError(f"fusion_type {self.fusion_type!r} is not implemented; expected one of "
                                 f"{list(FUSION_TYPES[1:])} with enable_fusion=True")
            if self.model_name != "Cnn14":
                raise ValueError(f"LAION implements feature fusion only for Cnn14, not {self.model_name}")

    @property
    def embed_dim(self) -> int:
        return ARCHITECTURES[self.model_name]["channels"][-1]

    @property
    def output_width(self) -> int:
        """Width of the `embedding` output (what CLAP projects), the same property on every audio tower config."""
        return self.embed_dim

    @classmethod
    def from_laion(cls, audio_cfg: Mapping, enable_fusion: bool = False, fusion_type: str = "None",
                   **overrides) -> "PANNConfig":
        """From a LAION model config's `audio_cfg` (model_type 'PANN') and CLAP's fusion arguments."""
        audio_cfg = dict(audio_cfg)
        if audio_cfg.get("model_type", "PANN") != "PANN":
            raise ValueError(f"audio_cfg model_type is {audio_cfg['model_type']!r}, not 'PANN'")
        return cls(model_name=audio_cfg.get("model_name", "Cnn14"),
                   frontend=FrontEndConfig.from_laion(audio_cfg),
                   class_num=int(audio_cfg.get("class_num", 527)),
                   enable_fusion=bool(enable_fusion),
                   fusion_type=fusion_type if enable_fusion else "None", **overrides)


def _xavier_uniform(layer: nnx.Module, rngs: nnx.Rngs) -> None:
    """LAION's `init_layer`: Xavier-uniform weights (a conv's fans include its kernel area)."""
    kernel = layer.kernel
    kernel.set_value(nnx.initializers.xavier_uniform()(rngs.params(), kernel.shape, kernel.get_value().dtype))


def _avg_pool(x: jax.Array, pool: tuple[int, int]) -> jax.Array:
    """`F.avg_pool2d(kernel=pool)` on NHWC: non-overlapping windows, trailing rows dropped (floor)."""
    ph, pw = pool
    if (ph, pw) == (1, 1):
        return x
    b, h, w, c = x.shape
    h2, w2 = h // ph, w // pw
    x = x[:, :h2 * ph, :w2 * pw]
    return x.reshape(b, h2, ph, w2, pw, c).mean(axis=(2, 4))


class ConvBlock(nnx.Module):
    """Two [3x3 conv (no bias), BN, ReLU] then average pooling."""

    def __init__(self, cin: int, cout: int, rngs: nnx.Rngs, *, prec: layers.Precision):
        self.conv1 = layers.conv2d(cin, cout, 3, rngs, padding=1, use_bias=False, prec=prec)
        self.bn1 = layers.batch_norm(cout, rngs, prec=prec)
        self.conv2 = layers.conv2d(cout, cout, 3, rngs, padding=1, use_bias=False, prec=prec)
        self.bn2 = layers.batch_norm(cout, rngs, prec=prec)
        _xavier_uniform(self.conv1, rngs)
        _xavier_uniform(self.conv2, rngs)

    def __call__(self, x, pool, *, deterministic: bool = True):
        x = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=deterministic))
        x = jax.nn.relu(self.bn2(self.conv2(x), use_running_average=deterministic))
        return _avg_pool(x, pool)


class ConvBlock5x5(nnx.Module):
    """One [5x5 conv (no bias), BN, ReLU] then average pooling (Cnn6)."""

    def __init__(self, cin: int, cout: int, rngs: nnx.Rngs, *, prec: layers.Precision):
        self.conv1 = layers.conv2d(cin, cout, 5, rngs, padding=2, use_bias=False, prec=prec)
        self.bn1 = layers.batch_norm(cout, rngs, prec=prec)
        _xavier_uniform(self.conv1, rngs)

    def __call__(self, x, pool, *, deterministic: bool = True):
        x = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=deterministic))
        return _avg_pool(x, pool)


def _time_pool3(x: jax.Array) -> jax.Array:
    """`max_pool1d(3, 1, 1) + avg_pool1d(3, 1, 1)` over time of (B, T, C); the average counts the
    zero padding (PyTorch's count_include_pad=True), the max ignores it."""
    neg = jnp.full_like(x[:, :1], -jnp.inf)
    zero = jnp.zeros_like(x[:, :1])
    prev_m, next_m = jnp.concatenate([neg, x[:, :-1]], 1), jnp.concatenate([x[:, 1:], neg], 1)
    prev_a, next_a = jnp.concatenate([zero, x[:, :-1]], 1), jnp.concatenate([x[:, 1:], zero], 1)
    return jnp.maximum(jnp.maximum(prev_m, x), next_m) + (prev_a + x + next_a) / 3


class PANN(nnx.Module):
    """A LAION PANN audio branch. `__call__(inputs)` takes the audio towers' input mapping
    (`frontend.tower_input`): `waveform` (B, N) without fusion; `mel_fusion` (B, 4, T, mel_bins) and
    `longer` (B,) or (B, 1) with fusion. Returns LAION's output dict: `embedding` (B, D), `clipwise_output`
    (B, class_num) and `fine_grained_embedding` (B, T', D) (frame-level, time upsampled by 16 or 32 by
    repetition). `prec` sets the compute and parameter dtypes; LAION's PANNs have no per-block activation
    checkpointing, so `remat` is refused (the keyword exists because every audio tower takes it)."""

    def __init__(self, config: PANNConfig, *, rngs: nnx.Rngs, prec: layers.Precision = layers.Precision(),
                 remat: bool = False, remat_policy: str | None = None):
        if remat:
            raise ValueError(f"a PANN audio tower has no activation checkpointing: remat must be False (got "
                             f"remat=True, remat_policy={remat_policy!r}; the trainer's model.remat, "
                             f"CLAPConfig.precision.audio.remat)")
        self.config = config
        self.compute_dtype = prec.dtype
        arch = ARCHITECTURES[config.model_name]
        mel_bins = config.frontend.mel_bins
        self.bn0 = layers.batch_norm(mel_bins, rngs, prec=prec)  # per mel bin
        block = ConvBlock5x5 if arch["block"] == "5x5" else ConvBlock
        chans = (1,) + tuple(arch["channels"])
        for i, (cin, cout) in enumerate(zip(chans[:-1], chans[1:]), start=1):
            setattr(self, f"conv_block{i}", block(cin, cout, rngs, prec=prec))
        d = chans[-1]
        self.fc1 = layers.linear(d, d, ("embed", "mlp"), rngs, prec=prec)
        self.fc_audioset = layers.linear(d, config.class_num, ("embed", "classes"), rngs, prec=prec)
        _xavier_uniform(self.fc1, rngs)
        _xavier_uniform(self.fc_audioset, rngs)
        if config.enable_fusion:
            # Sequential(Conv2d(1, 64, 5, stride=(6, 2), padding=2), BatchNorm2d(64), ReLU)
            self.mel_conv2d = nnx.List([
                layers.conv2d(1, 64, 5, rngs, stride=(6, 2), padding=2, prec=prec),
                layers.batch_norm(64, rngs, prec=prec), ReLU()])
            self.fusion_model = AFF(64, rngs, prec=prec)
        self.block_dropout = nnx.Dropout(config.block_dropout)
        self.head_dropout = nnx.Dropout(config.head_dropout)
        self.num_blocks = len(arch["channels"])

    # --- entry points -------------------------------------------------------------------------

    def __call__(self, inputs: Mapping[str, jax.Array], *, deterministic: bool = True,
                 rngs: nnx.Rngs | None = None) -> dict[str, jax.Array]:
        mel, longer = tower_input(inputs, self.config.frontend, self.config.enable_fusion, "PANN")
        return self.encode_mel(mel, longer, deterministic=deterministic, rngs=rngs)

    def encode_mel(self, mel: jax.Array, longer: jax.Array | None = None, *, deterministic: bool = True,
                   rngs: nnx.Rngs | None = None) -> dict[str, jax.Array]:
        """From log-mel: (B, T, mel_bins) without fusion, (B, 4, T, mel_bins) + `longer` with fusion."""
        cfg = self.config
        if not deterministic and rngs is None:
            raise ValueError("deterministic=False (training) needs rngs for dropout and SpecAugment")
        mel = jnp.asarray(mel)
        want_ndim = 4 if cfg.enable_fusion else 3
        if mel.ndim != want_ndim or mel.shape[-1] != cfg.frontend.mel_bins:
            raise ValueError(f"log-mel must be ({'B, 4, T' if cfg.enable_fusion else 'B, T'}, "
                             f"{cfg.frontend.mel_bins}), got shape {mel.shape}")
        min_frames = 2 ** min(self.num_blocks, 5)
        if mel.shape[-2] < min_frames:
            raise ValueError(f"{cfg.model_name} needs at least {min_frames} frames, got {mel.shape[-2]}")
        x = mel.astype(self.compute_dtype)
        if x.ndim == 3:
            x = x[:, None]  # (B, C=1, T, F): channels are the fusion's 4 mel views
        x = self.bn0(x, use_running_average=deterministic)  # feature axis -1 = mel bins
        if not deterministic and cfg.spec_augment:
            x = spec_augment(x, rngs.augment(), **SPEC_AUGMENT)

        if cfg.enable_fusion:
            x = self._fused_block1(x, longer, deterministic=deterministic, rngs=rngs)
        else:
            x = self.conv_block1(x[:, 0, :, :, None], (2, 2), deterministic=deterministic)
        x = self.block_dropout(x, deterministic=deterministic, rngs=rngs)
        for i in range(2, self.num_blocks + 1):
            pool = (1, 1) if (cfg.model_name == "Cnn14" and i == 6) else (2, 2)
            x = getattr(self, f"conv_block{i}")(x, pool, deterministic=deterministic)
            x = self.block_dropout(x, deterministic=deterministic, rngs=rngs)
        return self._head(x.mean(axis=2), deterministic=deterministic, rngs=rngs)  # mean over mel bins

    # --- pieces -------------------------------------------------------------------------------

    def _fused_block1(self, x, longer, *, deterministic, rngs):
        """conv_block1 on view 0, fused by AFF with the mel_conv2d features of views 1..3 on the
        `longer` rows. Every row is computed and `jnp.where` keeps the fused ones: static shapes."""
        b, c, t, f = x.shape
        if c != 4:
            raise ValueError(f"mel_fusion must have 4 views (global + 3 local chunks), got {c}")
        if longer is None:
            raise ValueError("a fusion PANN needs `longer` flags, shape (B,) or (B, 1)")
        longer = fusion_flags(longer, b)
        if not deterministic:  # LAION's Cnn14 does this in eval too, a bug we leave out (module docstring)
            longer = force_one_longer(longer, rngs.augment())

        g = self.conv_block1(x[:, 0, :, :, None], (2, 2), deterministic=deterministic)  # (B, T/2, F/2, 64)
        conv, bn, relu = self.mel_conv2d
        local = conv(x[:, 1:].reshape(b * 3, t, f, 1))
        # in training, BatchNorm statistics over the longer rows' views only (LAION's sub-batch)
        local = relu(bn(local, use_running_average=deterministic,
                        mask=None if deterministic else jnp.repeat(longer, 3)[:, None, None, None]))
        _, tl, fl, ch = local.shape
        # PyTorch concatenates the three local views along time: (B, 64, 3·T', F') → ours (B, 3·T', F', 64)
        local = local.reshape(b, 3 * tl, fl, ch)
        th = g.shape[1]
        if local.shape[1] < th:
            local = jnp.pad(local, ((0, 0), (0, th - local.shape[1]), (0, 0), (0, 0)))
        local = local[:, :th]
        if local.shape[2] != g.shape[2]:
            raise ValueError(f"local width {local.shape[2]} != global width {g.shape[2]} (mel_bins must be 64)")
        fused = self.fusion_model(g, local, deterministic=deterministic, rows=longer)
        return jnp.where(longer[:, None, None, None], fused, g)

    def _head(self, x, *, deterministic, rngs):
        """x (B, T, C) after the mean over mel bins."""
        latent = jax.nn.relu(self.fc1(_time_pool3(x)))
        fine = jnp.repeat(latent, ARCHITECTURES[self.config.model_name]["upsample"], axis=1)
        x = x.max(axis=1) + x.mean(axis=1)
        x = self.head_dropout(x, deterministic=deterministic, rngs=rngs)
        x = jax.nn.relu(self.fc1(x))
        embedding = self.head_dropout(x, deterministic=deterministic, rngs=rngs)
        # LAION's classifier reads fc1's output before the second dropout
        clipwise = jax.nn.sigmoid(self.fc_audioset(x))
        return {"clipwise_output": clipwise, "embedding": embedding, "fine_grained_embedding": fine}
