"""Where training samples come from: LAION webdataset tar shards, a manifest of local files, or the
synthetic generator. Each source is random access by record id, so the pipeline in `data.py`
decides the order (and can resume it exactly).

* `TarShards`: LAION's layout, `<key>.flac|.wav|… + <key>.json` (`text`: a string or a list) in
  uncompressed tar files, with an optional `sizes.json` ({shard file name: sample count}). Each
  process indexes only its own shards (member offsets from the tar headers, no data read); record
  ids are global, numbered shard by shard from `sizes.json` (without it every shard is indexed).
  Reading a record is one seek per member, so a tar behaves like a random-access file.
* `Manifest`: JSONL (`{"path": ..., "caption": ... | "captions": [...] | "text": ...}`) or CSV
  (a `path`/`file_name` column and `caption`, `text` or `caption_1`…`caption_N` columns, e.g.
  Clotho's CSVs). Relative paths are relative to the manifest (or `audio_root`).
* `SyntheticSource`: a `clapjax.synthetic.SyntheticSet`, rendered on demand.

A source never judges a sample: it returns what is there (`Raw`), and `decode` raises ValueError
for anything unusable, which the pipeline counts as a bad sample.
"""
from __future__ import annotations

import csv
import dataclasses
import glob
import io
import json
import logging
import os
import re
import tarfile
import threading
from typing import Sequence

import numpy as np

from clapjax.audio import io as audio_io

log = logging.getLogger("clapjax.train.data")
AUDIO_EXTS = ("flac", "wav", "mp3", "ogg", "opus")
TEXT_EXT = "json"


@dataclasses.dataclass
class Raw:
    """One record as stored: audio bytes (tar), a path (manifest) or samples (synthetic), and texts."""

    key: str
    audio: bytes | str | np.ndarray | None
    sample_rate: int | None = None       # for sample arrays
    ext: str | None = None               # for bytes
    texts: object = None                 # whatever the record holds; validated by `captions`
    problem: str | None = None           # a defect found while reading (missing member, bad JSON)


# --- shard and record bookkeeping -------------------------------------------------------------------

def expand_paths(spec: str | Sequence[str]) -> list[str]:
    """Shard paths from a directory (its *.tar), a glob, a `{000..099}` brace range, or a list."""
    if not isinstance(spec, str):
        out = [p for s in spec for p in expand_paths(s)]
        if not out:
            raise ValueError("no shard paths given")
        return out
    if os.path.isdir(spec):
        found = sorted(glob.glob(os.path.join(spec, "*.tar")))
        if not found:
            raise ValueError(f"{spec}: no .tar shards in this directory")
        return found
    m = re.search(r"\{(\d+)\.\.(\d+)\}", spec)
    if m:
        lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
        return [p for i in range(lo, hi + 1) for p in expand_paths(spec[:m.start()] + f"{i:0{width}d}" + spec[m.end():])]
    if any(c in spec for c in "*?["):
        found = sorted(glob.glob(spec))
        if not found:
            raise ValueError(f"{spec}: the pattern matches no file")
        return found
    if not os.path.isfile(spec):
        raise ValueError(f"{spec}: no such shard file")
    return [spec]


def split_member(name: str) -> tuple[str, str]:
    """webdataset's key/extension split: the key is the path up to the first '.' of the base name."""
    d, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (os.path.join(d, stem) if d else stem), ext.lower()


def index_tar(path: str) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """[(key, {ext: (data offset, size)})] in file order, from the tar headers alone."""
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                if m.isfile():
                    key, ext = split_member(m.name)
                    samples.setdefault(key, {})[ext] = (m.offset_data, m.size)
    except (tarfile.TarError, OSError) as err:
        raise ValueError(f"{path}: cannot read as an uncompressed tar shard ({err})") from err
    return list(samples.items())


class Source:
    """Record ids 0…num_records−1; `groups(p, P)` = the id arrays process p reads (interleave units)."""

    name = "source"
    num_records: int

    def groups(self, process_index: int, process_count: int) -> list[np.ndarray]:
        raise NotImplementedError

    def read(self, record: int) -> Raw:
        raise NotImplementedError

    def key(self, record: int) -> str:
        raise NotImplementedError

    def fingerprint(self) -> dict:
        return {"source": self.name, "num_records": int(self.num_records)}


def row_groups(source: Source, process_index: int, process_count: int) -> list[np.ndarray]:
    """A row source's groups: its records split round-robin over processes (one group each: shuffling
    happens in the pipeline)."""
    rows = np.arange(process_index, source.num_records, process_count, dtype=np.int64)
    if len(rows) == 0:
        raise ValueError(f"{source.name}: {source.num_records} records cannot feed process {process_index} "
                         f"of {process_count}")
    return [rows]


