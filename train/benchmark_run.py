"""Scoring a model on the papers' benchmarks (train/benchmark_sets.py): embed each benchmark's audio once
(cached, train/eval_cache.py), then LAION's metrics on the clips that could be read.

    results = run_benchmarks("630k-audioset-best", [("esc50", "ESC-50-master"), ("clotho", "clotho")])
    for r in results:
        print(format_benchmark(r))

Zero-shot sets (ESC-50, UrbanSound8K, GTZAN) report LAION's zero-shot script figures
(`metrics.zero_shot_ranking_metrics`: R@1 = top-1 accuracy, R@5, R@10, mAP@10, mean/median rank) on all
clips and per fold; ESC-50 also LAION README's protocol (fold 1, its prompt without the full stop, under
`readme_fold1/`). Retrieval sets (Clotho, AudioCaps) report `evaluate_clotho_audiocaps`' figures (5 captions a
clip: text→audio ranks each caption, audio→text the best of a clip's 5). Missing and unreadable clips are left
out of every figure and listed by name with their counts beside it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Sequence

import numpy as np

from clapjax.train import benchmark_sets as B
from clapjax.train import eval_cache
from clapjax.train import metrics as M
from clapjax.train import published

ZERO_SHOT_KEYS = ("R@1", "R@5", "R@10", f"mAP@{M.MAP_CUTOFF}", "mean_rank", "median_rank")


@dataclasses.dataclass
class BenchmarkResult:
    benchmark: str                 # 'esc50', …
    root: str                      # the dataset directory
    listed: int                    # clips the release's metadata lists
    scored: int                    # clips every figure is computed on (listed − missing − unreadable)
    missing: list[str]             # listed clips with no file (relative paths)
    unreadable: dict[str, str]     # relative path → why it could not be decoded
    prompts: dict[str, str]        # zero-shot: the prompt template of each figure group ('' = all clips)
    metrics: dict[str, float]      # metric name (as printed) → value
    chance: dict[str, float]       # metric name → what a uniformly random ranking scores
    published: dict[str, float]    # metric name → LAION's published figure for this model, where it has one
    published_from: list[str] = dataclasses.field(default_factory=list)  # those figures' protocols and sources
    cached: bool = False           # the audio embeddings came from the cache

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


# --- embedding ----------------------------------------------------------------------------------------

def benchmark_eval_set(bench: B.Benchmark, sample_rate: int):
    """The clips as an EvalSet that decodes each file when the evaluator asks for it."""
    from clapjax.audio import io as audio_io
    from clapjax.train.evaluate import EvalSet
    captions = bench.captions or [[""] for _ in bench.files]   # zero-shot sets have none; never embedded
    return EvalSet(bench.name, captions, lambda idx: [audio_io.load_audio(bench.files[i], sample_rate) for i in idx],
                   keys=[os.path.relpath(f, bench.root) for f in bench.files])


def embed_benchmark(bench: B.Benchmark, evaluator, model, model_id: str | None, *, cache_dir: str | None = None):
    """(embeddings (n, D) of the clips that decoded, their indices into bench.files, {index: reason}, cached?).
    `evaluator`: an Evaluator of `benchmark_eval_set(bench, …)` (its batching, mesh, workers, seed, progress).
    `model_id`: the model's `eval_cache.model_identity`, or None to use no cache (nothing read or written)."""
    path = None
    if model_id is not None:
        files = eval_cache.file_list_identity(bench.root, bench.files)
        key = eval_cache.entry_key(model_id, bench.name, bench.root, files, evaluator.seed, evaluator.crop_mode)
        path = eval_cache.entry_path(key, cache_dir)
        hit = eval_cache.load(path)
        if hit is not None:
            return (*hit, True)
    audio, failures = evaluator.embed_audio(model)
    kept = np.asarray([i for i in range(len(bench)) if i not in failures], np.int64)
    embeddings = np.asarray(audio)[kept]
    if path is not None:
        eval_cache.save(path, embeddings, kept, failures)
    return embeddings, kept, failures, False


# --- scoring ------------------------------------------------------------------------------------------

def _format_prompt(template: str, name: str) -> str:
    return template.replace("{}", name)   # not str.format: a user's template may hold other braces


