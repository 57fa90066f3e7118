"""Inference with the names laion_clap users know (`CLAP_Module` → `clapjax.CLAP`).

    clap = clapjax.CLAP.from_pretrained("laion/clap-htsat-unfused")   # or a path, or "630k-audioset-best"
    a = clap.get_audio_embedding_from_filelist(["dog.wav", "rain.flac"])   # (N, 512), L2-normalised
    t = clap.get_text_embedding(["a dog barks", "rain falls"])             # (N, 512)

NumPy in, NumPy out. Batches are padded to a few fixed sizes so one compile serves any count,
and JAX's persistent compilation cache is on by default, so a second process starts warm.
Long clips are cropped (or, for fused models, chunked) at random as LAION does when `rng` is
given (an int seed, `np.random.Generator` or `RandomState`); `rng=None` is deterministic: the
crop starts at the beginning of the clip and fusion chunks take the first start of each third.

Files are decoded by a pool of threads (`workers`, default the usable cores; `audio.stream.ordered_map`) a
window of batches ahead of the device, in input order, while the previous batch computes; the crop draws of
a seeded `rng` are made in the caller's thread in file order, so the embeddings are those of decoding
everything first and embedding in chunks of the largest batch size.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Iterable, Iterator, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from clapjax.audio import io as audio_io
from clapjax.audio.stream import Failed, ordered_map
from clapjax.embedding import (AUDIO_ROWS_PER_STEP, DEFAULT_CACHE, embedding_functions, enable_compilation_cache,
                               trimmed_text_length)
from clapjax.model import CLAPModel
from clapjax.tokenizer import CONTEXT_LENGTH, Tokenizer

BATCH_SIZES = (1, 8, 32)  # a request is cut into chunks of the largest size and padded up to one of these
WINDOW_BATCHES = 2        # files decoded ahead of the device: this many batches of the largest size


def _as_rng(rng):
    if rng is None or isinstance(rng, (np.random.Generator, np.random.RandomState)):
        return rng
    if isinstance(rng, (int, np.integer)):
        return np.random.default_rng(int(rng))
    raise TypeError(f"rng must be None, an int seed, a numpy Generator or RandomState; got {type(rng).__name__}")


def _padded_size(n: int, sizes: Sequence[int]) -> int:
    return next(s for s in sizes if s >= n)


def rng_state(rng) -> dict | None:
    """The state of a numpy Generator / RandomState as plain data (None for None), to carry on a seeded run."""
    if rng is None:
        return None
    if isinstance(rng, np.random.Generator):
        return rng.bit_generator.state
    name, keys, pos, has_gauss, gauss = rng.get_state()
    return {"RandomState": [name, keys.tolist(), pos, has_gauss, gauss]}


def _prepared_clip(path, sample_rate: int, frontend, fused: bool, featurize: bool):
    """One file → (path, its LAION int16 round-tripped 48 kHz clip), or (`featurize`: no random draws needed) its
    features (`audio_io.clip_features` from the start) in the clip's place. Runs in a pool thread."""
    clip = audio_io.quantize_int16(audio_io.load_audio(path, sample_rate))
    return path, audio_io.clip_features(clip, frontend, fused, None, crop_mode="start") if featurize else clip


