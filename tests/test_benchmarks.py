"""`make bench`'s driver end to end in its smoke mode (`--quick --tiny`): every section runs and is
written as JSON and into the markdown table file. Speeds are not asserted (they are the benchmark's
output, and this machine is shared); only that each figure exists and is a positive number."""
from __future__ import annotations

import json
import math

import pytest

from benchmarks import gpu, run_all


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


def test_device_peak_table():
    assert gpu.device_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu.device_peak("NVIDIA H100 PCIe") == 756e12
    assert gpu.device_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu.device_peak("TPU v5 lite") == 197e12
    assert gpu.device_peak("cpu") is None
