"""`clapjax prepare SRC OUT`: LAION tar shards or a manifest → pre-decoded shards (`array_records`).

    clapjax prepare data/train/ data/train-pcm/ --workers 8
    # then train with data.kind="array_record", data.shards="data/train-pcm/"

Each tar shard becomes one ArrayRecord file with the same records in the same order (a manifest's rows
are cut into files of `--rows-per-shard`); every record is decoded, down-mixed and resampled as the
training pipeline does (`data_sources.decode`), then stored as LAION's int16 round trip (or float32),
a bad one as its reason. Files are written under a temporary name by worker processes and renamed
when complete, and `prepared.json` records each finished file, so an interrupted prepare run again
keeps what it finished and redoes the rest.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import multiprocessing
import os
import sys
from typing import Sequence

import numpy as np

from clapjax.audio import io as audio_io
from clapjax.audio.frontend import FrontEndConfig
from clapjax.audio.stream import usable_cores
from clapjax.train import array_records as AR
from clapjax.train.data_sources import Manifest, Raw, Source, TarShards, bad_reason, captions, decode

MANIFEST_EXTS = (".jsonl", ".json", ".csv")


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    sample_rate: int = FrontEndConfig().sample_rate  # the front end's rate: audio is resampled to it
    pcm: str = "int16"           # 'int16': LAION's int16 round trip (train with quantize=True); 'float32': as decoded
    workers: int | None = None   # worker processes; None: the usable cores; 0: in this process
    rows_per_shard: int = 1024   # manifest rows per output file (a tar source keeps one file per tar shard)

    def __post_init__(self):
        if self.pcm not in AR.PCM_DTYPES:
            raise ValueError(f"pcm must be one of {sorted(AR.PCM_DTYPES)}, got {self.pcm!r}")
        for name in ("sample_rate", "rows_per_shard"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.workers is not None and (isinstance(self.workers, bool) or not isinstance(self.workers, int)
                                         or self.workers < 0):
            raise ValueError(f"workers must be an int >= 0 (0: in this process), got {self.workers!r}")


@dataclasses.dataclass(frozen=True)
class ShardTask:
    """One output file and where its records come from."""

    file: str                      # output file name in OUT
    origin: str                    # what it was made from: the tar's name, or 'rows a-b of the manifest'
    first_record: int              # the source's id of its first record (names an unreadable record as training does)
    records: int                   # how many records it holds
    tar: str | None = None         # the tar shard to read, or
    rows: tuple[Raw, ...] = ()     # the manifest rows
    sizes_json: str | None = None  # the tar source's sizes.json argument


@dataclasses.dataclass(frozen=True)
class Summary:
    directory: str
    records: int          # records in all files
    bad: int              # of which bad samples (kept as bad entries)
    shards: int           # files
    kept: int             # files an earlier, interrupted run had finished
    bytes: int            # size of the files on disk
    source_bytes: int     # size of what they were made from (tars, or the manifest's audio files)

    def line(self) -> str:
        ratio = f"{self.bytes / self.source_bytes:.2f} x" if self.source_bytes else "n/a x"
        return (f"prepared {self.records} records ({self.bad} bad) in {self.shards} shards in {self.directory}"
                f"{f' ({self.kept} kept from an earlier run)' if self.kept else ''}: {_mib(self.bytes)} on disk, "
                f"{ratio} the source's {_mib(self.source_bytes)}")


def _mib(n: int) -> str:
    return f"{n / 2 ** 20:.2f} MiB"


# --- one record, one file -------------------------------------------------------------------------------

def prepared_record(raw: Raw, sample_rate: int, pcm: str) -> tuple[bytes, bool]:
    """(a source record as stored, whether it is a bad sample): captions and samples as the training
    pipeline's Prepare gets them before its crop (captions, decode, [int16 round trip]), or the
    reason it is a bad sample."""
    try:
        texts = captions(raw) if not raw.problem else None
        x = decode(raw, sample_rate)
        if pcm == "int16":
            x = audio_io.quantize_int16(x)
    except Exception as err:  # as in Prepare: any failure of one record is that record's defect
        return AR.encode_record(raw.key, bad=bad_reason(err)), True
    if pcm == "int16":
        samples = audio_io.int16_of_quantized(x)
    elif x.dtype == np.float32:
        samples = x
    else:   # decode gives float32 today; anything else could not be stored exactly
        raise TypeError(f"{raw.key}: decoded samples are {x.dtype}, expected float32")
    return AR.encode_record(raw.key, samples, texts), False


def _records(task: ShardTask):
    """The task's source records in order (an unreadable one: the exception, for its bad entry)."""
    if task.tar is None:
        yield from task.rows
        return
    src = TarShards([task.tar], task.sizes_json)
    src.groups(0, 1)   # indexes the tar: an unreadable tar or a wrong sizes.json stops the prepare, as training
    for i in range(src.num_records):
        try:
            yield src.read(i)
        except Exception as err:
            yield err


