"""The training input pipeline (Grain): per-process sharding, interleaving, window shuffle, decoding
and LAION's preprocessing (in worker processes, or threads of the training process), bad-sample
accounting, batching, exact resume.

    source = TarShards("data/train/")            # or Manifest(...), SyntheticSource(...)
    it = make_iterator(source, tokenizer, frontend, DataConfig(global_batch_size=256))
    batch = next(it)            # dict of NumPy arrays, this process's rows of the global batch
    state = it.get_state()      # JSON-able; `it.set_state(state)` continues with the exact next batch

Order. Process p of P reads its groups (tar shards p, p+P, …; for row sources every P-th row). Each
epoch, a `np.random.default_rng((seed, epoch, p))` permutes the groups, interleaves them
`cycle_length` at a time (round robin, as webdataset/Grain interleave shards), and shuffles the result
in consecutive windows of `window_size` ('window'), over the whole epoch ('global': every source here
is random access), or not at all ('none'). The order is a pure function of (seed, epoch, p), so the
iterator state is only a position and a few counters.

Per sample, `np.random.default_rng((seed, epoch, record))` draws the crop and the caption, so a record
is prepared identically in any thread or worker, after any resume, whatever the process count. Preparation is
LAION's: decode, mono, resample to the front end's rate, int16 round trip, then `rand_trunc` crop or
`repeatpad` fill (`fusion`: the 4-chunk mel), one caption of the list. Tokenization is per batch.

Workers. With `num_workers` = W > 0, W Grain worker processes (spawned: each imports clapjax afresh)
prepare the samples, worker w the stream positions w, w+W, …, and the training process takes them
round robin, so it sees the very stream one process would: skipping bad samples, tokenizing and
batching stay in the training process, and batches are bit-identical for every W, 0 included. The
iterator state is the stream position and the bad-sample counters, whatever W: a run may resume with
another worker count. Workers end with the training process, a SIGKILLed one included. Spawned
workers re-import the script that started them as `__mp_main__`: a script that builds the iterator at
top level needs the `if __name__ == "__main__":` guard (the `clapjax` CLI has it).

Bad samples (corrupt or empty audio, no caption) are dropped, counted and logged by key; the stream
never puts another sample in their place. At each epoch end, and once `bad_check_after` samples were
seen, more than `max_bad_fraction` bad stops the run with `TooManyBadSamples`.

Batches: waveform (B, N) f32 [fusion: mel_fusion (B, 4, T, mel) f32 instead], longer (B,) bool,
input_ids / attention_mask (B, 77) int32 [token_type_ids for BERT], index (B,) int32 (the record id;
`source.key(index)` names it) [, key (B,) str with `with_keys`]. B = global_batch_size / P.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import sys
from typing import Any, Callable, Literal, Mapping

import grain
import numpy as np

from clapjax.audio import io as audio_io
from clapjax.audio.frontend import FrontEndConfig
from clapjax.train.data_sources import (Manifest, Source, SyntheticSource, TarShards, bad_reason, captions,
                                        decode)
from clapjax.train.data_workers import int16_handover, prepared_stream

log = logging.getLogger("clapjax.train.data")
STATE_VERSION = 1
MAX_LOGGED_BAD = 100


class TooManyBadSamples(RuntimeError):
    """More bad samples than the configured fraction: the data, not the model, needs attention."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    global_batch_size: int
    seed: int = 0
    num_epochs: int | None = None          # None: repeat forever (epochs still reshuffle)
    shuffle: Literal["window", "global", "none"] = "window"
    window_size: int = 2048
    cycle_length: int = 4                  # tar shards read round robin at a time
    drop_remainder: bool = True
    truncating: Literal["rand_trunc", "fusion"] = "rand_trunc"
    filling: Literal["repeatpad", "repeat", "pad"] = "repeatpad"
    crop_mode: Literal["random", "start", "center"] = "random"
    quantize: bool = True                  # LAION's int16 round trip
    max_bad_fraction: float = 0.01
    bad_check_after: int = 1000            # judge mid-epoch only after this many samples
    num_workers: int = 0                   # worker processes that decode and prepare (0: the training process)
    num_threads: int = 2                   # decoding threads of each process that decodes (0: inline, no thread)
    prefetch_samples: int = 0              # samples decoded ahead, over all workers (0: two local batches)
    with_keys: bool = False

    def __post_init__(self):
        def positive(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"DataConfig.{name} must be a positive int, got {v!r}")
        for name in ("global_batch_size", "window_size", "cycle_length", "bad_check_after"):
            positive(name)
        if self.num_epochs is not None:
            positive("num_epochs")
        if self.shuffle not in ("window", "global", "none"):
            raise ValueError(f"DataConfig.shuffle must be 'window', 'global' or 'none', got {self.shuffle!r}")
        if self.truncating not in ("rand_trunc", "fusion"):
            raise ValueError(f"DataConfig.truncating must be 'rand_trunc' or 'fusion', got {self.truncating!r}")
        if not 0.0 <= self.max_bad_fraction < 1.0:
            raise ValueError(f"DataConfig.max_bad_fraction must be in [0, 1), got {self.max_bad_fraction}")
        for name in ("num_workers", "num_threads", "prefetch_samples"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"DataConfig.{name} must be an int >= 0, got {v!r}")

    @property
    def fused(self) -> bool:
        """Whether batches are for a fused audio tower (LAION's 'fusion' truncation: 4-chunk mels)."""
        return self.truncating == "fusion"


