"""`clapjax` command line: convert, download, export, embed-audio, merge-embeddings, embed-text, zero-shot, retrieve,
train, launch, eval, prepare."""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

DEFAULT_TEMPLATE = "This is a sound of {}."
BAD_FILES_EXIT = 1  # some files could not be read (and --allow-bad-files was not given); the rest were embedded


def _progress(iterable, total: int, desc: str):
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=desc, disable=total < 2 or not sys.stderr.isatty(), file=sys.stderr)


def audio_paths(items: list[str]) -> list[str]:
    """Files as given; folders expanded recursively to their audio files, sorted."""
    from clapjax.audio.io import AUDIO_EXTENSIONS
    out = []
    for item in items:
        if os.path.isdir(item):
            found = sorted(os.path.join(d, f) for d, _, fs in os.walk(item) for f in fs
                           if f.lower().endswith(AUDIO_EXTENSIONS))
            if not found:
                raise ValueError(f"{item}: no audio files ({', '.join(AUDIO_EXTENSIONS)}) in this folder")
            out.extend(found)
        elif os.path.isfile(item):
            out.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
    return out


def _embed_files(clap, paths: list[str], seed: int | None, workers: int | None) -> tuple[list[str], np.ndarray, list]:
    """(embedded paths, their rows, the files that failed as `stream.Failed`), decoding in a pool."""
    rng = None if seed is None else np.random.default_rng(seed)
    embedded, parts, failed = [], [np.zeros((0, clap.config.joint_embed_shape), np.float32)], []
    with _progress(None, len(paths), "embedding audio") as bar:
        for batch in clap.iter_audio_embeddings(paths, rng, workers=workers, skip_bad=True):
            embedded += batch.paths
            parts.append(batch.embeddings)
            failed += batch.failed
            bar.update(batch.inputs)
    return embedded, np.concatenate(parts), failed


def _bad_files_status(failed: list, allowed: bool, listed_in: str | None = None) -> int:
    """Say which files were left out; BAD_FILES_EXIT unless the user accepted them."""
    if not failed:
        return 0
    where = f" (listed in {listed_in})" if listed_in else ""
    print(f"{'warning' if allowed else 'error'}: {len(failed)} file(s) could not be read and were left out{where}:",
          file=sys.stderr)
    for f in failed[:10]:
        print(f"  {f['reason'] if isinstance(f, dict) else f.reason}", file=sys.stderr)
    if len(failed) > 10:
        print(f"  ... and {len(failed) - 10} more", file=sys.stderr)
    if allowed:
        return 0
    print("pass --allow-bad-files to accept them (exit 0)", file=sys.stderr)
    return BAD_FILES_EXIT


def _load(args, need_tokenizer: bool = False):
    from clapjax.app.api import CLAP
    # an audio-only command looks up no tokenizer (a laion .pt's would be fetched for nothing)
    tokenizer = (args.tokenizer or None) if need_tokenizer else False
    clap = CLAP.from_pretrained(args.checkpoint, tokenizer=tokenizer, revision=args.revision,
                                compilation_cache=args.compilation_cache)
    if need_tokenizer and clap.tokenizer is None:
        from clapjax.convert import pretrained
        raise pretrained.NoOwnTokenizer(args.checkpoint)
    return clap


# --- commands -------------------------------------------------------------------------------------

def cmd_convert(args) -> int:
    from clapjax import saved_model
    from clapjax.convert import hub, keymap, pipeline
    located = hub.locate(args.src, revision=args.revision)
    src = args.src if located.repo_id is None else located.path  # a local path's messages name it as the user did
    try:
        report = pipeline.convert(src, args.out_dir, amodel=args.amodel, tmodel=args.tmodel,
                                  fusion=args.fusion)
    except keymap.KeyMappingError as err:
        print(err.report.summary(), file=sys.stderr)
        print(f"error: {err}\nnothing was written.", file=sys.stderr)
        return 2
    if located.repo_id is not None:  # from a repo: the model's own tokenizer is found again by its source
        saved_model.set_provenance(args.out_dir, {"name": args.src, **located.provenance})
    print(report.summary())
    print(f"wrote {args.out_dir} (Orbax variables, config.json, key_report.json)")
    if args.verify:
        from clapjax.convert import verify
        result = verify.verify(src, args.out_dir)
        print(result)
        return 0 if result.ok else 3
    return 0


