"""The restricted unpickler behind `clapjax convert` (convert/torch_pickle.py): hostile pickles in a
real torch.save zip layout are refused by name before anything runs, damaged files give a clear
error instead of a wrong tensor, and what torch.save writes loads bit-identically to torch.load."""
import collections
import re
import struct
import subprocess
import sys
import zipfile

import ml_dtypes
import numpy as np
import pytest
import torch

from clapjax.convert.torch_pickle import UnsafeCheckpointError, load_torch_file

# --- hand-built pickles (protocol 2 opcodes, as torch.save writes them) ---------------------------

MARK, TUPLE, REDUCE, BUILD, STOP, EMPTY_DICT, EMPTY_LIST, APPENDS = b"(", b"t", b"R", b"b", b".", b"}", b"]", b"e"


def glob(module, name):
    return b"c" + f"{module}\n{name}\n".encode()


def text(s):
    raw = s.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def num(n):
    return b"J" + struct.pack("<i", n)


def tup(*items):
    return MARK + b"".join(items) + TUPLE


def call(module, name, *args):
    return glob(module, name) + tup(*args) + REDUCE


def pickle_of(body):
    return b"\x80\x02" + body + STOP


def storage(key="0", numel=4, kind="FloatStorage"):
    """A tensor's persistent id, ('storage', torch.<kind>, key, 'cpu', numel), as torch.save writes it."""
    return tup(text("storage"), glob("torch", kind), text(key), text("cpu"), num(numel)) + b"Q"


def tensor(offset, size, stride, pid=None):
    return call("torch._utils", "_rebuild_tensor_v2", pid or storage(), num(offset), tup(*map(num, size)),
                tup(*map(num, stride)), b"\x89", call("collections", "OrderedDict"))


def torch_zip(path, data_pkl, storages=None, byteorder=b"little", prefix="archive", skip=()):
    """The records torch.save writes (read off a real file): data.pkl, .format_version,
    .storage_alignment, byteorder, data/<key>, version, .data/serialization_id."""
    storages = {"0": np.arange(4, dtype=np.float32).tobytes()} if storages is None else storages
    records = {"data.pkl": data_pkl, ".format_version": b"1", ".storage_alignment": b"64", "byteorder": byteorder,
               **{f"data/{k}": v for k, v in storages.items()}, "version": b"3\n",
               ".data/serialization_id": b"0" * 40}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in records.items():
            if name not in skip:
                zf.writestr(f"{prefix}/{name}", data)
    return path


