"""Launchers → clapjax's process-group environment, and `clapjax launch --local N` for one machine.

`clapjax train` is the same command on every platform; only its environment differs. Before
`jax.distributed.initialize`, `export_environment()` turns what the launcher set into the three
variables clapjax.train.distributed reads (`CLAPJAX_COORDINATOR`, `CLAPJAX_NUM_PROCESSES`,
`CLAPJAX_PROCESS_ID`):

* explicit — `CLAPJAX_COORDINATOR=host:port` already set (e.g. by `clapjax launch --local`): kept.
* SLURM (`srun`) — `SLURM_PROCID`, `SLURM_NTASKS`, the first host of `SLURM_STEP_NODELIST` (a
  batch script's own shell has no step: refused there when the job has several tasks), port `$CLAPJAX_COORDINATOR_PORT` or 61440 + job id mod 4096 (JAX's own
  formula, so a requeued job, which keeps its id, keeps its port). We resolve SLURM ourselves instead
  of letting JAX auto-detect it because JAX's detector also restricts each process to the GPU
  numbered `SLURM_LOCALID`: with one task per node that process would see 1 of the node's GPUs.
  (With several tasks per node we do pin each to its `SLURM_LOCALID` GPU, via JAX_LOCAL_DEVICE_IDS.)
* TPU (`TPU_WORKER_ID`, `TPU_WORKER_HOSTNAMES`, what GKE sets and JAX's GKE detector reads) —
  coordinator = the first worker, port `$CLAPJAX_COORDINATOR_PORT` or 8482 (JAX's TPU default).
  On a Cloud TPU VM created with `gcloud compute tpus tpu-vm create` these variables are NOT in an
  ssh shell: the worker number lives in the GCE metadata server, which only JAX's own detector
  queries. There set `CLAPJAX_COORDINATOR=auto` (scripts/tpu_pod.sh does): with no SLURM or TPU
  variables present, `auto` is left to `jax.distributed.initialize()` (metadata server, multislice
  MEGASCALE_*, Open MPI, Kubernetes).
* nothing — one process; `clapjax train` runs alone.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Mapping, MutableMapping, Sequence

from clapjax.train.distributed import ENV_COORDINATOR, ENV_ID, ENV_NUM

ENV_PORT = "CLAPJAX_COORDINATOR_PORT"
SLURM_PORT_BASE, SLURM_PORT_SPAN = 61440, 4096     # JAX's SLURM port: 61440 + job id mod 4096
TPU_DEFAULT_PORT = 8482                               # JAX's coordinator port on TPU pods
# `--local` probes a free port, and process 0's coordinator binds it later: another program may take it
# in between. gRPC then logs this line and process 0 fails at once; the launch starts again on a new port.
PORT_TAKEN, PORT_ATTEMPTS = "Failed to add port to server", 3


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
    """Where this process sits in the run, as a launcher described it."""
    platform: str               # 'explicit' | 'slurm' | 'tpu' | 'auto' | 'single'
    coordinator: str = ""
    num_processes: int = 1
    process_id: int = 0
    local_device_ids: str = ""  # SLURM with several tasks per node: this task's GPU(s) (JAX_LOCAL_DEVICE_IDS)

    def as_environment(self) -> dict[str, str]:
        if self.platform not in ("slurm", "tpu"):
            return {}
        env = {ENV_COORDINATOR: self.coordinator, ENV_NUM: str(self.num_processes), ENV_ID: str(self.process_id)}
        if self.local_device_ids:
            env["JAX_LOCAL_DEVICE_IDS"] = self.local_device_ids
        return env


# --- SLURM host lists ------------------------------------------------------------------------------

def _split_top_level(text: str) -> list[str]:
    """'a[1-2],b,c[3,5]' → ['a[1-2]', 'b', 'c[3,5]'] (commas inside brackets belong to the range)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"SLURM node list {text!r}: ']' without '['")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"SLURM node list {text!r}: '[' without ']'")
    parts.append(text[start:])
    return parts


