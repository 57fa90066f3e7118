"""Read PyTorch `.pt` / `.bin` checkpoints without torch and without running code from the pickle.

A `torch.save` file is a zip archive: `<name>/data.pkl` (a pickle whose tensors point at storages by
persistent id) plus one raw file per storage under `<name>/data/`. We unpickle `data.pkl` with a
restricted unpickler that resolves only the globals such files legitimately hold — tensor
rebuilders, typed storages, `OrderedDict`, and the NumPy scalar/dtype constructors that LAION-CLAP's
released checkpoints contain — and refuses every other global by name (so a pickle that would call
`os.system` fails before anything runs). Tensors come back as NumPy arrays; they may only view a
storage read from the archive, with non-negative geometry that stays inside it. Whatever a damaged
file raises comes back as a ValueError naming the file, never as a wrong tensor.

LAION's training checkpoints hold the AdamW moments (2× the weights) beside the `state_dict`:
`load_torch_file(path, entry="state_dict")` reads only the storage records reachable from that entry.
The whole pickle is still unpickled (restricted, twice: once with no storage read, to find which
records the entry's tensors view, once reading just those), and every storage's declared size and
every tensor's geometry is still checked; only the other records' bytes are never read.
"""
from __future__ import annotations

import codecs
import collections
import io
import os
import pickle
import struct
import types
import zipfile

import ml_dtypes
import numpy as np

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class UnsafeCheckpointError(pickle.UnpicklingError, ValueError):
    """The pickle names a global outside the allow-list (it could run arbitrary code). A ValueError
    too, so callers that report bad input report this one."""


class _NoBuild:
    """Pickle's BUILD opcode calls `__setstate__` on the object below it when it has one; without it
    BUILD would set attributes on our own functions (their `__defaults__`, say) for the rest of the
    process."""
    __slots__ = ()

    def __setstate__(self, state):
        raise UnsafeCheckpointError(f"refusing to load: the checkpoint's pickle sets state (BUILD) on {self!r}, "
                                    "which no torch.save file does")


class _StorageType(_NoBuild):
    __slots__ = ("name", "dtype")

    def __init__(self, name: str):
        self.name, self.dtype = name, np.dtype(_STORAGE_DTYPES[name])

    def __repr__(self):
        return f"torch.{self.name}"


class _Storage(_NoBuild):
    """The storage record `data/<key>`: the only thing a tensor may view (an array the pickle built
    itself could have any shape, and a view of it could reach past its memory). `array` is None
    for a record this load does not read."""
    __slots__ = ("key", "numel", "dtype", "array")

    def __init__(self, key, numel: int, dtype: np.dtype, array: np.ndarray | None):
        self.key, self.numel, self.dtype, self.array = key, numel, dtype, array

    def __repr__(self):
        return f"storage of {self.numel} {self.dtype}"


class _UnreadTensor(_NoBuild):
    """A tensor whose storage this load does not read: it stands in the parts of the pickle the
    caller did not ask for, and marks, in the first pass, which records the asked-for part needs.
    Unhashable, as the array it stands for is."""
    __slots__ = ("storage",)
    __hash__ = None

    def __init__(self, storage: _Storage):
        self.storage = storage

    def __repr__(self):
        return f"unread tensor of {self.storage!r}"


class _Global(_NoBuild):
    """An allowed global that is one of this module's functions, callable but closed to BUILD."""
    __slots__ = ("_fn", "_name")

    def __init__(self, name: str, fn):
        self._name, self._fn = name, fn

    def __call__(self, *args, **kwargs):
        return self._fn(*args, **kwargs)

    def __repr__(self):
        return self._name


def _is_index_tuple(value) -> bool:
    return isinstance(value, tuple) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                            for n in value)


