"""Where inference time goes: clapjax components vs the matching laion_clap (PyTorch eager) modules.

    python -m benchmarks.profile_inference [--repeats 5] [--audio-batch 8] [--text-batch 32]
                                           [--torch-threads 2] [--only audio,fused,text]

Random-init HTSAT-tiny + RoBERTa-base, laion_clap's weights copied into clapjax by the converter's
table. Each clapjax component is its own jitted function fed the previous component's output; each
torch component is timed inside one full eager forward with pre/post hooks on its module. Medians over
`--repeats` calls after a warm-up. Not a test: the speed goals are ratios measured in one process.
See benchmarks/PROFILE.md for what the numbers led to.
"""
from __future__ import annotations

import argparse
import collections
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: compiles (JAX) / allocates (torch)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timed_torch_modules(run, modules: dict, repeats: int) -> tuple[float, dict[str, float]]:
    """Median wall time of `run()` and of each named module inside it (forward pre/post hooks)."""
    acc: dict[str, list[float]] = collections.defaultdict(list)
    current: dict[str, float] = {}
    start: dict[str, float] = {}
    handles = []
    for name, mod in modules.items():
        def pre(_m, _a, name=name):
            start[name] = time.perf_counter()

        def post(_m, _a, _o, name=name):
            current[name] = current.get(name, 0.0) + time.perf_counter() - start[name]
        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    run()
    totals = []
    for _ in range(repeats):
        current.clear()
        t0 = time.perf_counter()
        run()
        totals.append(time.perf_counter() - t0)
        for name in modules:
            acc[name].append(current.get(name, 0.0))
    for h in handles:
        h.remove()
    return statistics.median(totals), {k: statistics.median(v) for k, v in acc.items()}


def jitted(module, fn):
    """`fn(module, *args)` as one jitted function of (module state, *args)."""
    import jax
    from flax import nnx
    graphdef, state = nnx.split(module)
    f = jax.jit(lambda s, *a: fn(nnx.merge(graphdef, s), *a))
    return lambda *a: jax.block_until_ready(f(state, *a))


def table(title: str, rows: list[tuple[str, float, float | None]]) -> str:
    lines = [f"### {title}", "", "| component | clapjax ms | laion_clap ms | laion ÷ clapjax |", "|---|---|---|---|"]
    for name, ours, theirs in rows:
        t = "" if theirs is None else f"{theirs * 1e3:.1f}"
        r = "" if theirs is None else f"{theirs / ours:.2f}×"
        lines.append(f"| {name} | {ours * 1e3:.1f} | {t} | {r} |")
    return "\n".join(lines)


def build(fusion: bool):
    from flax import nnx

    from clapjax.app.api import CLAP
    from clapjax.convert import keymap as K, laion, torch_reference as R
    from clapjax.model import CLAPModel
    ref = R.laion_clap_model("HTSAT-tiny", "roberta", fusion=fusion)
    sd = R.torch_state_dict(ref)
    cfg = laion.detect(sd)
    model = nnx.eval_shape(lambda: CLAPModel(cfg, nnx.Rngs(0)))
    K.load_state_dict(model, sd, laion.laion_table(model))
    return ref, model, CLAP(model, batch_sizes=(1, 8, 32, 128))


