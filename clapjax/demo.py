"""`make demo`: CLAP learning on a fresh machine with no downloads.

1. generates the synthetic audio–caption set (clapjax.synthetic) and trains a BPE on its captions;
2. trains a small CLAP on 8 CPU host devices over a 2 × 4 data × fsdp mesh (train/configs/demo.py),
   evaluating on the held-out split (attribute combinations never seen in training) as it goes;
3. prints R@1 / R@5 / mAP@10 both ways and zero-shot accuracy on held-out attribute classes, each
   against chance; writes TensorBoard logs (`tb/`) and PNG plots (`plots/`) to the work directory;
4. converts a random-init laion-clap checkpoint and prints the converter's key report.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time


def _prepare_env() -> None:
    # before jax is imported: 8 host devices make the data × fsdp mesh on a CPU machine
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def plot(workdir: str, history: list[dict], result, captions_per_clip: int) -> list[str]:
    """Loss and recall curves, and the held-out similarity matrix, as PNG files."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from clapjax.train.loop import read_metrics
    out = os.path.join(workdir, "plots")
    os.makedirs(out, exist_ok=True)
    rows = read_metrics(workdir)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set(xlabel="step", ylabel="contrastive loss", title="training loss")
    fig.savefig(os.path.join(out, "loss.png"), dpi=100, bbox_inches="tight")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in [("text_to_audio_R@1", "text→audio R@1"), ("audio_to_text_R@1", "audio→text R@1"),
                       ("text_to_audio_R@5", "text→audio R@5")]:
        ax.plot([h["step"] for h in history], [h[key] for h in history], marker="o", label=label)
    ax.axhline(history[-1]["chance_R@1"], color="grey", ls="--", label="chance R@1")
    ax.set(xlabel="step", ylabel="recall (held-out)", title="held-out retrieval")
    ax.legend()
    fig.savefig(os.path.join(out, "recall.png"), dpi=100, bbox_inches="tight")
    plt.close(fig)
    a, t = result.audio_embeddings, result.text_embeddings[::captions_per_clip]
    n = min(64, len(a))
    fig, ax = plt.subplots(figsize=(5, 5))
    im = ax.imshow(np.asarray(a[:n]) @ np.asarray(t[:n]).T, cmap="viridis")
    ax.set(xlabel="caption (first of each clip)", ylabel="clip", title=f"held-out similarity ({n}×{n})")
    fig.colorbar(im, ax=ax)
    fig.savefig(os.path.join(out, "similarity.png"), dpi=100, bbox_inches="tight")
    plt.close(fig)
    return [os.path.join(out, f) for f in ("loss.png", "recall.png", "similarity.png")]


def convert_random_laion(tmp: str) -> str:
    """A random-init laion-clap HTSAT-tiny + RoBERTa checkpoint through `clapjax convert`."""
    import numpy as np
    import torch
    from clapjax.convert import pipeline, torch_reference
    model = torch_reference.laion_clap_model("HTSAT-tiny", "roberta")
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    sd["module.text_branch.embeddings.position_ids"] = torch.arange(514)[None]
    path = os.path.join(tmp, "random-laion-clap.pt")
    torch.save({"epoch": np.int64(0), "name": "random-init", "state_dict": sd}, path)
    report = pipeline.convert(path, os.path.join(tmp, "converted"))
    return report.summary()