def _expand_range(body: str, whole: str) -> list[str]:
    """'01-03,07' → ['01', '02', '03', '07'], keeping the zero padding of the lower bound."""
    out = []
    for item in body.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if not m:
            raise ValueError(f"SLURM node list {whole!r}: {item!r} is not a number or a range a-b")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"SLURM node list {whole!r}: range {item!r} runs backwards")
        out.extend(str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1))
    return out


def expand_nodelist(text: str) -> list[str]:
    """SLURM's compressed host list → host names, in order, e.g. 'gpu[01-02,07],login' →
    ['gpu01', 'gpu02', 'gpu07', 'login']; several bracket groups in one name multiply
    ('r[1-2]n[1-2]' → r1n1 r1n2 r2n1 r2n2), as `scontrol show hostnames` does."""
    hosts = []
    for part in _split_top_level(text.strip()):
        if not part:
            raise ValueError(f"SLURM node list {text!r} has an empty entry")
        names = [""]
        for literal, body in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", part):
            names = [n + literal for n in names]
            if body:
                names = [n + r for n in names for r in _expand_range(body, text)]
        hosts.extend(names)
    return hosts


# --- detection -------------------------------------------------------------------------------------

def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except KeyError:
        raise ValueError(f"${name} is not set") from None
    except ValueError:
        raise ValueError(f"${name}={env[name]!r} is not an integer") from None


def _port(env: Mapping[str, str], default: int | None, why_missing: str) -> int:
    if env.get(ENV_PORT):
        return _int(env, ENV_PORT)
    if default is None:
        raise ValueError(why_missing)
    return default


def _checked(group: ProcessGroup, id_var: str, count_var: str) -> ProcessGroup:
    if group.num_processes < 1:
        raise ValueError(f"${count_var}={group.num_processes}: a run needs at least one process")
    if not 0 <= group.process_id < group.num_processes:
        raise ValueError(f"${id_var}={group.process_id} is not in [0, {group.num_processes}) (${count_var})")
    return group


def slurm_group(env: Mapping[str, str]) -> ProcessGroup:
    """The process group of an `srun` task."""
    nproc, pid = _int(env, "SLURM_NTASKS"), _int(env, "SLURM_PROCID")
    if not env.get("SLURM_STEP_NODELIST"):
        # The batch script's own shell also has SLURM_PROCID=0 and the job's SLURM_NTASKS, but no
        # step: a `clapjax train` started there directly would wait for partners that never come.
        if nproc > 1:
            raise ValueError(f"$SLURM_NTASKS={nproc} but no $SLURM_STEP_NODELIST: this is a batch script's shell, "
                             "not an srun step; start `clapjax train` with srun (one task per node)")
        return ProcessGroup("single")
    if env.get("SLURM_JOB_ID"):
        default = SLURM_PORT_BASE + _int(env, "SLURM_JOB_ID") % SLURM_PORT_SPAN
    else:
        default = None
    port = _port(env, default, f"SLURM gives no $SLURM_JOB_ID to derive the coordinator port from; set ${ENV_PORT}")
    host = expand_nodelist(env["SLURM_STEP_NODELIST"])[0]
    # One task per node (the recipe) drives all of the node's GPUs. With several tasks per node, each
    # takes the GPU numbered by its rank on the node, as JAX's own SLURM detector would arrange
    # (unless JAX_LOCAL_DEVICE_IDS already says otherwise).
    nodes = env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES")
    local = ""
    if nodes and nproc > int(nodes) and "JAX_LOCAL_DEVICE_IDS" not in env:
        local = str(_int(env, "SLURM_LOCALID"))
    group = ProcessGroup("slurm", f"{host}:{port}", nproc, pid, local)
    return _checked(group, "SLURM_PROCID", "SLURM_NTASKS")


