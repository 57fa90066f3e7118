"""Section 4: cold and warm start, fresh process → first embedding, with the persistent cache.

Each probe is a new Python process (`python -m benchmarks.startup --child CKPT CACHE`) that
timestamps: interpreter up (measured from the parent's spawn time), `import clapjax` + the API
module, `CLAP.from_pretrained` (Orbax restore), the first audio embedding of one 10 s clip
(compile or persistent-cache load + run), the same call again (run only; so compile/cache ≈
first − second), then the first and second text embedding. Cold: an empty cache directory. Warm:
a second process on the same, now populated, directory. Goal: warm ≤ 10 s to the first embedding.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from benchmarks import common

PHASES = ("interpreter_s", "imports_s", "restore_s", "first_audio_s", "second_audio_s", "first_text_s",
          "second_text_s")


def child(ckpt: str, cache: str, spawn_wall: float) -> dict:
    t = {"interpreter_s": time.time() - spawn_wall}
    t0 = time.perf_counter()
    import numpy as np
    import clapjax
    from clapjax.app.api import CLAP
    t["imports_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    clap = CLAP.from_pretrained(ckpt, compilation_cache=cache)
    t["restore_s"] = time.perf_counter() - t0
    wave = np.random.default_rng(0).uniform(-0.5, 0.5, (1, clap.config.frontend.clip_samples)).astype(np.float32)
    ids = np.ones((1, 77), np.int32)
    ids[0, 0] = 0
    tok = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for name, fn in (("audio", lambda: clap.get_audio_embedding_from_data(wave)),
                     ("text", lambda: clap.get_text_embedding(tok))):
        for which in ("first", "second"):
            t0 = time.perf_counter()
            fn()
            t[f"{which}_{name}_s"] = time.perf_counter() - t0
    t["to_first_audio_s"] = time.time() - spawn_wall
    t["clapjax_version"] = clapjax.__version__
    return t


def probe(ckpt: str, cache: str) -> dict:
    spawn = time.time()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.startup", "--child", ckpt, cache, repr(spawn)],
                          capture_output=True, text=True, env=common.subprocess_env(), timeout=900)
    wall = time.time() - spawn
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        raise ValueError(f"start-up probe failed (rc {proc.returncode}): {proc.stderr[-2000:]}")
    out = json.loads(lines[-1])
    out["process_wall_s"] = wall
    out["cache_files"] = sum(len(f) for _, _, f in os.walk(cache))
    return out


def run(opts: common.Options, workdir: str, ckpt: str) -> dict:
    cache = os.path.join(workdir, "jax_cache_startup")
    os.makedirs(cache, exist_ok=True)
    if os.listdir(cache):
        raise ValueError(f"{cache} should start empty")
    rows = [{"start": "cold (empty cache)", **probe(ckpt, cache)},
            {"start": "warm (cache populated)", **probe(ckpt, cache)}]
    for r in rows:
        r["compile_or_cache_load_s"] = r["first_audio_s"] - r["second_audio_s"]
    table = common.md_table(
        ["start (full-size checkpoint)", "interpreter s", "imports s", "restore s", "compile / cache load s",
         "audio run s", "→ first audio embedding s", "first text s", "goal ≤ 10 s (warm)"],
        [[r["start"], f"{r['interpreter_s']:.2f}", f"{r['imports_s']:.2f}", f"{r['restore_s']:.2f}",
          f"{r['compile_or_cache_load_s']:.2f}", f"{r['second_audio_s']:.2f}", f"{r['to_first_audio_s']:.2f}",
          f"{r['first_text_s']:.2f}", ("met" if r["to_first_audio_s"] <= 10 else "NOT met") if "warm" in r["start"]
          else ""] for r in rows])
    return {"rows": rows, "table": table}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", nargs=3, metavar=("CKPT", "CACHE", "SPAWN_WALL"), required=True)
    args = ap.parse_args(argv)
    ckpt, cache, spawn = args.child
    print(json.dumps(child(ckpt, cache, float(spawn))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