def cmd_download(args) -> int:
    from clapjax.convert import conversion_cache, pretrained
    found = pretrained.find(args.name, revision=args.revision, log=print)
    print(f"Hub cache: {_hub_cache()}")
    print(f"converted model: {found.model_dir}")
    print(f"tokenizer: {found.tokenizer_dir or 'none of its own'}")
    print(f"conversion cache: {conversion_cache.cache_root()} (copy both caches to use {args.name} offline, "
          "with HF_HUB_OFFLINE=1)")
    return 0


def _hub_cache() -> str:
    from huggingface_hub import constants
    return constants.HF_HUB_CACHE


def cmd_export(args) -> int:
    from clapjax.convert import pipeline
    sd = pipeline.export(args.checkpoint, args.to, args.dest)
    print(f"wrote {len(sd)} tensors in the {args.to} layout to {args.dest}")
    return 0


def cmd_embed_audio(args) -> int:
    from clapjax.app import embed_store
    embed_store.Outputs.of(args.out)  # a bad --out is refused before the model loads
    index, count = embed_store.process_split(args.process_index, args.process_count)
    all_paths = [os.path.abspath(p) for p in audio_paths(args.inputs)]
    paths, out = embed_store.split(all_paths, index, count), embed_store.part_out(args.out, index, count)
    clap = _load(args)
    with _progress(None, len(paths), "embedding audio") as bar:
        summary = embed_store.embed_to_file(clap, paths, out, seed=args.seed, workers=args.workers,
                                            model=args.checkpoint, index=index, count=count, all_paths=all_paths,
                                            progress=bar.update)
    files = embed_store.Outputs.of(out)
    resumed = f" (resumed after {summary.resumed_from} files)" if summary.resumed_from else ""
    print(f"wrote {summary.rows}×{summary.dim} embeddings to {out} and their paths to {files.paths}{resumed}")
    if count > 1:
        print(f"part {index} of {count}: merge the parts with `clapjax merge-embeddings {args.out}`")
    return _bad_files_status(summary.failed, args.allow_bad_files, files.failed)


def cmd_merge_embeddings(args) -> int:
    from clapjax.app import embed_store
    summary = embed_store.merge(args.out)
    print(f"merged {summary.rows}×{summary.dim} embeddings into {args.out} and their paths into "
          f"{embed_store.Outputs.of(args.out).paths}")
    return _bad_files_status(summary.failed, args.allow_bad_files, embed_store.Outputs.of(args.out).failed)


def cmd_embed_text(args) -> int:
    clap = _load(args, need_tokenizer=True)
    emb = clap.get_text_embedding(args.texts)
    np.save(args.out, emb)
    print(f"wrote {emb.shape[0]}×{emb.shape[1]} embeddings to {args.out}")
    return 0


def _labels(args) -> list[str]:
    if args.labels_file:
        with open(args.labels_file) as f:
            labels = [line.strip() for line in f if line.strip()]
    else:
        labels = [x.strip() for x in (args.labels or "").split(",") if x.strip()]
    if not labels:
        raise ValueError("give class labels with --labels 'dog,rain,...' or --labels-file FILE (one per line)")
    if "{}" not in args.template:
        raise ValueError(f"--template must contain '{{}}' where the label goes, got {args.template!r}")
    try:
        args.template.format("label")
    except (IndexError, KeyError, ValueError) as err:  # a second '{}', a '{name}', an unmatched brace
        raise ValueError(f"--template must hold one '{{}}' for the label and no other braces (write '{{{{' for "
                         f"a literal one), got {args.template!r} ({type(err).__name__}: {err})") from None
    return labels


def cmd_zero_shot(args) -> int:
    from clapjax.app.api import cosine_top_k
    labels = _labels(args)
    paths = audio_paths(args.inputs)
    clap = _load(args, need_tokenizer=True)
    text = clap.get_text_embedding([args.template.format(lab) for lab in labels])
    paths, audio, failed = _embed_files(clap, paths, args.seed, args.workers)
    if paths:
        idx, scores = cosine_top_k(audio, text, args.top_k)
        for path, row, sc in zip(paths, idx, scores):
            print(path)
            for rank, (j, s) in enumerate(zip(row, sc), 1):
                print(f"  {rank}. {labels[j]:<30} {s:+.4f}")
    return _bad_files_status(failed, args.allow_bad_files)