def check_prompt(template: str) -> str:
    if template.count("{}") != 1:
        raise ValueError(f"a prompt template needs exactly one '{{}}' (where the class name goes), got {template!r}")
    return template


def _class_embeddings(embed_texts, classes, template):
    emb = np.asarray(embed_texts([_format_prompt(template, c) for c in classes]))
    return M.class_embeddings(emb[:, None, :])


def score_zero_shot(bench: B.Benchmark, audio, kept, embed_texts, logit_scale, prompt: str | None = None):
    """(metrics, chance, prompts) of a zero-shot benchmark on the kept clips."""
    labels = bench.labels[kept]
    template = check_prompt(prompt) if prompt else bench.prompt
    classes = _class_embeddings(embed_texts, bench.classes, template)
    c = len(bench.classes)
    base = M.chance_levels(c)
    base.update({"mean_rank": (c + 1) / 2, "median_rank": (c + 1) / 2})
    metrics, chance, prompts = {}, {}, {"": template}

    def group(prefix, class_emb, lab, scale=logit_scale):
        m = M.to_python(M.zero_shot_ranking_metrics(audio, class_emb, lab, scale))
        metrics[f"{prefix}num_samples"] = m["num_samples"]
        for k in ZERO_SHOT_KEYS:
            metrics[f"{prefix}{k}"] = m[k]
            chance[f"{prefix}{k}"] = base[k]
    group("", classes, labels)
    if bench.folds is not None:
        folds = bench.folds[kept]
        for f in sorted(set(bench.folds.tolist())):
            if (folds == f).any():
                group(f"fold{f}/", classes, np.where(folds == f, labels, -1))
    if bench.readme is not None:
        fold = bench.readme.fold
        rp = check_prompt(prompt) if prompt else bench.readme.prompt
        prompts[f"readme_fold{fold}/"] = rp
        readme_classes = classes if rp == template else _class_embeddings(embed_texts, bench.classes, rp)
        folds = bench.folds[kept]
        if (folds == fold).any():   # LAION's README ranks audio·text, no logit scale
            group(f"readme_fold{fold}/", readme_classes, np.where(folds == fold, labels, -1), 1.0)
    return metrics, chance, prompts


def audio_to_text_chance(num_clips: int, k: int = B.CAPTIONS_PER_CLIP) -> dict[str, float]:
    """What a uniformly random ranking of the k·N captions scores audio→text: R@r = P(the best of a clip's k
    captions ranks within r), and LAION's mAP@10 (hits numbered in caption order; with the k positions a random
    k-subset, E = [k·H(m)/M + k(k−1)/2 · H(m)(m−1)/(M(M−1))] / k, M = kN, m = min(10, M))."""
    total = k * num_clips
    out = {}
    for r in M.RECALL_AT:
        miss = np.prod([(total - k - j) / (total - j) for j in range(min(r, total))])
        out[f"R@{r}"] = float(1 - miss)
    m = min(M.MAP_CUTOFF, total)
    harmonic = sum(1.0 / (p + 1) for p in range(m))
    pairs = k * (k - 1) / 2 * harmonic * (m - 1) / (total * (total - 1)) if total > 1 else 0.0
    out[f"mAP@{M.MAP_CUTOFF}"] = (k * harmonic / total + pairs) / k
    return out


def score_retrieval(bench: B.Benchmark, audio, kept, embed_texts, logit_scale):
    """(metrics, chance, prompts={}) of a retrieval benchmark on the kept clips: LAION's 5-caption protocol."""
    k = B.CAPTIONS_PER_CLIP
    texts = [c for i in kept for c in bench.captions[i]]
    text = np.asarray(embed_texts(texts))
    metrics = M.to_python(M.clotho_audiocaps_metrics(audio, text, logit_scale, captions_per_clip=k))
    t2a = M.chance_levels(len(kept))   # each caption ranks the N clips
    t2a["median_rank"] = t2a["mean_rank"]
    a2t = audio_to_text_chance(len(kept), k)
    chance = {f"text_to_audio_{key}": v for key, v in t2a.items()}
    chance.update({f"audio_to_text_{key}": v for key, v in a2t.items()})
    return metrics, {key: v for key, v in chance.items() if key in metrics}, {}