# --- order ----------------------------------------------------------------------------------------

def interleave(groups: list[np.ndarray], cycle_length: int) -> np.ndarray:
    """Round robin over `cycle_length` groups at a time; a finished group drops out of its block."""
    parts = []
    for start in range(0, len(groups), cycle_length):
        block = groups[start:start + cycle_length]
        pos = np.concatenate([np.arange(len(g)) for g in block])
        which = np.concatenate([np.full(len(g), j) for j, g in enumerate(block)])
        parts.append(np.concatenate(block)[np.lexsort((which, pos))])
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def epoch_order(groups: list[np.ndarray], epoch: int, cfg: DataConfig, process_index: int) -> np.ndarray:
    """Record ids process `process_index` reads in `epoch`, in order."""
    rng = np.random.default_rng((cfg.seed, epoch, process_index))
    if cfg.shuffle != "none":
        groups = [groups[i] for i in rng.permutation(len(groups))]
    order = interleave(groups, cfg.cycle_length)
    if cfg.shuffle == "global":
        return order[rng.permutation(len(order))]
    if cfg.shuffle == "window":
        window = np.arange(len(order)) // cfg.window_size
        return order[np.lexsort((rng.random(len(order)), window))]
    return order


class _Positions(grain.MapDataset):
    """Position i of this process's stream → (epoch, position in epoch, record id)."""

    def __init__(self, groups, cfg: DataConfig, process_index: int):
        super().__init__()
        self._groups, self._cfg, self._p = groups, cfg, process_index
        self.per_epoch = int(sum(len(g) for g in groups))
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return sys.maxsize if self._cfg.num_epochs is None else self.per_epoch * self._cfg.num_epochs

    def order(self, epoch: int) -> np.ndarray:
        got = self._cache.get(epoch)
        if got is None:   # threads may build the same epoch twice: harmless, the result is identical
            got = epoch_order(self._groups, epoch, self._cfg, self._p)
            self._cache = {e: o for e, o in self._cache.items() if e >= epoch - 1}
            self._cache[epoch] = got
        return got

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, pos = divmod(int(index), self.per_epoch)
        return epoch, pos, int(self.order(epoch)[pos])

    def __str__(self) -> str:
        return "Positions"


# --- preparing one sample -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Bad:
    key: str
    reason: str
    epoch: int
    pos: int


class Prepare(grain.transforms.Map):
    """(epoch, pos, record) → a prepared sample dict, or `Bad` (never an exception)."""

    def __init__(self, source: Source, frontend: FrontEndConfig, cfg: DataConfig):
        self.source, self.frontend, self.cfg = source, frontend, cfg
        # a source whose samples already are LAION's int16 round trip (int16 pre-decoded shards): the round
        # trip is the identity on them, so it is skipped
        self.quantized = bool(getattr(source, "quantized", False))
        if self.quantized and not cfg.quantize:
            raise ValueError(f"the {source.name} source holds LAION's int16 round trip of its audio; train it with "
                             f"data.quantize=True, or prepare the shards with --pcm float32")
        # pre-decoded samples resampled a second time would no longer be the tar pipeline's samples
        prepared_at = getattr(source, "sample_rate", None)
        if prepared_at is not None and prepared_at != frontend.sample_rate:
            raise ValueError(f"the {source.name} source was prepared at {prepared_at} Hz and the front end takes "
                             f"{frontend.sample_rate} Hz; prepare it again with --sample-rate {frontend.sample_rate}")
        # a worker hands the training process int16 waveforms: half the bytes to pickle, and exactly the
        # round trip's float32 again on arrival (`_Collate`)
        self.int16_waveforms = int16_handover(cfg)

    def map(self, element):
        epoch, pos, record = element
        key = f"record {record}"
        try:
            raw = self.source.read(record)
            key = raw.key
            texts = captions(raw) if not raw.problem else None
            x = decode(raw, self.frontend.sample_rate)
            rng = np.random.default_rng((self.cfg.seed, epoch, record))
            if self.cfg.quantize and not self.quantized:
                x = audio_io.quantize_int16(x)
            feats = audio_io.clip_features(x, self.frontend, self.cfg.fused, rng, filling=self.cfg.filling,
                                           crop_mode=self.cfg.crop_mode)
            text = texts[int(rng.integers(len(texts)))] if len(texts) > 1 else texts[0]
        except Exception as err:  # any failure of one record is that record's defect
            return Bad(key, bad_reason(err), epoch, pos)
        out = {k: feats[k] for k in audio_io.audio_input_keys(self.cfg.fused)}
        if self.int16_waveforms:
            out["waveform"] = audio_io.int16_of_quantized(out["waveform"], check=False)
        return {**out, "longer": feats["longer"], "index": record, "text": text, "key": key, "_end": (epoch, pos)}


