"""Section 1: audio embedding clips/s, HTSAT-tiny unfused and fused, 10 s clips.

clapjax: the public `CLAP.get_audio_embedding_from_data(waveforms)` (int16 quantisation, LAION's
crop/pad, the device front end, batching). laion_clap unfused: its public
`CLAP_Module.get_audio_embedding_from_data` (same quantisation; its model computes the mel).
laion_clap fused: its fusion preprocessing needs torchaudio (not installable here beside the CPU
torch wheel), so its model gets the `mel_fusion`/`longer` inputs clapjax's `audio_batch` makes, as
the parity tests do: the laion fused column therefore EXCLUDES the host mel, clapjax's includes it.
HF: `get_audio_features` on precomputed log-mels (model only). All under torch.no_grad (laion's hook
builds an autograd graph otherwise; no_grad is the faster, fairer baseline).
"""
from __future__ import annotations

import numpy as np

from benchmarks import common
from clapjax.train import throughput
from benchmarks.reference_models import build, tiny

CLIP_SAMPLES = 480000      # 10 s at 48 kHz: exactly one crop, so `longer` is False (20 s rows: True)


def _waves(batch: int, samples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-0.5, 0.5, (batch, samples)).astype(np.float32)


def _row(kind, batch, ours, laion, hf, flops=None):
    r = {"kind": kind, "batch": batch, "clapjax_per_s": batch / ours["median_s"],
         "laion_per_s": batch / laion["median_s"] if laion else None,
         "hf_per_s": batch / hf["median_s"] if hf else None,
         "clapjax_s": ours, "laion_s": laion, "hf_s": hf, "model_flops": flops}
    r["vs_laion"] = common.ratio(r["clapjax_per_s"], r["laion_per_s"])
    r["vs_hf"] = common.ratio(r["clapjax_per_s"], r["hf_per_s"])
    return r


def model_flops(clap, batch: dict) -> float | None:
    """XLA's FLOP count of the audio embedding on `batch` (our own jit of the model, so it does not
    depend on the API's internals)."""
    import jax
    from flax import nnx
    graphdef, state = nnx.split(clap.model)
    fn = jax.jit(lambda s, b: nnx.merge(graphdef, s).get_audio_embedding(b))
    return throughput.cost_flops(fn.lower(state, batch))   # HLO cost analysis: no compile needed


def _reference_times(trio, fused: bool, wave, batch: dict, repeats: int):
    """(laion_clap, HF) timings on the same clips (None, None for a smoke run's tiny model)."""
    if trio.laion is None:
        return None, None
    import torch
    from clapjax.audio.frontend import log_mel
    with torch.no_grad():
        if fused:
            items = [{"waveform": torch.zeros(CLIP_SAMPLES), "longer": torch.tensor([bool(lg)]),
                      "mel_fusion": torch.from_numpy(m)} for lg, m in zip(batch["longer"], batch["mel_fusion"])]
            laion = common.median_seconds(lambda: trio.laion.model.get_audio_embedding(items), repeats)
            feats = torch.from_numpy(batch["mel_fusion"])
            longer = torch.from_numpy(np.asarray(batch["longer"]).reshape(-1, 1))
            hf = common.median_seconds(lambda: trio.hf(input_features=feats, is_longer=longer), repeats)
        else:
            laion = common.median_seconds(lambda: trio.laion.get_audio_embedding_from_data(wave), repeats)
            feats = torch.from_numpy(np.asarray(log_mel(batch["waveform"], trio.config.frontend)))[:, None]
            hf = common.median_seconds(lambda: trio.hf.get_audio_features(input_features=feats), repeats)
    return laion, hf


def measure(trio, fused: bool, batches, repeats: int, long_batch: int | None) -> list[dict]:
    rows = []
    clip = trio.config.frontend.clip_samples
    seconds = clip / trio.config.frontend.sample_rate
    cases = [(b, clip, f"{seconds:g} s") for b in batches]
    if fused and long_batch:
        cases.append((long_batch, 2 * clip, f"{2 * seconds:g} s (longer: 4-chunk fusion)"))
    for b, samples, length in cases:
        wave = _waves(b, samples, seed=b)
        kind = f"HTSAT-tiny {'fused' if fused else 'unfused'}, {length}"
        try:
            ours = common.median_seconds(lambda: trio.clapjax.get_audio_embedding_from_data(wave), repeats)
            batch = trio.clapjax.audio_batch(list(wave))
            flops = model_flops(trio.clapjax, batch) if samples == clip else None
            laion, hf = _reference_times(trio, fused, wave, batch, repeats)
        except Exception as err:   # one failing case is reported in its row; the table goes on
            if samples == clip:
                raise
            rows.append({"kind": kind, "batch": b, "error": f"{type(err).__name__}: {err}"[:300]})
            continue
        rows.append(_row(kind, b, ours, laion, hf, flops))
    return rows


def table(rows: list[dict]) -> str:
    return common.md_table(
        ["audio", "batch", "clapjax clips/s", "laion_clap clips/s", "HF clips/s", "clapjax ÷ laion", "clapjax ÷ HF"],
        [[r["kind"], r["batch"], common.fmt(r.get("clapjax_per_s")), common.fmt(r.get("laion_per_s")),
          common.fmt(r.get("hf_per_s")), common.fmt(r.get("vs_laion"), ".2f", "×"),
          common.fmt(r.get("vs_hf"), ".2f", "×") if "error" not in r else "FAILED: " + r["error"][:100]]
         for r in rows])


def run(opts: common.Options) -> dict:
    import torch
    rows = []
    for fused in (False, True):
        trio = tiny(fused) if opts.tiny else build(fused, text_layers=1)   # the text tower plays no part
        rows += measure(trio, fused, opts.audio_batches, opts.repeats,
                        long_batch=None if opts.quick else 8)
        del trio
    return {"rows": rows, "table": table(rows), "torch_threads": torch.get_num_threads(),
            "notes": ["fused laion_clap and all HF rows take precomputed mels (their preprocessing is not "
                      "timed); clapjax rows time the whole public call from waveforms"]}
