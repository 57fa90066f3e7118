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

Two choices keep the first save of a run cheap (it used to take 10+ s on CPU): the finiteness check
reads the shards on the host instead of compiling one program over every leaf (XLA:CPU took ~15 s
for 300 leaves), and arrays are written without Orbax's replica-parallel slicing, which compiles an
eager slice per array shape (its default off on GPU already); each replicated array is written by
its first replica.
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


def _finite(tree) -> bool:
    """True when every floating value in `tree` is finite, on every process (a collective when
    multi-process). Each element is read once: only the shards of replica 0 are checked."""
    def pieces():   # host views of every floating value, each element once
        for x in jax.tree.leaves(tree):
            if not jnp.issubdtype(x.dtype, jnp.inexact):
                continue
            if isinstance(x, jax.Array):
                yield from (np.asarray(s.data) for s in x.addressable_shards if s.replica_id == 0)
            else:
                yield np.asarray(x)
    # np.isfinite has no bfloat16 loop: narrow floats are widened first
    ok = all(np.isfinite(d.astype(np.float32) if d.dtype.itemsize < 4 else d).all() for d in pieces())
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        ok = bool(np.all(multihost_utils.process_allgather(np.asarray([ok]))))
    return ok


def _state_handler() -> ocp.PyTreeCheckpointHandler:
    """The PyTree handler with Orbax's array handler minus replica-parallel slicing (see above)."""
    registry = ocp.type_handlers.create_type_handler_registry(
        (jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False)),
        (np.ndarray, ocp.type_handlers.NumpyHandler()),
        (int, ocp.type_handlers.ScalarHandler()), (float, ocp.type_handlers.ScalarHandler()),
        (np.number, ocp.type_handlers.ScalarHandler()))
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


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


def _restore_args(abstract_state) -> ocp.args.PyTreeRestore:
    """Restore every array onto the sharding its ShapeDtypeStruct names."""
    return ocp.args.PyTreeRestore(item=abstract_state,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))


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
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": _state_handler(), "data": ocp.JsonCheckpointHandler(),
                           "config": ocp.JsonCheckpointHandler()})

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
        if not _finite(state):
            raise NonFiniteStateError(f"step {step}: the train state holds a non-finite value; not saving it")
        data = {"process_count": jax.process_count(), "processes": _gather_json(data_state)}
        self.manager.save(int(step), args=ocp.args.Composite(
            state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(data),
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
            state=_restore_args(abstract_state), data=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore()))
        data = out.data
        if data["process_count"] != jax.process_count():
            raise ValueError(f"checkpoint step {step} was written by {data['process_count']} processes, this run "
                             f"has {jax.process_count()}: the data iterators' states cannot be matched up")
        return dict(out.state), data["processes"][jax.process_index()], out.config
