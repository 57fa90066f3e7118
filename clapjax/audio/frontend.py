"""The audio front end: waveform → log-mel spectrogram, and HTSAT's spectrogram → image reshape.

Everything here equals LAION-CLAP's PyTorch front end to float32 round-off:

* `stft_power` / `log_mel` with the Slaney bank = torchlibrosa `Spectrogram` + `LogmelFilterBank`, the
  in-model front end of every HTSAT/PANN tower (and HF `ClapFeatureExtractor` with `rand_trunc`);
* with the HTK bank = torchaudio `MelSpectrogram(norm=None)` + `AmplitudeToDB`, LAION's `get_mel` for
  fusion inputs (and HF's `fusion` path);
* `reshape_wav2img` = HTSAT's `reshape_wav2img` (bicubic time resize 1001 → 1024, then 4 time chunks
  stacked along frequency).

The filterbanks, the STFT kernels and the bicubic matrices are built on the host in float64 and cast
once to float32; the transforms are jit-able JAX functions that run batched on the device. Matmuls
pin `Precision.HIGHEST` because XLA on GPU would otherwise use TF32 for float32 and lose ~3 digits;
the bicubic resize runs as a four-tap stencil in PyTorch's summation order (bit-identical to it).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Literal, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning

MelKind = Literal["slaney", "htk"]
_HIGHEST = jax.lax.Precision.HIGHEST
AMIN = 1e-10  # power floor of both torchlibrosa's power_to_db and torchaudio's AmplitudeToDB


@dataclasses.dataclass(frozen=True)
class FrontEndConfig:
    """LAION's `audio_cfg` front-end fields; `window_size` is both n_fft and the window length."""

    sample_rate: int = 48000
    window_size: int = 1024
    hop_size: int = 480
    mel_bins: int = 64
    fmin: float = 50.0
    fmax: float = 14000.0
    clip_samples: int = 480000

    def __post_init__(self):
        for name in ("sample_rate", "window_size", "hop_size", "mel_bins", "clip_samples"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"FrontEndConfig.{name} must be a positive int, got {v!r}")
        if not 0.0 <= self.fmin < self.fmax <= self.sample_rate / 2:
            raise ValueError(f"FrontEndConfig needs 0 <= fmin < fmax <= sample_rate/2, got fmin={self.fmin}, "
                             f"fmax={self.fmax}, sample_rate={self.sample_rate}")

    @property
    def n_fft(self) -> int:
        return self.window_size

    @property
    def n_freqs(self) -> int:
        return self.window_size // 2 + 1

    @property
    def clip_frames(self) -> int:
        """Frames of one centred STFT over `clip_samples` (480000 → 1001)."""
        return self.clip_samples // self.hop_size + 1

    @classmethod
    def from_laion(cls, audio_cfg: Mapping) -> "FrontEndConfig":
        """From a LAION model config's `audio_cfg` dict (extra keys such as class_num are ignored)."""
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in audio_cfg]
        if missing:
            raise ValueError(f"audio_cfg lacks front-end keys {missing}")
        return cls(**{n: (float(audio_cfg[n]) if n in ("fmin", "fmax") else int(audio_cfg[n])) for n in names})


# --- host-side constants (float64 numpy, cast once) ------------------------------------------

