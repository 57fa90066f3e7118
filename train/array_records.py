"""Pre-decoded shards: what `clapjax prepare` writes and the source that trains from them.

A prepared directory holds one ArrayRecord file per unit of the original source (a tar shard, or a
block of manifest rows) and `prepared.json` (the settings, the source it came from, and each file's
record count). Record n of a file is record n of its tar shard, in the same order, bad ones kept as
bad entries with their reason, so record ids, the epoch order and the bad-sample accounting are those
of training from the original source, and the same seed gives the same batches bit for bit.

One record, uncompressed (`group_size:1`: a random read touches only its own record):

    uint32 LE n | n bytes of UTF-8 JSON, space-padded to a 4-byte boundary | PCM samples

The JSON is `{"key": ..., "texts": [...]}` for a usable sample (the captions `data_sources.captions`
returned) or `{"key": ..., "bad": reason}`; the PCM is mono at `prepared.json`'s sample_rate, after
decoding, down-mixing and resampling as the training pipeline does them:

* pcm 'int16': LAION's int16 round trip (`audio_io.quantize_int16`) stored as its integers;
  reading gives `int16 / 32767` in float32, which is exactly `quantize_int16` of the decoded audio,
  and `quantize_int16` of that is itself again (it never makes −32768), so training with
  `quantize=True` matches the original. Training with `quantize=False` needs pcm 'float32'.
* pcm 'float32': the decoded samples themselves (twice the size), exact for either setting.
"""
from __future__ import annotations

import json
import os
import struct
import threading
from typing import Sequence

import numpy as np

from clapjax.audio import io as audio_io
from clapjax.train.data_sources import Raw, Source, expand_paths, locate, process_shards, row_groups

FORMAT = "clapjax-predecoded/1"
META_FILE = "prepared.json"
SHARD_EXT = ".array_record"
# One record per chunk, no compression: PCM barely compresses, and decompressing would cost the time
# this format exists to save.
WRITER_OPTIONS = "group_size:1,uncompressed"
PCM_DTYPES = {"int16": np.dtype("<i2"), "float32": np.dtype("<f4")}
GROUPINGS = ("shard", "row")   # 'shard': each file is a group, as TarShards; 'row': rows round robin, as Manifest
# The reader's buffer must hold a whole record: with Grain's ArrayRecordDataSource (32 KiB buffer) a 10 s clip
# took ~5 ms to read here, with a buffer larger than the record ~0.4 ms. It is not kept allocated between reads.
MIN_READ_BUFFER, MAX_READ_BUFFER = 1 << 16, 1 << 26
_LENGTH = struct.Struct("<I")


# --- one record -------------------------------------------------------------------------------------

def encode_record(key: str, pcm: np.ndarray | None = None, texts: list[str] | None = None,
                  bad: str | None = None) -> bytes:
    """A usable sample (`pcm` and `texts`) or a bad one (`bad`: the reason), as stored."""
    if (bad is None) == (pcm is None or texts is None):
        raise ValueError("a record holds either pcm and texts or a bad-sample reason")
    header = json.dumps({"key": key, "bad": bad} if bad is not None else {"key": key, "texts": texts},
                        ensure_ascii=False).encode()
    header += b" " * (-(len(header) + _LENGTH.size) % 4)   # PCM starts 4-byte aligned
    return _LENGTH.pack(len(header)) + header + (b"" if pcm is None else pcm.tobytes())


def decode_record(data: bytes, dtype: np.dtype) -> tuple[dict, np.ndarray | None]:
    """(header, PCM samples or None for a bad record); the samples are a view of `data`."""
    if len(data) < _LENGTH.size:
        raise ValueError(f"truncated record ({len(data)} bytes)")
    (n,) = _LENGTH.unpack_from(data)
    start = _LENGTH.size + n
    if start > len(data):
        raise ValueError(f"truncated record: a {n}-byte header in {len(data)} bytes")
    header = json.loads(data[_LENGTH.size:start])
    return header, None if "bad" in header else np.frombuffer(data, dtype, offset=start)


def pcm_to_float(pcm: np.ndarray) -> np.ndarray:
    """Stored samples → float32 as the pipeline uses them (int16: exactly `audio_io.quantize_int16`'s result)."""
    if pcm.dtype == PCM_DTYPES["int16"]:
        return audio_io.dequantize_int16(pcm)
    return pcm.astype(np.float32)   # a copy: the record's bytes are read-only


def read_buffer_size(max_record_bytes: int) -> int:
    """A reader buffer that holds the file's largest record whole (a power of two, within bounds)."""
    need = int(max_record_bytes) + MIN_READ_BUFFER   # room for the container's block and chunk headers
    return min(MAX_READ_BUFFER, max(MIN_READ_BUFFER, 1 << (need - 1).bit_length()))


# --- the directory's metadata -------------------------------------------------------------------------

def read_meta(directory: str) -> dict:
    """`prepared.json` of a prepared directory, checked for this format."""
    path = os.path.join(directory, META_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{directory}: not a prepared directory (no {META_FILE}; `clapjax prepare` writes it)")
    with open(path) as f:
        try:
            meta = json.load(f)
        except ValueError as err:
            raise ValueError(f"{path}: unreadable ({err})") from None
    found = meta.get("format") if isinstance(meta, dict) else None
    if found != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} file (format {found!r})")
    if meta.get("grouping") not in GROUPINGS or meta.get("pcm") not in PCM_DTYPES:
        raise ValueError(f"{path}: grouping {meta.get('grouping')!r} / pcm {meta.get('pcm')!r} not one of "
                         f"{GROUPINGS} / {tuple(PCM_DTYPES)}")
    return meta


