"""Embedding throughput, clapjax vs laion_clap (PyTorch eager) vs HF ClapModel, in one run.

    python -m benchmarks.embedding_throughput [--repeats 5] [--out benchmarks/results]

Random-init HTSAT-tiny + RoBERTa-base (the released shape). clapjax holds laion_clap's weights (through
the converter's table); HF's ClapModel gets random weights of the same architecture (throughput does not
depend on the values) and, as in HF, takes log-mel features instead of waveforms. Medians over
`--repeats` timed calls after one warm-up call; clips/s and captions/s; ratio columns. Writes a
markdown table and JSON. Not a test: speed goals are ratios measured in one run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: compiles (JAX) / allocates (torch)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--audio-batches", default="1,8")
    ap.add_argument("--text-batches", default="1,32")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)

    import jax
    import numpy as np
    import torch
    from flax import nnx

    from clapjax.api import CLAP
    from clapjax.audio.frontend import log_mel
    from clapjax.convert import keymap as K, laion, torch_reference as R
    from clapjax.model import CLAPModel

    torch.set_grad_enabled(False)
    ref = R.laion_clap_model("HTSAT-tiny", "roberta")
    sd = R.torch_state_dict(ref)
    cfg = laion.detect(sd)
    model = nnx.eval_shape(lambda: CLAPModel(cfg, nnx.Rngs(0)))
    K.load_state_dict(model, sd, laion.laion_table(model))
    clap = CLAP(model, batch_sizes=tuple(int(b) for b in args.audio_batches.split(",")) + (32, 128))
    from transformers import ClapConfig, ClapModel
    hf = ClapModel(ClapConfig(text_config=dict(layer_norm_eps=1e-5))).eval()

    rng = np.random.default_rng(0)
    rows = []
    for b in (int(x) for x in args.audio_batches.split(",")):
        wave = rng.uniform(-0.5, 0.5, (b, 480000)).astype(np.float32)
        batch = {"waveform": wave}
        ours = median_seconds(lambda: jax.block_until_ready(clap._audio_fn(clap._state, batch)), args.repeats)
        items = [{"waveform": torch.from_numpy(w), "longer": torch.tensor([False])} for w in wave]
        theirs = median_seconds(lambda: ref.get_audio_embedding(items), args.repeats)
        feats = torch.from_numpy(np.asarray(log_mel(wave, cfg.frontend)))[:, None]
        hf_s = median_seconds(lambda: hf.get_audio_features(input_features=feats), args.repeats)
        rows.append({"what": "audio 10 s clips", "batch": b, "clapjax": b / ours, "laion_clap": b / theirs,
                     "hf": b / hf_s})
    for b in (int(x) for x in args.text_batches.split(",")):
        ids = rng.integers(5, 50000, (b, 77))
        mask = np.ones_like(ids)
        tok = {"input_ids": ids.astype(np.int32), "attention_mask": mask.astype(np.int32)}
        ours = median_seconds(lambda: jax.block_until_ready(clap._text_fn(clap._state, tok)), args.repeats)
        tt = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
        theirs = median_seconds(lambda: ref.get_text_embedding(tt), args.repeats)
        hf_s = median_seconds(lambda: hf.get_text_features(**tt), args.repeats)
        rows.append({"what": "text 77 tokens", "batch": b, "clapjax": b / ours, "laion_clap": b / theirs,
                     "hf": b / hf_s})

    os.makedirs(args.out, exist_ok=True)
    lines = ["| what | batch | clapjax /s | laion_clap /s | HF /s | clapjax ÷ laion_clap | clapjax ÷ HF |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['what']} | {r['batch']} | {r['clapjax']:.2f} | {r['laion_clap']:.2f} | {r['hf']:.2f} | "
                     f"{r['clapjax'] / r['laion_clap']:.2f}× | {r['clapjax'] / r['hf']:.2f}× |")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(args.out, "embedding_throughput.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "embedding_throughput.json"), "w") as f:
        json.dump({"repeats": args.repeats, "rows": rows, "torch_threads": torch.get_num_threads(),
                   "devices": [str(d) for d in jax.devices()]}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
