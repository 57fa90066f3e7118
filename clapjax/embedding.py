"""The jitted embedding functions and the compile-cache switch: what inference (`clapjax.CLAP`), evaluation and
training share, below the user-facing API.

`embedding_functions` turns one model structure into jitted `(state, batch) → L2-normalised embeddings`;
`trimmed_text_length` says how much of a padded caption batch a tower needs for an exact pooled feature;
`enable_compilation_cache` turns on JAX's persistent compilation cache (a second process starts warm).
"""
from __future__ import annotations

import os

import jax
import numpy as np
from flax import nnx

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


AUDIO_ROWS_PER_STEP = 4  # `clapjax.CLAP` runs its audio batches 4 clips per lax.map step (embedding_functions)


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
