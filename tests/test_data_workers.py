"""The training input pipeline with Grain worker processes (`DataConfig.num_workers`): the batches, the
bad-sample accounting and the iterator state are those of the in-process pipeline for any worker count,
a state resumes with another worker count, and workers end with a SIGKILLed training process.

Each worker is a spawned Python that imports clapjax (seconds on a loaded machine): the tests start few."""
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from clapjax.tokenizer import Tokenizer, train_byte_level_bpe
from clapjax.train import data as D
from clapjax.train.data_sources import Raw, Source, TarShards

from test_data import FE, WORDS, write_shards

BATCHES = 16              # 64 samples of a 30-sample set: past two epoch ends, each with its bad sample


@pytest.fixture(scope="module")
def tokdir(tmp_path_factory):
    texts = [f"a {w} sound number {i}" for w in WORDS for i in range(20)]
    return train_byte_level_bpe(texts * 3, tmp_path_factory.mktemp("tok"), vocab_size=300)


def _cfg(workers: int) -> D.DataConfig:
    # threads 0: each worker decodes in its own main loop (the tests' workers compete for 2 cores)
    return D.DataConfig(global_batch_size=4, window_size=8, cycle_length=2, max_bad_fraction=0.1, with_keys=True,
                        num_workers=workers, num_threads=0 if workers else 2)


def _draw(it, n: int, state_after: int | None = None):
    batches, state = [], None
    for i in range(n):
        batches.append(next(it))
        if i + 1 == state_after:
            state = json.loads(json.dumps(it.get_state()))    # as a checkpoint stores it
    return batches, state


def _assert_same(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert set(g) == set(w)
        for k in w:
            assert g[k].dtype == w[k].dtype, k     # workers hand waveforms over as int16: float32 again here
            np.testing.assert_array_equal(g[k], w[k], err_msg=k)


def test_batches_and_state_are_those_of_the_in_process_pipeline_for_any_worker_count(tmp_path, tokdir):
    root = write_shards(tmp_path / "shards", n=30, per_shard=6, bad={4: "corrupt", 17: "no_caption"})
    tok = Tokenizer(tokdir)

    def make(workers):
        return D.make_iterator(TarShards(str(root)), tok, FE, _cfg(workers), process_index=0, process_count=1)
    ref_it = make(0)
    ref, state3 = _draw(ref_it, BATCHES, state_after=3)
    ref_final, ref_stats = ref_it.get_state(), ref_it.stats
    assert ref_stats["bad"] == 4 and ref_stats["seen"] > 60     # two bad samples in each of two whole epochs
    # 2 workers resumed mid-epoch from the in-process state (an odd position: the workers' slices cross the
    # epoch ends at different steps)
    assert state3["pipeline"]["seen"] % 2 == 1
    it = make(2)
    it.set_state(state3)
    got, state6 = _draw(it, BATCHES - 3, state_after=3)
    _assert_same(got, ref[3:])
    assert it.get_state() == ref_final and it.stats == ref_stats
    it.close()
    # and back in-process from the worker run's state (the same JSON whatever the worker count)
    back = make(0)
    back.set_state(state6)
    _assert_same(_draw(back, 2)[0], ref[6:8])


_KILLED = textwrap.dedent("""
    import multiprocessing, sys, time
    from clapjax.audio.frontend import FrontEndConfig
    from clapjax.tokenizer import Tokenizer
    from clapjax.train import data as D
    from clapjax.train.data_sources import TarShards
    if __name__ == "__main__":
        cfg = D.DataConfig(global_batch_size=2, num_workers=1, num_threads=0)
        it = D.make_iterator(TarShards(sys.argv[1]), Tokenizer(sys.argv[2]), FrontEndConfig(clip_samples=24000), cfg,
                             process_index=0, process_count=1)
        next(it)
        print(" ".join(str(p.pid) for p in multiprocessing.active_children() if p.name.startswith("grain")),
              flush=True)
        time.sleep(600)
""")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"    # a zombie has exited
    except FileNotFoundError:
        return False


def test_workers_exit_when_the_training_process_is_sigkilled(tmp_path, tokdir):
    root = write_shards(tmp_path / "shards", n=8, per_shard=4)
    script = tmp_path / "trainer.py"      # a file, not -c: spawned workers re-import the main module
    script.write_text(_KILLED)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, str(script), str(root), str(tokdir)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        workers = [int(p) for p in line.split()]
        assert workers, f"no worker process reported; stderr: {proc.stderr.read()[-3000:] if proc.poll() else ''}"
        assert all(_alive(p) for p in workers)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in workers), "a data worker outlived its SIGKILLed training process"


def test_config_and_sources_for_workers(tmp_path):
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match="num_workers must be an int >= 0"):
            D.DataConfig(global_batch_size=4, num_workers=bad)
    # a tar source travels to the workers with its shard index, and without its lock
    root = write_shards(tmp_path / "shards", n=12, per_shard=6)
    ts = TarShards(str(root))
    ts.groups(0, 1)                              # indexes both shards
    copy = pickle.loads(pickle.dumps(ts))
    assert copy._index.keys() == {0, 1} and copy.read(7).key == ts.read(7).key == "shard-000001.tar/s0007"
    assert copy.groups(0, 1)[1].tolist() == list(range(6, 12))

    class Quantized(Source):            # what int16 pre-decoded shards declare
        name, num_records, quantized = "predecoded", 1, True

        def read(self, record):
            return Raw("k", np.zeros(10, np.float32), sample_rate=48000, texts=["x"])
    with pytest.raises(ValueError, match="data.quantize=True"):
        D.Prepare(Quantized(), FE, D.DataConfig(global_batch_size=1, quantize=False))
    Quantized.sample_rate = 44100                # prepared for another front end: not resampled again
    with pytest.raises(ValueError, match="prepared at 44100 Hz and the front end takes 48000 Hz"):
        D.Prepare(Quantized(), FE, D.DataConfig(global_batch_size=1))
    with pytest.raises(ValueError, match="'array_record'"):
        D.source_from_config({"kind": "webdataset"})
