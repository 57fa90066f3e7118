"""Meshes and shardings: the one module in clapjax that places arrays on devices.

Every other module asks this one for shardings instead of building `NamedSharding`s, calling
`with_sharding_constraint`, `shard_map` or `device_put` itself, so the placement policy lives in
one place and a new mesh layout is one rules table.

Parameters carry `logical_axes` metadata (see `clapjax.layers`): a tuple naming each dimension,
e.g. ('embed', 'mlp') for a Linear kernel, () for the logit scales, None for an unnamed
dimension. A rules table maps those names to mesh axes:

* `RULES_DP` (data parallel): every name → None, so every parameter is replicated.
* `RULES_FSDP`: every name → 'fsdp'. A mesh axis can appear once in a PartitionSpec, so
  `param_spec` gives it to the *largest* dimension it divides, else the next largest, else the
  parameter stays replicated (e.g. LayerNorm scales of an odd width, HTSAT's 527-class head).

Rules values may be a mesh axis name, a tuple of names (shard one dimension over several axes) or
None. A name the table does not know is an error: a new logical axis must be placed on purpose.

The batch is sharded over every batch axis of the mesh (('data', 'fsdp') by default), so with
FSDP each device sees a different slice of the batch and XLA all-gathers the parameter shards it
needs at use ("ZeRO-3"). Left alone, XLA's propagation may also split an activation's feature
dimension over 'fsdp' (it follows the parameter layout); pin the batch layout of what the step
returns (embeddings, loss inputs) with `constrain(x, ('batch', None), mesh)`.

Mesh axis types are `Auto` (sharding propagation by XLA), not jax 0.10's default `Explicit`.

One partitioning rule lives outside this module: the audio front end declares its FFT batch-parallel
(`clapjax.audio.frontend._rfft`, a `custom_partitioning`), because XLA would otherwise all-gather a
batch-sharded FFT operand onto every device, and the core cannot import the trainer.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from clapjax.layers import LOGICAL_AXES

MeshAxes = str | tuple[str, ...] | None
Rules = Mapping[str | None, MeshAxes]

DEFAULT_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")
# every logical axis name used by the clapjax towers and heads; None = an unnamed dimension
LOGICAL_AXIS_NAMES = (None, "embed", "embed_out", "mlp", "hidden", "heads", "qkv", "vocab", "pos",
                      "norm", "conv_in", "conv_out", "classes", "joint", "joint_out")
RULES_DP: dict[str | None, MeshAxes] = {name: None for name in LOGICAL_AXIS_NAMES}
RULES_FSDP: dict[str | None, MeshAxes] = {name: "fsdp" for name in LOGICAL_AXIS_NAMES}
RULES = {"dp": RULES_DP, "fsdp": RULES_FSDP}
# activations: only the batch dimension is ever named
ACTIVATION_RULES: dict[str | None, MeshAxes] = {None: None, "batch": BATCH_AXES}


# --- mesh -------------------------------------------------------------------------------------------
def make_mesh(shape: Mapping[str, int] | Sequence[int], axis_names: Sequence[str] = DEFAULT_AXES,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with Auto axis types over `devices` (default: every device of every process).

    `shape` is {'data': 2, 'fsdp': 4} (names from the keys) or (2, 4) with `axis_names`. One
    size may be -1: it takes whatever the device count leaves.
    """
    if isinstance(shape, Mapping):
        axis_names, sizes = tuple(shape), [int(v) for v in shape.values()]
    else:
        sizes, axis_names = [int(v) for v in shape], tuple(axis_names)
    if len(sizes) != len(axis_names) or not sizes:
        raise ValueError(f"mesh shape {sizes} does not match axis names {axis_names}")
    if len(set(axis_names)) != len(axis_names):
        raise ValueError(f"mesh axis names repeat: {axis_names}")
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh shape {sizes}: sizes must be positive, at most one -1")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if n % known:
            raise ValueError(f"mesh shape {sizes} cannot fill {n} devices")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise ValueError(f"mesh shape {dict(zip(axis_names, sizes))} needs {math.prod(sizes)} devices, "
                         f"have {n}")
    # jax.make_mesh orders devices for the physical topology (TPU ICI); we only override the
    # axis types, which it would otherwise make Explicit.
    return jax.make_mesh(tuple(sizes), axis_names, axis_types=(AxisType.Auto,) * len(sizes),
                         devices=devices)