def profile_audio(ref, model, clap, b: int, repeats: int, fused: bool, rng) -> str:
    import jax.numpy as jnp
    import numpy as np
    import torch

    from clapjax.audio import frontend as fe
    from clapjax.audio import swin
    hts, tb = model.audio_branch, ref.audio_branch
    cfg = hts.cfg
    if fused:
        mel = rng.normal(-20, 10, (b, 4, 1001, 64)).astype(np.float32)
        longer = np.ones((b,), bool)
        batch = {"mel_fusion": mel, "longer": longer}
        items = [{"mel_fusion": torch.from_numpy(m), "longer": torch.tensor([True])} for m in mel]
    else:
        wave = rng.uniform(-0.5, 0.5, (b, 480000)).astype(np.float32)
        batch = {"waveform": wave}
        items = [{"waveform": torch.from_numpy(w), "longer": torch.tensor([False])} for w in wave]

    def front(h, x):
        if fused:
            m = jnp.asarray(x)
        else:
            m = fe.log_mel(x, cfg.frontend, "slaney")[:, None]
        m = h.bn0(m)
        img = fe.reshape_wav2img(m, cfg.spec_size, cfg.freq_ratio)
        return jnp.transpose(img, (0, 2, 3, 1))
    x_in = batch["mel_fusion"] if fused else batch["waveform"]
    f_front = jitted(hts, front)
    img = f_front(x_in)
    longer = jnp.asarray(batch["longer"]) if fused else None
    f_patch = jitted(hts.patch_embed, lambda m, x, lg: m(x, lg))
    x = f_patch(img, longer)
    ours = [("front end (STFT, mel, dB, bn0, bicubic → image)", median_seconds(lambda: f_front(x_in), repeats)),
            ("patch_embed" + (" (+ aff_2d fusion)" if fused else ""),
             median_seconds(lambda: f_patch(img, longer), repeats))]
    stage_inputs = []
    for i, layer in enumerate(hts.layers):
        f = jitted(layer, lambda m, x: m(x))
        stage_inputs.append(x)
        ours.append((f"layers.{i} (Swin stage{' + PatchMerging' if layer.downsample is not None else ''})",
                     median_seconds(lambda f=f, x=x: f(x), repeats)))
        x = f(x)
    f_head = jitted(hts, lambda m, x: m._heads(m.norm(x)))
    ours.append(("norm + tscam head + pooling", median_seconds(lambda: f_head(x), repeats)))
    # one window attention of stage 0 (64² tokens, windows of 8², shifted): the hot loop of stage 0
    blk = hts.layers[0].blocks[1]
    wins = swin._partition(jnp.asarray(stage_inputs[0]), blk.window)
    f_attn = jitted(blk.attn, lambda m, w: m(w, blk.attention_mask()))
    attn_ours = median_seconds(lambda: f_attn(wins), repeats)
    full_ours = median_seconds(lambda: np.asarray(clap.get_audio_embedding_from_data(
        batch["waveform"], quantize=False)) if not fused else np.asarray(clap._run(clap._audio_fn, batch)), repeats)

    mods = {f"layers.{i}": layer for i, layer in enumerate(tb.layers)}
    mods.update(patch=tb.patch_embed, norm=tb.norm, tscam=tb.tscam_conv, attn=tb.layers[0].blocks[1].attn,
                bn0=tb.bn0)
    if not fused:
        mods.update(stft=tb.spectrogram_extractor, mel=tb.logmel_extractor)
    with torch.inference_mode():
        full_t, parts = timed_torch_modules(lambda: ref.get_audio_embedding(items), mods, repeats)
    front_t = parts["bn0"] + (0 if fused else parts["stft"] + parts["mel"])
    theirs = [front_t, parts["patch"]] + [parts[f"layers.{i}"] for i in range(len(tb.layers))] + [None]
    rows = [(n, o, t) for (n, o), t in zip(ours, theirs)]
    rows.append(("(inside stage 0) one shifted WindowAttention", attn_ours, parts["attn"]))
    rows.append(("**whole audio embedding (public API)**", full_ours, full_t))
    note = ("torch's front end row omits its reshape_wav2img (not a module; it is in the whole-embedding row); "
            "its pooling/head time is only in the whole row.")
    return table(f"audio {'fused (aff_2d, every row longer)' if fused else 'unfused'}, batch {b}", rows) + \
        "\n\n" + note