def write_meta(directory: str, meta: dict) -> None:
    """Replace `prepared.json` atomically (a reader or a resumed prepare never sees half of it)."""
    path = os.path.join(directory, META_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(path + ".tmp", path)


# --- the source ----------------------------------------------------------------------------------------

class ArrayRecordShards(Source):
    """Pre-decoded shards as a training source: `shards` is a prepared directory, or files of one
    (a list, glob or `{000..099}` range of .array_record files; 'shard' grouping only, numbered over the
    files given as TarShards numbers the tars given)."""

    name = "array_record"

    def __init__(self, shards: str | Sequence[str]):
        specs = [shards] if isinstance(shards, str) else list(shards)
        dirs = [s for s in specs if os.path.isdir(s)]
        if dirs and len(specs) > 1:
            raise ValueError(f"pass a prepared directory or its files, not both: {specs}")
        paths = None if dirs else expand_paths(specs)
        directory = dirs[0] if dirs else os.path.dirname(paths[0])
        if paths and any(os.path.dirname(p) != directory for p in paths):
            raise ValueError("the .array_record files given must come from one prepared directory")
        self.meta = meta = read_meta(directory)
        if not meta.get("complete"):
            raise ValueError(f"{directory}: `clapjax prepare` has not finished here; run it again to complete it")
        listed = {s["file"]: s for s in meta["shards"]}
        if paths is None:
            entries = meta["shards"]
        else:
            unknown = [os.path.basename(p) for p in paths if os.path.basename(p) not in listed]
            if unknown:
                raise ValueError(f"{directory}/{META_FILE} does not list {unknown[:3]}")
            entries = [listed[os.path.basename(p)] for p in paths]
            if meta["grouping"] == "row" and entries != meta["shards"]:
                raise ValueError(f"{directory} holds a manifest's rows: train from the whole directory, not "
                                 f"{len(entries)} of its {len(listed)} files or another order")
        self.directory, self.grouping = directory, meta["grouping"]
        self.sample_rate, self.dtype = int(meta["sample_rate"]), PCM_DTYPES[meta["pcm"]]
        self.quantized = meta["pcm"] == "int16"   # the samples already are LAION's int16 round trip
        self.files = [s["file"] for s in entries]
        self.paths = [os.path.join(directory, f) for f in self.files]
        self.sizes = np.asarray([s["records"] for s in entries], np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        self.num_records = int(self.offsets[-1])
        self._buffers = [read_buffer_size(s["max_record_bytes"]) for s in entries]
        self._readers: dict[int, object] = {}
        self._lock = threading.Lock()
        self._checked: set[int] = set()

    def __getstate__(self):  # for worker processes: readers are reopened there
        state = dict(self.__dict__)
        state.update(_readers={}, _lock=None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _reader(self, shard: int):
        reader = self._readers.get(shard)
        if reader is None:
            from array_record.python.array_record_module import ArrayRecordReader
            with self._lock:
                reader = self._readers.get(shard)
                if reader is None:   # one thread-safe reader per file, opened on first use
                    reader = ArrayRecordReader(self.paths[shard], options="readahead_buffer_size:0",
                                               file_reader_buffer_size=self._buffers[shard])
                    self._readers[shard] = reader
        return reader

    def _check(self, shards) -> None:
        """Each file holds the records prepared.json says (a replaced or truncated file is refused)."""
        for i in shards:
            if i in self._checked:
                continue
            if not os.path.isfile(self.paths[i]):
                raise ValueError(f"{self.paths[i]}: missing (listed in {META_FILE})")
            found = self._reader(i).num_records()
            if found != self.sizes[i]:
                raise ValueError(f"{self.paths[i]}: {META_FILE} says {self.sizes[i]} records, the file holds "
                                 f"{found}; prepare it again")
            self._checked.add(i)

    def groups(self, process_index: int, process_count: int) -> list[np.ndarray]:
        if self.grouping == "row":
            self._check(range(len(self.paths)))
            return row_groups(self, process_index, process_count)
        mine = process_shards(len(self.paths), process_index, process_count, "shards")
        self._check(mine)
        return [np.arange(self.offsets[i], self.offsets[i + 1], dtype=np.int64) for i in mine]

    def _record(self, record: int) -> tuple[dict, np.ndarray | None]:
        shard, pos = locate(self.offsets, record)
        return decode_record(self._reader(shard).read([pos])[0], self.dtype)

    def key(self, record: int) -> str:
        return self._record(record)[0]["key"]

    def read(self, record: int) -> Raw:
        header, pcm = self._record(record)
        if pcm is None:
            return Raw(header["key"], None, problem=header["bad"])
        return Raw(header["key"], pcm_to_float(pcm), sample_rate=self.sample_rate, texts=header["texts"])

    def fingerprint(self) -> dict:
        return {**super().fingerprint(), "shards": self.files, "sample_rate": self.sample_rate,
                "pcm": self.meta["pcm"]}
