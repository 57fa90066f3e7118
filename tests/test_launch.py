"""Launching (issue 8): launcher environments → clapjax's process group (SLURM node lists, TPU pod
variables, errors naming the missing variable), the shims that emulate srun / gcloud on one machine,
and `clapjax launch --local 2 --cpu-devices 4`: it trains the tiny config to the end; when one of its
processes is SIGKILLed mid-run it stops the other and exits non-zero; the same command then resumes
from the latest checkpoint, and the per-step metrics equal the uninterrupted run's bit for bit.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from helpers import comparable_metrics
from clapjax.app import cli
from clapjax.train import distributed, launch

from test_train_checkpoint import ROOT, STEPS, TIMEOUT, committed, logged_steps, metrics, run_overrides, train_env

SHIMS = os.path.join(ROOT, "tests", "shims")
SLURM = {"SLURM_JOB_ID": "123456", "SLURM_PROCID": "2", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0"}


# --- environment mapping -----------------------------------------------------------------------------

@pytest.mark.parametrize("nodelist, hosts", [
    ("node001", ["node001"]),
    ("node001,login2", ["node001", "login2"]),
    ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
    ("gpu[9-11],cpu[001-002]", ["gpu9", "gpu10", "gpu11", "cpu001", "cpu002"]),
    ("rack[1-2]-n[08-09]", ["rack1-n08", "rack1-n09", "rack2-n08", "rack2-n09"]),
])
def test_slurm_nodelists_expand_like_scontrol(nodelist, hosts):
    assert launch.expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad, why", [("node[01-", "without"), ("node]1", "without"), ("n[3-1]", "backwards"),
                                      ("n[a-b]", "not a number"), ("a,,b", "empty")])
def test_malformed_nodelists_are_refused(bad, why):
    with pytest.raises(ValueError, match=why):
        launch.expand_nodelist(bad)


def test_slurm_task_maps_to_first_node_and_job_id_port():
    env = dict(SLURM, SLURM_STEP_NODELIST="gpu[07-08,10]", SLURM_JOB_NODELIST="gpu[01-10]")
    group = launch.export_environment(env)
    port = 61440 + 123456 % 4096                      # JAX's own formula: a requeued job keeps its port
    assert group == launch.ProcessGroup("slurm", f"gpu07:{port}", 4, 2)
    assert (env[distributed.ENV_COORDINATOR], env[distributed.ENV_NUM], env[distributed.ENV_ID]) == (
        f"gpu07:{port}", "4", "2")
    settings = distributed.DistributedSettings.resolve({}, env)
    assert (settings.coordinator, settings.num_processes, settings.process_id) == (f"gpu07:{port}", 4, 2)
    # a given port wins
    group = launch.detect(dict(SLURM, SLURM_STEP_NODELIST="a[3-4]", CLAPJAX_COORDINATOR_PORT="7000"))
    assert group.coordinator == "a3:7000" and group.local_device_ids == ""
    # the batch script's own shell (no step): refused for a multi-task job, one process for a 1-task job
    with pytest.raises(ValueError, match="not an srun step"):
        launch.detect(dict(SLURM, SLURM_JOB_NODELIST="a[3-4]"))
    assert launch.detect(dict(SLURM, SLURM_NTASKS="1", SLURM_PROCID="0", SLURM_JOB_NODELIST="a3")).platform == "single"
    # several tasks per node: each is pinned to its node-local GPU; one per node: all GPUs stay visible
    env = dict(SLURM, SLURM_STEP_NODELIST="g1", SLURM_STEP_NUM_NODES="1", SLURM_LOCALID="2")
    assert launch.export_environment(env).local_device_ids == "2" and env["JAX_LOCAL_DEVICE_IDS"] == "2"
    env = dict(SLURM, SLURM_STEP_NODELIST="g[1-4]", SLURM_STEP_NUM_NODES="4")
    assert "JAX_LOCAL_DEVICE_IDS" not in launch.export_environment(env).as_environment()


@pytest.mark.parametrize("drop, named", [("SLURM_NTASKS", "SLURM_NTASKS"), ("SLURM_STEP_NODELIST", "NODELIST"),
                                         ("SLURM_JOB_ID", "CLAPJAX_COORDINATOR_PORT")])
def test_slurm_errors_name_the_missing_variable(drop, named):
    env = {k: v for k, v in dict(SLURM, SLURM_STEP_NODELIST="n1").items() if k != drop}
    with pytest.raises(ValueError, match=named):
        launch.detect(env)
    with pytest.raises(ValueError, match=r"SLURM_PROCID=4 is not in \[0, 4\)"):
        launch.detect(dict(SLURM, SLURM_STEP_NODELIST="n1", SLURM_PROCID="4"))


def test_tpu_workers_map_to_first_worker_on_jax_tpu_port():
    env = {"TPU_WORKER_ID": "1", "TPU_WORKER_HOSTNAMES": "t1v-w-0,t1v-w-1:8470,t1v-w-2"}
    assert launch.export_environment(env) == launch.ProcessGroup("tpu", "t1v-w-0:8482", 3, 1)
    assert env[distributed.ENV_NUM] == "3" and env[distributed.ENV_ID] == "1"
    with pytest.raises(ValueError, match="TPU_WORKER_HOSTNAMES is not set"):
        launch.detect({"TPU_WORKER_ID": "0"})
    with pytest.raises(ValueError, match="TPU_WORKER_ID=3 is not in"):
        launch.detect({"TPU_WORKER_ID": "3", "TPU_WORKER_HOSTNAMES": "a,b"})


def test_explicit_and_auto_and_nothing():
    explicit = {"CLAPJAX_COORDINATOR": "h:1", "CLAPJAX_NUM_PROCESSES": "2", "CLAPJAX_PROCESS_ID": "1", **SLURM}
    assert launch.export_environment(dict(explicit)).platform == "explicit"      # set by hand: kept as is
    auto = {"CLAPJAX_COORDINATOR": "auto", "TPU_WORKER_ID": "0", "TPU_WORKER_HOSTNAMES": "w0,w1"}
    assert launch.export_environment(auto).platform == "tpu" and auto["CLAPJAX_COORDINATOR"] == "w0:8482"
    assert launch.export_environment({"CLAPJAX_COORDINATOR": "auto"}).platform == "auto"  # JAX's detectors
    env = {}
    assert launch.export_environment(env).platform == "single" and env == {}


def test_train_refuses_a_broken_launcher_environment(monkeypatch, capsys):
    for k, v in SLURM.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("SLURM_NTASKS")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "n1")
    assert cli.main(["train", "tiny", "--workdir", "unused"]) == 2
    assert "SLURM_NTASKS is not set" in capsys.readouterr().err


# --- process supervision and the shims --------------------------------------------------------------

def test_supervisor_prefixes_output_and_stops_the_rest_when_one_fails(tmp_path, capsys):
    # process 0 would sleep for 10 minutes and then leave a mark: it is gone when supervise returns and left
    # none, so it was stopped (no wall-clock bound)
    env = {"PATH": os.environ["PATH"], "DIR": str(tmp_path)}
    script = 'echo "hi $N"; echo $$ > "$DIR/$N"; [ "$N" = 1 ] && exit 3; sleep 600 && touch "$DIR/finished"'
    rc = launch.supervise(["sh", "-c", script], [{**env, "N": "0"}, {**env, "N": "1"}])
    out = capsys.readouterr().out
    assert rc == 3 and not (tmp_path / "finished").exists()
    with pytest.raises(ProcessLookupError):
        os.kill(int((tmp_path / "0").read_text()), 0)
    assert "[0] hi 0" in out and "[1] hi 1" in out and "process 1 exited with 3" in out
    assert launch.supervise(["true"], [{}, {}]) == 0
    with pytest.raises(ValueError, match="after `--`"):
        launch.main(["--local", "2", "--"])


_JOIN = ("import os, jax; jax.distributed.initialize(os.environ['CLAPJAX_COORDINATOR'], "
         "int(os.environ['CLAPJAX_NUM_PROCESSES']), int(os.environ['CLAPJAX_PROCESS_ID']), initialization_timeout=60); "
         "print('joined', jax.process_index()); jax.distributed.shutdown()")


def test_local_launch_starts_again_when_the_coordinator_port_was_taken(monkeypatch, capsys):
    """The port `--local` found free is taken before process 0's coordinator binds it (another
    program, or a parallel test worker): the group is started again on a fresh port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        handed_out = iter([taken.getsockname()[1], launch.free_port()])
        monkeypatch.setattr(launch, "free_port", lambda: next(handed_out))
        monkeypatch.setattr(launch, "train_command", lambda args: [sys.executable, "-c", _JOIN])
        rc = launch.run_local(2, ["unused"], cpu_devices=1, base_env=train_env())
    out = capsys.readouterr().out
    assert rc == 0 and "was taken before process 0 could bind it; starting again" in out, out[-3000:]
    assert "[0] joined 0" in out and "[1] joined 1" in out and next(handed_out, None) is None