def main(argv: list[str] | None = None) -> int:
    _prepare_env()
    ap = argparse.ArgumentParser(prog="python -m clapjax.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="runs/demo", help="logs, checkpoints, plots (default: %(default)s)")
    ap.add_argument("--quick", action="store_true", help="the shortened run the test suite uses")
    ap.add_argument("--eval-every", type=int, default=0, help="held-out evaluation period (0: 4 times a run)")
    ap.add_argument("--heldout", type=int, default=200, help="held-out clips (default: %(default)s)")
    ap.add_argument("--skip-convert", action="store_true", help="skip the laion-clap conversion step")
    args = ap.parse_args(argv)

    import jax
    from clapjax import synthetic
    from clapjax.train import config as config_lib, evaluate, loop
    t0 = time.time()
    if os.path.isdir(args.workdir):
        shutil.rmtree(args.workdir)  # the demo always starts fresh (training resumes otherwise)
    os.makedirs(args.workdir)
    tok_dir = os.path.join(args.workdir, "tokenizer")
    tokenizer = synthetic.train_tokenizer(tok_dir, vocab_size=1000)
    cfg = config_lib.load_config(os.path.join(os.path.dirname(config_lib.__file__), "configs", "demo.py")
                                 + (":quick" if args.quick else ""),
                                 [f"data.tokenizer='{tok_dir}'", f"model.text_overrides.vocab_size={tokenizer.vocab_size}"])
    model_cfg = config_lib.model_config(cfg)
    heldout = synthetic.synthetic_dataset(1, args.heldout, "heldout", frontend=model_cfg.frontend,
                                          mix_probability=float(cfg.data.mix_probability))
    print(f"{len(jax.devices())} {jax.devices()[0].platform} devices; mesh data={cfg.mesh.data} × "
          f"fsdp={cfg.mesh.fsdp}; {cfg.data.n} training clips, {len(heldout)} held-out clips "
          f"({synthetic.__name__}: attribute combinations never seen in training)")
    evaluator = evaluate.Evaluator(evaluate.EvalSet.from_synthetic(heldout), tokenizer, batch_size=64,
                                   crop_mode="start", keep_embeddings=True)
    every = args.eval_every or max(1, int(cfg.train.steps) // 4)
    history: list[dict] = []
    chance_r1 = 1.0 / len(heldout)

    def periodic_eval(step, state, setup, metrics_log):
        if step % every and step != int(cfg.train.steps):
            return
        result = evaluator(setup.template.merge(state["params"], state["batch_stats"]))
        m = result.metrics
        history.append({"step": step, "chance_R@1": chance_r1, "result": result,
                        **{k: m[k] for k in ("text_to_audio_R@1", "audio_to_text_R@1", "text_to_audio_R@5")}})
        for k, v in m.items():
            metrics_log.scalar(f"heldout/{k}", v, step)
        print(f"  held-out @ step {step}: text→audio R@1 {m['text_to_audio_R@1']:.3f} "
              f"(chance {chance_r1:.3f}), audio→text R@1 {m['audio_to_text_R@1']:.3f}")

    trained = {}

    def keep_model(step, state, setup, metrics_log):
        if step == int(cfg.train.steps):
            trained["model"] = setup.template.merge(state["params"], state["batch_stats"])

    summary = loop.train(cfg, args.workdir, hooks=[periodic_eval, keep_model])
    final = history[-1]["result"]
    print()
    print(evaluate.format_table(final, f"held-out split after {summary['step']} steps ({len(heldout)} clips, "
                                       f"{heldout.captions_per_clip} captions each)"))
    ratio = final.metrics["text_to_audio_R@1"] / chance_r1
    print(f"\ntext→audio R@1 is {ratio:.1f}× chance")
    for path in plot(args.workdir, history, final, heldout.captions_per_clip):
        print(f"wrote {path}")
    print(f"TensorBoard logs: {os.path.join(args.workdir, 'tb')}")
    if "model" in trained:  # the trained model in the converter's format: `clapjax eval / zero-shot / …` read it
        from clapjax.convert import checkpoint
        checkpoint.save(os.path.join(args.workdir, "model"), trained["model"], source_format="clapjax-train")
        print(f"trained model: {os.path.join(args.workdir, 'model')} (try: clapjax eval "
              f"{os.path.join(args.workdir, 'model')} synthetic:heldout --tokenizer {tok_dir})")
    with open(os.path.join(args.workdir, "heldout.json"), "w") as f:
        json.dump({"steps": summary["step"], "metrics": final.metrics, "chance": final.chance,
                   "t2a_r1_over_chance": ratio}, f, indent=2)
    if not args.skip_convert:
        print("\nconverting a random-init laion-clap checkpoint (HTSAT-tiny + RoBERTa):")
        with tempfile.TemporaryDirectory() as tmp:
            print(convert_random_laion(tmp))
    print(f"\ndemo finished in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
