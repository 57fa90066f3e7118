"""Section 5: `clapjax convert` seconds and peak RSS for a release-shaped laion checkpoint.

A random-init laion_clap HTSAT-tiny + RoBERTa-base (≈158 M parameters, the 630k releases' shape)
saved as LAION's training saved it: `module.` prefix, `epoch` / `name`, and the `optimizer` entry
torch.optim.AdamW.state_dict() writes after a step (LAION's two weight-decay groups, its scheduler's
NumPy lr; the moments are 2× the weights, which makes the file ~3× them, as the releases are). Each
measurement is a subprocess started from a small wrapper process, so that the wrapper's
RUSAGE_CHILDREN ru_maxrss is that process's peak alone (a parent's RUSAGE_CHILDREN is the maximum
over every child it reaped): `clapjax convert SRC OUT` (which reads only the `state_dict`'s
storages), the same conversion after reading the whole file (the converter before it read one
entry), and each read alone. The converted directory is kept for the start-up section; the `.pt`
is deleted. Smoke runs (`--tiny`) convert a smaller HF-layout ClapModel directory instead
(HTSAT-tiny + a 1-layer, 32-wide text tower, ≈28 M parameters): the same subprocess and accounting
in a few seconds.
"""
from __future__ import annotations

import json
import os
import shutil
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


def laion_checkpoint(path: str, amodel: str = "HTSAT-tiny") -> int:
    """Write a random release-shaped laion checkpoint to `path` (HTSAT-base: the music releases'
    shape); returns its parameter count."""
    import numpy as np
    import torch
    from clapjax.convert import torch_reference as R
    model = R.laion_clap_model(amodel, "roberta", seed=0)
    # LAION's training/main.py: trainable parameters only (not the frozen STFT / mel front end),
    # no weight decay on gains, biases and the logit scales
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    def exclude(n, p):
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
    opt = torch.optim.AdamW([{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
                             {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": 0.2}])
    for _, p in named:
        p.grad = torch.zeros_like(p)
    opt.step()  # AdamW's state: step, exp_avg, exp_avg_sq per parameter
    for group in opt.param_groups:  # LAION's cosine scheduler sets NumPy floats
        group["lr"] = np.float64(5e-5)
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 45, "name": "random-init", "state_dict": sd, "optimizer": opt.state_dict()}, path)
    return int(sum(p.numel() for p in model.parameters()))


# the conversion as it was before the converter read one entry: the whole file, then its state dict
WHOLE_FILE_CONVERT = r"""
import sys
from clapjax.convert import laion, pipeline, torch_pickle
src, out = sys.argv[1:]
sd = laion.unwrap_state_dict(torch_pickle.load_torch_file(src), src)
pipeline.convert_source(pipeline.Source("laion", sd), out, log=lambda line: None)
"""

READ_ONLY = r"""
import sys
from clapjax.convert import laion, torch_pickle
src, how = sys.argv[1:]
sd = laion.read_state_dict(src) if how == "entry" else laion.unwrap_state_dict(torch_pickle.load_torch_file(src), src)
print(sum(v.nbytes for v in sd.values()), file=sys.stderr)
"""


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


def measured(cmd: list[str]) -> dict:
    """Wall time, CPU time and peak RSS of `cmd`, run from the wrapper."""
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], capture_output=True, text=True,
                          env=common.subprocess_env(), timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        raise ValueError(f"measuring wrapper failed: {proc.stderr[-2000:]}")
    result = json.loads(lines[-1])
    if result["rc"]:
        raise ValueError(f"{' '.join(cmd[:4])} exited {result['rc']}: {proc.stderr[-2000:]}")
    return result


def convert(src: str, out: str) -> dict:
    return measured([sys.executable, "-m", "clapjax.app.cli", "convert", src, out])


def run(opts: common.Options, workdir: str) -> dict:
    out = os.path.join(workdir, "converted")
    if opts.tiny:
        src, what = os.path.join(workdir, "hf_tiny"), "smoke: HF ClapModel dir, HTSAT-tiny + 1-layer text"
        params = hf_tiny_directory(src)
        size = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src))
        runs = [(what, convert(src, out))]
    else:
        src = os.path.join(workdir, "laion_release_shaped.pt")
        params = laion_checkpoint(src)
        size = os.path.getsize(src)
        what = "laion .pt (weights + AdamW state), HTSAT-tiny + RoBERTa-base, random init"
        try:
            runs = [
                (f"{what}: clapjax convert (reads the state_dict's storages)", convert(src, out)),
                ("the same, after reading the whole file (before)",
                 measured([sys.executable, "-c", WHOLE_FILE_CONVERT, src, os.path.join(workdir, "converted_whole")])),
                ("read alone: the state_dict's storages", measured([sys.executable, "-c", READ_ONLY, src, "entry"])),
                ("read alone: the whole file (before)", measured([sys.executable, "-c", READ_ONLY, src, "whole"])),
            ]
        finally:
            os.remove(src)  # ~1.8 GB
            shutil.rmtree(os.path.join(workdir, "converted_whole"), ignore_errors=True)
    rows = [{"source": name, "params": params, "file_mb": size / 2**20, **result,
             "peak_rss_gib": result["peak_rss_kib"] / 2**20,
             "peak_rss_per_file": result["peak_rss_kib"] * 1024 / size} for name, result in runs]
    table = common.md_table(
        ["converter (clapjax convert → Orbax)", "parameters", "source MiB", "wall s", "CPU s (user+sys)",
         "peak RSS GiB", "peak RSS ÷ file"],
        [[r["source"], f"{params / 1e6:.1f} M", f"{r['file_mb']:.0f}", f"{r['wall_s']:.1f}",
          f"{r['user_s'] + r['sys_s']:.1f}", f"{r['peak_rss_gib']:.2f}", f"{r['peak_rss_per_file']:.2f}×"]
         for r in rows])
    return {"rows": rows, "table": table, "checkpoint": out}
