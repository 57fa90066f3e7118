"""Strict key tables between PyTorch state dicts and clapjax's NNX modules.

Our module attribute names mirror the PyTorch ones, so most of a table is *derived* from the
Flax module tree: every `nnx.Param` / `nnx.BatchStat` gets one entry whose source key is its
dotted path with the leaf renamed the PyTorch way (`kernel`→`weight` transposed, `scale`→`weight`,
`mean`→`running_mean`, …). Format-specific tables then rename source keys, fuse split tensors
(HF's separate q/k/v) and list the source keys that are ignored, each with a written reason and,
for recomputed buffers, a check that the stored value is what we recompute.

Loading is all-or-nothing: every source key must be consumed or ignored, every target filled,
every shape equal; otherwise `KeyMappingError` names every offending key and nothing is written.
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
from flax import nnx

from clapjax.saved_model import SAVED, model_variables

Array = np.ndarray
StateDict = Mapping[str, Array]


class KeyMappingError(ValueError):
    """A state dict does not fit a model: carries the full `Report`."""

    def __init__(self, report: "Report"):
        self.report = report
        super().__init__(report.error_message())


@dataclasses.dataclass(frozen=True)
class Entry:
    """One target variable filled from one or more source tensors."""

    target: str
    sources: tuple[str, ...]
    to_target: Callable[..., Array]
    to_source: Callable[[Array], tuple[Array, ...]]
    # the target shape from the source shapes, so a check needs no copy of the data (None: run to_target)
    target_shape: Callable[..., tuple[int, ...]] | None = None


@dataclasses.dataclass(frozen=True)
class Ignore:
    """Source keys (regex, full match) that are deliberately not loaded, and why.

    `check(key, value, state_dict)` may raise ValueError when the stored value is not the one
    we recompute (e.g. a different attention mask or mel filterbank: a different model).
    """

    pattern: str
    reason: str
    check: Callable[[str, Array, StateDict], None] | None = None

    def matches(self, key: str) -> bool:
        return re.fullmatch(self.pattern, key) is not None


# --- per-layer conversions ---------------------------------------------------------------

def _identity(x: Array) -> Array:
    return x


def _linear_to_flax(w: Array) -> Array:
    return np.ascontiguousarray(np.asarray(w).T)


def _conv_to_flax(w: Array) -> Array:
    # torch (O, I, *k) -> flax (*k, I, O)
    nd = w.ndim
    return np.ascontiguousarray(np.transpose(w, tuple(range(2, nd)) + (1, 0)))


def _conv_to_torch(k: Array) -> Array:
    nd = k.ndim
    return np.ascontiguousarray(np.transpose(k, (nd - 1, nd - 2) + tuple(range(nd - 2))))


def _same_shape(shape):
    return tuple(shape)


def _linear_shape(shape):
    return tuple(shape)[::-1]


def _conv_shape(shape):
    return tuple(shape[2:]) + (shape[1], shape[0])


_COPY = (_identity, _identity, _same_shape)
# leaf renames by owning layer type: flax leaf -> (torch leaf, to_flax, to_torch, flax shape of torch shape)
_LEAF_RULES: dict[type, dict[str, tuple]] = {
    nnx.Linear: {"kernel": ("weight", _linear_to_flax, _linear_to_flax, _linear_shape), "bias": ("bias", *_COPY)},
    nnx.Conv: {"kernel": ("weight", _conv_to_flax, _conv_to_torch, _conv_shape), "bias": ("bias", *_COPY)},
    nnx.LayerNorm: {"scale": ("weight", *_COPY), "bias": ("bias", *_COPY)},
    nnx.BatchNorm: {"scale": ("weight", *_COPY), "bias": ("bias", *_COPY),
                    "mean": ("running_mean", *_COPY), "var": ("running_var", *_COPY)},
    nnx.Embed: {"embedding": ("weight", *_COPY)},
}

def _path_str(path: Sequence) -> str:
    return ".".join(str(p) for p in path)


def derive_entries(model: nnx.Module, rename: Callable[[str], str] = _identity) -> list[Entry]:
    """One entry per saved variable; `rename` maps the PyTorch-style key to the source key."""
    owners = {tuple(p): n for p, n in nnx.iter_graph(model) if isinstance(n, nnx.Module)}
    entries = []
    for path, var in nnx.iter_graph(model):
        if not isinstance(var, SAVED) or var.get_value() is None:
            continue
        owner, leaf = owners.get(tuple(path[:-1])), path[-1]
        rule = next((r for t, r in _LEAF_RULES.items() if isinstance(owner, t)), None)
        if rule is not None:
            if leaf not in rule:
                raise TypeError(f"no key rule for {type(owner).__name__}.{leaf} at {_path_str(path)}")
            tleaf, to_t, to_s, shape = rule[leaf]
        else:  # a bare parameter of one of our modules: same name, same layout
            tleaf, (to_t, to_s, shape) = leaf, _COPY
        src = rename(_path_str(list(path[:-1]) + [tleaf]))
        entries.append(Entry(_path_str(path), (src,), to_t, (lambda f: (lambda x: (f(x),)))(to_s), shape))
    return entries


@dataclasses.dataclass
class KeyTable:
    entries: list[Entry]
    ignores: list[Ignore] = dataclasses.field(default_factory=list)
    # ignored source keys that must nevertheless be present (buffers every file of the layout holds)
    required: tuple[str, ...] = ()

    def replace(self, overrides: Iterable[Entry]) -> "KeyTable":
        """Swap the entries whose target an override names (e.g. fused qkv from split q/k/v)."""
        overrides = list(overrides)
        by_target = {e.target: e for e in overrides}
        unknown = set(by_target) - {e.target for e in self.entries}
        if unknown:
            raise KeyError(f"override targets not in the model: {sorted(unknown)}")
        return KeyTable([by_target.get(e.target, e) for e in self.entries], list(self.ignores), self.required)

    def prefixed(self, target_prefix: str, source_prefix: str) -> "KeyTable":
        """The same table for a sub-module mounted at `target_prefix` (targets) / `source_prefix`."""
        def tp(k):
            return f"{target_prefix}.{k}" if target_prefix else k

        def sp(k):
            return f"{source_prefix}{k}"
        ents = [dataclasses.replace(e, target=tp(e.target), sources=tuple(sp(s) for s in e.sources))
                for e in self.entries]
        igs = [dataclasses.replace(i, pattern=re.escape(source_prefix) + i.pattern,
                                   check=_prefixed_check(i.check, source_prefix)) for i in self.ignores]
        return KeyTable(ents, igs, tuple(sp(k) for k in self.required))

    def __add__(self, other: "KeyTable") -> "KeyTable":
        return KeyTable(self.entries + other.entries, self.ignores + other.ignores, self.required + other.required)

    def source_keys(self) -> list[str]:
        return [s for e in self.entries for s in e.sources]


def _prefixed_check(check, prefix):
    if check is None:
        return None

    def wrapped(key, value, sd):
        inner = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        return check(key[len(prefix):], value, inner)
    return wrapped


# --- the report ----------------------------------------------------------------------------

_PROBLEMS = ("missing", "unexpected", "mismatched", "invalid")
_KINDS = ("consumed", "ignored") + _PROBLEMS


@dataclasses.dataclass
class Report:
    consumed: dict[str, str] = dataclasses.field(default_factory=dict)  # source -> target
    ignored: dict[str, str] = dataclasses.field(default_factory=dict)   # source -> reason
    missing: list[str] = dataclasses.field(default_factory=list)        # absent source keys (target in brackets)
    unexpected: list[str] = dataclasses.field(default_factory=list)     # source keys nobody takes
    mismatched: list[str] = dataclasses.field(default_factory=list)     # "key: expected (..) got (..)"
    invalid: list[str] = dataclasses.field(default_factory=list)        # ignored buffers whose value is wrong

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched or self.invalid)

    def by_branch(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for kind in _KINDS:
            for key in getattr(self, kind):  # dict keys or list items: the source key comes first
                branch = key.split(".", 1)[0].split(" ", 1)[0]
                out.setdefault(branch, dict.fromkeys(_KINDS, 0))[kind] += 1
        return dict(sorted(out.items()))

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["ok"] = self.ok
        d["by_branch"] = self.by_branch()
        return json.dumps(d, indent=2)

    def summary(self) -> str:
        lines = [f"{'branch':<22}{'consumed':>9}{'ignored':>9}{'missing':>9}{'unexpected':>11}{'mismatch':>9}"]
        for b, c in self.by_branch().items():
            lines.append(f"{b:<22}{c['consumed']:>9}{c['ignored']:>9}{c['missing']:>9}{c['unexpected']:>11}"
                         f"{c['mismatched'] + c['invalid']:>9}")
        reasons: dict[str, int] = {}
        for r in self.ignored.values():
            reasons[r] = reasons.get(r, 0) + 1
        for r, n in reasons.items():
            lines.append(f"  ignored {n:>4} × {r}")
        return "\n".join(lines)

    def error_message(self) -> str:
        parts = ["state dict does not match the model:"]
        for kind in _PROBLEMS:
            keys = getattr(self, kind)
            if keys:
                parts.append(f"  {kind} ({len(keys)}):")
                parts.extend(f"    {k}" for k in keys)
        return "\n".join(parts)


# --- matching ------------------------------------------------------------------------------

def match(state_dict: StateDict, table: KeyTable,
          target_shapes: Mapping[str, tuple[int, ...]]) -> tuple[Report, dict[str, Entry]]:
    """Check `state_dict` against `table` and targets of the given shapes; never raises for data.

    Shapes are checked from the source shapes alone (no copy of the weights); the entries that
    passed are returned so the caller can materialise the values only when everything fits.
    """
    rep = Report()
    claimed: dict[str, str] = {}
    for e in table.entries:
        for s in e.sources:
            if s in claimed:
                raise ValueError(f"key table bug: {s} claimed by {claimed[s]} and {e.target}")
            claimed[s] = e.target
    untabled = sorted(set(target_shapes) - {e.target for e in table.entries})
    rep.missing.extend(f"<no table entry> [{t}]" for t in untabled)

    good: dict[str, Entry] = {}
    for e in table.entries:
        absent = [s for s in e.sources if s not in state_dict]
        if absent:
            rep.missing.extend(f"{s} [{e.target}]" for s in absent)
            continue
        if e.target not in target_shapes:
            rep.unexpected.extend(f"{s} [no target {e.target}]" for s in e.sources)
            continue
        shapes = [tuple(np.shape(state_dict[s])) for s in e.sources]
        why = ""
        try:
            got = (tuple(e.target_shape(*shapes)) if e.target_shape is not None
                   else tuple(e.to_target(*[np.asarray(state_dict[s]) for s in e.sources]).shape))
        except Exception as err:  # a reshape that cannot happen is a shape mismatch
            got, why = None, f" ({type(err).__name__}: {err})"
        want = tuple(target_shapes[e.target])
        if got != want:
            rep.mismatched.append(f"{', '.join(e.sources)}: expected {want} for {e.target}, got "
                                  f"{shapes if len(shapes) > 1 else shapes[0]}{why}")
            continue
        for s in e.sources:
            rep.consumed[s] = e.target
        good[e.target] = e

    rep.missing.extend(f"{k} [required buffer]" for k in table.required if k not in state_dict)
    for key in state_dict:
        if key in claimed:
            continue
        rule = next((i for i in table.ignores if i.matches(key)), None)
        if rule is None:
            rep.unexpected.append(key)
            continue
        if rule.check is not None:
            try:
                rule.check(key, np.asarray(state_dict[key]), state_dict)
            except ValueError as err:
                rep.invalid.append(f"{key}: {err}")
                continue
        rep.ignored[key] = rule.reason
    return rep, good


def load_state_dict(model: nnx.Module, state_dict: StateDict, table: KeyTable) -> Report:
    """Fill `model` in place from `state_dict`, or raise `KeyMappingError` and change nothing."""
    targets = model_variables(model)
    rep, entries = match(state_dict, table, {k: tuple(v.shape) for k, v in targets.items()})
    if not rep.ok:
        raise KeyMappingError(rep)
    fill(model, state_dict, entries)
    return rep


def fill(model: nnx.Module, state_dict: StateDict, entries: Mapping[str, Entry]) -> None:
    """Write every variable of `model` from the entries a successful `match` returned."""
    for k, var in model_variables(model).items():
        e = entries[k]
        value = e.to_target(*[np.asarray(state_dict[s]) for s in e.sources])
        var.set_value(np.asarray(value, dtype=var.get_value().dtype))


def export_state_dict(model: nnx.Module, table: KeyTable) -> dict[str, Array]:
    """The inverse: our variables written back under the source layout's keys."""
    targets = model_variables(model)
    missing = sorted(set(targets) - {e.target for e in table.entries})
    if missing:
        raise KeyError(f"variables with no table entry: {missing}")
    out: dict[str, Array] = {}
    for e in table.entries:
        arrays = e.to_source(np.asarray(targets[e.target].get_value()))
        out.update(zip(e.sources, arrays))
    return out