def _axis_size(mesh: Mesh, axes: MeshAxes) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    for a in axes:
        if a not in mesh.shape:
            raise ValueError(f"rules name mesh axis {a!r}, but the mesh has only {tuple(mesh.shape)}")
    return math.prod(mesh.shape[a] for a in axes)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes the batch is split over: those of ('data', 'fsdp') the mesh has."""
    axes = tuple(a for a in BATCH_AXES if a in mesh.shape)
    if not axes:
        raise ValueError(f"mesh axes {tuple(mesh.shape)} include none of the batch axes {BATCH_AXES}")
    return axes


def num_batch_shards(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in batch_axes(mesh))


# --- parameters -------------------------------------------------------------------------------------
def param_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
               rules: Rules) -> P:
    """PartitionSpec for one parameter.

    Each mesh-axis group a rule names is given to the largest dimension (ties: the first) whose
    logical name maps to it and whose size it divides; a group used once is not used again.
    Axes of size 1 are left out (they shard nothing).
    """
    logical_axes, shape = tuple(logical_axes), tuple(int(s) for s in shape)
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {logical_axes} do not match shape {shape}")
    for name in logical_axes:
        if name not in rules:
            raise ValueError(f"logical axis {name!r} has no sharding rule; known: "
                             f"{sorted(map(str, rules))}")
    spec: list[MeshAxes] = [None] * len(shape)
    used: set[str] = set()
    targets = []
    for name in logical_axes:
        t = rules[name]
        t = (t,) if isinstance(t, str) else (tuple(t) if t is not None else None)
        if t is not None and t not in targets:
            targets.append(t)
    for target in targets:
        size = _axis_size(mesh, target)
        if size == 1 or used.intersection(target):
            continue
        candidates = [i for i, name in enumerate(logical_axes)
                      if spec[i] is None and _as_tuple(rules[name]) == target]
        for i in sorted(candidates, key=lambda i: (-shape[i], i)):
            if shape[i] % size == 0:
                spec[i] = target[0] if len(target) == 1 else target
                used.update(target)
                break
    return P(*spec)


def _as_tuple(axes: MeshAxes) -> tuple[str, ...] | None:
    return (axes,) if isinstance(axes, str) else (tuple(axes) if axes is not None else None)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _leaf_sharding(leaf, mesh: Mesh, rules: Rules, path) -> Any:
    """NamedSharding for a Variable (by its metadata) or a bare array (replicated)."""
    if isinstance(leaf, nnx.Variable):
        value = leaf.get_value()
        axes = leaf.get_metadata().get(LOGICAL_AXES)
        if axes is None:
            if isinstance(leaf, nnx.Param):
                raise ValueError(f"parameter {jax.tree_util.keystr(path)} has no {LOGICAL_AXES!r} metadata; "
                                 "build it with clapjax.layers or pass logical_axes=")
            # batch statistics, rng keys/counts and other state: replicated
            return leaf.replace(NamedSharding(mesh, P()))
        return leaf.replace(NamedSharding(mesh, param_spec(axes, np.shape(value), mesh, rules)))
    return NamedSharding(mesh, P())


def state_shardings(abstract_state, mesh: Mesh, rules: Rules):
    """A pytree of NamedSharding with the structure of `abstract_state`.

    `abstract_state` is an nnx State (or any pytree: an optax state built on one keeps the
    Variables and their metadata, so Adam's moments shard like their parameters). Variables
    come back as the same Variable type holding a NamedSharding, which is what `jax.jit`'s
    in/out_shardings and `jax.device_put` accept for the State; `jax.tree.leaves` of the result
    are the NamedShardings. Params shard by `logical_axes`; every other leaf is replicated.
    """
    return jax.tree_util.tree_map_with_path(lambda path, x: _leaf_sharding(x, mesh, rules, path),
                                            abstract_state, is_leaf=_is_variable)


def place(tree, shardings):
    """`jax.device_put` onto given shardings (e.g. a restored or host-built state)."""
    return jax.device_put(tree, shardings)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


# --- batches ----------------------------------------------------------------------------------------
def batch_spec(mesh: Mesh) -> P:
    """Leading (batch) dimension over all batch axes of the mesh; the rest replicated."""
    return P(batch_axes(mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, batch_spec(mesh))


def _check_batch_leaf(path, x, shards: int, what: str):
    dtype = np.asarray(x).dtype if not hasattr(x, "dtype") else np.dtype(x.dtype)
    if dtype.kind not in "biufc":
        raise ValueError(f"batch entry {jax.tree_util.keystr(path)} has dtype {dtype}: only numeric arrays "
                         "go on devices (drop keys/strings before sharding)")
    if np.ndim(x) == 0:
        raise ValueError(f"batch entry {jax.tree_util.keystr(path)} is a scalar; it needs a batch dimension")
    if np.shape(x)[0] % shards:
        raise ValueError(f"batch entry {jax.tree_util.keystr(path)}: {what} size {np.shape(x)[0]} is not "
                         f"divisible by the {shards} batch shards of the mesh")


def shard_batch(batch, mesh: Mesh):
    """Host arrays holding the whole global batch (single process) → batch-sharded jax Arrays."""
    shards = num_batch_shards(mesh)
    jax.tree_util.tree_map_with_path(lambda p, x: _check_batch_leaf(p, x, shards, "batch"), batch)
    return jax.device_put(batch, batch_sharding(mesh))


def global_batch_from_local(local_batch, mesh: Mesh):
    """Each process's slice of the batch (its rows, in process order) → one global jax Array.

    With one process this equals `shard_batch`. The global batch is the concatenation of the
    processes' local batches, which must all have the same size.
    """
    sharding = batch_sharding(mesh)
    local_shards = max(1, num_batch_shards(mesh) // jax.process_count())

    def one(path, x):
        _check_batch_leaf(path, x, local_shards, "local batch")
        x = np.asarray(x)
        global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree_util.tree_map_with_path(one, local_batch)


# --- activations ------------------------------------------------------------------------------------
def _context_mesh():
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty else mesh


def logical_to_spec(names: Sequence[str | None], mesh, rules: Rules = ACTIVATION_RULES) -> P:
    """Activation names → PartitionSpec: no divisibility search, the rule is applied as is."""
    spec = []
    for name in names:
        if name not in rules:
            raise ValueError(f"activation axis {name!r} has no rule; known: {sorted(map(str, rules))}")
        target = rules[name]
        if name == "batch" and target == BATCH_AXES:
            target = tuple(a for a in BATCH_AXES if a in mesh.shape)
        spec.append(target)
    return P(*spec)


def constrain(x: jax.Array, spec_or_names: P | Sequence[str | None], mesh: Mesh | None = None,
              rules: Rules = ACTIVATION_RULES) -> jax.Array:
    """`with_sharding_constraint` by PartitionSpec or activation names (e.g. ('batch', None)).

    Without a mesh (argument or `jax.set_mesh` context) this is the identity: single-device code
    calls it freely.
    """
    mesh = mesh if mesh is not None else _context_mesh()
    if mesh is None:
        return x
    spec = spec_or_names if isinstance(spec_or_names, P) else logical_to_spec(spec_or_names, mesh, rules)
    if isinstance(mesh, Mesh):
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
    return jax.lax.with_sharding_constraint(x, spec)


def shard_map(f: Callable, mesh: Mesh, in_specs, out_specs, **kw) -> Callable:
    """`jax.shard_map` with explicit specs (kept here so all placement calls live in one module)."""
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, **kw)


# --- accounting -------------------------------------------------------------------------------------
def bytes_per_device(tree, shardings=None) -> dict[Any, int]:
    """Bytes each device holds for `tree`: from live arrays' shards, or from abstract leaves and
    `shardings` (a matching pytree of NamedSharding), without allocating anything."""
    totals: dict[Any, int] = {}
    leaves = jax.tree.leaves(tree)
    if shardings is None:
        for x in leaves:
            for shard in x.addressable_shards:
                totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
        return totals
    shard_leaves = jax.tree.leaves(shardings)
    if len(shard_leaves) != len(leaves):
        raise ValueError(f"{len(leaves)} leaves but {len(shard_leaves)} shardings")
    for x, s in zip(leaves, shard_leaves):
        nbytes = math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
        for d in s.device_set:
            totals[d] = totals.get(d, 0) + nbytes
    return totals


def total_bytes(tree) -> int:
    """Unsharded size of `tree` (arrays or ShapeDtypeStructs)."""
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
