"""Section 5: `clapjax convert` seconds and peak RSS for a full-size laion checkpoint.

A random-init laion_clap HTSAT-tiny + RoBERTa-base (≈158 M parameters) saved as LAION's training
saved it (`module.` prefix, `state_dict` key), then `clapjax convert SRC OUT` in a subprocess,
started from a small wrapper process so that the wrapper's RUSAGE_CHILDREN ru_maxrss is the
converter's peak alone (a parent's RUSAGE_CHILDREN is the maximum over every child it reaped).
The converted directory is kept for the start-up section. Smoke runs (`--tiny`) convert a smaller
HF-layout ClapModel directory instead (HTSAT-tiny + a 1-layer, 32-wide text tower, ≈28 M
parameters): the same subprocess and accounting in a few seconds.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

from benchmarks import common

WRAPPER = r"""
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)
wall = time.perf_counter() - t0
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(proc.stdout[-3000:], file=sys.stderr)
print(proc.stderr[-3000:], file=sys.stderr)
print(json.dumps({"rc": proc.returncode, "wall_s": wall, "peak_rss_kib": usage.ru_maxrss,
                  "user_s": usage.ru_utime, "sys_s": usage.ru_stime}))
"""


def laion_checkpoint(path: str) -> int:
    """Write a random full-size laion checkpoint to `path`; returns its parameter count."""
    import numpy as np
    import torch
    from clapjax.convert import torch_reference as R
    model = R.laion_clap_model("HTSAT-tiny", "roberta", seed=0)
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": np.int64(1), "name": "random-init", "state_dict": sd}, path)
    return int(sum(p.numel() for p in model.parameters()))


def hf_tiny_directory(path: str) -> int:
    """Write a small HF ClapModel directory (detection needs HTSAT-tiny's width; the text tower is
    free); returns its parameter count."""
    import torch
    from transformers import ClapConfig, ClapModel
    torch.manual_seed(0)
    text = dict(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2, vocab_size=300,
                max_position_embeddings=80, layer_norm_eps=1e-5)
    model = ClapModel(ClapConfig(text_config=text, projection_dim=16))
    model.save_pretrained(path)
    return int(sum(p.numel() for p in model.parameters()))


def convert(src: str, out: str) -> dict:
    cmd = [sys.executable, "-m", "clapjax.app.cli", "convert", src, out]
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], capture_output=True, text=True,
                          env=common.subprocess_env(), timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        raise ValueError(f"convert wrapper failed: {proc.stderr[-2000:]}")
    result = json.loads(lines[-1])
    if result["rc"]:
        raise ValueError(f"clapjax convert exited {result['rc']}: {proc.stderr[-2000:]}")
    return result


def run(opts: common.Options, workdir: str) -> dict:
    out = os.path.join(workdir, "converted")
    if opts.tiny:
        src, what = os.path.join(workdir, "hf_tiny"), "smoke: HF ClapModel dir, HTSAT-tiny + 1-layer text"
        params = hf_tiny_directory(src)
        size = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src))
    else:
        src, what = os.path.join(workdir, "laion_random.pt"), "laion .pt, HTSAT-tiny + RoBERTa-base, random init"
        params = laion_checkpoint(src)
        size = os.path.getsize(src)
    result = convert(src, out)
    row = {"source": what, "params": params, "file_mb": size / 2**20, **result,
           "peak_rss_gib": result["peak_rss_kib"] / 2**20}
    table = common.md_table(
        ["converter (clapjax convert → Orbax)", "parameters", "source MiB", "wall s", "CPU s (user+sys)",
         "peak RSS GiB"],
        [[what, f"{params / 1e6:.1f} M", f"{row['file_mb']:.0f}",
          f"{row['wall_s']:.1f}", f"{row['user_s'] + row['sys_s']:.1f}", f"{row['peak_rss_gib']:.2f}"]])
    return {"rows": [row], "table": table, "checkpoint": out}