# --- bad-sample accounting ------------------------------------------------------------------------

class _SkipBad(grain.IterDataset):
    """The stream without its bad samples; `stream(start)` builds the stream from a position (resume)."""

    def __init__(self, stream: Callable[[int], grain.DatasetIterator], cfg: DataConfig, per_epoch: int):
        super().__init__()
        self._stream, self._cfg, self._per_epoch = stream, cfg, per_epoch

    def __iter__(self):
        return _SkipBadIterator(self._stream, self._cfg, self._per_epoch)

    def __str__(self) -> str:
        return "SkipBad"


class _SkipBadIterator(grain.DatasetIterator):
    def __init__(self, stream: Callable[[int], grain.DatasetIterator], cfg: DataConfig, per_epoch: int):
        super().__init__()
        self._stream, self._cfg, self._per_epoch = stream, cfg, per_epoch
        self._upstream: grain.DatasetIterator | None = None    # built on the first draw (workers start then)
        self.seen = self.bad = 0           # seen counts bad samples too: it is the stream position
        self.bad_keys: list[tuple[str, str]] = []

    def __next__(self):
        if self._upstream is None:
            self._upstream = self._stream(self.seen)
        while True:
            item = next(self._upstream)
            self.seen += 1
            if isinstance(item, Bad):
                self.bad += 1
                if len(self.bad_keys) < MAX_LOGGED_BAD:
                    self.bad_keys.append((item.key, item.reason))
                log.warning("skipping bad sample %s: %s (%d bad of %d seen)", item.key, item.reason, self.bad,
                            self.seen)
                self._check(item.pos == self._per_epoch - 1)
                continue
            self._check(item["_end"][1] == self._per_epoch - 1)
            return item

    def _check(self, epoch_end: bool) -> None:
        if not (epoch_end or self.seen >= self._cfg.bad_check_after):
            return
        if self.bad > self._cfg.max_bad_fraction * self.seen:
            listed = "; ".join(f"{k} ({r})" for k, r in self.bad_keys[:10])
            raise TooManyBadSamples(
                f"{self.bad} of {self.seen} samples read were bad ({100 * self.bad / self.seen:.1f} %), more than "
                f"max_bad_fraction={100 * self._cfg.max_bad_fraction:g} %; stopping instead of training on "
                f"what is left. First bad samples: {listed}")

    def get_state(self) -> dict:
        # "parent" is the layout of Grain's in-process prefetch state, which this state had before workers
        # (STATE_VERSION 1), so that those checkpoints resume; its next_index is always `seen`
        return {"parent": {"next_index": self.seen}, "seen": self.seen, "bad": self.bad,
                "bad_keys": [list(k) for k in self.bad_keys]}

    def set_state(self, state: dict) -> None:
        position, seen = int(state["parent"]["next_index"]), int(state["seen"])
        if position != seen:
            raise ValueError(f"data iterator state is inconsistent: stream position {position}, {seen} seen")
        self.close_stream()
        self.seen, self.bad = seen, int(state["bad"])
        self.bad_keys = [tuple(k) for k in state["bad_keys"]]

    def close_stream(self) -> None:
        if self._upstream is not None:
            self._upstream.close()
            self._upstream = None

    def close(self) -> None:
        self.close_stream()
        super().close()


# --- batches ---------------------------------------------------------------------------------------

class _Collate:
    def __init__(self, tokenizer, cfg: DataConfig):
        self.tokenizer, self.with_keys, self.fused = tokenizer, cfg.with_keys, cfg.fused
        self.int16_waveforms = int16_handover(cfg)

    def __call__(self, items: list[dict]) -> dict[str, np.ndarray]:
        if self.int16_waveforms:
            items = [{**it, "waveform": audio_io.dequantize_int16(it["waveform"])} for it in items]
        out = audio_io.stack_audio_input(items, self.fused)
        out["longer"] = np.array([it["longer"] for it in items], dtype=bool)  # every batch has the flags, fused or not
        out.update(self.tokenizer([it["text"] for it in items]))
        out["index"] = np.array([it["index"] for it in items], dtype=np.int32)
        if self.with_keys:
            out["key"] = np.array([it["key"] for it in items])
        return out


