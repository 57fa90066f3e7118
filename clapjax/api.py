"""Inference with the names laion_clap users know (`CLAP_Module` → `clapjax.CLAP`).

    clap = clapjax.CLAP.from_pretrained("converted/", tokenizer="tokenizer/")
    a = clap.get_audio_embedding_from_filelist(["dog.wav", "rain.flac"])   # (N, 512), L2-normalised
    t = clap.get_text_embedding(["a dog barks", "rain falls"])             # (N, 512)

NumPy in, NumPy out. Batches are padded to a few fixed sizes so one compile serves any count,
and JAX's persistent compilation cache is on by default, so a second process starts warm.
Long clips are cropped (or, for fused models, chunked) at random as LAION does when `rng` is
given (an int seed, `np.random.Generator` or `RandomState`); `rng=None` is deterministic: the
crop starts at the beginning of the clip and fusion chunks take the first start of each third.
"""
from __future__ import annotations

import os
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clapjax.audio import io as audio_io
from clapjax.model import CLAPModel
from clapjax.tokenizer import Tokenizer

BATCH_SIZES = (1, 8, 32)  # a request is cut into chunks of the largest size and padded up to one of these
TEXT_LENGTH_STEP = 16     # captions are cut to the next multiple of this that holds every real token
# Towers whose pooled feature ignores trailing padding exactly (see `trimmed_text_length`); BART is
# not one: LAION pools it as the mean over every position, padding included.
TRIMMABLE_TEXT = ("roberta", "bert", "transformer")
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "clapjax", "jax_cache")


def enable_compilation_cache(path: str | None = DEFAULT_CACHE, *, min_compile_secs: float = 0.5,
                             min_entry_bytes: int = 0) -> None:
    """Turn on JAX's persistent compilation cache at `path` (None or '' leaves JAX's setting alone);
    programs that compiled faster than `min_compile_secs` are not stored."""
    if not path:
        return
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_secs)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", min_entry_bytes)


def _as_rng(rng):
    if rng is None or isinstance(rng, (np.random.Generator, np.random.RandomState)):
        return rng
    if isinstance(rng, (int, np.integer)):
        return np.random.default_rng(int(rng))
    raise TypeError(f"rng must be None, an int seed, a numpy Generator or RandomState; got {type(rng).__name__}")


AUDIO_ROWS_PER_STEP = 4  # the API's audio function runs its batch 4 clips at a time (see below)


