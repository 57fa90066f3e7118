"""The trainer's throughput figures (train/throughput.py): per logging interval the share of wall time
spent waiting for data, FLOP/s from XLA's cost analysis of the compiled step, and MFU when a peak is
known; in metrics.jsonl (a `perf` object), TensorBoard (`perf/…`) and the console line."""
from __future__ import annotations

import copy
import time

import jax
import jax.numpy as jnp
import pytest

from clapjax.embedding import enable_compilation_cache
from clapjax.model import Precision, TowerPrecision
from clapjax.train import batches, sharding
from clapjax.train import config as C
from clapjax.train import loop as L
from clapjax.train import step as S
from clapjax.train import throughput as T
from clapjax.train.metrics import read_metrics


class _Clock:
    """A stand-in for time.perf_counter that moves only when told."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = _Clock()
    monkeypatch.setattr(T.time, "perf_counter", c)
    return c


def test_an_interval_splits_into_data_wait_and_step_time_and_leaves_pauses_out(clock):
    meter = T.Meter(devices=4, peak_per_device=1e12, flops_per_step=2e9)
    assert meter.read(1, True) is None                  # the first read only starts the clock
    clock.now += 3.0                                    # steps 2 and 3: 3 s, of which 1.5 s waiting for data, …
    meter.waited(1.5)
    with meter.paused():                                # … plus a 10 s checkpoint save that is not step time
        clock.now += 10.0
    assert meter.read(2, False) is None                 # a step that is not logged
    got = meter.read(3, True)
    assert got["step_time_s"] == pytest.approx(1.5) and got["data_wait_s"] == pytest.approx(0.75)
    assert got["data_wait_fraction"] == pytest.approx(0.5)
    assert got["flops_per_s"] == pytest.approx(2e9 * 4 / 1.5)
    assert got["mfu"] == pytest.approx(2e9 / 1.5 / 1e12)
    clock.now += 1.0                                    # the next interval starts afresh
    meter.waited(1.0)
    assert meter.read(4, True)["data_wait_fraction"] == pytest.approx(1.0)
    assert T.describe(got) == "data 50% | 0.00533 TFLOP/s | MFU 0.1%"


def test_mfu_only_with_a_peak_and_flops_only_with_a_count(clock):
    for peak, flops, keys in ((None, 2e9, {"flops_per_s"}), (1e12, None, set()), (None, None, set())):
        meter = T.Meter(1, peak, flops)
        meter.read(0, True)
        clock.now += 1.0
        got = meter.read(1, True)
        assert set(got) - {"step_time_s", "data_wait_s", "data_wait_fraction"} == keys, (peak, flops)
        assert 0.0 <= got["data_wait_fraction"] <= 1.0


def test_peak_table_config_override_and_compute_dtype():
    assert T.table_peak("NVIDIA H200", "bfloat16") == 989.4e12
    assert T.table_peak("NVIDIA H100 80GB HBM3", "float32") == 494.7e12         # TF32, XLA's default for f32
    assert T.table_peak("NVIDIA H100 PCIe", "bfloat16") == 756e12
    assert T.table_peak("NVIDIA A100-SXM4-80GB", "float16") == 312e12
    assert T.table_peak("TPU v5 lite", "bfloat16") == 197e12 and T.table_peak("TPU v5", "bfloat16") == 459e12
    assert T.table_peak("TPU v6 lite", "bfloat16") == 918e12 and T.table_peak("TPU v4", "float32") == 275e12
    assert T.table_peak("NVIDIA H100 NVL", "bfloat16") is None                  # not its SXM sibling's figure
    assert T.table_peak("cpu", "float32") is None
    assert T.peak_flops(0.0, "cpu", "float32")[0] is None
    assert T.peak_flops(5e12, "cpu", "float32") == (5e12, "train.peak_flops_per_device")
    assert T.peak_flops(0.0, "NVIDIA H200", "bfloat16")[0] == 989.4e12
    mixed = Precision(audio=TowerPrecision(dtype="float32"), text=TowerPrecision(dtype="bfloat16"))
    assert T.compute_dtype(mixed) == "bfloat16" and T.compute_dtype(Precision()) == "float32"
    with pytest.raises(ValueError, match="peak_flops_per_device"):
        C.load_config("tiny", ["train.peak_flops_per_device=-1"])


def test_cost_flops_reads_a_dict_or_a_list_of_dicts():
    class Compiled:
        def __init__(self, cost):
            self.cost = cost

        def cost_analysis(self):
            return self.cost
    assert T.cost_flops(Compiled({"flops": 12.0})) == T.cost_flops(Compiled([{"flops": 12.0}])) == 12.0
    assert T.cost_flops(Compiled(None)) is None and T.cost_flops(Compiled([])) is None
    assert T.cost_flops(Compiled({"flops": -1.0})) is None         # what some backends give for "unknown"
    x = jnp.ones((64, 64))
    assert T.cost_flops(jax.jit(lambda a: a @ a).lower(x).compile()) == pytest.approx(2 * 64 ** 3, rel=0.01)


class _Slow:
    """RandomBatches that take `delay` seconds per batch: an input-bound run."""

    def __init__(self, inner, delay):
        self.inner, self.delay = inner, delay

    def __iter__(self):
        return self

    def __next__(self):
        time.sleep(self.delay)
        return next(self.inner)

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory):
    cache = tmp_path_factory.mktemp("jax-cache")      # both runs and the tests' own compiles: one program
    enable_compilation_cache(str(cache), min_compile_secs=0.0, min_entry_bytes=-1)   # as the loop does
    return C.load_config("tiny", ["compiler_options.xla_backend_optimization_level=0", "train.steps=4",
                                  "checkpoint.every=100", f"compilation_cache={cache}"])


def _train(cfg, workdir, data_iter, monkeypatch):
    lines, scalars = [], {}
    original = L.MetricsLog.scalar

    def scalar(self, name, value, step):
        scalars.setdefault(name, []).append(step)
        original(self, name, value, step)
    monkeypatch.setattr(L.MetricsLog, "scalar", scalar)
    L.train(cfg, str(workdir), data_iter, log=lines.append)
    return read_metrics(str(workdir)), lines, scalars


def _random(cfg):
    return batches.make_data_iterator(cfg, C.model_config(cfg))


def test_an_input_bound_run_says_so_in_the_log_the_metrics_and_tensorboard(tiny_cfg, tmp_path, monkeypatch):
    cfg = copy.deepcopy(tiny_cfg)
    cfg.train.peak_flops_per_device = 1e12
    records, lines, scalars = _train(cfg, tmp_path / "slow", _Slow(_random(cfg), 1.0), monkeypatch)
    assert "perf" not in records[0]                          # step 1's interval would hold the compilation
    # the step runs while the host waits for the next batch; the last step has no next batch to wait for
    for r in records[1:-1]:
        assert 0.7 < r["perf"]["data_wait_fraction"] <= 1.0, r["perf"]
        assert r["perf"]["mfu"] == pytest.approx(r["perf"]["flops_per_s"] / (1e12 * jax.device_count()))
    steps = [r["step"] for r in records[1:]]
    for name in ("perf/data_wait_fraction", "perf/data_wait_s", "perf/flops_per_s", "perf/mfu"):
        assert scalars[name] == steps, name
    logged = [ln for ln in lines if ln.startswith("step ")]
    assert all(" | data " in ln and " TFLOP/s | MFU " in ln for ln in logged[1:]), logged

    # the FLOPs are XLA's cost analysis of the loop's compiled step, per device
    mc = C.model_config(cfg)
    setup = S.build_setup(cfg, mc, sharding.make_mesh({"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp}))
    state = S.init_state(setup, cfg, mc, int(cfg.seed))
    batch = batches.device_batch(next(_random(cfg)), setup.mesh)
    flops = T.cost_flops(S.train_step(setup).lower(state, batch).compile())
    assert f"throughput: {flops / 1e9:.4g} GFLOP per step per device (XLA's cost analysis)" in lines
    for r in records[1:]:
        assert r["perf"]["flops_per_s"] * r["perf"]["step_time_s"] == pytest.approx(flops * jax.device_count())

    # a run that does not wait on its data: a smaller share, and on CPU no peak, so no MFU
    fast, lines, _ = _train(copy.deepcopy(tiny_cfg), tmp_path / "fast", _random(tiny_cfg), monkeypatch)
    assert all("mfu" not in r["perf"] and "flops_per_s" in r["perf"] for r in fast[1:])
    assert max(r["perf"]["data_wait_fraction"] for r in fast[1:]) < min(
        r["perf"]["data_wait_fraction"] for r in records[1:-1])
    assert any(ln.startswith("throughput: 8 × cpu; no peak known for 'cpu'") for ln in lines), lines
    assert not any("MFU" in ln for ln in lines if ln.startswith("step "))


def test_with_accumulation_the_count_is_the_same_steps_without(tiny_cfg):
    cfg = copy.deepcopy(tiny_cfg)
    cfg.optim.accum_steps = 2          # a lax.scan over micro-batches, whose body XLA would count once
    mc = C.model_config(cfg)
    setup = S.build_setup(cfg, mc, sharding.make_mesh({"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp}))
    state = S.init_state(setup, cfg, mc, int(cfg.seed))
    batch = batches.device_batch(next(_random(cfg)), setup.mesh)
    plain = copy.deepcopy(tiny_cfg)
    one = S.build_setup(plain, mc, setup.mesh)
    assert T.step_flops(setup, S.train_step(setup), state, batch) == T.step_flops(one, S.train_step(one), state,
                                                                                   batch)