def gadgets(marker):
    """{case: (the global it must be refused by, data.pkl)}; each would create `marker` if unpickled
    without restriction (test_gadgets_are_live shows it for those plain pickle can run)."""
    touch = text(f"touch {marker}")
    py = text(f"open({str(marker)!r}, 'w').close()")
    argv = EMPTY_LIST + MARK + text("touch") + text(str(marker)) + APPENDS
    import_os = call("builtins", "__import__", text("os"))
    return {
        "reduce to os.system": ("os.system", pickle_of(call("os", "system", touch))),
        "reduce to posix.system": ("posix.system", pickle_of(call("posix", "system", touch))),
        "subprocess.Popen": ("subprocess.Popen", pickle_of(call("subprocess", "Popen", argv))),
        "subprocess.check_output": ("subprocess.check_output", pickle_of(call("subprocess", "check_output", argv))),
        "builtins.eval": ("builtins.eval", pickle_of(call("builtins", "eval", py))),
        "builtins.exec": ("builtins.exec", pickle_of(call("builtins", "exec", py))),
        # getattr(__import__('os'), 'system')('touch …')
        "getattr chain": ("builtins.getattr", pickle_of(glob("builtins", "getattr") + tup(import_os, text("system"))
                                                        + REDUCE + tup(touch) + REDUCE)),
        "importlib.import_module": ("importlib.import_module",
                                    pickle_of(call("importlib", "import_module", text("os")))),
        # protocol 4's STACK_GLOBAL takes the names from the stack; protocol 0's INST names them inline
        "STACK_GLOBAL os.system": ("os.system", b"\x80\x04" + text("os") + text("system") + b"\x93" + tup(touch)
                                   + REDUCE + STOP),
        "INST os.system": ("os.system", MARK + touch + b"ios\nsystem\n" + STOP),
        # copyreg._reconstructor(cls, base, state) calls base.__new__ with the pickle's classes
        "copyreg._reconstructor": ("copyreg._reconstructor",
                                   pickle_of(call("copyreg", "_reconstructor", glob("os", "system")))),
        "copy_reg._reconstructor": ("copy_reg._reconstructor",  # its Python 2 name (not mapped for us)
                                    pickle_of(call("copy_reg", "_reconstructor", glob("os", "system")))),
        # names a dot or a character away from allowed ones: attribute traversal and look-alikes
        "rebuild .__globals__": ("torch._utils._rebuild_tensor_v2.__globals__",
                                 pickle_of(glob("torch._utils", "_rebuild_tensor_v2.__globals__"))),
        "OrderedDict.__init__": ("collections.OrderedDict.__init__",
                                 pickle_of(glob("collections", "OrderedDict.__init__"))),
        "rebuild_tensor_v2_": ("torch._utils._rebuild_tensor_v2_",
                               pickle_of(call("torch._utils", "_rebuild_tensor_v2_", text("x")))),
        "torch.utils rebuild": ("torch.utils._rebuild_tensor_v2",
                                pickle_of(call("torch.utils", "_rebuild_tensor_v2", text("x")))),
        "torch rebuild from numpy": ("torch._utils._rebuild_device_tensor_from_numpy",
                                     pickle_of(call("torch._utils", "_rebuild_device_tensor_from_numpy", text("x")))),
        "torch.system": ("torch.system", pickle_of(call("torch", "system", touch))),
        "numpy.load": ("numpy.load", pickle_of(call("numpy", "load", text(str(marker))))),
        # a legitimate tensor first, the payload after it: what came before must not let it through
        "after a real tensor": ("os.system", pickle_of(EMPTY_DICT + MARK + text("w") + tensor(0, (4,), (1,))
                                                       + text("x") + call("os", "system", touch) + b"u")),
    }


def test_gadgets_are_live(tmp_path):
    """The corpus is real: plain pickle.loads, in a child process, runs each payload it can reach
    (Popen's child is not waited for; the last case needs torch's persistent ids)."""
    live = ["reduce to os.system", "reduce to posix.system", "subprocess.check_output", "builtins.eval",
            "builtins.exec", "getattr chain", "STACK_GLOBAL os.system", "INST os.system"]
    for i, case in enumerate(live):
        marker = tmp_path / f"ran-{i}"
        subprocess.run([sys.executable, "-c", "import pickle, sys; pickle.loads(sys.stdin.buffer.read())"],
                       input=gadgets(marker)[case][1], check=False, capture_output=True)
        assert marker.exists(), case


@pytest.mark.parametrize("entry", [None, "w"], ids=["whole", "entry"])
@pytest.mark.parametrize("case", list(gadgets("m")))
def test_hostile_pickle_is_refused_by_name(case, entry, tmp_path):
    """Also when only an entry is asked for: the payload beside it ('after a real tensor': next to
    entry 'w') is unpickled by the same restricted unpickler, never skipped or run."""
    marker = tmp_path / "pwned"
    name, blob = gadgets(marker)[case]
    path = torch_zip(tmp_path / "evil.pt", blob)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load") as err:
        load_torch_file(path, entry=entry)
    assert str(err.value).startswith(f"{path}: ") and f"references {name}," in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("state, target", [
    (glob("torch._utils", "_rebuild_parameter"), "torch._utils._rebuild_parameter"),
    (glob("torch", "FloatStorage"), "torch.FloatStorage"),
    (storage(), "storage of 4 float32"),
], ids=["our rebuild function", "a storage type", "a loaded storage"])
def test_build_on_an_allowed_global_is_refused(state, target, tmp_path):
    """BUILD (`__setstate__`) would otherwise set attributes, e.g. `__defaults__`, on the objects the
    allow-list hands out, for every later load in the process."""
    poison = tup(b"N", EMPTY_DICT + text("__defaults__") + tup(num(1)) + b"s") + BUILD
    path = torch_zip(tmp_path / "build.pt", pickle_of(state + poison))
    with pytest.raises(UnsafeCheckpointError, match=rf"sets state \(BUILD\) on {target},"):
        load_torch_file(path)