def embedding_functions(graphdef, audio_rows_per_step: int | None = None):
    """Jitted `(state, batch) → L2-normalised embeddings`, audio and text, for one model structure
    (`graphdef` from `nnx.split`); the state may be sharded, the batch sharded over its rows.

    `audio_rows_per_step`: run a batch whose size is a multiple of it as a `lax.map` over groups
    of that many rows. On CPU the HTSAT activations of 4 clips (~13 MB per tensor at stage 0) stay
    in cache where those of 32 do not: per clip, batch 4 is ~10-15% cheaper than batch 16-32
    (PROFILE.md). Leave it None for a batch sharded over devices."""
    @jax.jit
    def audio_fn(state, batch):
        model = nnx.merge(graphdef, state)
        n = len(jax.tree.leaves(batch)[0])
        rows = audio_rows_per_step
        if not rows or n <= rows or n % rows:
            return model.get_audio_embedding(batch)
        groups = jax.tree.map(lambda v: v.reshape(n // rows, rows, *v.shape[1:]), batch)
        out = jax.lax.map(model.get_audio_embedding, groups)
        return out.reshape(n, *out.shape[2:])

    @jax.jit
    def text_fn(state, batch):
        return nnx.merge(graphdef, state).get_text_embedding(batch)
    return audio_fn, text_fn


def _padded_size(n: int, sizes: Sequence[int]) -> int:
    return next(s for s in sizes if s >= n)


def trimmed_text_length(batch: dict[str, np.ndarray], tmodel: str, step: int = TEXT_LENGTH_STEP) -> int:
    """How many leading token positions a text batch needs for an exact pooled embedding.

    LAION pads every caption to 77 tokens, but a caption is usually far shorter and the towers
    other than BART never look at what follows the last real token:
    - RoBERTa / BERT read the first token; padded keys carry a finfo.min bias, so their softmax
      weight is exactly 0, positions are a prefix (BERT) or derived per token from the ids
      (RoBERTa), and every other op acts per token: dropping trailing padded positions is exact.
    - CLIP ('transformer') reads the EOT token (argmax of the ids) under a causal mask: nothing
      after it reaches it.
    The length is rounded up to a multiple of `step` (one compile per bucket, not per length) and
    never exceeds the batch's. BART, rows with no real token (their softmax is uniform over every
    position) and batches without an attention mask keep their full length; a batch without
    `input_ids` is refused.
    """
    ids = batch.get("input_ids")
    if ids is None:
        raise ValueError(f"a tokenized text batch needs 'input_ids' (N, L); got keys {sorted(batch)}")
    if tmodel not in TRIMMABLE_TEXT or ids.ndim != 2:
        return ids.shape[-1]
    full = ids.shape[1]
    if tmodel == "transformer":
        needed = int(np.argmax(ids, axis=1).max()) + 1
    else:
        mask = batch.get("attention_mask")
        if mask is None or not np.all(np.any(mask != 0, axis=1)):
            return full
        needed = int((full - np.argmax(mask[:, ::-1] != 0, axis=1)).max())
    return min(full, -(-needed // step) * step)


class CLAP:
    def __init__(self, model: CLAPModel, tokenizer: Tokenizer | None = None, *,
                 batch_sizes: Sequence[int] = BATCH_SIZES):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_sizes = tuple(sorted(batch_sizes))
        self.config = model.config
        graphdef, self._state = nnx.split(model)
        self._audio_fn, self._text_fn = embedding_functions(graphdef, AUDIO_ROWS_PER_STEP)

    @classmethod
    def from_pretrained(cls, directory: str, tokenizer: str | Tokenizer | None = None, *, sharding=None,
                        compilation_cache: str | None = DEFAULT_CACHE, **kw) -> "CLAP":
        """A checkpoint written by `clapjax convert` (and optionally a local tokenizer directory)."""
        from clapjax.convert import checkpoint
        enable_compilation_cache(compilation_cache)
        model = checkpoint.restore(directory, sharding)
        if isinstance(tokenizer, (str, os.PathLike)):
            kind = model.config.tmodel
            tokenizer = Tokenizer(tokenizer, kind=kind, max_length=getattr(model.config.text, "context_length", 77))
        return cls(model, tokenizer, **kw)

    # --- batching ---------------------------------------------------------------------------------
    def _run(self, fn, batch: dict[str, np.ndarray], trim=None) -> np.ndarray:
        """`fn` over `batch` in padded chunks; `trim(chunk) → length` cuts (N, L) arrays to L' <= L."""
        n = len(next(iter(batch.values())))
        step = self.batch_sizes[-1]
        out = []
        for start in range(0, n, step):
            chunk = {k: v[start:start + step] for k, v in batch.items()}
            if trim is not None:
                length = trim(chunk)
                chunk = {k: v[:, :length] if v.ndim == 2 else v for k, v in chunk.items()}
            m = len(next(iter(chunk.values())))
            size = _padded_size(m, self.batch_sizes)
            padded = {k: np.concatenate([v, np.repeat(v[-1:], size - m, axis=0)]) if size > m else v
                      for k, v in chunk.items()}
            out.append(np.asarray(fn(self._state, padded))[:m])
        return np.concatenate(out)

    # --- audio ------------------------------------------------------------------------------------
    def audio_batch(self, waveforms: Sequence[np.ndarray], rng=None, *, quantize: bool = True) -> dict:
        """LAION's preprocessing of 48 kHz mono clips → the model's audio input dict."""
        if len(waveforms) == 0:
            raise ValueError("no audio given")
        rng = _as_rng(rng)
        fused = self.config.enable_fusion
        clips = [audio_io.quantize_int16(w) if quantize else audio_io.check_waveform(w) for w in waveforms]
        feats = audio_io.batch_audio_features(
            clips, self.config.frontend, truncating="fusion" if fused else "rand_trunc", filling="repeatpad",
            rng=rng, mode="laion", crop_mode="random" if rng is not None else "start")
        if fused:
            return {"mel_fusion": feats["mel_fusion"].astype(np.float32), "longer": feats["longer"]}
        return {"waveform": feats["waveform"]}

    def get_audio_embedding_from_data(self, x: Iterable[np.ndarray], rng=None, *, quantize: bool = True) -> np.ndarray:
        """Mono 48 kHz waveforms (an (N, T) array or a list of 1-D arrays) → (N, D) embeddings."""
        waveforms = list(x) if not isinstance(x, np.ndarray) or x.ndim != 1 else [x]
        return self._run(self._audio_fn, self.audio_batch(waveforms, rng, quantize=quantize))

    def get_audio_embedding_from_filelist(self, x: Iterable[str], rng=None) -> np.ndarray:
        """Audio files of any rate / channel count / length → (N, D) embeddings."""
        paths = [x] if isinstance(x, (str, os.PathLike)) else list(x)
        sr = self.config.frontend.sample_rate
        return self.get_audio_embedding_from_data([audio_io.load_audio(p, sr) for p in paths], rng)

    # --- text -------------------------------------------------------------------------------------
    def get_text_embedding(self, x: str | Sequence[str] | dict) -> np.ndarray:
        """Captions (or an already tokenized dict of (N, L) arrays) → (N, D) embeddings."""
        if isinstance(x, dict):
            batch = {k: np.asarray(v) for k, v in x.items()}
        else:
            if self.tokenizer is None:
                raise ValueError("no tokenizer: pass tokenizer=DIR to from_pretrained, or token ids as a dict")
            batch = self.tokenizer(x)
        return self._run(self._text_fn, batch, trim=self._text_length)

    def _text_length(self, batch: dict[str, np.ndarray]) -> int:
        return trimmed_text_length(batch, self.config.tmodel)


def cosine_top_k(queries: np.ndarray, keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (indices, scores) of `keys` for each query by cosine similarity (inputs L2-normalised)."""
    sims = np.asarray(jnp.asarray(queries) @ jnp.asarray(keys).T)
    k = min(k, keys.shape[0])
    idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(sims, idx, axis=1)
