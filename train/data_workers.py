"""Where the training pipeline's samples are prepared: in the training process, or in Grain worker processes.

`prepared_stream` maps `data.Prepare` over the stream positions, in the training process (with
`num_threads` decoding threads) or, with `num_workers` = W > 0, in W spawned worker processes: worker w
takes the positions w, w+W, … and the training process reads the workers round robin, which is the
stream order again, so the batches are the same for every W. Samples cross the process boundary
pickled, their waveforms as int16 where LAION's int16 round trip makes that exact (`int16_handover`).
"""
from __future__ import annotations

import os
import threading
import time
from typing import TYPE_CHECKING

import grain

if TYPE_CHECKING:
    from clapjax.train.data import DataConfig

NO_SHM = 1 << 62        # Grain's min_shm_size that no array reaches


def int16_handover(cfg: DataConfig) -> bool:
    """Whether prepared waveforms cross from the workers as int16: with workers, LAION's int16 round trip
    (every sample is k/32767) and no fusion (a fused sample's mel is float)."""
    return bool(cfg.num_workers) and cfg.quantize and not cfg.fused


def _exit_with_parent(worker_index: int, worker_count: int) -> None:
    """Start-up of each worker: exit once the training process is gone. Grain's workers are daemonic,
    which ends them when the training process exits normally; a SIGKILLed one leaves them waiting
    forever on a queue nobody reads, holding memory and open shards."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)
    threading.Thread(target=watch, name=f"exit-with-parent-{worker_index}", daemon=True).start()


def prepared_stream(positions, prepare, cfg: DataConfig, buffer: int,
                    start: int) -> grain.DatasetIterator:
    """Prepared samples (or `Bad`) from stream position `start` on, in stream order. Workers: Grain's
    `mp_prefetch` gives worker w the positions start+w, start+w+W, … and reads the workers round robin,
    which is the stream order again."""
    per_process = -(-buffer // cfg.num_workers) if cfg.num_workers else buffer
    ds = positions[start:].map(prepare).to_iter_dataset(grain.ReadOptions(
        num_threads=cfg.num_threads, prefetch_buffer_size=per_process if cfg.num_threads else 0))
    if cfg.num_workers:
        from absl import flags
        if not flags.FLAGS.is_parsed():
            # Grain 0.2.18 reads an absl flag when it starts a worker, which fails unless flags were parsed
            # (google/grain#1355, fixed after this release); the defaults are what we want
            flags.FLAGS.mark_as_parsed()
        # samples travel pickled through the workers' queues, not in Grain's per-array shared memory: a block
        # per sample costs a shm_open/mmap/unlink and resource-tracker messages on both sides, measured at twice
        # the CPU per 10 s clip of decoding it (benchmarks/input_pipeline.py: 13.4 → 7.2 ms a clip in the worker)
        ds = grain.experimental.WithOptionsIterDataset(ds, grain.experimental.DatasetOptions(min_shm_size=NO_SHM))
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers,
                                                         per_worker_buffer_size=per_process),
                            worker_init_fn=_exit_with_parent)
    return ds.__iter__()
