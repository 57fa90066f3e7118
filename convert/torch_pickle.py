"""Read PyTorch `.pt` / `.bin` checkpoints without torch and without running code from the pickle.

A `torch.save` file is a zip archive: `<name>/data.pkl` (a pickle whose tensors point at storages by
persistent id) plus one raw file per storage under `<name>/data/`. We unpickle `data.pkl` with a
restricted unpickler that resolves only the globals such files legitimately hold — tensor
rebuilders, typed storages, `OrderedDict`, and the NumPy scalar/dtype constructors that LAION-CLAP's
released checkpoints contain — and refuses every other global by name (so a pickle that would call
`os.system` fails before anything runs). Tensors come back as NumPy arrays.
"""
from __future__ import annotations

import codecs
import collections
import io
import os
import pickle
import zipfile

import ml_dtypes
import numpy as np

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The pickle names a global outside the allow-list (it could run arbitrary code)."""


class _StorageType:
    def __init__(self, name: str):
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    del requires_grad, hooks, metadata
    itemsize = storage.dtype.itemsize
    if not size:
        return np.array(storage[offset], dtype=storage.dtype)
    extent = offset + 1 + sum((n - 1) * s for n, s in zip(size, stride))
    if any(n == 0 for n in size):
        return np.zeros(size, storage.dtype)
    if extent > storage.size:
        raise ValueError(f"tensor of size {tuple(size)} reads past its storage ({storage.size} elements)")
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
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
        raise UnsafeCheckpointError("numpy _reconstruct of a non-ndarray class")
    return np.ndarray.__new__(np.ndarray, shape, dtype)


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): codecs.encode,
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


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, fh, archive: zipfile.ZipFile, prefix: str):
        super().__init__(fh)
        self._archive, self._prefix, self._cache = archive, prefix, {}

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
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise UnsafeCheckpointError(f"unsupported persistent id {pid!r}")
        _, storage_type, key, _location, _numel = pid[:5]
        if not isinstance(storage_type, _StorageType):
            raise UnsafeCheckpointError(f"unsupported storage type {storage_type!r}")
        if key not in self._cache:
            raw = self._archive.read(f"{self._prefix}data/{key}")
            self._cache[key] = np.frombuffer(raw, dtype=storage_type.dtype)
        return self._cache[key]


def load_torch_file(path: str | os.PathLike):
    """Unpickle a `torch.save` zip archive safely; tensors become NumPy arrays."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: the file is empty")
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise ValueError(f"{path}: not a PyTorch checkpoint (not a torch.save zip archive; "
                         "truncated, or a different format)") from None
    with archive:
        pkl = [n for n in archive.namelist() if n.endswith("data.pkl")]
        if len(pkl) != 1:
            raise ValueError(f"{path}: zip archive without exactly one data.pkl: not a torch.save file")
        prefix = pkl[0][: -len("data.pkl")]
        if archive.namelist() and prefix + "byteorder" in archive.namelist():
            if archive.read(prefix + "byteorder").decode().strip() != "little":
                raise ValueError(f"{path}: big-endian checkpoints are not supported")
        try:
            return _RestrictedUnpickler(io.BytesIO(archive.read(pkl[0])), archive, prefix).load()
        except UnsafeCheckpointError:
            raise
        except (zipfile.BadZipFile, KeyError, EOFError, pickle.UnpicklingError, ValueError) as err:
            raise ValueError(f"{path}: corrupt PyTorch checkpoint ({type(err).__name__}: {err})") from None
