"""`clapjax embed-audio`'s output on disk: written as it goes, resumable, bad files listed, parts merged.

For `--out OUT.npy` (BASE = OUT without .npy):

    OUT.npy            (rows, D) float32, one row per embedded file, in input order
    BASE.paths.json    the file of each row (only files that were embedded)
    BASE.failed.json   [{"index", "path", "reason"}] the files that could not be read (only when there are any)
    BASE.part.json     a part of a split run: which part, of how many, of which file list (merge checks it)
    BASE.partial/      while running: rows.f32 (the rows so far) and state.json (how far, the crop generator's
                       state); a rerun with the same files, model and seed continues from there; gone when done

Each batch is appended and fsynced before state.json says it is done, so an interrupted run loses at most the
batches in flight. The inputs are processed in order, so "done" is a count of input files.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import re
import shutil

import numpy as np

STATE_VERSION = 1
COPY_ROWS = 65536  # rows per copy from the row file into the final .npy (bounded memory for any size)


@dataclasses.dataclass(frozen=True)
class Outputs:
    """The files of one output (see the module docstring)."""
    npy: str
    paths: str
    failed: str
    part: str
    partial: str

    @classmethod
    def of(cls, out: str) -> "Outputs":
        if not out.endswith(".npy"):
            raise ValueError(f"--out must name a .npy file, got {out!r}")
        base = out[:-len(".npy")]
        return cls(out, base + ".paths.json", base + ".failed.json", base + ".part.json", base + ".partial")


@dataclasses.dataclass
class Summary:
    """What a run (or a merge) wrote."""
    rows: int            # embeddings written
    dim: int             # their width
    failed: list[dict]   # the files left out: {"index", "path", "reason"}
    resumed_from: int    # input files already done by an earlier, interrupted run (0: a fresh run)


def process_split(index: int | None, count: int | None) -> tuple[int, int]:
    """(index, count) of this process's part: as given, else from the launch environment (SLURM, TPU pod,
    CLAPJAX_* of `clapjax launch`; `train.launch.detect`), else (0, 1)."""
    if index is None or count is None:
        from clapjax.train import launch
        group = launch.detect()
        count = max(group.num_processes, 1) if count is None else count
        index = max(group.process_id, 0) if index is None else index
    if count < 1:
        raise ValueError(f"--process-count must be at least 1, got {count}")
    return index, count


def part_out(out: str, index: int, count: int) -> str:
    """The output of part `index` of `count` of a split run (`count` 1: `out` itself)."""
    if not 0 <= index < count:
        raise ValueError(f"--process-index {index} is not in [0, {count}) (--process-count {count})")
    return out if count == 1 else f"{out[:-len('.npy')]}.part-{index:05d}-of-{count:05d}.npy"


def split(paths: list[str], index: int, count: int) -> list[str]:
    """Part `index` of `count` contiguous, near-equal parts of `paths` (merging them in order restores it)."""
    n = len(paths)
    return paths[index * n // count:(index + 1) * n // count]


def list_digest(paths: list[str]) -> str:
    return hashlib.sha256("\n".join(paths).encode()).hexdigest()


def _write_json(path: str, value) -> None:
    """Whole or not at all: a crash leaves the previous version."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def _seeded(seed: int | None, rng_state: dict | None, index: int, count: int):
    """The crop generator: `default_rng(seed)` for a whole run (as before streaming), the part's own child of
    `SeedSequence(seed)` in a split run; restored to `rng_state` when resuming."""
    if seed is None:
        return None
    rng = np.random.default_rng(seed if count == 1 else np.random.SeedSequence(seed).spawn(count)[index])
    if rng_state is not None:
        rng.bit_generator.state = rng_state
    return rng


def embed_to_file(clap, paths: list[str], out: str, *, seed: int | None, workers: int | None, model: str,
                  index: int = 0, count: int = 1, all_paths: list[str] | None = None, progress=None) -> Summary:
    """Embed `paths` (absolute) into `out` and its sidecars, resuming `out`'s .partial/ run if there is one.
    `index`/`count`/`all_paths`: this is part `index` of a split of `all_paths`. `progress(n)`: n more inputs done."""
    files = Outputs.of(out)
    identity = {"inputs_sha256": list_digest(paths), "inputs": len(paths), "model": model, "seed": seed,
                "part": [index, count]}
    state = _resume_state(files, identity)
    dim = clap.config.joint_embed_shape
    os.makedirs(files.partial, exist_ok=True)
    rows_file = os.path.join(files.partial, "rows.f32")
    start = state["done"] if state else 0
    failed = list(state["failed"]) if state else []
    rows = state["rows"] if state else 0
    with open(rows_file, "ab" if state else "wb") as f:
        f.truncate(rows * dim * 4)  # anything after the last recorded batch belongs to a batch never recorded
        f.seek(0, os.SEEK_END)
        rng = _seeded(seed, state and state["rng_state"], index, count)
        done = start
        for batch in clap.iter_audio_embeddings(paths[start:], rng, workers=workers, skip_bad=True):
            f.write(np.ascontiguousarray(batch.embeddings, np.float32).tobytes())
            f.flush()
            os.fsync(f.fileno())
            failed += _indexed_failures(paths[done:done + batch.inputs], batch, done)
            rows += len(batch.paths)
            done += batch.inputs
            _write_json(os.path.join(files.partial, "state.json"),
                        dict(identity, version=STATE_VERSION, dim=dim, done=done, rows=rows, failed=failed,
                             rng_state=batch.rng_state))
            if progress is not None:
                progress(batch.inputs)
    bad = {f["index"] for f in failed}
    embedded = [p for i, p in enumerate(paths) if i not in bad]
    part = None if count == 1 else dict(identity, all_inputs_sha256=list_digest(all_paths or paths), dim=dim)
    _finish(files, np.memmap(rows_file, np.float32, "r", shape=(rows, dim)) if rows else np.zeros((0, dim),
            np.float32), embedded, failed, part)
    shutil.rmtree(files.partial)
    return Summary(rows, dim, failed, start)


