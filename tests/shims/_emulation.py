"""Shared by the launcher stand-ins in this folder (srun, sbatch, gcloud).

They let the launch recipes in docs/launching.md run on one machine through the code path the real
launchers use: each starts the given command once per task/worker with the environment the real
launcher would set (and `CLAPJAX_SHIM_CPU_DEVICES`, default 4, CPU devices each); clapjax then maps
that environment itself (clapjax.train.launch). Nothing here sets CLAPJAX_* for the children.
"""
from __future__ import annotations

import os
import random
import socket
import sys

# the repository holding this folder, so `clapjax` imports when the shims run from a temporary dir
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from clapjax.train import launch  # noqa: E402

CLAPJAX_VARS = ("CLAPJAX_COORDINATOR", "CLAPJAX_NUM_PROCESSES", "CLAPJAX_PROCESS_ID", "CLAPJAX_COORDINATOR_PORT")


def clean_environment() -> dict[str, str]:
    """This process's environment without clapjax's own process-group variables (a fresh node has none)."""
    env = {k: v for k, v in os.environ.items() if k not in CLAPJAX_VARS}
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def with_devices(env: dict[str, str]) -> dict[str, str]:
    launch.with_cpu_devices(env, int(os.environ.get("CLAPJAX_SHIM_CPU_DEVICES", "4")))
    return env


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def slurm_job_id() -> int:
    """A job id whose SLURM-derived coordinator port (61440 + id mod 4096) is free on this machine."""
    rng = random.Random()
    for _ in range(200):
        offset = rng.randrange(launch.SLURM_PORT_SPAN)
        if _port_is_free(launch.SLURM_PORT_BASE + offset):
            return rng.randrange(1, 200) * launch.SLURM_PORT_SPAN + offset
    raise SystemExit("shim: no free port in 61440-65535 for the coordinator")


def fail(message: str) -> None:
    print(f"{os.path.basename(sys.argv[0])} (test shim): {message}", file=sys.stderr)
    raise SystemExit(2)