PROBE = ("from clapjax.train import launch; g = launch.export_environment(); import os; "
         "print(g.platform, g.coordinator, g.num_processes, g.process_id, os.environ['XLA_FLAGS'])")


def _shim(args, tmp_path, **env) -> str:
    full = dict(train_env(), PATH=f"{SHIMS}{os.pathsep}{os.path.dirname(sys.executable)}{os.pathsep}"
                + os.environ["PATH"], **env)
    full.pop("SLURM_JOB_ID", None)
    proc = subprocess.run(args, cwd=tmp_path, env=full, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_srun_and_gcloud_shims_give_each_process_its_launcher_environment(tmp_path):
    out = _shim(["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", sys.executable, "-c", PROBE],
                tmp_path)
    rows = sorted(re.findall(r"\[(\d)\] (\w+) (\S+) (\d) (\d) (.*)", out))
    assert [(r[0], r[1], r[3], r[4]) for r in rows] == [("0", "slurm", "2", "0"), ("1", "slurm", "2", "1")], out
    assert rows[0][2] == rows[1][2] and re.fullmatch(r"localhost:6[1-5]\d{3}", rows[0][2])
    assert all("device_count=4" in r[5] for r in rows)
    out = _shim(["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod", "--worker=all",
                 f"--command={sys.executable} -c \"{PROBE}\""], tmp_path, CLAPJAX_COORDINATOR="auto")
    rows = sorted(re.findall(r"\[(\d)\] (\w+) (\S+) (\d) (\d)", out))
    assert [(r[1], r[3], r[4]) for r in rows] == [("tpu", "2", "0"), ("tpu", "2", "1")], out


# --- `clapjax launch --local 2 --cpu-devices 4` ------------------------------------------------------

@pytest.fixture(scope="session")
def jax_cache(tmp_path_factory):
    path = tmp_path_factory.getbasetemp() / "clapjax-train-jax-cache"   # shared with the other train tests
    path.mkdir(exist_ok=True)
    return str(path)


def start_launch(workdir, cache, log_path) -> tuple[subprocess.Popen, object]:
    cmd = [sys.executable, "-m", "clapjax.app.cli", "launch", "--local", "2", "--cpu-devices", "4", "--",
           "tiny", "--workdir", str(workdir)] + run_overrides(cache)
    log = open(log_path, "w")
    return subprocess.Popen(cmd, cwd=ROOT, env=train_env(), stdout=log, stderr=subprocess.STDOUT), log


def finish_launch(proc, log, log_path) -> tuple[int, str]:
    try:
        proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.terminate()                      # forwarded to both processes
        proc.wait(timeout=60)
    log.close()
    with open(log_path) as f:
        return proc.returncode, f.read()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, jax_cache):
    workdir = tmp_path_factory.mktemp("launch_uninterrupted")
    rc, out = finish_launch(*start_launch(workdir, jax_cache, workdir / "launch.log"), workdir / "launch.log")
    assert rc == 0, out[-3000:]
    return workdir, out


