"""Train checkpoints with Orbax's CheckpointManager.

Each step directory `WORKDIR/checkpoints/<step>/` holds three items:
* `state`: the whole train state (params, batch stats, optimizer state, step, rng key data, the
  non-finite counters) as an Orbax PyTree: each array is written by the processes that hold its
  shards, and can be read back onto any mesh (restore passes the target shardings);
* `data`: every process's data-iterator state (JSON; gathered to process 0, which writes it), so
  that a resumed run reads exactly the batches the interrupted one would have read next;
* `config`: the resolved run config (JSON).

Saves are asynchronous (the arrays are copied off the devices before `save` returns, then written
in the background; a step directory appears only once complete, so a run killed mid-save leaves
the previous checkpoint as the latest). Retention: the last `keep_last` checkpoints plus every
`keep_every`-th step. A state holding a non-finite value is refused, never written.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

ITEMS = ("state", "data", "config")


class NonFiniteStateError(RuntimeError):
    """A state with NaN/Inf was about to be checkpointed."""


@jax.jit
def _finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _gather_json(obj: Any) -> list[Any]:
    """Every process's JSON-serialisable `obj`, in process order (a collective: all must call it)."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils
    raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.asarray([raw.size], np.int32))
    longest = int(np.max(sizes))
    padded = np.zeros((longest,), np.uint8)
    padded[:raw.size] = raw
    everything = np.asarray(multihost_utils.process_allgather(padded)).reshape(jax.process_count(), longest)
    return [json.loads(bytes(row[:int(n)]).decode()) for row, n in zip(everything, np.ravel(sizes))]


class Checkpointer:
    """Save / find / restore train checkpoints under `directory`."""

    def __init__(self, directory: str, *, keep_last: int = 3, keep_every: int = 0, async_save: bool = True):
        policies = [ocm.LatestN(n=int(keep_last))]
        if keep_every:
            policies.append(ocm.EveryNSteps(int(keep_every)))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocm.AnyPreservationPolicy(policies), create=True,
            cleanup_tmp_directories=True, enable_async_checkpointing=bool(async_save))
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    @classmethod
    def from_config(cls, cfg, workdir: str) -> "Checkpointer":
        c = cfg.checkpoint
        return cls(os.path.join(workdir, "checkpoints"), keep_last=c.keep_last, keep_every=c.keep_every,
                   async_save=c.async_save)

    # --- saving ---------------------------------------------------------------------------------
    def save(self, step: int, state: Mapping, data_state: Any, config: Mapping) -> None:
        """Start saving `state` (+ this process's `data_state`, the config) as step `step`.

        All processes must call it. Raises NonFiniteStateError (and writes nothing) if any
        floating value in `state` is NaN/Inf.
        """
        if not bool(_finite(state)):
            raise NonFiniteStateError(f"step {step}: the train state holds a non-finite value; not saving it")
        data = {"process_count": jax.process_count(), "processes": _gather_json(data_state)}
        self.manager.save(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data),
            config=ocp.args.JsonSave(dict(config))), force=True)

    def wait(self) -> None:
        """Block until the pending asynchronous save is on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    # --- reading --------------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore(self, abstract_state: Mapping, step: int | None = None) -> tuple[dict, Any, dict]:
        """(state, this process's data-iterator state, config) of `step` (default: the latest).

        `abstract_state` is a pytree of ShapeDtypeStructs whose `sharding`s say where each array
        goes: any mesh, whatever mesh the checkpoint was written from.
        """
        step = self.latest_step() if step is None else int(step)
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore()))
        data = out.data
        if data["process_count"] != jax.process_count():
            raise ValueError(f"checkpoint step {step} was written by {data['process_count']} processes, this run "
                             f"has {jax.process_count()}: the data iterators' states cannot be matched up")
        return dict(out.state), data["processes"][jax.process_index()], out.config

    def read_json(self, item: str, step: int | None = None):
        """The `config` or `data` item of `step` (default: the latest) as saved (all processes' data)."""
        if item not in ("config", "data"):
            raise ValueError(f"item must be 'config' or 'data', got {item!r}")
        step = self.latest_step() if step is None else int(step)
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint")
        out = self.manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))
        return out[item]

    def restore_state(self, abstract_state: Mapping, step: int | None = None) -> dict:
        """Only the train state (e.g. to evaluate, or to start a run with another process count)."""
        step = self.latest_step() if step is None else int(step)
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        return dict(out.state)