def _hz_to_mel_slaney(f: np.ndarray) -> np.ndarray:
    """Slaney's Auditory Toolbox scale: linear (200/3 Hz per mel) below 1 kHz, logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    safe = np.maximum(f, min_log_hz)  # keep log() away from 0; those entries take the linear branch
    return np.where(f >= min_log_hz, min_log_mel + np.log(safe / min_log_hz) / logstep, f / f_sp)


def _mel_to_hz_slaney(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


def _hz_to_mel_htk(f):
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def _mel_to_hz_htk(m):
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(cfg: FrontEndConfig, kind: MelKind = "slaney") -> np.ndarray:
    """Triangular mel filters, (n_fft//2+1, mel_bins) float32, to right-multiply a power spectrum.

    'slaney': Slaney scale with area normalisation 2/(f[i+2]-f[i]) = librosa.filters.mel defaults =
    torchlibrosa's `melW`. 'htk': HTK scale, peak 1, no normalisation = torchaudio's default bank.
    """
    if kind == "slaney":
        to_mel, to_hz = _hz_to_mel_slaney, _mel_to_hz_slaney
    elif kind == "htk":
        to_mel, to_hz = _hz_to_mel_htk, _mel_to_hz_htk
    else:
        raise ValueError(f"unknown mel filterbank kind {kind!r}; expected 'slaney' or 'htk'")
    fft_hz = np.arange(cfg.n_freqs, dtype=np.float64) * (cfg.sample_rate / cfg.n_fft)
    edges_hz = to_hz(np.linspace(to_mel(cfg.fmin), to_mel(cfg.fmax), cfg.mel_bins + 2))
    widths = np.diff(edges_hz)                                   # (mel_bins+1,)
    dist = edges_hz[:, None] - fft_hz[None, :]                   # (mel_bins+2, n_freqs)
    rising = -dist[:-2] / widths[:-1, None]
    falling = dist[2:] / widths[1:, None]
    bank = np.maximum(0.0, np.minimum(rising, falling))          # (mel_bins, n_freqs)
    if kind == "slaney":
        bank *= (2.0 / (edges_hz[2:] - edges_hz[:-2]))[:, None]
    return np.ascontiguousarray(bank.T.astype(np.float32))


def hann_window(n: int) -> np.ndarray:
    """Periodic ("fftbins") Hann window, float64: scipy/librosa `hann` and `torch.hann_window`."""
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)


@functools.lru_cache(maxsize=8)
def stft_kernels(cfg: FrontEndConfig) -> tuple[np.ndarray, np.ndarray]:
    """torchlibrosa's STFT Conv1d weights, each (n_fft//2+1, 1, n_fft) float32, read-only (cached:
    every checkpoint check of the stored kernels compares against them).

    real[k, 0, n] = cos(2πkn/N)·w[n], imag[k, 0, n] = −sin(2πkn/N)·w[n]: what checkpoints store as
    `spectrogram_extractor.stft.conv_real.weight` / `conv_imag.weight`. Reducing k·n mod N keeps the
    angle exact before the trig functions.
    """
    n = cfg.n_fft
    kn = np.mod(np.outer(np.arange(cfg.n_freqs), np.arange(n)), n).astype(np.float64)
    angle = 2.0 * np.pi * kn / n
    w = hann_window(n)[None, :]
    real = (np.cos(angle) * w).astype(np.float32)[:, None, :]
    imag = (-np.sin(angle) * w).astype(np.float32)[:, None, :]
    real.flags.writeable = imag.flags.writeable = False
    return real, imag


@functools.lru_cache(maxsize=None)
def _cached_bank(cfg: FrontEndConfig, kind: str) -> np.ndarray:
    bank = mel_filterbank(cfg, kind)
    bank.flags.writeable = False
    return bank


# --- device-side transforms ------------------------------------------------------------------

def _as_batch(waveform) -> jax.Array:
    x = jnp.asarray(waveform)
    if x.ndim != 2:
        raise ValueError(f"waveform must be (batch, samples), got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"waveform must be floating point, got {x.dtype}")
    return x


def frame_signal(waveform, cfg: FrontEndConfig) -> jax.Array:
    """Centre reflect-pad by n_fft//2 and cut (B, T, n_fft) frames every hop samples."""
    x = _as_batch(waveform)
    pad = cfg.n_fft // 2
    if x.shape[1] <= pad:
        raise ValueError(f"waveform of {x.shape[1]} samples is too short for reflect padding by {pad} "
                         f"(needs more than n_fft//2 samples)")
    x = jnp.pad(x, ((0, 0), (pad, pad)), mode="reflect")  # torch/numpy 'reflect': edge not repeated
    n_frames = (x.shape[1] - cfg.n_fft) // cfg.hop_size + 1
    idx = np.arange(n_frames)[:, None] * cfg.hop_size + np.arange(cfg.n_fft)[None, :]
    return x[:, idx]