def _rebuild_tensor_v2(record, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    del requires_grad, hooks, metadata
    if not isinstance(record, _Storage):
        raise ValueError(f"a tensor's storage is a {type(record).__name__}, not a persistent storage record")
    # negative strides or offsets would read outside the storage (torch refuses them too)
    if not (_is_index_tuple(size) and _is_index_tuple(stride) and len(size) == len(stride)
            and _is_index_tuple((offset,))):
        raise ValueError(f"tensor with offset {offset!r}, size {size!r}, stride {stride!r}: "
                         "expected non-negative integers and as many strides as dimensions")
    if any(n == 0 for n in size):
        return np.zeros(size, record.dtype)
    extent = offset + 1 + sum((n - 1) * s for n, s in zip(size, stride))
    if extent > record.numel:
        raise ValueError(f"tensor of size {tuple(size)} at offset {offset} reads past its storage "
                         f"({record.numel} elements)")
    if record.array is None:
        return _UnreadTensor(record)
    storage, itemsize = record.array, record.dtype.itemsize
    if not size:
        return np.array(storage[offset], dtype=storage.dtype)
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size,
                                           strides=tuple(s * itemsize for s in stride), writeable=False)
    return np.ascontiguousarray(view)


def _rebuild_parameter(data, requires_grad=False, hooks=None, *extra):
    return data


def _numpy_scalar(dtype, data=None):
    if data is None:
        return np.zeros((), dtype)[()]
    if isinstance(data, str):  # protocol-2 pickles carry the bytes through _codecs.encode(…, 'latin1')
        data = data.encode("latin1")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _reconstruct(cls, shape, dtype):  # numpy.core.multiarray._reconstruct (arrays pickled by numpy)
    if cls is not np.ndarray:
        raise UnsafeCheckpointError(f"refusing to load: numpy _reconstruct of {cls!r}, not numpy.ndarray")
    return np.ndarray.__new__(np.ndarray, shape, dtype)


def _latin1_encode(text, encoding):
    # torch/numpy only ever write 'latin1'; another codec name is a lookup that can import modules
    if encoding != "latin1":
        raise UnsafeCheckpointError(f"refusing to load: _codecs.encode with codec {encoding!r} (only 'latin1' "
                                    "carries NumPy scalar bytes)")
    return codecs.encode(text, encoding)


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): _latin1_encode,
    ("numpy", "dtype"): np.dtype,
    ("numpy", "ndarray"): np.ndarray,
    ("builtins", "set"): set,
    ("torch", "Size"): tuple,
}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED[(_mod, "scalar")] = _numpy_scalar
    _ALLOWED[(_mod, "_reconstruct")] = _reconstruct
for _name in ("Float64DType", "Float32DType", "Int64DType", "Int32DType", "BoolDType", "Float16DType"):
    _ALLOWED[("numpy.dtypes", _name)] = type(np.dtype(_name[:-5].lower().replace("bool", "bool")))
_ALLOWED = {key: _Global(".".join(key), fn) if isinstance(fn, types.FunctionType) else fn
            for key, fn in _ALLOWED.items()}


class _RestrictedUnpickler(pickle.Unpickler):
    """`read`: the storage keys whose records are read (None: all of them)."""

    def __init__(self, fh, archive: zipfile.ZipFile, prefix: str, read: set | None):
        super().__init__(fh)
        self._archive, self._prefix, self._read, self._cache = archive, prefix, read, {}

    def find_class(self, module, name):
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"refusing to load: the checkpoint's pickle references {module}.{name}, which is not a "
                "tensor, storage or NumPy scalar (loading it could run arbitrary code)") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafeCheckpointError(f"unsupported persistent id {pid!r} (torch.save writes "
                                        "('storage', type, key, location, numel))")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise UnsafeCheckpointError(f"unsupported storage type {storage_type!r}")
        if key not in self._cache:
            name = f"{self._prefix}data/{key}"
            # the directory's size is checked for every record, read or not
            _check_size(key, self._archive.getinfo(name).file_size, numel, storage_type)
            array = None
            if self._read is None or key in self._read:
                raw = self._archive.read(name)
                _check_size(key, len(raw), numel, storage_type)
                array = np.frombuffer(raw, dtype=storage_type.dtype)
            self._cache[key] = _Storage(key, numel, storage_type.dtype, array)
        return self._cache[key]


