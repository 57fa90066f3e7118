"""`make bench`'s driver end to end in its smoke mode (`--quick --tiny`): every section runs and is
written as JSON and into the markdown table file. Speeds are not asserted (they are the benchmark's
output, and this machine is shared); only that each figure exists and is a positive number."""
from __future__ import annotations

import json
import math

import pytest

from benchmarks import common, host_cores, run_all


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rc = run_all.main(["--quick", "--tiny", "--out", str(out)])
    return rc, out


def test_every_section_is_written(smoke_run):
    rc, out = smoke_run
    summary = json.loads((out / "all.json").read_text())
    errors = {k: v["error"] for k, v in summary["sections"].items() if "error" in v}
    assert not errors and rc == 0, errors
    assert list(summary["sections"]) == list(run_all.SECTIONS)
    md = (out / "bench.md").read_text()
    for name in run_all.SECTIONS:
        section = json.loads((out / f"{name}.json").read_text())
        assert section["rows"], name
        assert run_all.TITLES[name] in md and section["table"] in md, name
    assert summary["environment"]["cores"] >= 1 and summary["environment"]["versions"]["jax"] != "absent"


def test_sections_hold_their_figures(smoke_run):
    _, out = smoke_run
    s = json.loads((out / "all.json").read_text())["sections"]
    assert {r["kind"].split(",")[0] for r in s["audio"]["rows"]} == {"HTSAT-tiny unfused", "HTSAT-tiny fused"}
    assert {r["input"] for r in s["text"]["rows"]} == {"full", "captions"}
    assert all(_positive(r["clapjax_per_s"]) for r in s["audio"]["rows"] + s["text"]["rows"])
    ours = s["train"]["rows"][0]
    assert _positive(ours["pairs_per_s"]) and _positive(ours["flops"]) and ours["loss_finite"]
    conv = s["converter"]["rows"][0]
    assert conv["params"] > 20e6 and _positive(conv["peak_rss_gib"]) and conv["rc"] == 0
    cold, warm = s["startup"]["rows"]
    assert warm["cache_files"] > 0 and all(_positive(r["to_first_audio_s"]) for r in (cold, warm))
    (fsdp,) = s["fsdp"]["rows"]
    # sharding over 2 devices must halve the per-device state, up to the replicated small leaves
    assert fsdp["devices"] == 2 and 1.0 <= fsdp["state_ratio_vs_ideal"] < 1.5
    assert fsdp["state_max_per_device_bytes"] < 0.75 * fsdp["state_total_bytes"]
    assert _positive(fsdp["temp_bytes"]) and fsdp["alias_bytes"] > 0     # the donated state is reused
    assert _positive(s["flops"]["peak"]["gflops"]) and all(_positive(r["gflops"]) for r in s["flops"]["rows"])
    host = s["host"]
    assert _positive(host["flops_per_pair"]) and all(_positive(r["pairs_per_s"]) for r in host["rows"])
    rates = s["pipeline"]["per_core_clips_per_s"]
    assert rates and all(_positive(v) for v in rates.values()) and host["per_core_clips_per_s"] == rates
    assert all(set(r["cores"]) == set(rates) and all(_positive(c) for c in r["cores"].values()) for r in host["rows"])


def test_host_cores_are_the_demand_over_each_pipelines_per_core_rate(monkeypatch):
    # the figure: 75 GFLOP per pair, so one H100 at 50 % bf16 MFU wants ≈ 6,600 pairs/s
    monkeypatch.setattr(host_cores, "flops_per_pair", lambda tiny: 75e9)
    pipeline = {"per_core_clips_per_s": {"FLAC tars": 110.0, "pre-decoded shards": 1500.0}}
    measured = {"device_kind": "NVIDIA H200", "devices": 2,
                "train": [{"batch": 256, "pairs_per_s": 8000.0}, {"batch": 1024, "error": "out of memory"}]}
    got = host_cores.run(common.Options(), {"pipeline": pipeline}, measured)
    by_name = {r["accelerator"]: r for r in got["rows"]}
    h100 = by_name["H100 SXM"]
    assert h100["pairs_per_s"] == pytest.approx(0.5 * 989.4e12 / 75e9)
    assert h100["cores"] == pytest.approx({"FLAC tars": h100["pairs_per_s"] / 110.0,
                                           "pre-decoded shards": h100["pairs_per_s"] / 1500.0})
    assert by_name["NVIDIA H200"]["pairs_per_s"] == 4000.0 and len(got["rows"]) == len(host_cores.ACCELERATORS) + 1
    assert "cores: FLAC tars (110 clips/s/core)" in got["table"]


def test_device_peak_table():
    from clapjax.train.throughput import table_peak
    assert table_peak("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4e12
    assert table_peak("NVIDIA H100 PCIe", "bfloat16") == 756e12
    assert table_peak("NVIDIA A100-SXM4-80GB", "bfloat16") == 312e12
    assert table_peak("NVIDIA A10", "bfloat16") == 125e12 and table_peak("NVIDIA L4", "bfloat16") == 121e12
    assert table_peak("NVIDIA L40S", "bfloat16") == 362e12
    assert table_peak("TPU v5 lite", "bfloat16") == 197e12
    assert table_peak("cpu", "bfloat16") is None


def test_profile_train_charges_overlapping_ops_their_exclusive_share():
    from benchmarks import profile_train as P
    # a: 0-10 alone, then 10-20 together with b; c: 30-35 alone
    events = [{"ts": 0, "dur": 20}, {"ts": 10, "dur": 10}, {"ts": 30, "dur": 5}]
    assert P.exclusive_times(events) == [15.0, 5.0, 5.0]


def test_profile_train_maps_ops_to_pass_and_source_line():
    from benchmarks import profile_train as P
    hlo = "\n".join([
        "HloModule jit_step", "", "FileNames", '1 "/pkg/clapjax/layers.py"', '2 "/x/site-packages/flax/linear.py"', "",
        "FunctionNames", '1 "gelu"', '2 "Linear.__call__"', "",
        "FileLocations", "1 {file_name_id=1 function_name_id=1 line=85 end_line=85}",
        "2 {file_name_id=2 function_name_id=2 line=10 end_line=10}", "",
        "StackFrames", "1 {file_location_id=1 parent_frame_id=1}", "2 {file_location_id=2 parent_frame_id=1}",
        "3 {file_location_id=2 parent_frame_id=3}", "",
        "ENTRY %main {",
        '  %fusion.1 = f32[4] fusion(%p), metadata={op_name="jit(step)/jvp()/mul" stack_frame_id=2}',
        '  %dot.2 = f32[4] dot(%a, %b), metadata={op_name="jit(step)/transpose(jvp())/dot_general" stack_frame_id=3}',
        "  ROOT %copy.3 = f32[4] copy(%dot.2)", "}"])
    got = P.op_sources(hlo, ("/pkg/clapjax/",))
    assert got["fusion.1"] == ("fwd", "gelu:85")                  # Flax frame skipped, caller found
    assert got["dot.2"] == ("bwd", "primitive dot_general")       # no clapjax frame: the primitive
    assert got["copy.3"] == ("fwd", "primitive copy")
