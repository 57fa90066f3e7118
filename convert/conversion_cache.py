"""The conversion cache: a source converted once, found again by its content.

    <root>/converted/<key>/     a saved model (clapjax.saved_model) + ENTRY, the list of its files
    <root>/converted/.building-*  conversions under way (never read; a crashed one is left behind)

`<root>` is `cache_dir=`, else $CLAPJAX_CACHE, else ~/.cache/clapjax. The key is the sha256 of the
source files' sha256 (config.json and the weight files the converter reads), the converter options
and `FORMAT`: the same bytes under another name or path are the same entry, changed bytes a new one.

An entry is built in a private directory and renamed into place whole, so a reader sees no entry or
a complete one. ENTRY, written last, holds the size and sha256 of every file of the entry; an entry
whose files do not match it (truncated, deleted, edited) is rebuilt. Two processes converting the same
source both finish: the second rename finds the first's valid entry and uses it.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from typing import Callable

from clapjax import saved_model
from clapjax.convert import hf, pipeline

ENV = "CLAPJAX_CACHE"
FORMAT = 1  # bump when entries written by an older converter must not be reused
ENTRY = "cache_entry.json"
_CHUNK = 1 << 24


def cache_root(cache_dir: str | os.PathLike | None = None) -> str:
    """Where clapjax keeps what it derives from downloads (read at each call, not at import)."""
    if cache_dir is not None:
        return os.path.abspath(os.fspath(cache_dir))
    return os.path.abspath(os.environ.get(ENV) or os.path.join(os.path.expanduser("~"), ".cache", "clapjax"))


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def source_files(path: str) -> list[str]:
    """The files converting `path` reads: the file itself, or an HF directory's config.json and the weights
    `hf.read_weights` picks (an index and its shards)."""
    if not os.path.isdir(path):
        return [path]
    chosen = hf.weight_file(path)
    names = ["config.json"] + ([chosen] if chosen else [])  # no weights: read_source says so, naming the directory
    if chosen and chosen.endswith(".index.json"):
        names += hf.shard_names(os.path.join(path, chosen))
    return [os.path.join(path, n) for n in names if os.path.isfile(os.path.join(path, n))]


def entry_key(digests: dict[str, str], options: dict) -> str:
    """The content key: file names are left out (a renamed copy is the same source), their roles are not
    (config.json vs weights), so digests are listed in the order source_files gives them."""
    text = json.dumps({"format": FORMAT, "files": list(digests.values()), "options": options}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def converted(path: str, *, provenance: dict | None = None, cache_dir: str | os.PathLike | None = None,
              amodel=None, tmodel=None, fusion=None, log: Callable[[str], None] = print) -> str:
    """The saved model converted from the source at `path` (built now unless a valid entry exists)."""
    files = source_files(path)
    digests = {f: sha256(f) for f in files}
    options = {"amodel": amodel, "tmodel": tmodel, "fusion": fusion}
    key = entry_key(digests, options)
    parent = os.path.join(cache_root(cache_dir), "converted")
    final = os.path.join(parent, key)
    if os.path.exists(final):
        problem = entry_problem(final, key)
        if problem is None:
            return final
        log(f"conversion cache: rebuilding {final} ({problem})")
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".building-", dir=parent)
    try:
        entry = os.path.join(work, "entry")
        report = pipeline.convert(path, entry, amodel=amodel, tmodel=tmodel, fusion=fusion, log=log)
        record = {**(provenance or {}), "cache_key": key, "converter_format": FORMAT, "options": options,
                  "files": [{"name": os.path.basename(f), "sha256": d, "size": os.path.getsize(f)}
                            for f, d in digests.items()],
                  "key_report": {"ok": report.ok, "by_branch": report.by_branch()}}  # in full: key_report.json
        saved_model.set_provenance(entry, record)
        _write_entry_list(entry, key)
        _commit(entry, final, key)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def entry_problem(entry: str, key: str) -> str | None:
    """None for a complete entry of `key`; else what is wrong with it."""
    try:
        with open(os.path.join(entry, ENTRY)) as f:
            listed = json.load(f)
    except (OSError, ValueError) as err:
        return f"{ENTRY} unreadable: {err}"
    if not isinstance(listed, dict) or listed.get("key") != key or not isinstance(listed.get("files"), dict):
        return f"{ENTRY} is not this entry's list"
    for rel, (size, digest) in listed["files"].items():
        file = os.path.join(entry, rel)
        if not os.path.isfile(file):
            return f"{rel} is missing"
        if os.path.getsize(file) != size or sha256(file) != digest:
            return f"{rel} differs from what was written"
    return None


def _write_entry_list(entry: str, key: str) -> None:
    files = {}
    for root, _, names in os.walk(entry):
        for n in names:
            file = os.path.join(root, n)
            files[os.path.relpath(file, entry)] = [os.path.getsize(file), sha256(file)]
    with open(os.path.join(entry, ENTRY), "w") as f:
        json.dump({"key": key, "files": files}, f, indent=1)


def _commit(entry: str, final: str, key: str) -> None:
    """Rename the finished entry into place; a valid entry already there (another process) wins, an invalid
    one is moved aside first."""
    for _ in range(3):
        try:
            os.rename(entry, final)
            return
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        if entry_problem(final, key) is None:
            return
        aside = tempfile.mkdtemp(prefix=".stale-", dir=os.path.dirname(final))
        try:
            os.rename(final, os.path.join(aside, "entry"))
        except FileNotFoundError:  # another process moved it already
            pass
        finally:
            shutil.rmtree(aside, ignore_errors=True)
    raise RuntimeError(f"conversion cache: could not put a valid entry at {final} (other processes keep replacing it)")