def write_shard(task: ShardTask, out_dir: str, sample_rate: int, pcm: str) -> dict:
    """Write one file (under a temporary name, renamed when complete); its entry for prepared.json."""
    from array_record.python.array_record_module import ArrayRecordWriter

    final = os.path.join(out_dir, task.file)
    partial = os.path.join(out_dir, f".{task.file}.partial")
    writer = ArrayRecordWriter(partial, AR.WRITER_OPTIONS)
    n = bad = largest = 0
    try:
        for raw in _records(task):
            if isinstance(raw, Exception):
                data, is_bad = AR.encode_record(f"record {task.first_record + n}", bad=bad_reason(raw)), True
            else:
                data, is_bad = prepared_record(raw, sample_rate, pcm)
            writer.write(data)
            bad += is_bad
            largest = max(largest, len(data))
            n += 1
    finally:
        writer.close()
    if n != task.records:
        os.remove(partial)
        raise ValueError(f"{task.origin}: expected {task.records} records, read {n}")
    os.replace(partial, final)
    return {"bad": bad, "bytes": os.path.getsize(final), "max_record_bytes": largest}


def _source_bytes(task: ShardTask) -> int:
    if task.tar is not None:
        return os.path.getsize(task.tar)
    return sum(os.path.getsize(r.audio) for r in task.rows if isinstance(r.audio, str) and os.path.isfile(r.audio))


def run_task(task: ShardTask, out_dir: str, sample_rate: int, pcm: str) -> dict:
    """A worker's job: one file, and its figures for prepared.json."""
    return {**write_shard(task, out_dir, sample_rate, pcm), "source_bytes": _source_bytes(task)}


# --- the plan and the run --------------------------------------------------------------------------------

def open_source(spec: str, *, sizes_json: str | None = None, audio_root: str | None = None) -> Source:
    """SRC as `clapjax prepare` reads it: a manifest file (.jsonl/.json/.csv) or tar shards."""
    if spec.endswith(MANIFEST_EXTS) and os.path.isfile(spec):
        return Manifest(spec, audio_root)
    if audio_root:
        raise ValueError("--audio-root is for a manifest source, not tar shards")
    return TarShards(spec, sizes_json)


def plan(source: Source, cfg: PrepareConfig, sizes_json: str | None = None) -> tuple[str, list[ShardTask]]:
    """(grouping, the output files in order): a file per tar shard, or per `rows_per_shard` manifest rows."""
    if isinstance(source, TarShards):
        return "shard", [ShardTask(os.path.basename(p).removesuffix(".tar") + AR.SHARD_EXT, os.path.basename(p),
                                   int(source.offsets[i]), int(source.sizes[i]), tar=p, sizes_json=sizes_json)
                         for i, p in enumerate(source.paths)]
    if isinstance(source, Manifest):
        name = os.path.basename(source.path)
        tasks = []
        for k, a in enumerate(range(0, source.num_records, cfg.rows_per_shard)):
            b = min(source.num_records, a + cfg.rows_per_shard)
            tasks.append(ShardTask(f"{os.path.splitext(name)[0]}-{k:05d}{AR.SHARD_EXT}", f"rows {a}-{b - 1} of {name}",
                                   a, b - a, rows=tuple(source.read(i) for i in range(a, b))))
        return "row", tasks
    raise ValueError(f"clapjax prepare reads tar shards or a manifest, not a {type(source).__name__}")


def _files_planned(meta: dict) -> list[tuple]:
    return [(s["file"], s["source"], s["records"]) for s in meta["shards"]]


def _resumed(out_dir: str, fresh: dict) -> dict:
    """The metadata to continue with: `fresh` for a new directory, else the earlier run's, if it is the
    same preparation (same settings, source and files), with files that are not intact marked undone."""
    if not os.path.isfile(os.path.join(out_dir, AR.META_FILE)):
        if os.listdir(out_dir):
            raise ValueError(f"{out_dir}: not empty and not a prepared directory; give an empty or new directory")
        return fresh
    old = AR.read_meta(out_dir)
    settings = [k for k in fresh if k not in ("shards", "complete")]
    differ = {k: (old.get(k), fresh[k]) for k in settings if old.get(k) != fresh[k]}
    if _files_planned(old) != _files_planned(fresh):
        differ["shards"] = "a different list of files"
    if differ:
        raise ValueError(f"{out_dir} was prepared from another source or with other settings (there vs now: "
                         f"{differ}); use a new directory")
    for s in old["shards"]:
        path = os.path.join(out_dir, s["file"])
        if s["done"] and not (os.path.isfile(path) and os.path.getsize(path) == s["bytes"]):
            s["done"] = False
    return old


