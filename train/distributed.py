"""Multi-process start-up: `jax.distributed.initialize` from the config or the environment.

The coordinator address, process count and process id come from the config's `distributed`
section or, when it leaves them unset, from `CLAPJAX_COORDINATOR`, `CLAPJAX_NUM_PROCESSES`,
`CLAPJAX_PROCESS_ID`. `coordinator='auto'` lets JAX detect the cluster itself (Cloud TPU pods,
SLURM, Open MPI). With neither a coordinator nor more than one process this is a no-op, so the same
command trains on one host.

On CPU the cross-process collectives need an implementation: we select gloo (JAX's default for
CPU is none, and a multi-process CPU computation would fail at its first all-reduce). The option
only concerns the CPU client, so it is harmless on accelerators.
"""
from __future__ import annotations

import dataclasses
import os

import jax

ENV_COORDINATOR, ENV_NUM, ENV_ID = "CLAPJAX_COORDINATOR", "CLAPJAX_NUM_PROCESSES", "CLAPJAX_PROCESS_ID"


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


def shutdown() -> None:
    if jax.distributed.is_initialized():
        jax.distributed.shutdown()