def published_figures(model_names: Sequence[str], bench: B.Benchmark, metrics: dict) -> dict[str, published.Figure]:
    """Metric name → LAION's figure, from train/published.py for the first of `model_names` it knows.
    A fold-1 figure (LAION's README protocol) stands beside `readme_fold1/`, any other zero-shot one beside
    the all-clips row."""
    found = {}
    for name in model_names:
        try:
            found = published.figures(name, bench.name)
        except ValueError:   # a path or a name that is no release / repo id
            continue
        if found:
            break
    out = {}
    for key, fig in found.items():
        readme = bench.readme is not None and fig.fold == bench.readme.fold
        name = f"readme_fold{bench.readme.fold}/{key}" if readme else key
        if name in metrics:
            out[name] = fig
    return out


# --- the run ------------------------------------------------------------------------------------------

def run_benchmarks(model_name: str, specs: Sequence[tuple[str, str]], *, tokenizer=None, revision=None,
                   batch_size: int = 32, seed: int = 0, prompts: dict[str, str] | None = None,
                   audiocaps_pattern: str = B.AUDIOCAPS_PATTERN, cache_dir: str | None = None,
                   use_cache: bool = True, workers: int | None = None, progress: bool = True
                   ) -> list[BenchmarkResult]:
    """Score `model_name` (anything `clapjax eval MODEL` takes) on each (benchmark, dataset directory).

    `prompts`: benchmark name → template ('{}' = the class name), '' → every zero-shot benchmark;
    default LAION's. `cache_dir`: the root of the embedding cache (default the conversion cache's root; models
    are converted into the conversion cache as always)."""
    import jax
    from clapjax import saved_model
    from clapjax.convert import pretrained
    from clapjax.train import sharding
    from clapjax.train.evaluate import Evaluator
    prompts = dict(prompts or {})
    names = [B.benchmark_name(n) or n for n, _ in specs]
    for key, template in prompts.items():
        if key and B.benchmark_name(key) is None:
            raise ValueError(f"--prompt names {key!r}, which is no benchmark ({', '.join(B.READERS)})")
        check_prompt(template)
    if len(set(names)) != len(names):
        raise ValueError(f"each benchmark once per command, got {names}")
    benches = [B.read_benchmark(n, p, audiocaps_pattern=audiocaps_pattern) for n, p in specs]
    found = pretrained.find(model_name, revision=revision, tokenizer=tokenizer is None, log=lambda s: None)
    tok = found.choose_tokenizer(tokenizer)
    if tok is None:
        raise pretrained.NoOwnTokenizer(model_name)
    mesh = sharding.make_mesh({"data": -1}, devices=jax.local_devices())   # batches over the local devices
    model = saved_model.restore(found.model_dir, sharding=sharding.replicated(mesh))
    # hashing every file of the model is only needed to key the cache
    model_id = eval_cache.model_identity(found.model_dir) if use_cache else None
    scale = float(np.asarray(Evaluator.logit_scale(model)))
    provenance = saved_model.read_provenance(found.model_dir) or {}
    known_as = [model_name] + ([provenance["name"]] if provenance.get("name") else [])
    results = []
    for bench in benches:
        bar = _progress_bar(bench, progress)
        evaluator = Evaluator(benchmark_eval_set(bench, model.config.frontend.sample_rate), tok,
                              batch_size=batch_size, mesh=mesh, seed=seed, workers=workers,
                              progress=bar.update if bar else None)
        try:
            audio, kept, failures, cached = embed_benchmark(bench, evaluator, model, model_id, cache_dir=cache_dir)
        finally:
            if bar:
                bar.close()
        unreadable = {os.path.relpath(bench.files[i], bench.root): why for i, why in sorted(failures.items())}
        if len(kept) == 0:
            raise ValueError(f"{bench.name}: no clip could be read; first: {next(iter(unreadable.items()))}")

        def embed_texts(texts, evaluator=evaluator):
            return evaluator.embed_texts(model, texts)
        if bench.task == "zero_shot":
            prompt = prompts.get(bench.name, prompts.get(""))
            metrics, chance, used = score_zero_shot(bench, audio, kept, embed_texts, scale, prompt)
        else:
            metrics, chance, used = score_retrieval(bench, audio, kept, embed_texts, scale)
        figures = published_figures(known_as, bench, metrics)
        # a figure's protocol may differ from ours (GTZAN's music releases: another prompt): the table says which
        sources = sorted({f"{f.protocol} ({f.source})" for f in figures.values()})
        results.append(BenchmarkResult(bench.name, bench.root, bench.listed, len(kept), list(bench.missing),
                                       unreadable, used, metrics, chance, {k: f.value for k, f in figures.items()},
                                       sources, cached))
    return results


