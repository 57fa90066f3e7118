"""Multi-process training (issue 5): two `clapjax train` processes × 4 CPU devices joined by
`jax.distributed` on localhost (gloo collectives), each feeding its half of every global batch, with
the parameters FSDP-sharded over all 8 devices, give the same per-step losses as one data-parallel
process with 8 devices (≤ 1e-5); process 0 alone logs; the checkpoint they write together restores
in a single process.
"""
from __future__ import annotations

import socket
import subprocess
import sys

import numpy as np
import pytest

from clapjax.train import checkpoint as ckpt_lib
from clapjax.train import config as C
from clapjax.train import distributed, sharding
from clapjax.train import step as S

from test_train_checkpoint import ROOT, STEPS, TIMEOUT, metrics, run_overrides, run_to_end, train_env


def test_settings_from_config_then_environment():
    env = {distributed.ENV_COORDINATOR: "10.0.0.1:1234", distributed.ENV_NUM: "4", distributed.ENV_ID: "3"}
    s = distributed.DistributedSettings.resolve({"coordinator": "", "num_processes": 0, "process_id": -1}, env)
    assert (s.coordinator, s.num_processes, s.process_id, s.multi_process) == ("10.0.0.1:1234", 4, 3, True)
    s = distributed.DistributedSettings.resolve({"coordinator": "h:1", "num_processes": 2, "process_id": 0}, env)
    assert (s.coordinator, s.num_processes, s.process_id) == ("h:1", 2, 0)
    single = distributed.DistributedSettings.resolve({}, {})
    assert not single.multi_process and distributed.initialize({}, {}) is False   # one process: a no-op
    with pytest.raises(ValueError, match="coordinator"):
        distributed.DistributedSettings.resolve({"num_processes": 2, "process_id": 0}, {}).validate()
    with pytest.raises(ValueError, match="process_id 2"):
        distributed.DistributedSettings.resolve({"coordinator": "h:1", "num_processes": 2, "process_id": 2}, {}).validate()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def jax_cache(tmp_path_factory):
    path = tmp_path_factory.getbasetemp() / "clapjax-train-jax-cache"
    path.mkdir(exist_ok=True)
    return str(path)


def test_two_processes_of_four_devices_equal_one_process_of_eight(tmp_path, jax_cache):
    single = tmp_path / "one_process"
    run_to_end(single, jax_cache)
    reference = metrics(single)

    multi = tmp_path / "two_processes"
    port = _free_port()
    procs = []
    for pid in range(2):
        cmd = [sys.executable, "-m", "clapjax.cli", "train", "tiny", "--workdir", str(multi)] + run_overrides(jax_cache) + [
            f"distributed.coordinator=127.0.0.1:{port}", "distributed.num_processes=2",
            f"distributed.process_id={pid}", "distributed.initialization_timeout=120", "checkpoint.every=4",
            "mesh.rules=fsdp", "mesh.data=1", "mesh.fsdp=-1"]   # and FSDP across the two processes
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=train_env(devices=4), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=TIMEOUT)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("the two-process run timed out:\n" + "\n".join((p.communicate()[0] or "")[-2000:] for p in procs))
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert "step 1: loss" in outs[0] and "step 1: loss" not in outs[1]       # process 0 logs, alone

    got = metrics(multi)
    assert [m["step"] for m in got] == [m["step"] for m in reference] == list(range(1, STEPS + 1))
    for a, b in zip(got, reference):
        assert a["finite"] == b["finite"] and a["nonfinite_total"] == b["nonfinite_total"]
        if b["finite"]:
            assert abs(a["loss"] - b["loss"]) <= 1e-5, (a["step"], a["loss"], b["loss"])
    assert not got[4]["finite"]                                               # the NaN batch, skipped there too

    # their checkpoint: every process's data position, and a state that loads in one process
    ck = ckpt_lib.Checkpointer(str(multi / "checkpoints"))
    assert ck.all_steps() == [4, 8]
    data = ck.read_json("data", 8)
    assert data["process_count"] == 2 and [d["index"] for d in data["processes"]] == [8, 8]
    with pytest.raises(ValueError, match="2 processes"):
        ck.restore(_abstract(), 8)
    state = ck.restore_state(_abstract(), 8)
    assert int(state["step"]) == 8 and int(state["nonfinite_total"]) == 1
    # (parameters are not compared: Adam turns the last-ulp gradient differences of near-zero
    # gradients into lr-sized steps; the losses above are the acceptance criterion)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in state["params"].values())
    ck.close()


def _abstract():
    cfg = C.load_config("tiny")
    return S.build_setup(cfg, C.model_config(cfg), sharding.make_mesh({"data": -1, "fsdp": 1})).abstract