def test_reconstruct_of_a_non_ndarray_class_is_refused(tmp_path):
    body = call("numpy._core.multiarray", "_reconstruct", glob("collections", "OrderedDict"), tup(num(0)),
                text("b"))
    with pytest.raises(UnsafeCheckpointError, match="_reconstruct of <class 'collections.OrderedDict'>"):
        load_torch_file(torch_zip(tmp_path / "r.pt", pickle_of(body)))


def test_codec_other_than_latin1_is_refused(tmp_path):
    body = call("_codecs", "encode", text("payload"), text("rot13"))
    with pytest.raises(UnsafeCheckpointError, match="codec 'rot13'"):
        load_torch_file(torch_zip(tmp_path / "c.pt", pickle_of(body)))


def test_refusal_reaches_the_cli_as_a_clean_error(tmp_path, capsys):
    from clapjax.app import cli
    marker = tmp_path / "pwned"
    path = torch_zip(tmp_path / "evil.pt", gadgets(marker)["reduce to os.system"][1])
    assert cli.main(["convert", str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "references os.system," in err
    assert not marker.exists() and not (tmp_path / "out").exists()


# --- damaged and unsupported files ---------------------------------------------------------------

def test_tensor_reading_past_its_storage_is_refused(tmp_path):
    path = torch_zip(tmp_path / "past.pt", pickle_of(tensor(2, (4,), (1,))))
    with pytest.raises(ValueError, match=r"size \(4,\) at offset 2 reads past its storage \(4 elements\)"):
        load_torch_file(path)
    with pytest.raises(ValueError, match="reads past its storage"):  # a 0-d tensor too
        load_torch_file(torch_zip(tmp_path / "past0.pt", pickle_of(tensor(4, (), ()))))


@pytest.mark.parametrize("offset, size, stride", [(-2, (2,), (1,)), (0, (2,), (-1,)), (0, (-1,), (1,)),
                                                  (0, (2, 2), (1,))])
def test_negative_or_mismatched_geometry_is_refused(offset, size, stride, tmp_path):
    """A negative offset would slice from the storage's end, a negative stride read before it."""
    path = torch_zip(tmp_path / "geom.pt", pickle_of(tensor(offset, size, stride)))
    with pytest.raises(ValueError, match="expected non-negative integers and as many strides as dimensions"):
        load_torch_file(path)


def test_storage_shorter_than_declared_is_refused(tmp_path):
    path = torch_zip(tmp_path / "short.pt", pickle_of(tensor(0, (4,), (1,))), {"0": b"\0" * 12})
    with pytest.raises(ValueError, match="storage 0 holds 12 bytes, but the pickle declares 4 elements of "
                                         "torch.FloatStorage"):
        load_torch_file(path)


@pytest.mark.parametrize("pid, why", [
    (tup(text("module"), text("os")) + b"Q", r"unsupported persistent id \('module', 'os'\)"),
    (tup(text("storage"), glob("torch", "FloatStorage"), text("0"), text("cpu")) + b"Q", "unsupported persistent id"),
    (tup(text("storage"), text("FloatStorage"), text("0"), text("cpu"), num(4)) + b"Q",
     "unsupported storage type 'FloatStorage'"),
    (tup(text("storage"), glob("torch", "ComplexFloatStorage"), text("0"), text("cpu"), num(4)) + b"Q",
     "references torch.ComplexFloatStorage,"),
])
def test_bad_persistent_id_or_storage_type_is_refused(pid, why, tmp_path):
    path = torch_zip(tmp_path / "pid.pt", pickle_of(tensor(0, (4,), (1,), pid=pid)))
    with pytest.raises(UnsafeCheckpointError, match=why):
        load_torch_file(path)


def test_storage_argument_that_is_not_a_storage_is_refused(tmp_path):
    fake = call("numpy._core.multiarray", "_reconstruct", glob("numpy", "ndarray"), tup(num(64)), text("b"))
    for name, pid in [("str", text("0")), ("ndarray", fake)]:
        with pytest.raises(ValueError, match=f"storage is a {name}, not a persistent storage record"):
            load_torch_file(torch_zip(tmp_path / f"{name}.pt", pickle_of(tensor(0, (4,), (1,), pid=pid))))


@pytest.mark.parametrize("body", [
    call("numpy", "dtype", text("no-such-dtype")), call("builtins", "set", num(4)),
    call("collections", "OrderedDict", num(1), num(2)), call("torch._utils", "_rebuild_tensor_v2"),
    call("numpy._core.multiarray", "scalar", call("numpy", "dtype", text("f8")), b"C\x02ab"),
], ids=["dtype name", "set of an int", "OrderedDict args", "rebuild without args", "scalar too short"])
def test_allowed_global_called_wrongly_is_a_named_error(body, tmp_path):
    """Whatever an allowed callable raises on a damaged pickle (TypeError, …) is reported as corruption."""
    with pytest.raises(ValueError, match=r"ok.pt: corrupt PyTorch checkpoint \((TypeError|ValueError): "):
        load_torch_file(torch_zip(tmp_path / "ok.pt", pickle_of(body)))


def test_missing_storage_record_is_named(tmp_path):
    path = torch_zip(tmp_path / "nodata.pt", pickle_of(tensor(0, (4,), (1,))), storages={})
    with pytest.raises(ValueError, match="corrupt PyTorch checkpoint .*archive/data/0"):
        load_torch_file(path)


def _saved(tmp_path, obj, name="ok.pt"):
    torch.save(obj, tmp_path / name)
    return tmp_path / name


def _records(path):
    with zipfile.ZipFile(path) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist()}


def _rezip(path, records):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in records.items():
            zf.writestr(name, data)
    return path


def test_big_endian_file_is_refused_by_name(tmp_path):
    values = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    records = _records(_saved(tmp_path, {"w": values}))
    prefix = next(n for n in records if n.endswith("data.pkl"))[: -len("data.pkl")]
    records[prefix + "byteorder"] = b"big"
    records[prefix + "data/0"] = np.frombuffer(records[prefix + "data/0"], "<f4").astype(">f4").tobytes()
    big = _rezip(tmp_path / "big.pt", records)
    assert torch.equal(torch.load(big, weights_only=True)["w"], values)  # a valid file torch reads
    with pytest.raises(ValueError, match="big-endian checkpoints are not supported"):
        load_torch_file(big)
    records[prefix + "byteorder"] = b"\xffmiddle"
    with pytest.raises(ValueError, match="unknown byteorder record"):
        load_torch_file(_rezip(tmp_path / "odd.pt", records))


def test_zip_without_data_pkl_is_refused(tmp_path):
    path = torch_zip(tmp_path / "nopkl.pt", b"", skip=("data.pkl",))
    with pytest.raises(ValueError, match="without exactly one data.pkl: not a torch.save file"):
        load_torch_file(path)


def test_truncated_pickle_never_gives_a_tensor(tmp_path):
    """data.pkl cut at every offset (the zip itself intact): each prefix is a clear error."""
    blob = _records(_saved(tmp_path, {"a": torch.ones(2, 3), "n": np.float64(0.5)}))
    name = next(n for n in blob if n.endswith("data.pkl"))
    pkl = blob[name]
    for cut in range(len(pkl)):
        path = _rezip(tmp_path / "cut.pt", {**blob, name: pkl[:cut]})
        with pytest.raises(ValueError, match="corrupt PyTorch checkpoint"):
            load_torch_file(path)


def test_cut_archive_gives_a_clear_error(tmp_path):
    """The file cut short inside data.pkl, at a storage's local header, inside the storage, inside the
    zip directory: always an error naming the file."""
    path = _saved(tmp_path, {"w": torch.arange(1000, dtype=torch.float32)})
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as zf:
        header = next(i.header_offset for i in zf.infolist() if i.filename.endswith("data/0"))
    offsets = {"in data.pkl": raw.index(b"\x80\x02") + 20, "at a local header": header + 10,
               "in the storage": raw.index(np.arange(1000, dtype=np.float32).tobytes()) + 1600,
               "in the zip directory": len(raw) - 40}
    for where, at in offsets.items():
        (tmp_path / "cut.pt").write_bytes(raw[:at])
        with pytest.raises(ValueError, match="cut.pt: not a PyTorch checkpoint"):
            load_torch_file(tmp_path / "cut.pt")


def test_overwritten_bytes_give_an_error_or_the_exact_tensor(tmp_path):
    """8 bytes overwritten every 61 bytes through the file: the CRC-32 of every record, the
    directory's offsets and sizes catch it, or the bytes were ones zipfile ignores (a local header's
    timestamp, the archive's padding) and the tensor is exact. Never a wrong tensor."""
    values = np.arange(1000, dtype=np.float32)
    raw = _saved(tmp_path, {"w": torch.from_numpy(values)}).read_bytes()
    errors = 0
    for at in range(0, len(raw), 61):
        damaged = bytearray(raw)
        damaged[at:at + 8] = b"\xa5" * 8
        (tmp_path / "bad.pt").write_bytes(bytes(damaged))
        try:
            loaded = load_torch_file(tmp_path / "bad.pt")
        except ValueError as err:
            assert re.match(r".*bad\.pt: (corrupt PyTorch checkpoint|not a PyTorch checkpoint)", str(err)), str(err)
            errors += 1
        else:
            assert list(loaded) == ["w"] and loaded["w"].tobytes() == values.tobytes(), at
    assert errors >= 0.75 * len(range(0, len(raw), 61))  # 77 of 89 today


def test_dtype_outside_the_storage_table_is_refused_by_name(tmp_path):
    """uint16 (torch ≥ 2.3) travels as an untyped storage through _rebuild_tensor_v3."""
    with pytest.raises(UnsafeCheckpointError, match="references torch._utils._rebuild_tensor_v3,"):
        load_torch_file(_saved(tmp_path, {"u": torch.tensor([1, 2, 3], dtype=torch.uint16)}))


# --- what torch.save writes ------------------------------------------------------------------------

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool]
NUMPY_GLOBALS = [np._core.multiarray.scalar, np._core.multiarray._reconstruct, np.dtype, np.ndarray]


