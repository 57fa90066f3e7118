"""Multi-process training (issue 5): two `clapjax train` processes × 4 CPU devices joined by
`jax.distributed` on localhost (gloo collectives), each feeding its half of every global batch, with
the parameters FSDP-sharded over all 8 devices, give the same per-step losses as one data-parallel
process with 8 devices (≤ 1e-5); process 0 alone logs; the checkpoint they write together restores
in a single process.

`run_group` is how every multi-process test here starts its processes (see its docstring for the
coordinator-port race it handles).
"""
from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from helpers import restore_train_state, saved_data_states
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


PORT_TAKEN = "Failed to add port to server"   # gRPC, as process 0 fails to bind the coordinator port
PORT_ATTEMPTS = 3


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_group(commands, env: dict, timeout: float = TIMEOUT) -> list[tuple[int, str]]:
    """Run the processes `commands(port)` lists to their end (process 0 first: it hosts the
    coordinator on `port`); [(exit status, output)] per process, or a test failure after `timeout`.

    JAX's coordinator binds its port itself, so the port can only be probed free here and bound
    later; a parallel test worker (`pytest -n`) may take it in between. Process 0 then fails at
    once with PORT_TAKEN, and the group is started again on a fresh port (PORT_ATTEMPTS at most).
    Outputs go to files, not pipes: a peer blocked on a full pipe could stall the group."""
    for _ in range(PORT_ATTEMPTS):
        cmds = commands(_free_port())
        logs = [tempfile.TemporaryFile("w+") for _ in cmds]
        procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
                 for cmd, log in zip(cmds, logs)]
        deadline = time.monotonic() + timeout

        def output(i: int) -> str:
            logs[i].seek(0)
            return logs[i].read()
        try:
            procs[0].wait(timeout=timeout)
            if PORT_TAKEN in output(0):
                continue
            for p in procs[1:]:
                p.wait(timeout=max(deadline - time.monotonic(), 1))
            return [(p.returncode, output(i)) for i, p in enumerate(procs)]
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
                p.wait()
            pytest.fail(f"the process group did not end within {timeout}s:\n" +
                        "\n".join(f"--- process {i}:\n{output(i)[-2000:]}" for i in range(len(procs))))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    pytest.fail(f"{PORT_ATTEMPTS} coordinator ports were taken before process 0 could bind them")


_JOIN = ("import sys, jax; jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, "
         "process_id=int(sys.argv[2]), initialization_timeout=60); print('joined', jax.process_index()); "
         "jax.distributed.shutdown()")


def test_a_taken_coordinator_port_is_retried_on_a_fresh_one(monkeypatch):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        ports = [taken.getsockname()[1], _free_port()]
        handed_out = iter(ports)
        monkeypatch.setattr(sys.modules[__name__], "_free_port", lambda: next(handed_out))
        results = run_group(lambda port: [[sys.executable, "-c", _JOIN, f"127.0.0.1:{port}", str(i)] for i in range(2)],
                            train_env(devices=1), timeout=120)
    assert next(handed_out, None) is None                      # the second port was used
    for i, (rc, out) in enumerate(results):
        assert rc == 0 and f"joined {i}" in out, out[-2000:]


@pytest.fixture(scope="session")
def jax_cache(tmp_path_factory):
    path = tmp_path_factory.getbasetemp() / "clapjax-train-jax-cache"
    path.mkdir(exist_ok=True)
    return str(path)


def two_process_train(workdir, cache, port: int, entry=("-m", "clapjax.app.cli")) -> list[list[str]]:
    """`clapjax train tiny` as processes 0 and 1 of a group, each with its half of every batch and
    the parameters FSDP-sharded over both."""
    return [[sys.executable, *entry, "train", "tiny", "--workdir", str(workdir)] + run_overrides(cache) + [
        f"distributed.coordinator=127.0.0.1:{port}", "distributed.num_processes=2",
        f"distributed.process_id={pid}", "distributed.initialization_timeout=120", "checkpoint.every=4",
        "mesh.rules=fsdp", "mesh.data=1", "mesh.fsdp=-1"] for pid in range(2)]


def test_two_processes_of_four_devices_equal_one_process_of_eight(tmp_path, jax_cache):
    single = tmp_path / "one_process"
    run_to_end(single, jax_cache)
    reference = metrics(single)

    multi = tmp_path / "two_processes"
    results = run_group(lambda port: two_process_train(multi, jax_cache, port), train_env(devices=4))
    outs = [out for _, out in results]
    for rc, out in results:
        assert rc == 0, out[-3000:]
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
    data = saved_data_states(ck, 8)
    assert data["process_count"] == 2 and [d["index"] for d in data["processes"]] == [8, 8]
    with pytest.raises(ValueError, match="2 processes"):
        ck.restore(_abstract(), 8)
    state = restore_train_state(ck, _abstract(), 8)
    assert int(state["step"]) == 8 and int(state["nonfinite_total"]) == 1
    # (parameters are not compared: Adam turns the last-ulp gradient differences of near-zero
    # gradients into lr-sized steps; the losses above are the acceptance criterion)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in state["params"].values())
    ck.close()


def _abstract():
    cfg = C.load_config("tiny")
    return S.build_setup(cfg, C.model_config(cfg), sharding.make_mesh({"data": -1, "fsdp": 1})).abstract