def stft_power(waveform, cfg: FrontEndConfig) -> jax.Array:
    """|STFT|² of a (B, N) batch: (B, N//hop + 1, n_fft//2+1), periodic Hann, centre reflect padding.

    Uses the FFT rather than torchlibrosa's direct-DFT convolution: same values (the DFT is the DFT),
    a fraction of the flops, and its round-off is far below the float32 noise of the reference.
    """
    frames = frame_signal(waveform, cfg)
    dtype = jnp.promote_types(frames.dtype, jnp.float32)
    window = jnp.asarray(hann_window(cfg.n_fft), dtype)
    spec = _rfft(frames.astype(dtype) * window)
    return jnp.square(spec.real) + jnp.square(spec.imag)


# XLA's SPMD partitioners (GSPMD and Shardy alike) do not treat an FFT's leading dimensions as batch
# dimensions: a batch-sharded operand is all-gathered and every device transforms the whole batch.
# On the demo's 8 CPU devices that made the front end 20× slower than sharded and most of a training
# step; on a pod every chip would transform the global batch. `_rfft` declares the transform
# batch-parallel (JAX's custom_partitioning, the documented remedy), so each device transforms its
# own rows and the values are the plain FFT's, bit for bit. The partitioner callbacks only keep the
# operand's sharding of the leading dimensions (the one placement rule outside clapjax.train.sharding,
# since the core cannot import the trainer); the last dimension is always whole.
def _leading_dims_sharding(arg_shape):
    spec = tuple(arg_shape.sharding.spec) + (None,) * len(arg_shape.shape)
    return jax.sharding.NamedSharding(arg_shape.sharding.mesh,
                                      jax.sharding.PartitionSpec(*spec[:len(arg_shape.shape) - 1], None))


def _plain_rfft(x):
    return jnp.fft.rfft(x, axis=-1)


def _partition_rfft(mesh, arg_shapes, result_shape):
    keep = _leading_dims_sharding(arg_shapes[0])
    return mesh, _plain_rfft, keep, (keep,)


_partitioned_rfft = custom_partitioning(_plain_rfft)
_partitioned_rfft.def_partition(
    partition=_partition_rfft, infer_sharding_from_operands=lambda mesh, args, result: _leading_dims_sharding(args[0]),
    sharding_rule="... n -> ... k", need_replication_factors=("n", "k"))


@jax.custom_vjp
def _rfft(x):
    """rfft over the last axis, partitioned over the leading ones (custom_partitioning has no
    autodiff rule, so the gradient, for whoever differentiates through the front end, is the plain FFT's)."""
    return _partitioned_rfft(x)


def _rfft_fwd(x):
    return _partitioned_rfft(x), x


def _rfft_bwd(x, g):
    return jax.vjp(_plain_rfft, x)[1](g)


_rfft.defvjp(_rfft_fwd, _rfft_bwd)


def power_to_db(power: jax.Array) -> jax.Array:
    """10·log10(max(power, 1e-10)) with ref 1 and no top_db (torchlibrosa and torchaudio settings)."""
    return 10.0 * jnp.log10(jnp.maximum(power, AMIN))


def mel_power(waveform, cfg: FrontEndConfig, kind: MelKind = "slaney") -> jax.Array:
    """Mel-band power (B, T, mel_bins): the STFT power projected on the mel filterbank."""
    power = stft_power(waveform, cfg)
    bank = jnp.asarray(_cached_bank(cfg, kind), power.dtype)
    return jnp.matmul(power, bank, precision=_HIGHEST)


def log_mel(waveform, cfg: FrontEndConfig, kind: MelKind = "slaney") -> jax.Array:
    """Log-mel spectrogram in dB, (B, T, mel_bins); T = N//hop + 1 (480000 samples → 1001 frames)."""
    return power_to_db(mel_power(waveform, cfg, kind))


# --- the audio towers' input mapping ------------------------------------------------------------

def fusion_flags(longer, batch: int) -> jax.Array:
    """`longer` of shape (B,) or LAION's (B, 1) → (B,) bool, refused unless it holds one flag per row."""
    flags = jnp.asarray(longer)
    if flags.size != batch:
        raise ValueError(f"longer must hold one flag per row: {flags.shape} for batch {batch}")
    return flags.reshape(batch).astype(bool)