def test_local_launch_trains_two_processes_of_four_devices(uninterrupted):
    workdir, out = uninterrupted
    assert [m["step"] for m in metrics(workdir)] == list(range(1, STEPS + 1))
    assert "[0] step 1: loss" in out and "[1] step 1: loss" not in out       # process 0 logs, alone
    assert f"[0] trained to step {STEPS}" in out and f"[1] trained to step {STEPS}" in out
    assert committed(workdir) == [STEPS - 2, STEPS]


def test_a_killed_process_stops_the_launch_and_the_relaunch_resumes_bit_identically(tmp_path, jax_cache,
                                                                                       uninterrupted):
    workdir, log_path = tmp_path / "run", tmp_path / "launch.log"
    proc, log = start_launch(workdir, jax_cache, log_path)
    pids = {}
    deadline = time.time() + TIMEOUT
    while len(pids) < 2 or not committed(workdir):            # mid-run, once a checkpoint is committed
        assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
        pids.update((int(i), int(p)) for i, p in re.findall(r"process (\d): pid (\d+)", log_path.read_text()))
        time.sleep(0.01)
    os.kill(pids[1], signal.SIGKILL)
    rc, out = finish_launch(proc, log, log_path)
    reached, kept = logged_steps(workdir), committed(workdir)
    # normally process 1's SIGKILL (137); process 0 may already have failed on the broken collective
    # by the time the launcher looks, and then it is named (lower id first)
    failure = re.search(r"process ([01]) exited with (-?\d+); stopping the others", out)
    assert failure and rc == launch.exit_status(int(failure.group(2))) != 0, out[-3000:]
    assert reached < STEPS and kept, (reached, kept)
    with pytest.raises(ProcessLookupError):                          # the other process is gone too
        os.kill(pids[0], 0)

    rc, out = finish_launch(*start_launch(workdir, jax_cache, log_path), log_path)
    assert rc == 0 and f"[0] resumed from step {max(kept)}" in out, out[-3000:]
    assert comparable_metrics(metrics(workdir)) == comparable_metrics(metrics(uninterrupted[0])), f"killed at step {reached}"
