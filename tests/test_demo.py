"""The shortened `make demo`: a small CLAP learns the synthetic set on 8 host devices."""
import json
import os
import re
import subprocess
import sys


def test_quick_demo_learns(tmp_path):
    workdir = tmp_path / "demo"
    env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, "-m", "clapjax.app.demo", "--quick", "--skip-convert", "--workdir", str(workdir)],
                          capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "mesh data=2 × fsdp=4" in out and "8 cpu devices" in out
    losses = [json.loads(line)["loss"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.5, (first, last)  # the contrastive loss falls
    # the report's machine-readable line, and learning a bound the SpecAugment-crippled demo failed
    # (its quick run: R@1 0.012 of a 0.235 ceiling, pitch zero-shot 0.108 against chance 0.125)
    r1, ceiling = map(float, re.search(r"held-out text→audio R@1 (\d+\.\d+) of ceiling (\d+\.\d+)", out).groups())
    held = json.loads((workdir / "heldout.json").read_text())
    m, chance = held["metrics"], held["chance"]
    assert ceiling == round(m["text_to_audio_R@1_ceiling"], 3) and 0.1 < ceiling < 0.5
    pitch = m["zero_shot/pitch/top1"] / chance["zero_shot/pitch/top1"]
    # a one-attribute prompt ("a pure tone") read like the training captions: with complete captions
    # only, the full run's zero-shot kind was 2.0× chance
    kind = m["zero_shot/kind/top1"] / chance["zero_shot/kind/top1"]
    print(f"quick demo: loss {first:.3f} → {last:.3f}; held-out text→audio R@1 {r1:.3f} of ceiling {ceiling:.3f}, "
          f"attribute match {m['text_to_audio_attribute_match@1']:.3f}, pitch zero-shot {pitch:.1f}× chance, "
          f"kind {kind:.1f}× chance")
    assert r1 >= 0.2 * ceiling
    assert pitch >= 2.0
    assert kind >= 2.0
    for name in ("loss.png", "recall.png", "similarity.png", "zero_shot.png"):
        assert f"wrote {workdir / 'plots' / name}" in out
        assert (workdir / "plots" / name).stat().st_size > 1000
    assert any((workdir / "tb").iterdir())
    # the saved model through the public API (clapjax.CLAP.from_pretrained, as `clapjax eval` loads
    # it): 4 held-out clips, each with its top 3 captions
    assert "through the public API (clapjax.CLAP.from_pretrained" in out
    assert len(re.findall(r"^    [✓✗] \d\.\d{3}  ", out, flags=re.M)) == 12