def prepare(source: Source, out_dir: str, cfg: PrepareConfig = PrepareConfig(), *, sizes_json: str | None = None,
            log=print) -> Summary:
    """Pre-decode `source` into `out_dir` (resuming an interrupted run there); `log` gets a line per file."""
    grouping, tasks = plan(source, cfg, sizes_json)
    os.makedirs(out_dir, exist_ok=True)
    fresh = {"format": AR.FORMAT, "sample_rate": cfg.sample_rate, "pcm": cfg.pcm, "grouping": grouping,
             "source": source.fingerprint(), "complete": False,
             "shards": [{"file": t.file, "source": t.origin, "records": t.records, "done": False} for t in tasks]}
    meta = _resumed(out_dir, fresh)
    entries = {s["file"]: s for s in meta["shards"]}
    # a source file that changed since its shard was made (same name and count, other bytes) is made again
    todo = [t for t in tasks if not entries[t.file]["done"] or entries[t.file]["source_bytes"] != _source_bytes(t)]
    for t in todo:   # a partial file (or one finished after its run stopped recording) is redone
        entries[t.file]["done"] = False
        for name in (t.file, f".{t.file}.partial"):
            if os.path.exists(os.path.join(out_dir, name)):
                os.remove(os.path.join(out_dir, name))
    meta["complete"] = False
    AR.write_meta(out_dir, meta)

    def finished(task: ShardTask, result: dict) -> None:
        entries[task.file].update(result, done=True)
        AR.write_meta(out_dir, meta)
        log(f"[{sum(s['done'] for s in meta['shards'])}/{len(tasks)}] {task.file}: {task.records} records "
            f"({result['bad']} bad)")

    workers = usable_cores() if cfg.workers is None else cfg.workers
    if workers == 0 or not todo:
        for t in todo:
            finished(t, run_task(t, out_dir, cfg.sample_rate, cfg.pcm))
    else:
        # spawn, not fork: the parent has imported JAX, whose threads do not survive a fork
        with concurrent.futures.ProcessPoolExecutor(min(workers, len(todo)),
                                                    mp_context=multiprocessing.get_context("spawn")) as pool:
            running = {pool.submit(run_task, t, out_dir, cfg.sample_rate, cfg.pcm): t for t in todo}
            try:
                for fut in concurrent.futures.as_completed(running):
                    finished(running[fut], fut.result())
            except BaseException:
                pool.shutdown(cancel_futures=True)
                raise
    meta["complete"] = True
    AR.write_meta(out_dir, meta)
    shards = meta["shards"]
    return Summary(out_dir, sum(s["records"] for s in shards), sum(s["bad"] for s in shards), len(shards),
                   len(tasks) - len(todo), sum(s["bytes"] for s in shards), sum(s["source_bytes"] for s in shards))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="clapjax prepare", description=(
        "pre-decode LAION tar shards or a manifest into ArrayRecord shards of PCM and captions, to train from with "
        "data.kind=array_record (the same batches as from SRC, faster); run it again to resume an interrupted run"))
    p.add_argument("src", metavar="SRC", help="tar shards (a directory, glob or {000..099} range) or a manifest "
                   ".jsonl/.json/.csv")
    p.add_argument("out", metavar="OUT", help="the directory to write (new or empty, or an interrupted run's)")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: the usable cores; "
                   "0: in this process)")
    p.add_argument("--sample-rate", type=int, default=PrepareConfig.sample_rate,
                   help="the model front end's sample rate (default %(default)s)")
    p.add_argument("--pcm", choices=sorted(AR.PCM_DTYPES), default=PrepareConfig.pcm,
                   help="int16: LAION's int16 round trip, for data.quantize=True (default); float32: as decoded, "
                   "for either setting, twice the size")
    p.add_argument("--sizes-json", help="the tars' sizes.json (default: beside the shards)")
    p.add_argument("--audio-root", help="a manifest's relative paths are relative to this (default: its folder)")
    p.add_argument("--rows-per-shard", type=int, default=PrepareConfig.rows_per_shard,
                   help="manifest rows per output file (default %(default)s)")
    args = p.parse_args(argv)
    cfg = PrepareConfig(sample_rate=args.sample_rate, pcm=args.pcm, workers=args.workers,
                        rows_per_shard=args.rows_per_shard)
    source = open_source(args.src, sizes_json=args.sizes_json, audio_root=args.audio_root)
    print(prepare(source, args.out, cfg, sizes_json=args.sizes_json).line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
