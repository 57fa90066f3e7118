"""The shortened `make demo`: a small CLAP learns the synthetic set on 8 host devices."""
import json
import os
import subprocess
import sys


def test_quick_demo_learns(tmp_path):
    workdir = tmp_path / "demo"
    env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, "-m", "clapjax.demo", "--quick", "--skip-convert", "--workdir", str(workdir)],
                          capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "mesh data=2 × fsdp=4" in proc.stdout and "8 cpu devices" in proc.stdout
    losses = [json.loads(line)["loss"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.2, (first, last)  # the contrastive loss falls
    held = json.loads((workdir / "heldout.json").read_text())
    print(f"quick demo: loss {first:.3f} → {last:.3f}; held-out text→audio R@1 "
          f"{held['metrics']['text_to_audio_R@1']:.3f} = {held['t2a_r1_over_chance']:.1f}× chance")
    assert held["t2a_r1_over_chance"] > 2.0
    for name in ("loss.png", "recall.png", "similarity.png"):
        assert (workdir / "plots" / name).stat().st_size > 1000
    assert any((workdir / "tb").iterdir())
    assert (workdir / "model" / "config.json").exists()  # the trained model in the converter's format

    # the saved model goes through `clapjax eval` as a subprocess
    proc = subprocess.run([sys.executable, "-m", "clapjax.cli", "eval", str(workdir / "model"), "synthetic:heldout:16",
                           "--tokenizer", str(workdir / "tokenizer")], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "text_to_audio R@1" in proc.stdout and "zero-shot" in proc.stdout