def _progress_bar(bench: B.Benchmark, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=len(bench), desc=f"{bench.name}: embedding audio", unit="clip", file=sys.stderr,
                leave=False, dynamic_ncols=True)


def format_benchmark(r: BenchmarkResult, max_names: int = 10) -> str:
    """The benchmark's table: metric, value, chance, LAION's published figure (blank where none)."""
    lines = [f"{r.benchmark}: {r.scored} of {r.listed} clips scored ({r.root})"
             + (" [audio embeddings from the cache]" if r.cached else "")]
    for what, names in (("missing", r.missing), ("unreadable", [f"{k} ({v})" for k, v in r.unreadable.items()])):
        if names:
            shown = ", ".join(names[:max_names]) + (f", … ({len(names) - max_names} more)" if len(names) > max_names else "")
            lines.append(f"  {len(names)} {what}, left out of every figure: {shown}")
    for prefix, template in r.prompts.items():
        lines.append(f"  prompt{' (' + prefix.rstrip('/') + ')' if prefix else ''}: {template!r}")
    lines.append(f"  {'metric':<30}{'value':>10}{'chance':>10}{'published':>11}")
    for name, value in r.metrics.items():
        if name.endswith("num_samples"):
            continue
        pub = r.published.get(name)
        chance = r.chance.get(name)
        lines.append(f"  {name:<30}{value:>10.4f}{'' if chance is None else f'{chance:.4f}':>10}"
                     f"{'' if pub is None else f'{pub:.4f}':>11}")
    lines += [f"  published: {where}" for where in r.published_from]
    return "\n".join(lines)


# --- `clapjax eval MODEL BENCH:PATH …` ---------------------------------------------------------------

def benchmark_specs(data: Sequence[str]) -> list[tuple[str, str]] | None:
    """[(benchmark, path)] when every DATA argument is 'BENCH:PATH' with a known benchmark, None when none is;
    a mixture is an error."""
    specs = [(d.split(":", 1)[0], d.split(":", 1)[1]) if ":" in d and B.benchmark_name(d.split(":", 1)[0]) else None
             for d in data]
    if all(s is None for s in specs):
        if len(data) > 1:
            raise ValueError(f"several DATA arguments are only for benchmarks (BENCH:PATH, BENCH one of "
                             f"{', '.join(B.READERS)}); got {list(data)}")
        return None
    bad = [d for d, s in zip(data, specs) if s is None]
    if bad:
        raise ValueError(f"{bad}: not BENCH:PATH with BENCH one of {', '.join(B.READERS)} (a synthetic spec, manifest "
                         "or shards is evaluated alone)")
    return specs


def prompt_overrides(values: Sequence[str]) -> dict[str, str]:
    """--prompt 'T' (every zero-shot benchmark) or --prompt BENCH='T'."""
    out = {}
    for v in values:
        head, sep, tail = v.partition("=")
        if sep and B.benchmark_name(head):
            out[B.benchmark_name(head)] = tail
        else:
            out[""] = v
    return out


def main(args, specs) -> int:
    """`clapjax eval MODEL BENCH:PATH …` (its arguments parsed by train/evaluate.py's main): the tables, --json."""
    results = run_benchmarks(
        args.checkpoint, specs, tokenizer=args.tokenizer, revision=args.revision, batch_size=args.batch_size,
        seed=args.seed, prompts=prompt_overrides(args.prompt), audiocaps_pattern=args.audiocaps_pattern,
        cache_dir=args.cache_dir, use_cache=not args.no_cache, workers=args.workers, progress=not args.no_progress)
    print("\n\n".join(format_benchmark(r) for r in results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({r.benchmark: r.to_json() for r in results}, f, indent=1)
    return 0
