"""Audio embeddings of a benchmark, kept per (model, benchmark) so that scoring again (another prompt, another
table) embeds no audio.

    <root>/eval/<key>.npz     embeddings (N, D) of the clips that decoded, their indices, and the failures

`<root>` is the conversion cache's (convert/conversion_cache.cache_root: `--cache-dir`, $CLAPJAX_CACHE,
~/.cache/clapjax). The key is the sha256 of: the model directory's content (the sha256 of each of its files,
by relative path: a conversion-cache entry or any saved model, renamed or copied, is the same model), the
benchmark, the dataset directory, the identity of its file list (each clip's relative path, size and
modification time, in order), the crop seed and crop mode. A clip that changes on disk changes the key.
An entry is written to a temporary file and renamed into place, so a reader sees a whole entry or none.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile

import numpy as np

from clapjax.convert import conversion_cache

FORMAT = 1  # bump when entries written by an older evaluator must not be reused
SUBDIR = "eval"


def model_identity(model_dir: str) -> str:
    """sha256 over (relative path, sha256) of every file of a saved model directory."""
    digest = hashlib.sha256()
    for root, dirs, names in os.walk(model_dir):
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(root, name)
            digest.update(f"{os.path.relpath(path, model_dir)}\0{conversion_cache.sha256(path)}\n".encode())
    return digest.hexdigest()


def file_list_identity(root: str, files: list[str]) -> str:
    """sha256 over each file's path relative to `root`, size and modification time, in order."""
    digest = hashlib.sha256()
    for path in files:
        st = os.stat(path)
        digest.update(f"{os.path.relpath(path, root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def entry_key(model: str, benchmark: str, root: str, files: str, seed: int, crop_mode: str) -> str:
    text = json.dumps({"format": FORMAT, "model": model, "benchmark": benchmark, "root": os.path.abspath(root),
                       "files": files, "seed": seed, "crop_mode": crop_mode}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def entry_path(key: str, cache_dir: str | None = None) -> str:
    return os.path.join(conversion_cache.cache_root(cache_dir), SUBDIR, f"{key}.npz")


def load(path: str) -> tuple[np.ndarray, np.ndarray, dict[int, str]] | None:
    """(embeddings, indices of the clips they belong to, {index: why it could not be read}), or None when
    there is no readable entry at `path`."""
    try:
        with np.load(path, allow_pickle=False) as z:
            failures = json.loads(str(z["failures"]))
            return z["embeddings"], z["kept"], {int(k): v for k, v in failures.items()}
    except (OSError, KeyError, ValueError):
        return None


def save(path: str, embeddings: np.ndarray, kept: np.ndarray, failures: dict[int, str]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".writing-", suffix=".npz", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, embeddings=np.asarray(embeddings, np.float32), kept=np.asarray(kept, np.int64),
                     failures=np.asarray(json.dumps({str(k): v for k, v in failures.items()})))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
