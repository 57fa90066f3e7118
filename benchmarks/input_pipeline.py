"""Section 'pipeline': the training input pipeline's clips/s against the raw FLAC decode limit and
LAION's own webdataset pipeline (issue 17 item 5, bullets 1–3).

One set of LAION-format tar shards (10 s 48 kHz mono 16-bit FLAC clips, tones under noise, 5 captions
each, a sizes.json; written once, read from the page cache by every row), and from it the pre-decoded
shards `clapjax prepare` writes (their preparation is not timed). Rows, in clips/s:

* raw FLAC decode: soundfile's decode of the clips' bytes in a tight loop, one thread: one core's limit;
* clapjax in-process: `num_workers=0` with 1 and 2 decoding threads (the pipeline before workers), and
  the pre-decoded shards with 1 thread (their cost per core without a process boundary);
* clapjax from FLAC tars, and from the pre-decoded shards, with 1 and 2 worker processes (one decoding
  thread each);
* LAION's pipeline: `laion_clap.training.data.get_wds_dataset` (its shard and sample shuffles, decode,
  `collate_fn_with_preprocess`: int16 round trip, crop or pad, per-sample RoBERTa tokenization) in its
  torch DataLoader, same shards, batch and worker count, in a child process (the DataLoader forks).
  Two substitutions, both in LAION's favour or neutral: torchaudio (not installable here beside the CPU
  torch wheel) → soundfile behind webdataset's own decoder (which still writes each clip to a temporary
  file, as LAION's does), and the roberta-base vocabulary (not available offline) → the small BPE
  clapjax's rows tokenize with, loaded into LAION's own (slow) RobertaTokenizer.

A pipeline row is the whole way to host batches (read, decode, LAION's preprocessing, tokenization,
stacking) timed over `timed_batches` batches after `WARMUP_BATCHES` (worker start-up, first epoch order).
The stage table times one clip's steps in this process (where the time goes). `--tiny`: 1 s clips, the
1-worker rows only, no LAION row; its figures are a smoke test, not 10 s clips' rates.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time

import numpy as np

from benchmarks import common

SAMPLE_RATE = 48000
WARMUP_BATCHES = 2
WORDS = ("dog", "bell", "rain", "car", "bird", "door", "wind", "drum", "engine", "crowd")
# issue 17's goals, each a ratio of this run's figures
GOALS = {"per_worker_vs_raw": 0.85, "two_vs_one_worker": 1.8, "vs_laion": 1.5, "predecoded_vs_flac": 5.0,
         "predecoded_vs_flac_in_process": 5.0}   # the last: the same goal per core without a process boundary


@dataclasses.dataclass(frozen=True)
class Sizes:
    clips: int             # clips in the shards
    per_shard: int         # clips per tar shard
    seconds: float         # clip length (the front end's clip: no crop, no padding)
    batch: int             # batch size of every pipeline
    timed_batches: int     # batches timed after the warm-up (LAION's epoch must hold warm-up + timed)
    workers: tuple[int, ...]   # worker counts of the worker rows
    laion: bool            # whether LAION's rows run


def sizes(opts: common.Options) -> Sizes:
    if opts.tiny:
        return Sizes(clips=16, per_shard=4, seconds=1.0, batch=4, timed_batches=2, workers=(1,), laion=False)
    if opts.quick:
        return Sizes(clips=128, per_shard=16, seconds=10.0, batch=16, timed_batches=6, workers=(1, 2), laion=True)
    return Sizes(clips=384, per_shard=32, seconds=10.0, batch=32, timed_batches=10, workers=(1, 2), laion=True)


# --- the data ---------------------------------------------------------------------------------------

def clip(i: int, seconds: float) -> np.ndarray:
    """Two tones under noise: compresses like recorded sound (~75 % of 16-bit PCM), unlike pure noise."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    rng = np.random.default_rng(i)
    f1, f2 = rng.uniform(100, 2000, 2)
    x = 0.3 * np.sin(2 * np.pi * f1 * t) * np.sin(2 * np.pi * 0.5 * t) + 0.1 * np.sin(2 * np.pi * f2 * t)
    return (x + 0.02 * rng.standard_normal(len(t))).astype(np.float32)


def captions(i: int) -> list[str]:
    w = WORDS[i % len(WORDS)]
    return [f"a {w} sound number {i}", f"the {w} again", f"{w} and some noise", f"a short {w} clip",
            f"recording of a {w}"]