def process_shards(num_shards: int, process_index: int, process_count: int, what: str) -> list[int]:
    """The shards process p of P reads: p, p+P, … (every process needs at least one)."""
    mine = list(range(process_index, num_shards, process_count))
    if not mine:
        raise ValueError(f"{num_shards} {what} cannot feed process {process_index} of {process_count}: "
                         f"every process needs at least one shard")
    return mine


def locate(offsets: np.ndarray, record: int) -> tuple[int, int]:
    """(shard, position in it) of a record id, from the shards' cumulative record offsets (0 first)."""
    shard = int(np.searchsorted(offsets, record, side="right")) - 1
    if not (0 <= shard < len(offsets) - 1 and record >= 0):
        raise IndexError(f"record {record} out of range for {int(offsets[-1])} records")
    return shard, int(record - offsets[shard])


class _RowSource(Source):
    """Rows split round-robin over processes."""

    def groups(self, process_index: int, process_count: int) -> list[np.ndarray]:
        return row_groups(self, process_index, process_count)


class TarShards(Source):
    name = "tar"

    def __init__(self, shards: str | Sequence[str], sizes_json: str | None = None):
        self.paths = expand_paths(shards)
        names = [os.path.basename(p) for p in self.paths]
        if len(set(names)) != len(names):
            raise ValueError("tar shards must have distinct file names (sizes.json is keyed by name)")
        sizes_json = sizes_json or os.path.join(os.path.dirname(self.paths[0]), "sizes.json")
        self.declared = None
        if os.path.isfile(sizes_json):
            with open(sizes_json) as f:
                declared = json.load(f)
            missing = [n for n in names if n not in declared]
            if missing:
                log.warning("%s lists no size for %s; indexing every shard instead", sizes_json, missing[:3])
            else:
                self.declared = [int(declared[n]) for n in names]
        self._index: dict[int, list] = {}
        self._lock = threading.Lock()
        sizes = self.declared or [len(self._shard(i)) for i in range(len(self.paths))]
        self.sizes = np.asarray(sizes, np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        self.num_records = int(self.offsets[-1])

    def __getstate__(self) -> dict:
        # pickled into each data worker: the shard indexes travel (no re-indexing there), the lock cannot
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _shard(self, i: int) -> list:
        with self._lock:
            if i not in self._index:
                entries = index_tar(self.paths[i])
                if self.declared is not None and len(entries) != self.declared[i]:
                    raise ValueError(f"{self.paths[i]}: sizes.json says {self.declared[i]} samples, the tar "
                                     f"holds {len(entries)}; fix sizes.json or remove it")
                self._index[i] = entries
            return self._index[i]

    def groups(self, process_index: int, process_count: int) -> list[np.ndarray]:
        mine = process_shards(len(self.paths), process_index, process_count, "tar shards")
        return [np.arange(self.offsets[i], self.offsets[i] + len(self._shard(i)), dtype=np.int64) for i in mine]

    def _locate(self, record: int) -> tuple[int, int]:
        return locate(self.offsets, record)

    def key(self, record: int) -> str:
        shard, pos = self._locate(record)
        return f"{os.path.basename(self.paths[shard])}/{self._shard(shard)[pos][0]}"

    def read(self, record: int) -> Raw:
        shard, pos = self._locate(record)
        key, members = self._shard(shard)[pos]
        full_key = f"{os.path.basename(self.paths[shard])}/{key}"
        ext = next((e for e in AUDIO_EXTS if e in members), None)
        with open(self.paths[shard], "rb") as f:
            def member(name):
                off, size = members[name]
                f.seek(off)
                return f.read(size)
            audio = member(ext) if ext else None
            raw = Raw(full_key, audio, ext=ext, problem=None if ext else f"no audio member ({', '.join(AUDIO_EXTS)})")
            if TEXT_EXT not in members:
                raw.problem = raw.problem or "no caption: the sample has no .json member"
            else:
                try:
                    meta = json.loads(member(TEXT_EXT))
                    raw.texts = meta.get("text") if isinstance(meta, dict) else None
                except (ValueError, UnicodeDecodeError) as err:
                    raw.problem = raw.problem or f"unreadable .json ({err})"
        return raw

    def fingerprint(self) -> dict:
        return {**super().fingerprint(), "shards": [os.path.basename(p) for p in self.paths]}


class Manifest(_RowSource):
    name = "manifest"
    PATH_COLUMNS = ("path", "file_name", "filename", "file", "audio")

    def __init__(self, path: str, audio_root: str | None = None):
        self.path = path
        root = audio_root or os.path.dirname(os.path.abspath(path))
        rows = self._read_jsonl(path) if path.endswith((".jsonl", ".json")) else self._read_csv(path)
        if not rows:
            raise ValueError(f"{path}: the manifest has no rows")
        self.rows = [(p if os.path.isabs(p) else os.path.join(root, p), p, texts) for p, texts in rows]
        self.num_records = len(self.rows)

    @classmethod
    def _read_jsonl(cls, path: str) -> list:
        rows = []
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as err:
                    raise ValueError(f"{path}:{n}: not a JSON object ({err})") from None
                p = next((obj[c] for c in cls.PATH_COLUMNS if c in obj), None)
                if not isinstance(p, str):
                    raise ValueError(f"{path}:{n}: no audio path (one of {cls.PATH_COLUMNS})")
                rows.append((p, next((obj[c] for c in ("captions", "caption", "text") if c in obj), None)))
        return rows

    @classmethod
    def _read_csv(cls, path: str) -> list:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            cols = reader.fieldnames or []
            pcol = next((c for c in cls.PATH_COLUMNS if c in cols), None)
            tcols = [c for c in cols if c in ("caption", "captions", "text") or re.fullmatch(r"caption_\d+", c)]
            if pcol is None or not tcols:
                raise ValueError(f"{path}: a CSV manifest needs a path column ({', '.join(cls.PATH_COLUMNS)}) and "
                                 f"caption columns (caption, text, caption_1…); it has {cols}")
            return [(row[pcol], [row[c] for c in tcols]) for row in reader]

    def key(self, record: int) -> str:
        return self.rows[record][1]

    def read(self, record: int) -> Raw:
        full, rel, texts = self.rows[record]
        return Raw(rel, full, texts=texts)

    def fingerprint(self) -> dict:
        return {**super().fingerprint(), "manifest": os.path.basename(self.path)}


class SyntheticSource(_RowSource):
    name = "synthetic"

    def __init__(self, dataset):
        self.dataset = dataset
        self.num_records = len(dataset)

    def key(self, record: int) -> str:
        return self.dataset.key(record)

    def read(self, record: int) -> Raw:
        return Raw(self.key(record), self.dataset.waveform(record), sample_rate=self.dataset.sample_rate,
                   texts=list(self.dataset.captions[record]))

    def fingerprint(self) -> dict:
        d = self.dataset
        return {**super().fingerprint(), "synthetic": [d.seed, d.split, d.clip_samples, d.mix_probability]}


# --- validation and decoding ------------------------------------------------------------------------

def captions(raw: Raw) -> list[str]:
    """The non-empty captions of a record; ValueError when there is none."""
    t = raw.texts
    items = [t] if isinstance(t, str) else (list(t) if isinstance(t, (list, tuple)) else None)
    if items is None:
        raise ValueError("no caption: 'text' is missing" if t is None else
                         f"no caption: 'text' is a {type(t).__name__}, not a string or list")
    good = [s.strip() for s in items if isinstance(s, str) and s.strip()]
    if not good:
        raise ValueError("no caption: every caption is empty")
    return good


def bad_reason(err: Exception) -> str:
    """How a record's defect is worded in the bad-sample log and stats: `decode`'s and `captions`' ValueErrors
    say what is wrong themselves; anything else (a failing read, a crop) is named by its type."""
    return str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}"