def _check_size(key, nbytes: int, numel, storage_type: _StorageType) -> None:
    if not isinstance(numel, int) or nbytes != numel * storage_type.dtype.itemsize:
        raise ValueError(f"storage {key} holds {nbytes} bytes, but the pickle declares {numel!r} "
                         f"elements of {storage_type!r}")


def _select(obj, entry: str | None):
    """What `load_torch_file`'s `entry` asks for: the whole object, or the dict's `entry` when it has one."""
    return obj[entry] if entry is not None and isinstance(obj, dict) and entry in obj else obj


def _storage_keys_under(root) -> set:
    """The storage keys of the unread tensors reachable from `root`, through every container the
    restricted unpickler can build that can hold one: dict values, lists, tuples, an instance's
    attributes (BUILD on an OrderedDict: `_metadata`), NumPy object arrays (dict keys and set
    members are hashable, a tensor is not). Iterative (a deep or cyclic pickle is fine)."""
    keys, seen, stack = set(), set(), [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, _UnreadTensor):
            keys.add(node.storage.key)
            continue
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
        elif isinstance(node, np.ndarray) and node.dtype == object:
            stack.extend(node.flat)
        if not isinstance(node, type) and hasattr(node, "__dict__"):
            stack.extend(vars(node).values())
    return keys


def load_torch_file(path: str | os.PathLike, entry: str | None = None):
    """Unpickle a `torch.save` zip archive safely; tensors become NumPy arrays.

    `entry` (e.g. "state_dict"): return only `obj[entry]` when the pickled object is a dict holding
    it, reading only the storage records its tensors view (a file without it, a bare state dict,
    comes back whole)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: the file is empty")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, ValueError, EOFError, struct.error) as err:  # ValueError: an undecodable name
        raise ValueError(f"{path}: not a PyTorch checkpoint (not a torch.save zip archive; truncated, or a "
                         f"different format: {err})") from None
    with archive:
        pkl = [n for n in archive.namelist() if n.endswith("data.pkl")]
        if len(pkl) != 1:
            raise ValueError(f"{path}: zip archive without exactly one data.pkl: not a torch.save file")
        prefix = pkl[0][: -len("data.pkl")]
        name = prefix + "byteorder"  # torch.load reads a file without the record as little-endian
        order = _record(archive, name, path) if name in archive.namelist() else b"little"
        if order == b"big":
            raise ValueError(f"{path}: big-endian checkpoints are not supported (byteorder record 'big')")
        if order != b"little":
            raise ValueError(f"{path}: unknown byteorder record {order[:20]!r} (torch writes little or big)")
        pickled = _record(archive, pkl[0], path)

        def unpickle(read: set | None):
            return _select(_RestrictedUnpickler(io.BytesIO(pickled), archive, prefix, read).load(), entry)
        try:
            if entry is None:
                return unpickle(read=None)
            # a second pass over the same bytes builds the same objects, the needed records read
            return unpickle(read=_storage_keys_under(unpickle(read=set())))
        except UnsafeCheckpointError as err:
            raise UnsafeCheckpointError(f"{path}: {err}") from None
        except Exception as err:  # whatever a damaged storage record or pickle raises: a clear error
            raise ValueError(f"{path}: corrupt PyTorch checkpoint ({type(err).__name__}: {err})") from err


def _record(archive: zipfile.ZipFile, name: str, path: str) -> bytes:
    try:
        return archive.read(name)
    except Exception as err:  # a bad CRC, header, size or compression flag
        raise ValueError(f"{path}: corrupt PyTorch checkpoint ({type(err).__name__}: {err})") from err
