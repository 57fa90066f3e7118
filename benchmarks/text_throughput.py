"""Section 2: text embedding captions/s, RoBERTa at 77 tokens, two input kinds.

(a) 77 real tokens (all-ones mask): the worst case, every position attends.
(b) realistic captions: 8–20 real tokens padded to 77 with RoBERTa's pad id and a zero mask on the
    padding, as LAION's tokenizer (padding='max_length', max_length=77) produces them.

clapjax: the public `CLAP.get_text_embedding({'input_ids', 'attention_mask'})`. laion_clap: its
model's `get_text_embedding` on the same tokens (its hook's tokenizer would need the hub). HF:
`ClapModel.get_text_features`. Torch under no_grad.
"""
from __future__ import annotations

import numpy as np

from benchmarks import common
from clapjax.train import throughput
from benchmarks.reference_models import build, tiny

LENGTH, PAD, BOS, EOS = 77, 1, 0, 2


def tokens(batch: int, kind: str, seed: int, vocab: int = 50265) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = np.full((batch, LENGTH), PAD, np.int64)
    mask = np.zeros((batch, LENGTH), np.int64)
    for i in range(batch):
        n = LENGTH if kind == "full" else int(rng.integers(8, 21))
        ids[i, :n] = rng.integers(3, vocab, n)
        ids[i, 0], ids[i, n - 1] = BOS, EOS
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


def model_flops(clap, batch: dict) -> float | None:
    import jax
    from flax import nnx
    graphdef, state = nnx.split(clap.model)
    fn = jax.jit(lambda s, b: nnx.merge(graphdef, s).get_text_embedding(b))
    return throughput.cost_flops(fn.lower(state, batch))   # HLO cost analysis: no compile needed


KINDS = {"full": "77 real tokens", "captions": "captions, 8–20 real tokens padded to 77"}


def measure(trio, batches, repeats: int, layers: int) -> list[dict]:
    import torch
    rows = []
    for kind, label in KINDS.items():
        for b in batches:
            tok = tokens(b, kind, seed=b, vocab=trio.config.text.vocab_size)
            ours = common.median_seconds(lambda: trio.clapjax.get_text_embedding(tok), repeats)
            tt = {k: torch.from_numpy(v) for k, v in tok.items()}
            laion = hf = None
            if trio.laion is not None:
                with torch.no_grad():
                    laion = common.median_seconds(lambda: trio.laion.model.get_text_embedding(tt), repeats)
                    hf = common.median_seconds(lambda: trio.hf.get_text_features(**tt), repeats)
            flops = model_flops(trio.clapjax, {k: v.astype(np.int32) for k, v in tok.items()}) \
                if kind == "full" else None
            r = {"kind": f"RoBERTa-{layers}L, {label}", "input": kind, "batch": b,
                 "clapjax_per_s": b / ours["median_s"],
                 "laion_per_s": b / laion["median_s"] if laion else None, "hf_per_s": b / hf["median_s"] if hf else None, "clapjax_s": ours, "laion_s": laion, "hf_s": hf,
                 "model_flops": flops}
            r["vs_laion"] = common.ratio(r["clapjax_per_s"], r["laion_per_s"])
            r["vs_hf"] = common.ratio(r["clapjax_per_s"], r["hf_per_s"])
            rows.append(r)
    return rows


def table(rows: list[dict]) -> str:
    return common.md_table(
        ["text", "batch", "clapjax captions/s", "laion_clap captions/s", "HF captions/s", "clapjax ÷ laion",
         "clapjax ÷ HF"],
        [[r["kind"], r["batch"], common.fmt(r["clapjax_per_s"]), common.fmt(r["laion_per_s"]),
          common.fmt(r["hf_per_s"]), common.fmt(r["vs_laion"], ".2f", "×"), common.fmt(r["vs_hf"], ".2f", "×")]
         for r in rows])


def run(opts: common.Options) -> dict:
    import torch
    trio = tiny(False) if opts.tiny else build(False, text_layers=opts.text_layers)
    layers = trio.config.text.num_hidden_layers
    rows = measure(trio, opts.text_batches, opts.repeats, layers)
    return {"rows": rows, "table": table(rows), "torch_threads": torch.get_num_threads()}