def _bits(value):
    if isinstance(value, torch.Tensor):
        value = (value.detach().view(torch.int16).numpy().view(ml_dtypes.bfloat16) if value.dtype == torch.bfloat16
                 else value.detach().numpy())
    value = np.asarray(value)
    return value.dtype, value.shape, value.tobytes()


def _assert_same(ours, theirs, where="root"):
    if isinstance(theirs, dict):
        assert type(ours) is type(theirs) and list(ours) == list(theirs), where
        for key in theirs:
            _assert_same(ours[key], theirs[key], f"{where}.{key}")
        assert getattr(ours, "_metadata", None) == getattr(theirs, "_metadata", None), where
    elif isinstance(theirs, (list, tuple)):
        assert type(ours) is type(theirs) and len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs)):
            _assert_same(a, b, f"{where}[{i}]")
    elif isinstance(theirs, (torch.Tensor, np.ndarray, np.generic)):
        assert isinstance(ours, (np.ndarray, np.generic)), where
        assert _bits(ours) == _bits(theirs), where
        if isinstance(theirs, np.generic):
            assert type(ours) is type(theirs), where
    else:
        assert type(ours) is type(theirs) and ours == theirs, where


def test_torch_save_files_load_bit_identically(tmp_path):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=gen)
    tensors = {str(dt).split(".")[1]: (torch.randn(3, 5, generator=gen) * 50).to(dt) for dt in DTYPES}
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    obj = {
        "state_dict": model.state_dict(),  # an OrderedDict carrying `_metadata` (set by BUILD)
        "tensors": tensors,
        "views": {"base": base, "row": base[2], "cols": base[:, 1::2], "t": base.t(), "tail": base.view(-1)[5:],
                  "expanded": base[:1].expand(3, 6), "scalar": base[1, 1], "empty": base[:0]},
        "zero_d": torch.tensor(2.5, dtype=torch.float64), "param": torch.nn.Parameter(torch.ones(2)),
        # NumPy scalars and arrays, as LAION's released checkpoints carry them next to the weights
        "epoch": 45, "best": np.float64(0.3125), "steps": np.int64(123456789), "lr": np.float32(1e-4),
        "flag": np.bool_(True), "hist": np.arange(5.0), "name": "HTSAT-tiny", "none": None, "list": [1, 2.0, "x"],
    }
    path = _saved(tmp_path, obj)
    with torch.serialization.safe_globals(NUMPY_GLOBALS + [type(np.dtype(t)) for t in ("f8", "i8", "f4", "?")]):
        theirs = torch.load(path, weights_only=True)
    ours = load_torch_file(path)
    _assert_same(ours, theirs)
    assert ours["tensors"]["bfloat16"].dtype == ml_dtypes.bfloat16 and ours["views"]["scalar"].shape == ()
    assert ours["views"]["cols"].flags.c_contiguous and not ours["views"]["t"].base is ours["views"]["base"]