def tpu_group(env: Mapping[str, str]) -> ProcessGroup:
    """The process group of one worker of a TPU pod slice, from GKE-style variables."""
    for name in ("TPU_WORKER_ID", "TPU_WORKER_HOSTNAMES"):
        if not env.get(name):
            raise ValueError(f"${name} is not set (a TPU pod worker needs TPU_WORKER_ID and TPU_WORKER_HOSTNAMES)")
    hosts = [h.strip().split(":")[0] for h in env["TPU_WORKER_HOSTNAMES"].split(",")]
    if not all(hosts):
        raise ValueError(f"$TPU_WORKER_HOSTNAMES={env['TPU_WORKER_HOSTNAMES']!r} has an empty entry")
    port = _port(env, TPU_DEFAULT_PORT, "")
    group = ProcessGroup("tpu", f"{hosts[0]}:{port}", len(hosts), _int(env, "TPU_WORKER_ID"))
    return _checked(group, "TPU_WORKER_ID", "TPU_WORKER_HOSTNAMES")


def detect(environ: Mapping[str, str] | None = None) -> ProcessGroup:
    """Which launcher started this process, and its place in the group (see the module docstring)."""
    env = os.environ if environ is None else environ
    explicit = env.get(ENV_COORDINATOR, "")
    if explicit and explicit != "auto":
        return ProcessGroup("explicit", explicit, int(env.get(ENV_NUM, 0) or 0), int(env.get(ENV_ID, -1)))
    if "SLURM_PROCID" in env:
        return slurm_group(env)
    if "TPU_WORKER_ID" in env or "TPU_WORKER_HOSTNAMES" in env:
        return tpu_group(env)
    return ProcessGroup("auto" if explicit == "auto" else "single")


def export_environment(environ: MutableMapping[str, str] | None = None) -> ProcessGroup:
    """Write the detected group into `environ` (default os.environ) for clapjax.train.distributed."""
    env = os.environ if environ is None else environ
    group = detect(env)
    env.update(group.as_environment())
    return group


# --- running several processes ---------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_cpu_devices(env: MutableMapping[str, str], count: int) -> None:
    """Make `count` CPU devices this process's JAX devices (replacing any device count in XLA_FLAGS)."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", "")).split()
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={count}"])
    env["JAX_PLATFORMS"] = "cpu"


def _die_with_parent() -> None:
    """Children get SIGKILL if the launcher itself is killed (Linux), so none is left stepping alone."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _pump(stream, prefix: str, out) -> None:
    for line in iter(stream.readline, ""):
        out.write(prefix + line)
        out.flush()
    stream.close()


def exit_status(rc: int) -> int:
    return rc if rc > 0 else 128 - rc        # killed by signal s → 128 + s, like a shell


def supervise(command: Sequence[str], environments: Sequence[Mapping[str, str]], *, grace_s: float = 10.0,
              out=None, name: str = "launch") -> int:
    """Run `command` once per environment; prefix each line with `[i]`; forward SIGINT/SIGTERM to all;
    when one exits non-zero, stop the others (SIGTERM, then SIGKILL after `grace_s`) and return its
    exit code (128 + signal for a killed one). 0 when all succeed."""
    out = sys.stdout if out is None else out
    procs = [subprocess.Popen(list(command), env=dict(e), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, bufsize=1, start_new_session=True, preexec_fn=_die_with_parent)
             for e in environments]
    for i, p in enumerate(procs):
        out.write(f"[{name}] process {i}: pid {p.pid}\n")
    out.flush()
    pumps = [threading.Thread(target=_pump, args=(p.stdout, f"[{i}] ", out), daemon=True)
             for i, p in enumerate(procs)]
    for t in pumps:
        t.start()

    received: list[int] = []

    def forward(signum, _frame):
        received.append(signum)
        for p in procs:
            _signal_group(p, signum)
    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    failed: tuple[int, int] | None = None
    try:
        while True:
            codes = [p.poll() for p in procs]             # every process, each time round
            failed = next(((i, rc) for i, rc in enumerate(codes) if rc not in (None, 0)), None)
            if failed is not None or all(rc is not None for rc in codes):
                break
            time.sleep(0.05)
        if failed is not None:
            out.write(f"[{name}] process {failed[0]} exited with {failed[1]}; stopping the others\n")
            out.flush()
            _stop(procs, grace_s)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for t in pumps:
            t.join(timeout=5)
    if failed is not None:
        return exit_status(failed[1])
    return exit_status(-received[0]) if received else 0