def cmd_retrieve(args) -> int:
    from clapjax.app.api import cosine_top_k
    if not os.path.isfile(args.embeddings):
        raise FileNotFoundError(f"{args.embeddings}: no such file (write it with `clapjax embed-audio`)")
    index = os.path.splitext(args.embeddings)[0] + ".paths.json"
    if not os.path.isfile(index):
        raise FileNotFoundError(f"{index}: the path index written by `clapjax embed-audio` is missing")
    audio = np.load(args.embeddings)
    with open(index) as f:
        paths = json.load(f)
    if len(paths) != audio.shape[0]:
        raise ValueError(f"{index} lists {len(paths)} paths for {audio.shape[0]} embeddings")
    clap = _load(args, need_tokenizer=True)
    idx, scores = cosine_top_k(clap.get_text_embedding([args.query]), audio, args.top_k)
    for rank, (j, s) in enumerate(zip(idx[0], scores[0]), 1):
        print(f"{rank}. {s:+.4f}  {paths[j]}")
    return 0


def cmd_train(args) -> int:
    from clapjax.train import config as config_lib, launch, loop
    # SLURM / TPU pod variables → CLAPJAX_* before `distributed.initialize` (inside loop.train) reads them
    group = launch.export_environment()
    if group.platform in ("slurm", "tpu") and group.process_id == 0:
        print(f"{group.platform}: {group.num_processes} processes, coordinator {group.coordinator}", flush=True)
    cfg = config_lib.load_config(args.config, args.overrides)
    summary = loop.train(cfg, args.workdir)
    print(f"trained to step {summary['step']} in {args.workdir} "
          f"({summary['nonfinite_total']} non-finite steps skipped)")
    return 0 if summary["stopped"] is None else 3   # stopped early (the data ran out); non-finite stops raise


# --- parser ---------------------------------------------------------------------------------------

MODEL_HELP = ("a clapjax model directory; a laion-clap .pt, HF ClapModel directory or .safetensors (converted once "
              "into the conversion cache); a Hugging Face repo id (laion/clap-htsat-unfused); or a laion-clap release "
              "name (630k-audioset-best)")


def _revision_arg(p):
    p.add_argument("--revision", help="the commit, branch or tag of a Hugging Face repo (default: main)")


def _model_args(p, tokenizer: bool):
    p.add_argument("checkpoint", metavar="MODEL", help=MODEL_HELP)
    _revision_arg(p)
    if tokenizer:
        p.add_argument("--tokenizer", help="local tokenizer directory (vocab.json + merges.txt, or tokenizer.json); "
                                           "default: the model's own")
    p.add_argument("--compilation-cache", default=os.path.join(os.path.expanduser("~"), ".cache", "clapjax", "jax_cache"),
                   help="JAX persistent compilation cache directory (default: %(default)s)")


