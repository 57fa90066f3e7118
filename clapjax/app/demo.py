"""`make demo`: CLAP learning on a fresh machine with no downloads.

1. generates the synthetic audio–caption set (clapjax.synthetic) and trains a BPE on its captions;
2. trains a small CLAP on 8 CPU host devices over a 2 × 4 data × fsdp mesh (train/configs/demo.py),
   evaluating on the held-out split (attribute combinations never seen in training) as it goes;
3. leads its report with held-out R@1 / R@5 / mAP@10 both ways against chance and against the R@1
   ceiling of the held-out set, attribute-match top-1, and zero-shot top-1 per attribute family
   against chance (clapjax.app.demo_report); writes TensorBoard logs (`tb/`), PNG plots (`plots/`) and
   the trained model (`model/`) to the work directory;
4. loads that model with `clapjax.CLAP` as a user would and prints the top captions of a few
   held-out clips;
5. converts a random-init laion-clap checkpoint and prints the converter's key report.
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
    ap = argparse.ArgumentParser(prog="python -m clapjax.app.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="runs/demo", help="logs, checkpoints, plots (default: %(default)s)")
    ap.add_argument("--quick", action="store_true", help="the shortened run the test suite uses")
    ap.add_argument("--eval-every", type=int, default=0,
                    help="held-out evaluation period (0: 4 times a run, twice with --quick)")
    ap.add_argument("--heldout", type=int, default=200, help="held-out clips (default: %(default)s)")
    ap.add_argument("--skip-convert", action="store_true", help="skip the laion-clap conversion step")
    args = ap.parse_args(argv)

    import jax
    from clapjax import synthetic
    from clapjax.app import demo_report
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
    every = args.eval_every or max(1, int(cfg.train.steps) // (2 if args.quick else 4))
    history: list[dict] = []

    def periodic_eval(step, state, setup, metrics_log):
        if step % every and step != int(cfg.train.steps):
            return
        model = setup.template.merge(state["params"], state["batch_stats"])
        result = evaluator(model)
        m = result.metrics
        history.append({"step": step, "metrics": m, "result": result, "model": model})
        for k, v in m.items():
            metrics_log.scalar(f"heldout/{k}", v, step)
        print(f"  held-out @ step {step}: text→audio R@1 {m['text_to_audio_R@1']:.3f} of ceiling "
              f"{m['text_to_audio_R@1_ceiling']:.3f}, attribute match {m['text_to_audio_attribute_match@1']:.3f}, "
              f"audio→text R@1 {m['audio_to_text_R@1']:.3f} (chance R@1 {result.chance['retrieval/R@1']:.3f})",
              flush=True)

    summary = loop.train(cfg, args.workdir, hooks=[periodic_eval])
    final = history[-1]["result"]     # the last evaluation is at the last step the run reached
    print()
    for line in demo_report.lead_report(final, heldout, summary["step"]):
        print(line)
    print()
    print(evaluate.format_table(final, "every held-out metric beside its chance level:"))
    for path in demo_report.plot(args.workdir, history, final, heldout):
        print(f"wrote {path}")
    print(f"TensorBoard logs: {os.path.join(args.workdir, 'tb')}")
    model_dir = os.path.join(args.workdir, "model")
    # the trained model in the converter's format: `clapjax eval / zero-shot / …` and clapjax.CLAP read it
    from clapjax import saved_model
    saved_model.save(model_dir, history[-1]["model"], source_format="clapjax-train")
    print(f"trained model: {model_dir} (try: clapjax eval {model_dir} synthetic:heldout --tokenizer {tok_dir})")
    with open(os.path.join(args.workdir, "heldout.json"), "w") as f:
        json.dump({"steps": summary["step"], "metrics": final.metrics, "chance": final.chance}, f, indent=2)
    print()
    for line in demo_report.top_captions_through_api(model_dir, tok_dir, heldout):
        print(line)
    if not args.skip_convert:
        print("\nconverting a random-init laion-clap checkpoint (HTSAT-tiny + RoBERTa):")
        with tempfile.TemporaryDirectory() as tmp:
            print(convert_random_laion(tmp))
    print(f"\ndemo finished in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