# --- helpers for format tables ----------------------------------------------------------------

def copied(*names: str) -> KeyTable:
    """Targets loaded as-is from the source key of the same name (e.g. the logit scales)."""
    return KeyTable([Entry(n, (n,), _identity, lambda x: (x,), _same_shape) for n in names])


def fused_linear(target: str, sources: Sequence[str], leaf: str) -> Entry:
    """A fused projection (our qkv kernel/bias) from split PyTorch Linears (HF query/key/value)."""
    n = len(sources)

    def shape(*shapes):
        if any(len(x) != len(shapes[0]) or x[1:] != shapes[0][1:] for x in shapes):
            raise ValueError(f"split parts differ in shape: {shapes}")
        fused = (sum(x[0] for x in shapes),) + tuple(shapes[0][1:])
        return fused[::-1] if leaf == "kernel" else fused
    if leaf == "kernel":
        def to_t(*ws):
            return np.ascontiguousarray(np.concatenate(ws, axis=0).T)

        def to_s(k):
            return tuple(np.ascontiguousarray(w) for w in np.split(k.T, n, axis=0))
    else:
        def to_t(*bs):
            return np.concatenate(bs, axis=0)

        def to_s(b):
            return tuple(np.ascontiguousarray(x) for x in np.split(b, n, axis=0))
    return Entry(target, tuple(sources), to_t, to_s, shape)


def expect_equal(expected: Callable[[str, StateDict], Array], what: str, atol: float = 0.0):
    """An `Ignore.check` that the stored buffer equals the value we recompute."""
    def check(key: str, value: Array, sd: StateDict) -> None:
        want = np.asarray(expected(key, sd))
        if value.shape != want.shape:
            raise ValueError(f"{what}: shape {value.shape}, expected {want.shape}")
        diff = float(np.max(np.abs(value.astype(np.float64) - want.astype(np.float64)))) if value.size else 0.0
        if diff > atol:
            raise ValueError(f"{what}: differs from the recomputed value by {diff:.3g} (> {atol})")
    return check


def batch_norm_counter(key: str, value: Array, sd: StateDict) -> None:
    """`Ignore.check` for `num_batches_tracked`: PyTorch stores it as an int64 scalar."""
    if value.shape != () or not np.issubdtype(value.dtype, np.integer):
        raise ValueError(f"a BatchNorm counter is an integer scalar, got {value.dtype} {value.shape}")
