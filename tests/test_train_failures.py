"""How training fails (issue 18): a finite loss whose gradient is not finite is skipped and counted
like a non-finite loss, and stops the run the same way; one process of two raising stops its peer
(both exit with a message instead of waiting on each other in a collective).

The non-finite gradient is built, not sampled: the loss gets `sqrt(b)` added for a parameter
element `b` that is exactly 0 at initialisation. sqrt(0) = 0 leaves the loss bit for bit as it was;
the derivative of sqrt at 0 is +inf, so that one element's gradient is inf and every other gradient
is what it was. One non-finite element among ~10^5 is the hardest case for the step's check.
"""
from __future__ import annotations

import copy
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import restore_train_state
from clapjax.train import batches
from clapjax.train import checkpoint as ckpt_lib
from clapjax.train import config as C
from clapjax.train import distributed, optim, sharding
from clapjax.train import loop as L
from clapjax.train import step as S
from clapjax.train.metrics import read_metrics

from test_multihost import run_group, two_process_train
from test_train_checkpoint import metrics, train_env

ZERO_AT_INIT = "audio_projection.0.bias"     # Linear biases start at exactly 0


def _with_infinite_gradient(monkeypatch):
    """Patch the step's loss: + sqrt(ZERO_AT_INIT[0]) (0 forward, +inf gradient)."""
    original = S.loss_from_features

    def loss_from_features(name, feats, params, mesh):
        return original(name, feats, params, mesh) + jnp.sqrt(params[ZERO_AT_INIT][0])
    monkeypatch.setattr(S, "loss_from_features", loss_from_features)


@pytest.fixture(scope="module")
def infinite_gradient_run(tmp_path_factory):
    """The run both tests share: its config, and a persistent compilation cache so that the loop's
    identical program (same config, donated state) is compiled once."""
    cache = tmp_path_factory.mktemp("jax-cache")
    cfg = C.load_config("tiny", ["compiler_options.xla_backend_optimization_level=0", "train.steps=4",
                                 "train.max_nonfinite_in_row=2", "checkpoint.every=100", f"compilation_cache={cache}"])
    return cfg


def _batch(cfg, index):
    it = batches.RandomBatches(cfg.train.batch_size, C.model_config(cfg).frontend.clip_samples, 300, seed=cfg.seed)
    it.set_state({"index": index})
    return {k: v for k, v in next(it).items() if k in batches.MODEL_KEYS}