def write_shards(root: str, sz: Sizes) -> list[bytes]:
    """LAION's layout under `root` (shard-N.tar of <key>.flac + <key>.json, sizes.json); returns the FLAC bytes."""
    import soundfile as sf
    os.makedirs(root, exist_ok=True)
    blobs, sizes_json = [], {}
    for s in range(0, sz.clips, sz.per_shard):
        name = f"shard-{s // sz.per_shard:06d}.tar"
        with tarfile.open(os.path.join(root, name), "w") as tf:
            for i in range(s, min(sz.clips, s + sz.per_shard)):
                buf = io.BytesIO()
                sf.write(buf, clip(i, sz.seconds), SAMPLE_RATE, format="FLAC")
                blobs.append(buf.getvalue())
                for ext, data in (("flac", blobs[-1]), ("json", json.dumps({"text": captions(i)}).encode())):
                    info = tarfile.TarInfo(f"{i:07d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        sizes_json[name] = min(sz.clips, s + sz.per_shard) - s
    with open(os.path.join(root, "sizes.json"), "w") as f:
        json.dump(sizes_json, f)
    return blobs


def tokenizer_dir(root: str) -> str:
    from clapjax.tokenizer import train_byte_level_bpe
    texts = [c for i in range(200) for c in captions(i)]
    return str(train_byte_level_bpe(texts, os.path.join(root, "tokenizer"), vocab_size=1000))


# --- measurements -----------------------------------------------------------------------------------

def raw_decode_rate(blobs: list[bytes], seconds_budget: float) -> dict:
    """Clips/s of soundfile's FLAC decode, one thread, as the pipeline calls it (float32, 2-D), and its CPU
    milliseconds per clip."""
    import soundfile as sf
    sf.read(io.BytesIO(blobs[0]), dtype="float32", always_2d=True)
    n, c0, t0 = 0, time.process_time(), time.perf_counter()
    while n < len(blobs) or time.perf_counter() - t0 < seconds_budget:
        sf.read(io.BytesIO(blobs[n % len(blobs)]), dtype="float32", always_2d=True)
        n += 1
        if n >= 4 * len(blobs):
            break
    return {"clips_per_s": n / (time.perf_counter() - t0), "clips": n,
            "cpu_ms_per_clip": 1e3 * (time.process_time() - c0) / n}


def cpu_seconds(pids) -> float:
    """User + system CPU seconds the processes `pids` have used so far (Linux /proc)."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])          # utime, stime (fields 14 and 15 of stat)
    return total / os.sysconf("SC_CLK_TCK")


def timed(draw, batches: int, worker_pids) -> dict:
    """Wall clips/s of `batches` calls of `draw` (returns a batch's size), and the CPU they took: the calling
    process's (all its threads) and its decoding workers' (`worker_pids()`), per clip. On a loaded machine the
    wall rate is a share of the cores; CPU per clip is what the pipeline costs, whoever else runs."""
    t0 = time.perf_counter()
    for _ in range(WARMUP_BATCHES):
        draw()
    warmup, pids = time.perf_counter() - t0, worker_pids()
    n, c0, w0, t0 = 0, time.process_time(), cpu_seconds(pids), time.perf_counter()
    for _ in range(batches):
        n += draw()
    elapsed, main_cpu, workers_cpu = time.perf_counter() - t0, time.process_time() - c0, cpu_seconds(pids) - w0
    return {"clips_per_s": n / elapsed, "clips": n, "warmup_s": warmup, "main_cpu_ms_per_clip": 1e3 * main_cpu / n,
            "worker_cpu_ms_per_clip": 1e3 * workers_cpu / n if pids else None}


def _grain_workers() -> list[int]:
    import multiprocessing
    return [p.pid for p in multiprocessing.active_children() if p.name.startswith("grain")]


def _children() -> list[int]:
    """This process's child processes (the DataLoader's workers; webdataset hides the loader's own list)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid():
                        out.append(int(entry))
            except (OSError, IndexError, ValueError):   # gone meanwhile
                continue
    return out


def clapjax_rate(source, tok, frontend, sz: Sizes, workers: int, threads: int) -> dict:
    """Clips/s of clapjax's training pipeline over `source`, after the warm-up batches."""
    from clapjax.train import data as D
    cfg = D.DataConfig(global_batch_size=sz.batch, num_workers=workers, num_threads=threads)
    it = D.make_iterator(source, tok, frontend, cfg, process_index=0, process_count=1)
    try:
        return timed(lambda: len(next(it)["index"]), sz.timed_batches, _grain_workers)
    finally:
        it.close()


def stage_times(source, tok, frontend, records: int) -> dict:
    """CPU milliseconds per clip of each step of the pipeline's preparation, in this thread, on `records` clips."""
    from clapjax.audio import io as audio_io
    from clapjax.train import data_sources as S
    totals = dict.fromkeys(("read", "decode", "int16 round trip", "crop / pad", "tokenize + stack (per clip)"), 0.0)
    quantize = not getattr(source, "quantized", False)      # as data.Prepare: int16 shards hold the round trip
    tok(["warm-up"])                                           # the tokenizer's first call sets itself up
    feats, texts = [], []
    for r in range(records):
        t = [time.thread_time()]
        raw = source.read(r)
        t.append(time.thread_time())
        x = S.decode(raw, frontend.sample_rate)
        t.append(time.thread_time())
        x = audio_io.quantize_int16(x) if quantize else x
        t.append(time.thread_time())
        feats.append(audio_io.clip_features(x, frontend, False, np.random.default_rng(r)))
        texts.append(S.captions(raw)[0])
        t.append(time.thread_time())
        for name, a, b in zip(totals, t, t[1:]):
            totals[name] += b - a
    t0 = time.thread_time()
    audio_io.stack_audio_input(feats, False)
    tok(texts)
    totals["tokenize + stack (per clip)"] = time.thread_time() - t0
    return {k: 1e3 * v / records for k, v in totals.items()}


def laion_rate(spec: dict) -> dict:
    """LAION's get_wds_dataset DataLoader over `spec['shards']` (run in a child: `python -m
    benchmarks.input_pipeline laion SPEC`)."""
    import types
    from clapjax.convert.torch_reference import laion_clap
    laion_clap()
    from laion_clap.training import data as laion_data
    from transformers import RobertaTokenizer
    tok = spec["tokenizer"]
    laion_data.roberta_tokenizer = RobertaTokenizer(os.path.join(tok, "vocab.json"), os.path.join(tok, "merges.txt"))
    laion_data.wds.torch_audio = _soundfile_audio
    args = types.SimpleNamespace(
        remotedata=False, train_data=spec["shards"], val_data=None, train_num_samples=None, parallel_eval=False,
        seed=0, batch_size=spec["batch"], world_size=1, workers=spec["workers"], horovod=False, prefetch_factor=None,
        class_index_dict=None, data_filling="repeatpad", data_truncating="rand_trunc", text_augment_selection=None,
        tmodel="roberta")
    audio_cfg = {"sample_rate": SAMPLE_RATE, "clip_samples": spec["clip_samples"]}
    info = laion_data.get_wds_dataset(args, {"audio_cfg": audio_cfg}, is_train=True, max_len=spec["clip_samples"])
    it = iter(info.dataloader)
    return timed(lambda: len(next(it)["waveform"]), spec["timed_batches"], _children)


def _soundfile_audio(key, data):
    """webdataset's `torch_audio` decoder with soundfile in torchaudio.load's place: the same extension test,
    the same temporary file, the same (channels, samples) float32 tensor and rate."""
    import re
    import soundfile as sf
    import torch
    extension = re.sub(r".*[.]", "", key)
    if extension not in ["flac", "mp3", "sox", "wav", "m4a", "ogg", "wma"]:
        return None
    with tempfile.TemporaryDirectory() as dirname:
        fname = os.path.join(dirname, f"file.{extension}")
        with open(fname, "wb") as stream:
            stream.write(data)
        x, sr = sf.read(fname, dtype="float32", always_2d=True)
    return torch.from_numpy(np.ascontiguousarray(x.T)), sr


# --- the section --------------------------------------------------------------------------------------

def _row(pipeline: str, workers: int | None, m: dict, raw: dict, laion: dict | None = None) -> dict:
    per_worker = m["clips_per_s"] / max(1, workers or 1)
    decoding_cpu = m["worker_cpu_ms_per_clip"] if workers else m["main_cpu_ms_per_clip"]
    total_cpu = m["main_cpu_ms_per_clip"] + (m["worker_cpu_ms_per_clip"] or 0.0)
    return {"pipeline": pipeline, "workers": workers, **m, "per_worker_clips_per_s": per_worker,
            "per_worker_vs_raw": per_worker / raw["clips_per_s"],
            "vs_laion": common.ratio(m["clips_per_s"], (laion or {}).get("clips_per_s")),
            "total_cpu_ms_per_clip": total_cpu, "cpu_vs_raw": common.ratio(raw["cpu_ms_per_clip"], decoding_cpu)}


def measure(root: str, sz: Sizes) -> dict:
    from clapjax.audio.frontend import FrontEndConfig
    from clapjax.tokenizer import Tokenizer
    from clapjax.train.array_records import ArrayRecordShards
    from clapjax.train.data_sources import TarShards
    from clapjax.train.prepare import PrepareConfig, open_source, prepare
    tars = os.path.join(root, "tars")
    blobs = write_shards(tars, sz)
    tokdir = tokenizer_dir(root)
    tok, frontend = Tokenizer(tokdir), FrontEndConfig(clip_samples=int(sz.seconds * SAMPLE_RATE))
    t0 = time.perf_counter()
    prepare(open_source(tars), os.path.join(root, "prepared"), PrepareConfig(workers=0), log=lambda *a: None)
    prepare_s = time.perf_counter() - t0
    flac, predecoded = TarShards(tars), ArrayRecordShards(os.path.join(root, "prepared"))
    raw = raw_decode_rate(blobs, seconds_budget=1.0 if sz.laion else 0.2)
    out = {"raw": raw, "prepare_s": prepare_s, "stages_flac": stage_times(flac, tok, frontend, min(16, sz.clips)),
           "stages_predecoded": stage_times(predecoded, tok, frontend, min(16, sz.clips)), "rows": []}
    out["rows"].append({"pipeline": "raw FLAC decode (soundfile, 1 thread)", "workers": None, **raw,
                        "per_worker_clips_per_s": raw["clips_per_s"], "per_worker_vs_raw": 1.0, "vs_laion": None,
                        "main_cpu_ms_per_clip": raw["cpu_ms_per_clip"], "worker_cpu_ms_per_clip": None,
                        "total_cpu_ms_per_clip": raw["cpu_ms_per_clip"], "cpu_vs_raw": 1.0})
    for threads in (1, 2) if sz.laion else (1,):
        out["rows"].append(_row(f"clapjax FLAC tars, in-process, {threads} thread{'s' * (threads > 1)}", 0,
                                clapjax_rate(flac, tok, frontend, sz, 0, threads), raw))
    # the shards' cost per core without a process boundary (what num_workers=0 gives them)
    out["rows"].append(_row("clapjax pre-decoded shards, in-process, 1 thread", 0,
                            clapjax_rate(predecoded, tok, frontend, sz, 0, 1), raw))
    laion = {}
    if sz.laion:
        for w in sz.workers:
            spec = {"shards": flac.paths, "tokenizer": tokdir, "batch": sz.batch, "workers": w,
                    "clip_samples": frontend.clip_samples, "timed_batches": sz.timed_batches}
            laion[w] = common.run_json_child(["benchmarks.input_pipeline", "laion", json.dumps(spec)], timeout=900)
    for name, source in (("FLAC tars", flac), ("pre-decoded shards", predecoded)):
        for w in sz.workers:
            out["rows"].append(_row(f"clapjax {name}", w, clapjax_rate(source, tok, frontend, sz, w, 1), raw,
                                    laion.get(w)))
    for w, m in laion.items():
        out["rows"].append(_row("LAION webdataset + DataLoader", w, m, raw))
    return out


def _find(rows, prefix: str, workers, key: str = "clips_per_s") -> float | None:
    return next((r[key] for r in rows if r["pipeline"].startswith(prefix) and r["workers"] == workers), None)


def ratios(rows: list[dict]) -> dict:
    """The goals' ratios from wall rates, and from CPU per clip (what a loaded machine cannot hide)."""
    one, two = _find(rows, "clapjax FLAC tars", 1), _find(rows, "clapjax FLAC tars", 2)
    w = 2 if two else 1
    cpu = functools.partial(_find, key="total_cpu_ms_per_clip")
    return {"per_worker_vs_raw": common.ratio(one, rows[0]["clips_per_s"]),
            "two_vs_one_worker": common.ratio(two, one),
            "vs_laion": common.ratio(_find(rows, "clapjax FLAC tars", w), _find(rows, "LAION", w)),
            "predecoded_vs_flac": common.ratio(_find(rows, "clapjax pre-decoded", 1), one),
            "predecoded_vs_flac_in_process": common.ratio(_find(rows, "clapjax pre-decoded shards, in-process", 0),
                                                          _find(rows, "clapjax FLAC tars, in-process, 1", 0)),
            "cpu_per_worker_vs_raw": _find(rows, "clapjax FLAC tars", 1, "cpu_vs_raw"),
            "cpu_vs_laion": common.ratio(cpu(rows, "LAION", w), cpu(rows, "clapjax FLAC tars", w)),
            "cpu_predecoded_vs_flac": common.ratio(cpu(rows, "clapjax FLAC tars", 1),
                                                   cpu(rows, "clapjax pre-decoded", 1)),
            "cpu_predecoded_vs_flac_in_process": common.ratio(cpu(rows, "clapjax FLAC tars, in-process, 1", 0),
                                                              cpu(rows, "clapjax pre-decoded shards, in-process", 0))}


def table(rows: list[dict]) -> str:
    return common.md_table(
        ["pipeline", "workers", "clips/s", "clips/s per worker", "per worker ÷ raw decode", "÷ LAION (same workers)",
         "CPU ms/clip: workers", "training process", "decoding CPU ÷ raw decode's", "warm-up s"],
        [[r["pipeline"], "–" if r["workers"] is None else r["workers"], common.fmt(r["clips_per_s"], ".1f"),
          common.fmt(r["per_worker_clips_per_s"], ".1f"), common.fmt(r["per_worker_vs_raw"], ".2f", "×"),
          common.fmt(r["vs_laion"], ".2f", "×"), common.fmt(r["worker_cpu_ms_per_clip"], ".1f"),
          common.fmt(r["main_cpu_ms_per_clip"], ".1f"), common.fmt(r["cpu_vs_raw"], ".2f", "×"),
          common.fmt(r.get("warmup_s"), ".1f")] for r in rows])


def stage_table(stages: dict) -> str:
    names = list(stages["stages_flac"])
    return common.md_table(["CPU ms per clip, one thread"] + names,
                           [["FLAC tars"] + [common.fmt(stages["stages_flac"][n]) for n in names],
                            ["pre-decoded shards"] + [common.fmt(stages["stages_predecoded"][n]) for n in names]])


def run(opts: common.Options) -> dict:
    sz = sizes(opts)
    root = tempfile.mkdtemp(prefix="clapjax-pipeline-bench-")
    load_before = os.getloadavg()
    try:
        out = measure(root, sz)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows, got = out["rows"], ratios(out["rows"])
    goals = [f"{name}: {common.fmt(got[name], '.2f', '×')} (goal ≥ {goal:g}×"
             f"{'' if got[name] is None else ', met' if got[name] >= goal else ', MISSED'}"
             f"{'' if got.get('cpu_' + name) is None else ', by CPU per clip ' + common.fmt(got['cpu_' + name], '.2f', '×')})"
             for name, goal in GOALS.items()]
    one = {name: _find(rows, f"clapjax {name}", 1) for name in ("FLAC tars", "pre-decoded shards")}
    notes = [f"{sz.clips} clips of {sz.seconds:g} s in {sz.clips // sz.per_shard} shards, batch {sz.batch}, "
             f"{sz.timed_batches} batches timed after {WARMUP_BATCHES} warm-up; {len(os.sched_getaffinity(0))} "
             f"usable cores, load average {load_before[0]:.1f} before and {os.getloadavg()[0]:.1f} after "
             "(other processes' load lowers every rate, the multi-worker ones most)",
             "goals (ratios of this run): " + "; ".join(goals),
             "per_core_clips_per_s: the 1-worker rates (one worker process is one decoding core; the training "
             "process's tokenizing and batching come on top), and the raw decode rate",
             f"pre-decoded shards written by `clapjax prepare` in {out['prepare_s']:.1f} s (in this process; not "
             "part of any row)",
             "LAION's rows: soundfile behind webdataset's decoder (no torchaudio here) and the rows' small BPE in "
             "LAION's RobertaTokenizer (no roberta-base files offline)" if sz.laion else
             "LAION's rows skipped (--tiny), as are the 2-worker and in-process 2-thread rows"]
    return {"rows": rows, "table": table(rows) + "\n\n" + stage_table(out), "notes": notes, "ratios": got,
            "goals": GOALS, "stages": {"flac": out["stages_flac"], "predecoded": out["stages_predecoded"]},
            "per_core_clips_per_s": {"raw FLAC decode": out["raw"]["clips_per_s"], **{k: v for k, v in one.items() if v}},
            "sizes": dataclasses.asdict(sz)}


if __name__ == "__main__":
    if sys.argv[1:2] != ["laion"] or len(sys.argv) != 3:
        raise SystemExit("usage: python -m benchmarks.input_pipeline laion SPEC_JSON (run_all runs the section)")
    print(json.dumps(laion_rate(json.loads(sys.argv[2]))))