def _indexed_failures(stretch: list[str], batch, offset: int) -> list[dict]:
    """The batch's failed files with their input index: the stretch is its embedded and failed files interleaved
    in input order, so walking it beside the embedded ones places each failure."""
    out, good = [], iter(batch.paths)
    failures, next_good = iter(batch.failed), next(good, None)
    for i, path in enumerate(stretch):
        if path == next_good:
            next_good = next(good, None)
        else:
            bad = next(failures)
            out.append({"index": offset + i, "path": bad.item, "reason": bad.reason})
    return out


def _resume_state(files: Outputs, identity: dict) -> dict | None:
    state_file = os.path.join(files.partial, "state.json")
    if not os.path.isfile(state_file):
        return None
    state = _read_json(state_file)
    differs = [k for k in identity if state.get(k) != identity[k]]
    if state.get("version") != STATE_VERSION or differs:
        raise ValueError(f"{files.partial} holds an interrupted run of other "
                         f"{', '.join(differs) or 'format'}; rerun with the same files, model and --seed to "
                         f"resume it, or delete it to start over")
    return state


def _finish(files: Outputs, rows, embedded: list[str], failed: list[dict], part: dict | None) -> None:
    """The final files: OUT.npy copied from `rows` in slices, then the indexes (a stale failed list goes)."""
    if len(rows) != len(embedded):
        raise RuntimeError(f"{files.npy}: {len(rows)} rows for {len(embedded)} embedded files")
    tmp = files.npy[:-len(".npy")] + ".tmp.npy"
    final = np.lib.format.open_memmap(tmp, "w+", np.float32, rows.shape)
    for s in range(0, len(rows), COPY_ROWS):
        final[s:s + COPY_ROWS] = rows[s:s + COPY_ROWS]
    final.flush()
    del final
    os.replace(tmp, files.npy)
    _write_json(files.paths, embedded)
    if failed:
        _write_json(files.failed, failed)
    elif os.path.exists(files.failed):
        os.remove(files.failed)
    if part is not None:
        _write_json(files.part, part)


def merge(out: str) -> Summary:
    """The parts of a split run of `out` → `out` and its indexes, after checking that every part is there,
    finished, and of the same file list, model, seed and width."""
    files = Outputs.of(out)
    base = out[:-len(".npy")]
    found = sorted(glob.glob(glob.escape(base) + ".part-*-of-*.npy"))
    pattern = re.compile(re.escape(base) + r"\.part-(\d{5})-of-(\d{5})\.npy$")
    parts = [(int(m[1]), int(m[2]), p) for p in found if (m := pattern.match(p))]
    if not parts:
        raise FileNotFoundError(f"no parts of {out} ({base}.part-NNNNN-of-NNNNN.npy) to merge")
    counts = {c for _, c, _ in parts}
    if len(counts) != 1:
        raise ValueError(f"parts of {out} from runs split differently ({sorted(counts)} parts): remove the stale ones")
    count = counts.pop()
    missing = sorted(set(range(count)) - {i for i, _, _ in parts})
    if missing:
        raise ValueError(f"{out}: parts {missing} of {count} are missing (run them with --process-index)")
    metas, arrays, embedded, failed, offset = [], [], [], [], 0
    for i, _, path in sorted(parts):
        pf = Outputs.of(path)
        if os.path.exists(pf.partial) or not os.path.isfile(pf.part):
            raise ValueError(f"{path}: part {i} of {count} is not finished (rerun it to resume)")
        meta = _read_json(pf.part)
        rows = np.load(path, mmap_mode="r")
        names = _read_json(pf.paths)
        bad = _read_json(pf.failed) if os.path.isfile(pf.failed) else []
        if len(names) != len(rows) or len(names) + len(bad) != meta["inputs"]:
            raise ValueError(f"{path}: {len(rows)} rows, {len(names)} paths and {len(bad)} failed files for "
                             f"{meta['inputs']} inputs")
        metas.append(meta)
        arrays.append(rows)
        embedded += names
        failed += [dict(b, index=b["index"] + offset) for b in bad]
        offset += meta["inputs"]
    for key in ("all_inputs_sha256", "model", "seed", "dim"):
        values = {json.dumps(m[key]) for m in metas}
        if len(values) != 1:
            raise ValueError(f"parts of {out} differ in {key} ({', '.join(sorted(values))}): not one run")
    dim = metas[0]["dim"]
    _finish(files, _Concatenated(arrays, dim), embedded, failed, None)
    return Summary(len(embedded), dim, failed, 0)


class _Concatenated:
    """Row slices across the parts' memory-mapped arrays, without loading them all at once."""

    def __init__(self, arrays, dim: int):
        self.arrays, self.starts = arrays, np.cumsum([0] + [len(a) for a in arrays])
        self.shape = (int(self.starts[-1]), dim)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        lo, hi = rows.start, min(rows.stop, self.shape[0])
        out = [a[max(lo - s, 0):max(hi - s, 0)] for a, s in zip(self.arrays, self.starts[:-1])]
        return np.concatenate([np.asarray(o) for o in out])