class DataIterator:
    """Batches of one process, with `get_state()/set_state()` for checkpoints and bad-sample stats."""

    def __init__(self, source: Source, tokenizer, frontend: FrontEndConfig, cfg: DataConfig,
                 process_index: int, process_count: int):
        if cfg.global_batch_size % process_count:
            raise ValueError(f"global_batch_size {cfg.global_batch_size} is not divisible by the "
                             f"{process_count} processes")
        self.source, self.cfg = source, cfg
        self.process_index, self.process_count = process_index, process_count
        self.local_batch_size = cfg.global_batch_size // process_count
        positions = _Positions(source.groups(process_index, process_count), cfg, process_index)
        self.samples_per_epoch = positions.per_epoch
        stream = functools.partial(prepared_stream, positions, Prepare(source, frontend, cfg), cfg,
                                   cfg.prefetch_samples or 2 * self.local_batch_size)
        ds = _SkipBad(stream, cfg, positions.per_epoch)
        self._it = ds.batch(self.local_batch_size, drop_remainder=cfg.drop_remainder,
                            batch_fn=_Collate(tokenizer, cfg)).__iter__()
        self._fingerprint = {"version": STATE_VERSION, **source.fingerprint(), "seed": cfg.seed,
                             "global_batch_size": cfg.global_batch_size, "process_index": process_index,
                             "process_count": process_count, "shuffle": cfg.shuffle, "window": cfg.window_size,
                             "cycle_length": cfg.cycle_length, "num_epochs": cfg.num_epochs}

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def _skip_iterator(self) -> _SkipBadIterator:
        node, todo = self._it, [self._it]
        while todo:
            node = todo.pop()
            if isinstance(node, _SkipBadIterator):
                return node
            todo.extend(getattr(node, "_parents", ()))
        raise RuntimeError("pipeline has no bad-sample counter")  # cannot happen: built above

    @property
    def stats(self) -> dict:
        s = self._skip_iterator()
        return {"seen": s.seen, "bad": s.bad, "bad_keys": list(s.bad_keys)}

    def get_state(self) -> dict[str, Any]:
        return {"pipeline": self._it.get_state(), "fingerprint": self._fingerprint}

    def set_state(self, state: Mapping[str, Any]) -> None:
        theirs = dict(state.get("fingerprint", {}))
        if theirs != self._fingerprint:
            diff = {k: (theirs.get(k), v) for k, v in self._fingerprint.items() if theirs.get(k) != v}
            raise ValueError(f"data iterator state is from a different pipeline (saved vs now: {diff})")
        self._it.set_state(state["pipeline"])

    def close(self) -> None:
        self._it.close()


def _process(process_index, process_count) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} out of range for {process_count} processes")
    return int(process_index), int(process_count)


def make_iterator(source: Source, tokenizer, frontend: FrontEndConfig, cfg: DataConfig, *,
                  process_index: int | None = None, process_count: int | None = None) -> DataIterator:
    """This process's batch iterator (process index/count default to JAX's)."""
    p, n = _process(process_index, process_count)
    return DataIterator(source, tokenizer, frontend, cfg, p, n)


def source_from_config(data: Mapping[str, Any]) -> Source:
    """A source from a config section: kind 'tar' (shards, sizes_json), 'manifest' (path,
    audio_root), 'synthetic' (n, split, synthetic_seed, clip_samples, mix_probability) or
    'array_record' (shards: a directory `clapjax prepare` wrote, or its files)."""
    kind = data.get("kind")
    if kind == "tar":
        return TarShards(data["shards"], data.get("sizes_json"))
    if kind == "manifest":
        return Manifest(data["path"], data.get("audio_root"))
    if kind == "synthetic":
        from clapjax import synthetic
        return SyntheticSource(synthetic.synthetic_dataset(
            int(data.get("synthetic_seed", 0)), int(data["n"]), data.get("split", "train"),
            clip_samples=int(data.get("clip_samples", synthetic.CLIP_SAMPLES)),
            mix_probability=float(data.get("mix_probability", synthetic.MIX_PROBABILITY))))
    if kind == "array_record":
        from clapjax.train.array_records import ArrayRecordShards
        return ArrayRecordShards(data["shards"])
    raise ValueError(f"unknown data kind {kind!r}; expected 'tar', 'manifest', 'synthetic' or 'array_record'")


def config_from_mapping(data: Mapping[str, Any], **fixed) -> DataConfig:
    """DataConfig from a config section's keys that name its fields (others belong to the source)."""
    names = {f.name for f in dataclasses.fields(DataConfig)}
    return DataConfig(**{**{k: v for k, v in data.items() if k in names}, **fixed})