def _signal_group(p: subprocess.Popen, signum: int) -> None:
    """Signal the child's whole process group (it leads one), so that what it started
    (`bash -c '… clapjax train …'` under the shims) gets the signal too, even once the leader is gone."""
    try:
        os.killpg(p.pid, signum)
    except (ProcessLookupError, PermissionError):   # the group is empty
        pass


def _stop(procs, grace_s: float) -> None:
    for p in procs:
        _signal_group(p, signal.SIGTERM)
    deadline = time.time() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            _signal_group(p, signal.SIGKILL)
            p.wait()


def train_command(train_args: Sequence[str]) -> list[str]:
    """The `clapjax train` entry point with these arguments (a leading 'train' is accepted)."""
    args = list(train_args)
    if args[:1] == ["train"]:
        args = args[1:]
    if not args:
        raise ValueError("give the `clapjax train` arguments after `--`, e.g. "
                         "clapjax launch --local 2 -- tiny --workdir runs/local")
    return [sys.executable, "-m", "clapjax.app.cli", "train"] + args


class _NoticePortTaken:
    """The launcher's output stream, noting whether a line said the coordinator port was taken."""

    def __init__(self, out):
        self.out, self.taken = out, False

    def write(self, text: str) -> None:
        self.taken = self.taken or PORT_TAKEN in text
        self.out.write(text)

    def flush(self) -> None:
        self.out.flush()


def run_local(num_processes: int, train_args: Sequence[str], *, cpu_devices: int | None = None,
              port: int | None = None, base_env: Mapping[str, str] | None = None) -> int:
    """`num_processes` copies of `clapjax train` on this machine, joined through 127.0.0.1:port
    (a free port when none is given, found again if it is taken before the coordinator binds it)."""
    if num_processes < 1:
        raise ValueError(f"--local {num_processes}: need at least one process")
    if cpu_devices is not None and cpu_devices < 1:
        raise ValueError(f"--cpu-devices {cpu_devices}: need at least one device")
    command = train_command(train_args)
    attempts, attempt = (1 if port is not None else PORT_ATTEMPTS), 1
    while True:
        chosen = free_port() if port is None else port
        envs = []
        for pid in range(num_processes):
            env = dict(os.environ if base_env is None else base_env)
            env.update({ENV_COORDINATOR: f"127.0.0.1:{chosen}", ENV_NUM: str(num_processes), ENV_ID: str(pid),
                        "PYTHONUNBUFFERED": "1"})
            if cpu_devices is not None:
                with_cpu_devices(env, cpu_devices)
            envs.append(env)
        out = _NoticePortTaken(sys.stdout)
        rc = supervise(command, envs, out=out)
        if rc == 0 or not out.taken or attempt == attempts:
            return rc
        attempt += 1
        print(f"[launch] coordinator port {chosen} was taken before process 0 could bind it; "
              f"starting again on another (attempt {attempt} of {attempts})", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="clapjax launch", description=(
        "Start N processes of `clapjax train` on this machine (coordinator on a free local port), the "
        "same entry point SLURM and TPU pods start once per host. Output lines carry the process id; "
        "if one process fails, the others are stopped and the launcher exits non-zero."))
    ap.add_argument("--local", type=int, required=True, metavar="N", help="number of processes")
    ap.add_argument("--cpu-devices", type=int, metavar="K", help="give each process K CPU devices (testing)")
    ap.add_argument("--port", type=int, help="coordinator port (default: a free one)")
    ap.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the `clapjax train` arguments")
    args = ap.parse_args(argv)
    rest = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    return run_local(args.local, rest, cpu_devices=args.cpu_devices, port=args.port)