def profile_text(ref, model, clap, b: int, repeats: int, rng, real_tokens: int) -> str:
    import jax.numpy as jnp
    import numpy as np
    import torch

    from clapjax import layers as L
    tower = model.text_branch
    ids = rng.integers(5, 50000, (b, 77)).astype(np.int32)
    mask = np.ones_like(ids)
    if real_tokens < 77:
        ids[:, real_tokens:] = 1  # roberta's pad id
        mask[:, real_tokens:] = 0
    tok = {"input_ids": ids, "attention_mask": mask}
    f_emb = jitted(tower.embeddings, lambda m, i: m(i))
    x = f_emb(ids)
    bias = L.padding_bias(jnp.asarray(mask))
    f_layer = jitted(tower.encoder.layer[0], lambda m, x, bias: m(x, bias))
    f_attn = jitted(tower.encoder.layer[0].attention.self, lambda m, x, bias: m(x, bias))
    f_enc = jitted(tower.encoder, lambda m, x, bias: m(x, bias))
    h = f_enc(x, bias)
    f_pool = jitted(model, lambda m, h: m.text_projection(m.text_branch.pooler(h)))
    ours = [("embeddings", median_seconds(lambda: f_emb(ids), repeats)),
            ("one encoder layer", median_seconds(lambda: f_layer(x, bias), repeats)),
            ("(inside it) self-attention", median_seconds(lambda: f_attn(x, bias), repeats)),
            ("encoder (12 layers)", median_seconds(lambda: f_enc(x, bias), repeats)),
            ("pooler + text_projection", median_seconds(lambda: f_pool(h), repeats)),
            ("**whole text embedding (public API)**",
             median_seconds(lambda: np.asarray(clap.get_text_embedding(tok)), repeats))]
    tb = ref.text_branch
    mods = {"emb": tb.embeddings, "layer": tb.encoder.layer[0], "attn": tb.encoder.layer[0].attention.self,
            "enc": tb.encoder, "pool": tb.pooler, "proj": ref.text_projection}
    tt = {"input_ids": torch.from_numpy(ids.astype(np.int64)), "attention_mask": torch.from_numpy(mask.astype(np.int64))}
    with torch.inference_mode():
        full_t, p = timed_torch_modules(lambda: ref.get_text_embedding(dict(tt)), mods, repeats)
    theirs = [p["emb"], p["layer"], p["attn"], p["enc"], p["pool"] + p["proj"], full_t]
    rows = [(n, o, t) for (n, o), t in zip(ours, theirs)]
    return table(f"text (RoBERTa-base), batch {b}, 77-token context, {real_tokens} real tokens", rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--audio-batch", type=int, default=8)
    ap.add_argument("--text-batch", type=int, default=32)
    ap.add_argument("--text-real-tokens", default="77,20", help="comma list: real tokens per caption")
    ap.add_argument("--torch-threads", type=int, default=2)
    ap.add_argument("--only", default="audio,fused,text")
    ap.add_argument("--out", default=None, help="also write the tables to this markdown file")
    args = ap.parse_args(argv)

    import jax
    import numpy as np
    import torch
    torch.set_grad_enabled(False)
    torch.set_num_threads(args.torch_threads)
    rng = np.random.default_rng(0)
    only = set(args.only.split(","))
    out = [f"torch {torch.__version__} at {torch.get_num_threads()} threads, jax {jax.__version__} on "
           f"{jax.devices()[0].platform}, {os.cpu_count()} CPUs; medians of {args.repeats} after a warm-up"]
    if only & {"audio", "text"}:
        ref, model, clap = build(False)
        if "audio" in only:
            out.append(profile_audio(ref, model, clap, args.audio_batch, args.repeats, False, rng))
            print(out[-1], flush=True)
        if "text" in only:
            for n in (int(t) for t in args.text_real_tokens.split(",")):
                out.append(profile_text(ref, model, clap, args.text_batch, args.repeats, rng, n))
                print(out[-1], flush=True)
    if "fused" in only:
        ref, model, clap = build(True)
        out.append(profile_audio(ref, model, clap, args.audio_batch, args.repeats, True, rng))
        print(out[-1], flush=True)
    # other processes on the same cores hurt torch's spinning OpenMP threads more than XLA: say how busy
    # the machine was, so a reader can tell a quiet run from a loaded one
    out[0] += ", load average {:.1f}/{:.1f}/{:.1f} at the end".format(*os.getloadavg())
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n\n".join(out) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