def decode(raw: Raw, sample_rate: int) -> np.ndarray:
    """Mono float32 samples at `sample_rate`; ValueError for corrupt, empty or non-finite audio."""
    if raw.problem:
        raise ValueError(raw.problem)
    if isinstance(raw.audio, str):
        return audio_io.load_audio(raw.audio, sample_rate)       # librosa: mono, resampled
    if isinstance(raw.audio, np.ndarray):
        x, sr = raw.audio.astype(np.float32, copy=False), raw.sample_rate
    else:
        import soundfile as sf
        if not raw.audio:
            raise ValueError(f"empty .{raw.ext} member (0 bytes)")
        try:
            x, sr = sf.read(io.BytesIO(raw.audio), dtype="float32", always_2d=True)
        except Exception as err:  # libsndfile raises its own error types
            # libsndfile's own message, without soundfile's "Error opening <BytesIO object at 0x…>: " prefix,
            # so that a bad sample's reason (kept in the iterator state) is the same in every run
            why = getattr(err, "error_string", None) or str(err)
            raise ValueError(f"cannot decode .{raw.ext} ({type(err).__name__}: {why})") from None
        x = x.mean(axis=1) if x.shape[1] > 1 else x[:, 0]
    x = audio_io.check_waveform(x, f".{raw.ext or 'audio'}")
    if sr != sample_rate:
        import librosa  # the resampler librosa.load uses (LAION's loader), so files and tars agree
        x = librosa.resample(x, orig_sr=sr, target_sr=sample_rate)
        x = audio_io.check_waveform(x, "resampled audio")
    return x