def test_finite_loss_with_an_infinite_gradient_leaves_the_state_unchanged_and_is_counted(
        infinite_gradient_run, monkeypatch):
    from clapjax.embedding import enable_compilation_cache
    cfg = infinite_gradient_run
    enable_compilation_cache(cfg.compilation_cache, min_compile_secs=0.0, min_entry_bytes=-1)   # as train() does
    mc = C.model_config(cfg)
    setup = S.build_setup(cfg, mc, sharding.make_mesh({"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp}))
    state = S.init_state(setup, cfg, mc, int(cfg.seed))
    initial = jax.tree.map(np.asarray, state)
    assert initial["params"][ZERO_AT_INIT][0] == 0.0

    _with_infinite_gradient(monkeypatch)
    step = S.train_step(setup)                      # donating, as in the loop
    for n in (1, 2):
        state, m = step(state, batches.device_batch(_batch(cfg, n - 1), setup.mesh))
        assert np.isfinite(float(m["loss"])) and not bool(m["finite"]), n
        assert not np.isfinite(float(m["grad_norm"]))
        assert int(m["nonfinite_streak"]) == int(m["nonfinite_total"]) == n and int(state["step"]) == n
        for part in ("params", "batch_stats", "opt_state"):       # bit for bit the initial state, no NaN in it
            got, want = jax.tree_util.tree_flatten_with_path(state[part])[0], jax.tree.leaves(initial[part])
            for (path, x), y in zip(got, want):
                assert np.array_equal(np.asarray(x), y), (part, jax.tree_util.keystr(path))
        assert float(m["lr"]) == float(optim.learning_rate(cfg.optim, cfg.train.steps, 0))   # no update counted


def test_infinite_gradients_stop_the_run_like_nonfinite_losses(infinite_gradient_run, monkeypatch, tmp_path):
    cfg = copy.deepcopy(infinite_gradient_run)
    cfg.export.model = True                       # asked for, but a run stopped this way exports nothing
    _with_infinite_gradient(monkeypatch)
    with pytest.raises(L.NonFiniteLossError, match="2 steps in a row had a non-finite loss or gradient"):
        L.train(cfg, str(tmp_path), log=lambda *a, **k: None)
    records = read_metrics(str(tmp_path))
    # the loop reads a step's metrics after dispatching the next one, so it stops after step 3
    assert [(r["step"], r["finite"], r["nonfinite_streak"]) for r in records] == [(n, False, n) for n in (1, 2, 3)]
    assert all(np.isfinite(r["loss"]) for r in records)
    assert not (tmp_path / "model").exists()
    # the state saved at the stop is the initial one (it is finite: the checkpointer refuses anything else)
    mc = C.model_config(cfg)
    setup = S.build_setup(cfg, mc, sharding.make_mesh({"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp}))
    ck = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"))
    assert ck.all_steps() == [3]
    saved = restore_train_state(ck, setup.abstract, 3)
    ck.close()
    initial = S.init_state(setup, cfg, mc, int(cfg.seed))
    for k, x in initial["params"].items():
        assert np.array_equal(np.asarray(saved["params"][k]), np.asarray(x)), k
    assert int(saved["step"]) == 3 and int(saved["nonfinite_total"]) == 3


def test_data_that_runs_out_stops_the_run_with_that_reason_and_still_exports(infinite_gradient_run, tmp_path):
    cfg = copy.deepcopy(infinite_gradient_run)
    cfg.export.model = True
    lines = []
    summary = L.train(cfg, str(tmp_path), iter(()), log=lines.append)
    assert summary["stopped"] is L.StopReason.DATA_RAN_OUT and summary["step"] == 0
    assert summary["stop_message"] == "the data ran out after step 0" and lines[-1] == summary["stop_message"]
    assert (tmp_path / "model" / "config.json").is_file()        # only a non-finite stop skips the export


# --- one process of two raising ------------------------------------------------------------------------

FAIL_AT_BATCH = 2          # both processes ran steps 1 and 2; the peer waits in step 3's collectives
DRIVER = """
import os, sys
from clapjax.train import batches
failing, at_batch = int(os.environ["FAIL_PROCESS"]), int(os.environ["FAIL_BATCH"])
draw = batches.RandomBatches.__next__
def failing_draw(self):
    if self.first_row == failing * self.local and self.index == at_batch:
        raise OSError(f"injected: process {failing} cannot read its data")
    return draw(self)
batches.RandomBatches.__next__ = failing_draw
from clapjax.app.cli import main
sys.exit(main(sys.argv[1:]))
"""


HOST_WORK_FAILS = """
import sys, threading
from clapjax.train import distributed
pid = int(sys.argv[2])
distributed.initialize({"coordinator": sys.argv[1], "num_processes": 2, "process_id": pid,
                        "initialization_timeout": 60})
with distributed.one_failure_stops_all():
    if pid == 1:
        raise OSError("injected on process 1")
    threading.Event().wait(600)     # host work that no collective interrupts: only the watcher ends it
"""


def test_a_peer_busy_outside_any_collective_is_stopped_too():
    results = run_group(lambda port: [[sys.executable, "-c", HOST_WORK_FAILS, f"127.0.0.1:{port}", str(i)]
                                      for i in range(2)], train_env(devices=1), timeout=120)
    (rc0, out0), (rc1, out1) = results
    assert rc1 == distributed.FAILED_EXIT and "process 1 of 2 failed; stopping the other processes" in out1, out1
    assert rc0 == distributed.FAILED_EXIT, out0[-3000:]
    assert "error: process 1 of 2 failed: OSError: injected on process 1; stopping process 0" in out0, out0[-3000:]


@pytest.fixture(scope="session")
def jax_cache(tmp_path_factory):
    path = tmp_path_factory.getbasetemp() / "clapjax-train-jax-cache"   # shared with the other train tests
    path.mkdir(exist_ok=True)
    return str(path)


@pytest.mark.parametrize("failing", [1, 0])   # 0 also hosts the coordination service
def test_one_process_raising_stops_its_peer_with_a_message(tmp_path, jax_cache, failing):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = train_env(devices=4, FAIL_PROCESS=str(failing), FAIL_BATCH=str(FAIL_AT_BATCH))
    results = run_group(lambda port: two_process_train(tmp_path / "run", jax_cache, port, entry=(str(driver),)), env)
    peer = 1 - failing
    (rc_failing, out_failing), (rc_peer, out_peer) = results[failing], results[peer]
    cause = f"OSError: injected: process {failing} cannot read its data"
    assert rc_failing == distributed.FAILED_EXIT and f"process {failing} of 2 failed; stopping the other" in out_failing, \
        out_failing[-3000:]
    assert cause in out_failing
    assert rc_peer == distributed.FAILED_EXIT, out_peer[-3000:]
    assert f"error: process {failing} of 2 failed: {cause}; stopping process {peer}" in out_peer, out_peer[-3000:]
    # steps 1 and 2 ran; the loop writes a step's metrics once the next one is dispatched, and the watcher stops
    # process 0 wherever it is when the error is posted (before or after it wrote step 1's, or step 2's): what
    # is logged is a prefix of the steps before the failed batch's, never a step that needed it
    logged = [m["step"] for m in metrics(tmp_path / "run")]
    assert logged == list(range(1, len(logged) + 1)) and len(logged) <= FAIL_AT_BATCH, logged