def _decode_args(p):
    from clapjax.audio.stream import usable_cores
    p.add_argument("--workers", type=int, default=usable_cores(),
                   help="threads decoding files ahead of the model (default: the usable cores, %(default)s; "
                        "0: decode in the main thread)")
    p.add_argument("--allow-bad-files", action="store_true",
                   help="files that cannot be read are always left out and listed; with this flag that exits 0 "
                        f"(without it, {BAD_FILES_EXIT})")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="clapjax", description="CLAP in JAX: convert checkpoints, embed, search.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="a model (path, HF repo id or laion-clap release name) → clapjax checkpoint",
                       description="Convert with strict key accounting; exits non-zero and writes nothing if any "
                                   "key is missing, unexpected or mis-shaped.")
    p.add_argument("src", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("out_dir")
    _revision_arg(p)
    p.add_argument("--amodel", help="audio model name (e.g. HTSAT-tiny); must agree with the weights")
    p.add_argument("--tmodel", choices=["roberta", "bert", "bart", "transformer"], help="text model; must agree")
    p.add_argument("--fusion", action=argparse.BooleanOptionalAction, default=None,
                   help="whether the model is fused (aff_2d); must agree with the weights")
    p.add_argument("--verify", action="store_true", help="compare embeddings with the PyTorch reference")
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser("download", help="fetch a model by name into the Hub cache and convert it into the "
                       "conversion cache (for a later offline machine)")
    p.add_argument("name", metavar="MODEL", help=MODEL_HELP)
    _revision_arg(p)
    p.set_defaults(fn=cmd_download)

    p = sub.add_parser("export", help="write a clapjax checkpoint back as a laion-clap .pt or an HF directory")
    p.add_argument("checkpoint")
    p.add_argument("--to", choices=["laion", "hf"], required=True)
    p.add_argument("dest", help="a .pt file (laion) or a new directory (hf)")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("embed-audio", help="audio files or folders → .npy embeddings + a .paths.json index")
    _model_args(p, tokenizer=False)
    p.add_argument("inputs", nargs="+", help="audio files and/or folders (searched recursively)")
    p.add_argument("--out", required=True, help="output .npy (beside it: .paths.json, the file of each row; "
                   ".failed.json, the files left out; .partial/ while running: a rerun resumes it)")
    p.add_argument("--seed", type=int, default=None, help="random crops of long clips (default: deterministic)")
    _decode_args(p)
    p.add_argument("--process-index", type=int, default=None,
                   help="embed part I of a split file list into OUT.part-I-of-N.npy (default: the launch "
                        "environment's process id, SLURM_PROCID / TPU_WORKER_ID / CLAPJAX_PROCESS_ID; else 0)")
    p.add_argument("--process-count", type=int, default=None,
                   help="the number N of parts (default: the launch environment's process count; else 1: no split)")
    p.set_defaults(fn=cmd_embed_audio)

    p = sub.add_parser("merge-embeddings", help="join the parts of a split embed-audio run into one output")
    p.add_argument("out", help="the --out the parts were written for (OUT.part-*-of-N.npy beside it)")
    p.add_argument("--allow-bad-files", action="store_true", help="exit 0 even if some files were left out")
    p.set_defaults(fn=cmd_merge_embeddings)

    p = sub.add_parser("embed-text", help="texts → .npy embeddings")
    _model_args(p, tokenizer=True)
    p.add_argument("texts", nargs="+")
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_embed_text)

    p = sub.add_parser("zero-shot", help="classify audio files against labels through a prompt template")
    _model_args(p, tokenizer=True)
    p.add_argument("inputs", nargs="+", help="audio files and/or folders")
    p.add_argument("--labels", help="comma-separated class labels")
    p.add_argument("--labels-file", help="a file with one label per line")
    p.add_argument("--template", default=DEFAULT_TEMPLATE, help="prompt template (default: %(default)r)")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--seed", type=int, default=None)
    _decode_args(p)
    p.set_defaults(fn=cmd_zero_shot)

    p = sub.add_parser("retrieve", help="rank an embedded folder for a text query")
    _model_args(p, tokenizer=True)
    p.add_argument("embeddings", help="the .npy written by embed-audio (its .paths.json beside it)")
    p.add_argument("query")
    p.add_argument("--top-k", type=int, default=5)
    p.set_defaults(fn=cmd_retrieve)

    p = sub.add_parser("train", help="train CLAP (resumes automatically from WORKDIR's latest checkpoint)",
                       description="CONFIG is a config file (train/configs/NAME.py, a path, or either with :ARG); "
                                   "overrides are dotted key=value pairs, e.g. optim.lr=1e-4 train.steps=100.")
    p.add_argument("config")
    p.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl and config.json go here")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("launch", add_help=False, help="start N local processes of `clapjax train` "
                       "(`clapjax launch --local 2 --cpu-devices 4 -- tiny --workdir runs/x`; --help for more)")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_launch)

    p = sub.add_parser("eval", add_help=False, help="retrieval and zero-shot metrics of a checkpoint on a data set "
                       "(`clapjax eval --help` for its options)")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("prepare", add_help=False, help="decode an audio-caption data set once into indexed shards "
                       "for training (`clapjax prepare SRC OUT`; --help for its options)")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_prepare)
    return ap


def cmd_eval(args) -> int:
    from clapjax.train import evaluate
    return evaluate.main(args.rest)


def cmd_launch(args) -> int:
    from clapjax.train import launch
    return launch.main(args.rest)


def cmd_prepare(args) -> int:
    from clapjax.train import prepare
    return prepare.main(args.rest)


# what a bad argument or input raises: printed as one line, exit status 2
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotImplementedError, RuntimeError)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # eval, prepare and launch have their own parsers: eval's options and --help are clapjax.train.evaluate's,
    # prepare's clapjax.train.prepare's, and everything after launch's `--` belongs to `clapjax train`
    own_parser = {"eval": cmd_eval, "launch": cmd_launch, "prepare": cmd_prepare}.get(argv[0] if argv else "")
    if own_parser is not None:
        try:
            return own_parser(argparse.Namespace(rest=argv[1:]))
        except USER_ERRORS as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # `train CONFIG --workdir D k=v …`: argparse leaves overrides after an option unparsed
        if args.command != "train":
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    try:
        return args.fn(args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
