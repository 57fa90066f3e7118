"""The iterators the training loop draws batches from, and how a drawn batch goes onto the devices.

Data iterator interface — what `loop.train()` needs from the data pipeline (clapjax.train.data's
`DataIterator` and `RandomBatches` below both provide it):

* `next(it)` → dict of NumPy arrays holding THIS PROCESS's rows of the next global batch
  (`train.batch_size / process_count` rows; process p's rows are rows p·b … (p+1)·b − 1 of the
  global batch). The loop uses `waveform` (B, N) float32 — or `mel_fusion` (B, 4, T, mel) and
  `longer` (B,) for fused models — and `input_ids`, `attention_mask` [, `token_type_ids`] (B, 77)
  int32; other keys (`index`, `key`, …) stay on the host. `StopIteration` ends the run early.
* `it.get_state()` → a JSON-serialisable value, taken right after the batch of step s was drawn
  and stored in checkpoint s; `it.set_state(value)` on resume must make the next `next(it)` return
  exactly the batch the uninterrupted run drew for step s + 1.
"""
from __future__ import annotations

from typing import Mapping

import jax
import numpy as np

from clapjax.train import config as config_lib
from clapjax.train import sharding

MODEL_KEYS = ("waveform", "mel_fusion", "longer", "input_ids", "attention_mask", "token_type_ids")


class RandomBatches:
    """Random waveforms and token ids, a pure function of (seed, batch index, row): for tests and
    smoke runs. Steps listed in `nan_steps` (0-based batch indices) carry NaN audio."""

    def __init__(self, global_batch: int, clip_samples: int, vocab_size: int, *, text_length: int = 77,
                 seed: int = 0, process_index: int = 0, process_count: int = 1, nan_steps=(), pad_id: int = 1):
        if global_batch % process_count:
            raise ValueError(f"batch {global_batch} is not divisible by {process_count} processes")
        self.local = global_batch // process_count
        self.first_row = process_index * self.local
        self.clip_samples, self.vocab, self.length = clip_samples, vocab_size, text_length
        self.seed, self.nan_steps, self.pad_id = seed, frozenset(int(s) for s in nan_steps), pad_id
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows = range(self.first_row, self.first_row + self.local)
        wav = np.empty((self.local, self.clip_samples), np.float32)
        ids = np.full((self.local, self.length), self.pad_id, np.int32)
        mask = np.zeros((self.local, self.length), np.int32)
        for i, row in enumerate(rows):
            r = np.random.default_rng((self.seed, self.index, row))
            wav[i] = r.uniform(-1.0, 1.0, self.clip_samples).astype(np.float32)
            n = int(r.integers(4, self.length + 1))
            ids[i, :n] = r.integers(3, self.vocab, n)
            ids[i, 0], ids[i, n - 1] = 0, 2            # <s> … </s>, RoBERTa's ids
            mask[i, :n] = 1
        if self.index in self.nan_steps:
            wav[:] = np.nan
        self.index += 1
        return {"waveform": wav, "input_ids": ids, "attention_mask": mask,
                "index": np.asarray(list(rows), np.int32)}

    def get_state(self) -> dict:
        return {"index": self.index}

    def set_state(self, state: Mapping) -> None:
        self.index = int(state["index"])


def make_data_iterator(cfg, model_cfg, process_index: int | None = None, process_count: int | None = None):
    """The iterator `cfg.data` describes, for this process."""
    p = jax.process_index() if process_index is None else process_index
    n = jax.process_count() if process_count is None else process_count
    data = cfg.data
    if data.kind == "random":
        return RandomBatches(cfg.train.batch_size, model_cfg.frontend.clip_samples, int(data.get("vocab_size", 300)),
                             text_length=int(data.get("text_length", 77)), seed=int(data.get("seed", cfg.seed)),
                             process_index=p, process_count=n, nan_steps=tuple(data.get("nan_steps", ())))
    from clapjax.tokenizer import Tokenizer
    from clapjax.train import data as data_lib
    if not data.get("tokenizer"):
        raise ValueError("data.tokenizer must name a tokenizer directory (vocab.json + merges.txt, …)")
    plain = config_lib.to_dict(cfg)["data"]
    fixed = {"global_batch_size": int(cfg.train.batch_size), "seed": int(plain.get("seed", cfg.seed))}
    if model_cfg.enable_fusion:
        fixed["truncating"] = "fusion"
    return data_lib.make_iterator(data_lib.source_from_config(plain), Tokenizer(data.tokenizer, kind=cfg.model.tmodel),
                                  model_cfg.frontend, data_lib.config_from_mapping(plain, **fixed),
                                  process_index=p, process_count=n)


def device_batch(local_batch: Mapping[str, np.ndarray], mesh) -> dict:
    """This process's rows → the global, batch-sharded arrays the step takes."""
    return sharding.global_batch_from_local({k: v for k, v in local_batch.items() if k in MODEL_KEYS}, mesh)
