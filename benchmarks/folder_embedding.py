"""Section 9: embedding a folder of files end to end, clapjax vs laion_clap's `get_audio_embedding_from_filelist`.

The same files for both (10 s clips at 44.1, 48, 32 and 22.05 kHz, FLAC and WAV), decoded by the same loader
(`librosa.load(sr=48000)`), int16 round trip and crop/pad, then the audio tower. laion_clap decodes every file
one after another before any compute; clapjax (`CLAP.get_audio_embedding_from_filelist`) decodes in a pool of
threads (one per usable core) a window of batches ahead, overlapped with the tower. Two towers: the full
HTSAT-tiny (the tower dominates on a CPU) and a tiny HTSAT of the same front end (16-wide, one block per
stage: decoding dominates, as it does beside an accelerator). For the tiny tower laion_clap's model gets the
same small HTSAT (its own `HTSAT_Swin_Transformer` class) and a matching projection. Random weights: the
throughput does not depend on them. The clapjax column with `workers=0` is the same call decoding in one
thread (what the pool buys). `--tiny`: clapjax alone on the tiny training config's model (1 s clips), seconds.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile

import numpy as np

from benchmarks import common
from benchmarks.reference_models import random_model

RATES = (44100, 48000, 32000, 22050)   # mixed rates: every one but 48 kHz is resampled by librosa (soxr_hq)
SECONDS = 10.0                          # a full-size model's clip: one crop, no fill
FILES = {"full": 64, "quick": 24, "tiny": 8}
TINY_TOWER = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2))   # on HTSAT's 256² grid, window 8


def write_folder(directory: str, n: int, seconds: float, seed: int = 0) -> list[str]:
    """`n` noise clips of `seconds` at the RATES in turn, FLAC and WAV alternating; their paths."""
    import soundfile as sf
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        sr = RATES[i % len(RATES)]
        path = os.path.join(directory, f"clip{i:04d}.{'flac' if i % 2 == 0 else 'wav'}")
        sf.write(path, rng.uniform(-0.4, 0.4, int(sr * seconds)).astype(np.float32), sr)
        paths.append(path)
    return paths


def _clapjax_timing(clap, paths, repeats: int, workers: int | None) -> dict:
    return common.median_seconds(lambda: clap.get_audio_embedding_from_filelist(paths, workers=workers), repeats)


def _laion_timing(hook, paths, repeats: int) -> dict:
    import torch
    with torch.no_grad():
        return common.median_seconds(lambda: hook.get_audio_embedding_from_filelist(paths), repeats)


def _decode_timing(paths, repeats: int) -> dict:
    """The loader alone, one file after another: what decoding costs of the whole."""
    from clapjax.audio.io import load_audio
    return common.median_seconds(lambda: [load_audio(p) for p in paths], repeats)


def _tiny_tower_pair(hook_builder):
    """(laion hook, clapjax CLAP) with the tiny tower in place of HTSAT-tiny (same front end, same projection
    shape), from a fresh `reference_models.build` trio."""
    import torch
    from laion_clap.clap_module.htsat import HTSAT_Swin_Transformer
    from clapjax.app.api import CLAP
    trio = hook_builder()
    model = trio.laion.model
    torch.manual_seed(0)
    model.audio_branch = HTSAT_Swin_Transformer(
        spec_size=256, patch_size=4, patch_stride=(4, 4), num_classes=527, window_size=8,
        config=model.audio_branch.config,
        enable_fusion=False, fusion_type="None", embed_dim=TINY_TOWER["embed_dim"],
        depths=list(TINY_TOWER["depths"]), num_heads=list(TINY_TOWER["num_heads"])).eval()
    width = TINY_TOWER["embed_dim"] * 2 ** (len(TINY_TOWER["depths"]) - 1)
    model.audio_projection[0] = torch.nn.Linear(width, model.joint_embed_shape)
    cfg = dataclasses.replace(trio.config, audio=dataclasses.replace(trio.config.audio, **TINY_TOWER))
    return trio.laion, CLAP(random_model(cfg))


def _row(tower: str, n: int, ours: dict, sequential: dict, laion: dict | None, decode: dict) -> dict:
    row = {"tower": tower, "files": n, "clapjax_files_per_s": n / ours["median_s"],
           "clapjax_one_thread_files_per_s": n / sequential["median_s"],
           "laion_files_per_s": n / laion["median_s"] if laion else None,
           "decode_share_of_laion": decode["median_s"] / laion["median_s"] if laion else None,
           "clapjax_s": ours, "clapjax_one_thread_s": sequential, "laion_s": laion, "decode_s": decode}
    row["vs_laion"] = common.ratio(row["clapjax_files_per_s"], row["laion_files_per_s"])
    row["pool_speedup"] = common.ratio(row["clapjax_files_per_s"], row["clapjax_one_thread_files_per_s"])
    return row


def table(rows: list[dict]) -> str:
    return common.md_table(
        ["tower", "files", "clapjax files/s", "clapjax 1 thread", "laion_clap files/s", "clapjax ÷ laion",
         "decoding, share of laion's time"],
        [[r["tower"], r["files"], common.fmt(r["clapjax_files_per_s"]),
          common.fmt(r["clapjax_one_thread_files_per_s"]), common.fmt(r["laion_files_per_s"]),
          common.fmt(r["vs_laion"], ".2f", "×"), common.fmt(r["decode_share_of_laion"], ".0%")] for r in rows])


def run(opts: common.Options) -> dict:
    from clapjax.audio.stream import usable_cores
    workers = usable_cores()
    rows = []
    with tempfile.TemporaryDirectory(prefix="clapjax-folder-bench-") as folder:
        if opts.tiny:
            from clapjax.app.api import CLAP
            from clapjax.train import config as C
            cfg = C.model_config(C.load_config("tiny", []))
            paths = write_folder(folder, FILES["tiny"], cfg.frontend.clip_samples / cfg.frontend.sample_rate)
            clap = CLAP(random_model(cfg))
            rows.append(_row("tiny training config (1 s clips)", len(paths), _clapjax_timing(clap, paths, 1, workers),
                             _clapjax_timing(clap, paths, 1, 0), None, _decode_timing(paths, 1)))
        else:
            from benchmarks.reference_models import build
            paths = write_folder(folder, FILES["quick" if opts.quick else "full"], SECONDS)
            decode = _decode_timing(paths, opts.repeats)
            trio = build(False, text_layers=1)   # the text tower plays no part
            rows.append(_row("HTSAT-tiny", len(paths), _clapjax_timing(trio.clapjax, paths, opts.repeats, workers),
                             _clapjax_timing(trio.clapjax, paths, opts.repeats, 0),
                             _laion_timing(trio.laion, paths, opts.repeats), decode))
            del trio
            hook, clap = _tiny_tower_pair(lambda: build(False, text_layers=1))
            rows.append(_row("tiny HTSAT (16 wide, 1 block a stage)", len(paths),
                             _clapjax_timing(clap, paths, opts.repeats, workers), _clapjax_timing(clap, paths,
                             opts.repeats, 0), _laion_timing(hook, paths, opts.repeats), decode))
    notes = [f"clapjax decodes with {workers} threads (the usable cores) a window of 2 batches of 32 ahead; "
             "laion_clap decodes every file first, in one thread, then runs its model on all of them at once",
             f"files: {', '.join(f'{r / 1000:g} kHz' for r in RATES)} in turn, FLAC and WAV, "
             f"{SECONDS:g} s each (1 s with --tiny); the page cache is warm for both (one untimed call first)",
             "'decoding, share of laion's time': the loader alone over the files, one after another, ÷ laion_clap's "
             "whole call; with the tiny tower laion_clap's own front end and per-file feature code still outweigh it",
             "ratios are from one run on a shared machine: compare columns of the same row"]
    return {"rows": rows, "table": table(rows), "notes": notes, "workers": workers}