@dataclasses.dataclass(frozen=True)
class EmbeddedBatch:
    """One batch of `CLAP.iter_audio_embeddings`: a stretch of the input files, in order."""
    paths: list            # the files embedded, in input order (embeddings row i is paths[i])
    embeddings: np.ndarray  # (len(paths), D) float32, L2-normalised
    failed: list[Failed]   # the stretch's files that could not be read (Failed.item is the path), in input order
    inputs: int            # input files this stretch covers: len(paths) + len(failed)
    rng_state: dict | None  # the crop generator's state after this stretch's draws (`rng_state`; None if no rng)


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
    def from_pretrained(cls, name_or_path: str, tokenizer: str | Tokenizer | bool | None = None, *,
                        revision: str | None = None, cache_dir: str | None = None,
                        conversion_cache_dir: str | None = None, sharding=None,
                        compilation_cache: str | None = DEFAULT_CACHE, **kw) -> "CLAP":
        """A model by name or path (clapjax.convert.pretrained.find): a clapjax model directory; a laion `.pt`,
        HF ClapModel directory or `.safetensors` (converted once into the conversion cache); a Hugging Face repo
        id (`laion/clap-htsat-unfused`); a laion-clap release name (`630k-audioset-best`). `revision` picks a
        repo's commit, `cache_dir` the Hub cache, `conversion_cache_dir` clapjax's (default $CLAPJAX_CACHE or
        ~/.cache/clapjax). `tokenizer`: None → the model's own (None when it has none), a directory or a
        Tokenizer → that one, False → none (audio only: nothing is looked up for it)."""
        from clapjax import saved_model
        from clapjax.convert import pretrained
        enable_compilation_cache(compilation_cache)
        own = tokenizer is None
        found = pretrained.find(os.fspath(name_or_path), revision=revision, cache_dir=cache_dir,
                                conversion_cache_dir=conversion_cache_dir, tokenizer=own, log=lambda s: None)
        model = saved_model.restore(found.model_dir, sharding)
        max_length = getattr(model.config.text, "context_length", CONTEXT_LENGTH)
        return cls(model, found.choose_tokenizer(tokenizer, max_length), **kw)

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
            out.append(np.asarray(fn(self._state, self._pad_rows(chunk)))[:m])
        return np.concatenate(out)

    def _pad_rows(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A chunk of at most the largest batch size, its last row repeated up to the next size (as `_run`)."""
        m = len(next(iter(batch.values())))
        size = _padded_size(m, self.batch_sizes)
        return {k: np.concatenate([v, np.repeat(v[-1:], size - m, axis=0)]) if size > m else v
                for k, v in batch.items()}

    # --- audio ------------------------------------------------------------------------------------
    def audio_batch(self, waveforms: Sequence[np.ndarray], rng=None, *, quantize: bool = True) -> dict:
        """LAION's preprocessing of 48 kHz mono clips → the audio towers' input mapping (`audio.io.model_audio_input`)."""
        return audio_io.model_audio_input(waveforms, self.config.frontend, self.config.enable_fusion, _as_rng(rng),
                                          quantize=quantize)

    def get_audio_embedding_from_data(self, x: Iterable[np.ndarray], rng=None, *, quantize: bool = True) -> np.ndarray:
        """Mono 48 kHz waveforms (an (N, T) array or a list of 1-D arrays) → (N, D) embeddings."""
        waveforms = list(x) if not isinstance(x, np.ndarray) or x.ndim != 1 else [x]
        return self._run(self._audio_fn, self.audio_batch(waveforms, rng, quantize=quantize))

    def get_audio_embedding_from_filelist(self, x: Iterable[str], rng=None, *, workers: int | None = None) -> np.ndarray:
        """Audio files of any rate / channel count / length → (N, D) embeddings; a file that cannot be read raises
        ValueError naming it. `workers`: decoding threads (default the usable cores; 0 decodes in this thread)."""
        paths = [x] if isinstance(x, (str, os.PathLike)) else x
        parts = [b.embeddings for b in self.iter_audio_embeddings(paths, rng, workers=workers)]
        if not any(len(p) for p in parts):
            raise ValueError("no audio given")
        return np.concatenate(parts)

    def iter_audio_embeddings(self, paths: Iterable[str], rng=None, *, workers: int | None = None,
                              window_batches: int = WINDOW_BATCHES, skip_bad: bool = False) -> Iterator[EmbeddedBatch]:
        """Embed files as a stream of `EmbeddedBatch`es, in input order, one per batch of the largest batch size
        (plus a last one with no rows if files that failed come after the last embedded one). `paths` is read
        lazily: at most `window_batches` batches of files are decoded ahead, one batch is assembled and one
        computes on the device, so any number of files is held in bounded memory. A file that cannot be read
        raises ValueError naming it, or with `skip_bad` is left out and listed in its batch's `failed`.
        `rng` as in `get_audio_embedding_from_filelist`: its draws are made here in file order (a failed file
        draws nothing)."""
        rng = _as_rng(rng)
        if not isinstance(window_batches, int) or window_batches < 1:
            raise ValueError(f"window_batches must be a positive integer, got {window_batches!r}")
        cfg, fused, step = self.config.frontend, self.config.enable_fusion, self.batch_sizes[-1]
        # without draws the pool does the whole per-clip preprocessing; with them, the crops happen in file order
        prepare = functools.partial(_prepared_clip, sample_rate=cfg.sample_rate, frontend=cfg, fused=fused,
                                    featurize=rng is None)
        decoded = ordered_map(prepare, paths, workers=workers, window=window_batches * step, catch=(ValueError,))
        pending = None   # the batch on the device: dispatch k, then read back k-1 while k runs
        good, features, failed = [], [], []
        for out in decoded:
            if isinstance(out, Failed):
                if not skip_bad:
                    raise ValueError(out.reason)
                failed.append(out)
                continue
            path, out = out
            good.append(path)
            features.append(out if rng is None else
                            audio_io.clip_features(out, cfg, fused, rng, crop_mode="random"))
            if len(good) == step:
                if pending is not None:
                    yield self._finish(*pending)
                pending = self._dispatch(good, features, failed, rng)
                good, features, failed = [], [], []
        if good:
            if pending is not None:
                yield self._finish(*pending)
            pending = self._dispatch(good, features, failed, rng)
            failed = []
        if pending is not None:
            yield self._finish(*pending)
        if failed:
            yield EmbeddedBatch([], np.zeros((0, self.config.joint_embed_shape), np.float32), failed, len(failed),
                                rng_state(rng))

    def _dispatch(self, good, features, failed, rng):
        batch = self._pad_rows(audio_io.stack_audio_input(features, self.config.enable_fusion))
        return self._audio_fn(self._state, batch), good, failed, rng_state(rng)

    def _finish(self, device_rows, good, failed, state) -> EmbeddedBatch:
        rows = np.asarray(device_rows)[:len(good)]
        return EmbeddedBatch(good, rows, failed, len(good) + len(failed), state)

    # --- text -------------------------------------------------------------------------------------
    def get_text_embedding(self, x: str | Sequence[str] | dict) -> np.ndarray:
        """Captions (or an already tokenized dict of (N, L) arrays) → (N, D) embeddings."""
        if isinstance(x, dict):
            batch = {k: np.asarray(v) for k, v in x.items()}
        else:
            if self.tokenizer is None:
                raise ValueError("no tokenizer: this model has none of its own; pass tokenizer=DIR to from_pretrained, "
                                 "or token ids as a dict")
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