# --- one entry: only the storage records it needs are read ----------------------------------------

def _release_shaped(tmp_path):
    """A laion training checkpoint in small: `module.` keys, epoch and name, and an optimizer entry
    in the layout torch.optim.AdamW.state_dict() writes after a step (2× the weights; LAION's
    scheduler's NumPy lr). Built by hand: constructing a torch optimizer imports torch._dynamo (seconds)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    params = list(model.parameters())
    state = {i: {"step": torch.tensor(1.0), "exp_avg": torch.randn_like(p), "exp_avg_sq": torch.rand_like(p)}
             for i, p in enumerate(params)}
    group = {"lr": np.float64(5e-5), "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False,
             "foreach": None, "maximize": False, "capturable": False, "differentiable": False, "fused": None,
             "params": list(range(len(params)))}
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    optimizer = {"state": state, "param_groups": [group]}
    return _saved(tmp_path, {"epoch": 3, "name": "run", "state_dict": sd, "optimizer": optimizer}), sd


def test_entry_reads_only_its_own_records(tmp_path, monkeypatch):
    path, sd = _release_shaped(tmp_path)
    opened = []
    real_open = zipfile.ZipFile.open
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda zf, name, *a, **k: opened.append(
        zf.getinfo(name) if isinstance(name, str) else name) or real_open(zf, name, *a, **k))
    ours = load_torch_file(path, entry="state_dict")
    with torch.serialization.safe_globals(NUMPY_GLOBALS + [type(np.dtype("f8"))]):
        _assert_same(ours, torch.load(path, weights_only=True)["state_dict"])
    read = [i for i in opened if "/data/" in i.filename]
    assert sum(i.file_size for i in read) == sum(v.numel() * v.element_size() for v in sd.values())
    assert len(read) == len(sd)
    opened.clear()
    whole = load_torch_file(path)
    assert len([i for i in opened if "/data/" in i.filename]) > 2 * len(sd)  # the moments and steps too
    _assert_same(ours, whole["state_dict"])
    # a bare state dict has no such entry: it comes back whole
    bare = _saved(tmp_path, sd, "bare.pt")
    _assert_same(load_torch_file(bare, entry="state_dict"), load_torch_file(bare))


def test_record_outside_the_entry_is_never_read(tmp_path):
    """A damaged storage record beside the entry (its CRC no longer matches) fails the whole read,
    and is not even opened when only the entry is asked for."""
    outside = torch.arange(5, dtype=torch.float32) + 0.5
    raw = _saved(tmp_path, {"state_dict": {"w": torch.ones(3)}, "optimizer": {"m": outside}}).read_bytes()
    at = raw.index(outside.numpy().tobytes())
    (tmp_path / "bad.pt").write_bytes(raw[:at] + b"\xa5" * 20 + raw[at + 20:])
    with pytest.raises(ValueError, match="bad.pt: corrupt PyTorch checkpoint .*CRC"):
        load_torch_file(tmp_path / "bad.pt")
    assert load_torch_file(tmp_path / "bad.pt", entry="state_dict")["w"].tobytes() == np.ones(3, "f4").tobytes()


def test_entry_tensors_are_found_in_every_container(tmp_path):
    """Through tuples, lists, an instance attribute (what BUILD sets on an OrderedDict) and a NumPy
    object array, each its own storage; and one storage shared with a tensor outside the entry."""
    part = [torch.arange(2 * i, 2 * i + 2, dtype=torch.float32) for i in range(6)]  # 6 storages
    outside = torch.arange(10, 14, dtype=torch.float32)
    attr = collections.OrderedDict(a=part[0])
    attr.extra = part[1]
    inner = {"attr": attr, "pair": (part[2], [part[3]]), "objects": np.array([part[4], None], dtype=object),
             "shared": outside[2:]}
    path = _saved(tmp_path, {"e": inner, "outside": outside, "rest": part[5]})
    ours = load_torch_file(path, entry="e")
    got = [ours["attr"]["a"], ours["attr"].extra, ours["pair"][0], ours["pair"][1][0], ours["objects"][0],
           ours["shared"]]
    assert [type(g) for g in got] == [np.ndarray] * 6 and ours["objects"][1] is None
    assert np.concatenate(got).tobytes() == np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 13], np.float32).tobytes()
