"""Multi-process start-up: `jax.distributed.initialize` from the config or the environment.

The coordinator address, process count and process id come from the config's `distributed`
section or, when it leaves them unset, from `CLAPJAX_COORDINATOR`, `CLAPJAX_NUM_PROCESSES`,
`CLAPJAX_PROCESS_ID`. `coordinator='auto'` lets JAX detect the cluster itself (Cloud TPU pods,
SLURM, Open MPI). With neither a coordinator nor more than one process this is a no-op, so the same
command trains on one host.

On CPU the cross-process collectives need an implementation: we select gloo (JAX's default for
CPU is none, and a multi-process CPU computation would fail at its first all-reduce). The option
only concerns the CPU client, so it is harmless on accelerators.

One process failing must stop the others. Left alone, its peers wait in the next collective for a
partner that never comes, and the failing process itself waits in JAX's shutdown barrier for them,
until the coordination service times the barrier out (`shutdown_timeout_seconds`, 300 s) and kills
everyone with a fatal error. Inside `one_failure_stops_all()`, an exception instead posts the error
in the coordination service's key-value store (`stop_peers`); a watcher thread in every process
(`watch_peers`) waits on that key, prints which process failed and why, and ends its process with
exit status `FAILED_EXIT`, whatever it was doing. (A peer waiting in a collective usually fails on
its own first, as the failing process's sockets close: it then reports the first failure too.)
Exits skip the shutdown barrier (`os._exit`): the group is gone, there is nobody to meet there.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import threading
import traceback

import jax

ENV_COORDINATOR, ENV_NUM, ENV_ID = "CLAPJAX_COORDINATOR", "CLAPJAX_NUM_PROCESSES", "CLAPJAX_PROCESS_ID"
FAILED_EXIT = 2                      # the status of every process of a group one of them stopped (as the CLI's errors)
ABORT_KEY = "clapjax/failed"         # key-value store: "process P of N failed: <error>"
STOPPED_KEY = "clapjax/stopped/{}"   # set by each process just before it exits
WATCH_POLL_MS = 1000                 # the watcher's wait per look (so it notices when it is told to stop)
LAST_EXIT_WAIT_MS = 30_000           # how long process 0 waits for each peer to leave first


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
    coordinator: str = ""
    num_processes: int = 0
    process_id: int = -1
    initialization_timeout: int = 300

    @classmethod
    def resolve(cls, section=None, environ=None) -> "DistributedSettings":
        """Config values first, then the environment."""
        env = os.environ if environ is None else environ
        s = section if section is not None else {}
        get = (lambda k, d: s.get(k, d)) if hasattr(s, "get") else (lambda k, d: getattr(s, k, d))
        coordinator = get("coordinator", "") or env.get(ENV_COORDINATOR, "")
        num = int(get("num_processes", 0) or env.get(ENV_NUM, 0) or 0)
        pid = int(get("process_id", -1))
        if pid < 0:
            pid = int(env.get(ENV_ID, -1))
        return cls(coordinator, num, pid, int(get("initialization_timeout", 300)))

    @property
    def multi_process(self) -> bool:
        return self.coordinator == "auto" or self.num_processes > 1

    def validate(self) -> None:
        if self.coordinator == "auto" or not self.multi_process:
            return
        if not self.coordinator:
            raise ValueError(f"{self.num_processes} processes need a coordinator address "
                             f"(distributed.coordinator=host:port or ${ENV_COORDINATOR})")
        if not 0 <= self.process_id < self.num_processes:
            raise ValueError(f"process_id {self.process_id} is not in [0, {self.num_processes}) "
                             f"(distributed.process_id or ${ENV_ID})")


def initialize(section=None, environ=None) -> bool:
    """Join the process group if the settings ask for one; True when running multi-process.

    Must run before anything touches a JAX backend (device lists, arrays).
    """
    settings = DistributedSettings.resolve(section, environ)
    settings.validate()
    if not settings.multi_process:
        return False
    if jax.distributed.is_initialized():
        return True
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if settings.coordinator == "auto":
        jax.distributed.initialize(initialization_timeout=settings.initialization_timeout)
    else:
        # 'deactivate': the values are complete, so JAX's cluster detection must not add its own
        # guesses (under SLURM it would pin each process to the one GPU numbered SLURM_LOCALID,
        # hiding the others from a one-task-per-node run; JAX_LOCAL_DEVICE_IDS still applies).
        jax.distributed.initialize(coordinator_address=settings.coordinator,
                                   num_processes=settings.num_processes, process_id=settings.process_id,
                                   initialization_timeout=settings.initialization_timeout,
                                   cluster_detection_method="deactivate")
    return True


def is_main() -> bool:
    """Process 0: the one that logs and writes single-writer files."""
    return jax.process_index() == 0


def local_batch_size(global_batch: int) -> int:
    """Rows of the global batch this process feeds (the processes' slices are equal)."""
    n = jax.process_count()
    if global_batch % n:
        raise ValueError(f"global batch {global_batch} is not divisible by {n} processes")
    return global_batch // n


# --- one process failing stops the group -----------------------------------------------------------

_stopping = threading.Lock()         # taken by whichever thread of this process stops it first


def _client():
    """JAX's coordination-service client (no public accessor exists; multihost_utils reads it the same way)."""
    from jax._src import distributed as jax_distributed
    return jax_distributed.global_state.client


def _leave(client, pid: int, n: int) -> None:
    """Say this process is leaving; process 0, which hosts the coordination service, leaves last so
    that every message is delivered; then exit without JAX's shutdown barrier."""
    with contextlib.suppress(Exception):
        client.key_value_set(STOPPED_KEY.format(pid), "1")
    if pid == 0:
        for peer in range(1, n):
            with contextlib.suppress(Exception):   # a peer that cannot answer is not waited for longer
                client.blocking_key_value_get(STOPPED_KEY.format(peer), LAST_EXIT_WAIT_MS)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(FAILED_EXIT)


def _take_over() -> None:
    """Become the thread that stops this process, or wait for the one that already does (it exits)."""
    if not _stopping.acquire(blocking=False):
        threading.Event().wait()


def stop_peers(err: BaseException) -> None:
    """In a multi-process run: print `err`, tell every other process, and exit with FAILED_EXIT
    (never returns). In a single process: nothing (the caller re-raises)."""
    client = _client() if jax.distributed.is_initialized() else None
    if client is None:
        return
    _take_over()
    pid, n = jax.process_index(), jax.process_count()
    what = f"{type(err).__name__}: {err}"
    try:
        client.key_value_set(ABORT_KEY, f"process {pid} of {n} failed: {what}")
    except Exception:   # ALREADY_EXISTS: another process failed first, and this error is likely its consequence
        first = client.key_value_try_get(ABORT_KEY)
        print(f"error: {first}; stopping process {pid} (here: {what})", file=sys.stderr)
    else:
        traceback.print_exception(err, file=sys.stderr)
        print(f"error: {what}\nprocess {pid} of {n} failed; stopping the other processes", file=sys.stderr)
    _leave(client, pid, n)


class _PeerWatch(threading.Thread):
    def __init__(self, client, pid: int, n: int):
        super().__init__(name="clapjax-peer-watch", daemon=True)
        self.client, self.pid, self.n = client, pid, n
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                message = self.client.blocking_key_value_get(ABORT_KEY, WATCH_POLL_MS)
            except Exception as err:
                if "DEADLINE_EXCEEDED" in str(err):
                    continue                     # nothing posted yet
                return                           # the service is gone: JAX's own heartbeat check takes over
            if self.done.is_set():
                return
            _take_over()
            print(f"error: {message}; stopping process {self.pid}", file=sys.stderr)
            _leave(self.client, self.pid, self.n)


@contextlib.contextmanager
def one_failure_stops_all():
    """An exception escaping the block stops every process of the group (`stop_peers`), and one
    posted by another process ends this one (`watch_peers`); a no-op in a single process. Enter it
    inside whatever closes the run's resources: closing a checkpointer may wait for the peers."""
    with watch_peers():
        try:
            yield
        except Exception as err:
            stop_peers(err)        # multi-process: never returns
            raise


@contextlib.contextmanager
def watch_peers():
    """While the block runs, a failure that another process posts with `stop_peers` ends this one
    (a no-op in a single process)."""
    client = _client() if jax.distributed.is_initialized() else None
    if client is None:
        yield
        return
    watch = _PeerWatch(client, jax.process_index(), jax.process_count())
    watch.start()
    try:
        yield
    finally:
        watch.done.set()
        watch.join()


def shutdown() -> None:
    if jax.distributed.is_initialized():
        jax.distributed.shutdown()