def tower_input(inputs: Mapping, cfg: FrontEndConfig, fused: bool, tower: str) -> tuple[jax.Array, jax.Array | None]:
    """What every audio tower reads from its input mapping (the one `audio.io.model_audio_input` builds).

    Unfused: {'waveform' (B, N)} → its Slaney log-mel (B, T, mel_bins) and no flags; 'mel_fusion' / 'longer' are
    refused. Fused: {'mel_fusion' (B, C, T, mel_bins), 'longer' (B,) or (B, 1)} → that mel and (B,) bool flags;
    a 'waveform' beside them is ignored, as LAION's fused towers ignore it."""
    if not isinstance(inputs, Mapping):
        raise TypeError(f"{tower} takes a mapping of its inputs ({{'waveform': ...}} or {{'mel_fusion': ..., "
                        f"'longer': ...}}), got {type(inputs).__name__}")
    if not fused:
        if "waveform" not in inputs:
            raise ValueError(f"an unfused {tower} needs inputs['waveform'] (B, samples); got keys {sorted(inputs)}")
        if "mel_fusion" in inputs or "longer" in inputs:
            raise ValueError(f"mel_fusion / longer are only for a fused {tower} (enable_fusion=True)")
        wav = jnp.asarray(inputs["waveform"])
        if wav.ndim != 2:
            raise ValueError(f"waveform must be (batch, samples), got shape {wav.shape}")
        return log_mel(wav.astype(jnp.float32), cfg, "slaney"), None
    if "mel_fusion" not in inputs or "longer" not in inputs:
        raise ValueError(f"a fused {tower} needs inputs['mel_fusion'] (B, 4, T, mel_bins) and inputs['longer'] (B,) "
                         f"(its waveform input is unused, as in LAION); got keys {sorted(inputs)}")
    mel = jnp.asarray(inputs["mel_fusion"])
    if mel.ndim != 4 or mel.shape[-1] != cfg.mel_bins or mel.shape[1] < 2:
        raise ValueError(f"mel_fusion must be (B, channels>=2, T, {cfg.mel_bins}), got {mel.shape}")
    return mel, fusion_flags(inputs["longer"], mel.shape[0])


# --- HTSAT's spectrogram → image reshape ------------------------------------------------------

def _cubic_coefficients(t: np.ndarray, a: float = -0.75) -> list[np.ndarray]:
    """Keys' cubic weights (A = −0.75) of taps −1, 0, 1, 2 for fractions t, evaluated with the same
    formulas, in t's dtype and with the same roundings as PyTorch's CPU `get_cubic_upsample_coefficients`.

    PyTorch's x86-64 build contracts the middle step `u·x + 8A` of the outer-tap polynomial into
    one fused multiply-add; we round that step once too (float64 holds the exact float32 product),
    which makes the weights bit-identical to torch's (plain float32 steps are 4 ulp off there).
    """
    dt = t.dtype.type
    a, one = dt(a), dt(1)

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + one

    def far(x):   # 1 < |x| < 2
        u = a * x - dt(5) * a
        v = (u.astype(np.float64) * x + np.float64(dt(8) * a)).astype(dt)  # the fused step
        return v * x - dt(4) * a
    return [far(t + one), near(t), near(one - t), far((one - t) + one)]


def _bicubic_stencil(n_in: int, n_out: int, position_dtype) -> tuple[np.ndarray, list[np.ndarray]]:
    """(4, n_out) int64 clamped source indices (taps −1..2 around floor(position)) and the four Keys
    weights in `position_dtype`, computed as PyTorch's `upsample_bicubic2d` does (align_corners)."""
    if n_in < 1 or n_out < 1:
        raise ValueError(f"bicubic resize needs positive sizes, got n_in={n_in}, n_out={n_out}")
    dt = np.dtype(position_dtype).type
    scale = dt(n_in - 1) / dt(n_out - 1) if n_out > 1 else dt(0)
    src = scale * np.arange(n_out).astype(dt)                      # rounded like PyTorch's
    base = np.clip(np.floor(src), 0, n_in - 1)                     # guard_index_and_lambda
    frac = np.clip(src - base.astype(dt), dt(0), dt(1)).astype(dt)
    base = base.astype(np.int64)
    idx = np.stack([np.clip(base + tap, 0, n_in - 1) for tap in range(-1, 3)])
    return idx, _cubic_coefficients(frac)


def bicubic_taps(n_in: int, n_out: int, position_dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """(4, n_out) int32 source indices and (4, n_out) float32 weights of PyTorch's bicubic resize
    (align_corners=True), taps −1..2 around floor(position), indices clamped onto the border."""
    idx, weights = _bicubic_stencil(n_in, n_out, position_dtype)
    return idx.astype(np.int32), np.stack([w.astype(np.float32) for w in weights])


@functools.lru_cache(maxsize=None)
def _cached_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    idx, weights = bicubic_taps(n_in, n_out)
    idx.flags.writeable = weights.flags.writeable = False
    return idx, weights


def _bicubic_resize(x: jax.Array, n_out: int, axis: int) -> jax.Array:
    """Resize `axis` of x with the four-tap stencil, summed in PyTorch's order w0·x0 + … + w3·x3.

    Same result as the dense resize matrix (tests/test_frontend.py `bicubic_matrix`) @ x to round-off, at 4
    multiply-adds per output instead of n: the dense matmul cost ~4 GFLOP for a fused batch of 8 (PROFILE.md)."""
    idx, weights = _cached_taps(x.shape[axis], n_out)
    shape = [1] * x.ndim
    shape[axis] = n_out
    out = None
    for k in range(4):
        term = jnp.take(x, jnp.asarray(idx[k]), axis=axis) * jnp.asarray(weights[k], x.dtype).reshape(shape)
        out = term if out is None else out + term
    return out


def reshape_wav2img(x, spec_size: int = 256, freq_ratio: int = 4) -> jax.Array:
    """LAION HTSAT's `reshape_wav2img`: (B, C, T, F) log-mel → (B, C, spec_size, spec_size) image.

    Time is bicubic-resized to spec_size·freq_ratio (1001 → 1024) and frequency to
    spec_size//freq_ratio when shorter (each only when smaller, as HTSAT does; longer inputs are
    refused, as HTSAT asserts). Then img[b, c, k·F + f, t] = spec[b, c, k·W + t, f] for time chunk
    k < freq_ratio and W = T/freq_ratio: the chunks are stacked along the frequency (row) axis.
    """
    x = jnp.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"reshape_wav2img expects (B, C, T, F), got shape {x.shape}")
    _, _, t, f = x.shape
    target_t, target_f = spec_size * freq_ratio, spec_size // freq_ratio
    if t > target_t or f > target_f:
        raise ValueError(f"spectrogram of {t} frames × {f} bins exceeds HTSAT's {target_t} × {target_f} input")
    if t < target_t:
        x = _bicubic_resize(x, target_t, axis=2)
    if f < target_f:
        x = _bicubic_resize(x, target_f, axis=3)
    b, c = x.shape[:2]
    x = x.reshape(b, c, freq_ratio, target_t // freq_ratio, target_f)  # (B, C, chunk, t, f)
    x = jnp.transpose(x, (0, 1, 2, 4, 3))                               # (B, C, chunk, f, t)
    return x.reshape(b, c, freq_ratio * target_f, target_t // freq_ratio)


# --- augmentation -------------------------------------------------------------------------------

def spec_augment(x: jax.Array, key: jax.Array, *, time_width: int, time_stripes: int,
                 freq_width: int, freq_stripes: int) -> jax.Array:
    """torchlibrosa's SpecAugmentation on (B, C, T, F): per sample, zero `*_stripes` stripes of
    width uniform in [0, width) starting uniformly in [0, size - width), the same on every channel.
    Same distribution as torchlibrosa; the random draws themselves of course differ."""
    b, _, t, f = x.shape

    def stripes(k, size, width, count):
        kw, ks = jax.random.split(k)
        widths = jax.random.randint(kw, (b, count), 0, width)
        starts = jax.random.randint(ks, (b, count), 0, jnp.maximum(size - widths, 1))
        pos = jnp.arange(size)[None, None, :]
        hit = (pos >= starts[..., None]) & (pos < (starts + widths)[..., None])
        return hit.any(axis=1)  # (B, size)

    kt, kf = jax.random.split(key)
    drop_t = stripes(kt, t, time_width, time_stripes)[:, None, :, None]
    drop_f = stripes(kf, f, freq_width, freq_stripes)[:, None, None, :]
    return jnp.where(drop_t | drop_f, jnp.zeros((), x.dtype), x)
