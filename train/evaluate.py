"""Evaluation: retrieval (LAION's metrics, the 5-caption Clotho/AudioCaps protocol) and zero-shot
classification of a model on an evaluation set, sharded over a mesh when one is given.

    ev = Evaluator(EvalSet.from_synthetic(heldout_set), tokenizer, batch_size=64, mesh=mesh)
    result = ev(model)          # result.metrics: {'audio_to_text_R@1': …, 'zero_shot/kind/top1': …}
    print(format_table(result))

Clips are prepared as in training (int16 round trip, crop/fill, fusion mel) with a fixed per-clip
seed, so an evaluation is deterministic. Embeddings are computed in fixed-size global batches (the
tail padded, so one compile serves all); with a mesh each process feeds its rows of every batch and
the embeddings stay global, batch-sharded arrays; the metrics (train/metrics.py) run on them under
jit (rows whose ground truth ties are re-ranked on the host, as torch sorts them) and return scalars.

Retrieval uses the Clotho/AudioCaps protocol when every clip has the same K > 1 captions, else LAION's
`get_metrics` on each clip's first caption. Zero-shot tasks embed each class name through every
prompt template and average (LAION's zero-shot classifier).

Sets whose captions cannot tell some clips apart (the synthetic set: a caption names a clip's
attributes, and many clips share all of them) carry `groups`, one id per clip for "described
identically". Strict R@1 then has a ceiling below 1: a perfect model ranks the right group first and
can only guess within it. The evaluator adds that ceiling (`*_R@1_ceiling`, exact for the set) and
`*_attribute_match@1`: the top-ranked item belongs to the query's group (what a perfect model scores
1.0 on), each with its chance level.

`clapjax eval MODEL DATA` evaluates one such set; `clapjax eval MODEL BENCH:PATH …` the papers' benchmarks
(train/benchmark_sets.py reads them, train/benchmark_run.py scores them through `Evaluator.embed_audio`).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import sys
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clapjax.audio import io as audio_io
from clapjax.train import metrics as M

log = logging.getLogger("clapjax.train.evaluate")
DEFAULT_TEMPLATES = ("the sound of {}", "{}", "a recording of {}")


@dataclasses.dataclass
class ZeroShotTask:
    classes: Sequence[str]
    labels: np.ndarray                  # (num_clips,) class index, −1 where the task does not apply
    templates: Sequence[str] = DEFAULT_TEMPLATES


@dataclasses.dataclass
class EvalSet:
    """Clips (any length, at the front end's rate) with their captions and optional zero-shot tasks."""

    name: str
    captions: list[list[str]]
    audio: Callable[[Sequence[int]], Sequence[np.ndarray]]     # clip indices → waveforms
    zero_shot: dict[str, ZeroShotTask] = dataclasses.field(default_factory=dict)
    keys: list[str] | None = None
    groups: np.ndarray | None = None    # (num_clips,) id: clips whose captions describe them identically

    def __len__(self) -> int:
        return len(self.captions)

    @classmethod
    def from_synthetic(cls, ds, tasks: Sequence[str] | None = None, name: str | None = None) -> "EvalSet":
        """A `clapjax.synthetic.SyntheticSet`; `tasks` defaults to every zero-shot task it has labels for."""
        from clapjax import synthetic as S
        tasks = list(S.ZERO_SHOT_CLASSES) if tasks is None else list(tasks)
        zs = {}
        for t in tasks:
            labels = ds.labels(t)
            if (labels >= 0).any():
                zs[t] = ZeroShotTask(S.ZERO_SHOT_CLASSES[t], labels, S.PROMPT_TEMPLATES)
        return cls(name or f"synthetic-{ds.split}", [list(c) for c in ds.captions],
                   lambda idx: list(ds.waveforms(idx)), zs, [ds.key(i) for i in range(len(ds))],
                   ds.description_groups())

    @classmethod
    def from_source(cls, source, sample_rate: int, name: str | None = None) -> "EvalSet":
        """Every readable record of a data source (tar shards, manifest), all its captions kept; bad
        records are skipped and logged by key."""
        from clapjax.train.data_sources import captions, decode
        waves, caps, keys = [], [], []
        for r in range(source.num_records):
            raw = source.read(r)
            try:
                texts = captions(raw) if not raw.problem else None
                x = decode(raw, sample_rate)
            except ValueError as err:
                log.warning("evaluation set: skipping bad sample %s: %s", raw.key, err)
                continue
            waves.append(x)
            caps.append(texts)
            keys.append(raw.key)
        if not waves:
            raise ValueError(f"evaluation set {name or source.name}: no readable sample")
        return cls(name or source.name, caps, lambda idx: [waves[i] for i in idx], {}, keys)


def r1_ceiling(groups: np.ndarray, captions_per_clip: Sequence[int]) -> dict[str, float]:
    """Expected strict R@1 of a perfect attribute-level model that breaks ties at random.

    text→audio: a caption of clip i ties with every clip of i's group, so it ranks i first with
    probability 1/|group|. audio→text (best of a clip's captions): all captions of the group tie, so
    the top one is the clip's own with probability K_i / Σ_group K_j."""
    groups = np.asarray(groups)
    k = np.asarray(captions_per_clip, np.float64)
    if groups.shape != k.shape:
        raise ValueError(f"groups {groups.shape} and captions per clip {k.shape} must have one entry per clip")
    _, inverse, sizes = np.unique(groups, return_inverse=True, return_counts=True)
    captions_in_group = np.bincount(inverse, weights=k)
    return {"text_to_audio_R@1_ceiling": float((k / sizes[inverse]).sum() / k.sum()),
            "audio_to_text_R@1_ceiling": float(np.mean(k / captions_in_group[inverse]))}


@jax.jit
def attribute_match_top1(audio: jax.Array, text: jax.Array, clip_groups: jax.Array, text_groups: jax.Array):
    """Share of queries whose top-ranked item has the query's group, both ways."""
    sims = M.logits(audio, text)                                      # (N, T)
    a2t = text_groups[jnp.argmax(sims, axis=1)] == clip_groups
    t2a = clip_groups[jnp.argmax(sims, axis=0)] == text_groups
    return {"text_to_audio_attribute_match@1": t2a.mean(), "audio_to_text_attribute_match@1": a2t.mean()}


@dataclasses.dataclass
class EvalResult:
    metrics: dict[str, float]
    chance: dict[str, float]
    audio_embeddings: np.ndarray | None = None    # (N, D), host copies (single process)
    text_embeddings: np.ndarray | None = None     # (N·K, D)


@functools.lru_cache(maxsize=4)
def _model_functions(graphdef) -> dict:
    """The jitted embedding, scale and concatenation functions of one model structure, shared by every
    Evaluator (one compile per structure and batch shape, however many evaluation sets)."""
    from clapjax.embedding import embedding_functions
    audio_fn, text_fn = embedding_functions(graphdef)

    @jax.jit
    def scale_fn(state):
        return jnp.exp(nnx.merge(graphdef, state).logit_scale_a[...])
    return {"audio": audio_fn, "text": text_fn, "scale": scale_fn,
            "concat": jax.jit(lambda parts, n: jnp.concatenate(parts)[:n], static_argnums=1)}


class Evaluator:
    """Evaluates models on one EvalSet; compiled functions are reused across calls (periodic eval).

    Clips are decoded and prepared on `workers` threads (default: the usable cores; 0: in the caller's
    thread), at most `prefetch_batches` batches ahead of the device, so memory holds a window of batches,
    never the set; `progress(clips)` is called after each batch is embedded."""

    def __init__(self, eval_set: EvalSet, tokenizer, *, batch_size: int = 64, mesh=None, seed: int = 0,
                 crop_mode: str = "random", a2t_map: str = "laion", keep_embeddings: bool = False,
                 workers: int | None = 0, prefetch_batches: int = 2,
                 progress: Callable[[int], None] | None = None):
        if len(eval_set) == 0:
            raise ValueError("empty evaluation set")
        if prefetch_batches < 1:
            raise ValueError(f"prefetch_batches must be at least 1, got {prefetch_batches}")
        self.set, self.tokenizer, self.mesh, self.seed = eval_set, tokenizer, mesh, seed
        self.crop_mode, self.a2t_map, self.keep = crop_mode, a2t_map, keep_embeddings
        self.workers, self.prefetch, self.progress = workers, prefetch_batches, progress
        shards = 1
        if mesh is not None:
            from clapjax.train import sharding
            shards = int(np.lcm(sharding.num_batch_shards(mesh), jax.process_count()))
        self.batch_size = -(-batch_size // shards) * shards      # a multiple of the batch shards

    # --- host-side batches --------------------------------------------------------------------------
    def _batch_plan(self, count: int) -> list[list[int]]:
        """This process's rows of each global batch of items 0…count−1 (the tail padded with its last item)."""
        p, n = (jax.process_index(), jax.process_count()) if self.mesh is not None else (0, 1)
        rows = self.batch_size // n
        plan = []
        for start in range(0, count, self.batch_size):
            idx = list(range(start, min(count, start + self.batch_size)))
            idx += [idx[-1]] * (self.batch_size - len(idx))
            plan.append(idx[p * rows:(p + 1) * rows])
        return plan

    def _clip(self, i: int, frontend, fused: bool) -> dict:
        # one generator per item (not per batch), so an item's crop does not depend on the batching
        (w,) = self.set.audio([i])
        return audio_io.clip_features(audio_io.quantize_int16(np.asarray(w, np.float32)), frontend, fused,
                                      np.random.default_rng((self.seed, i)), crop_mode=self.crop_mode)

    def _audio_batches(self, plan: list[list[int]], frontend, fused: bool, failures: dict[int, str]):
        """The stacked audio input of each planned batch; each item is prepared once, on the worker threads,
        in a window of `prefetch_batches` batches. An item that cannot be read is recorded in `failures`
        (index → reason) and takes the features of a silent clip, so the batch keeps its shape."""
        from clapjax.audio.stream import Failed, ordered_map
        order = list(dict.fromkeys(i for rows in plan for i in rows))    # ascending: each item once
        window = self.prefetch * max(len(plan[0]), 1) if plan else 1
        source = zip(order, ordered_map(lambda i: self._clip(i, frontend, fused), order, workers=self.workers,
                                        window=window))
        silent = None
        for rows in plan:
            ready: dict[int, dict] = {}
            while rows[-1] not in ready:          # rows ascend; padding repeats the last
                j, out = next(source)
                if isinstance(out, Failed):
                    failures[j] = out.reason
                    if silent is None:
                        silent = audio_io.clip_features(np.zeros(frontend.clip_samples, np.float32), frontend,
                                                        fused, np.random.default_rng(0))
                    out = silent
                ready[j] = out
            yield audio_io.stack_audio_input([ready[i] for i in rows], fused)

    def _embed(self, fn, state, batches) -> list[jax.Array]:
        """Embeddings of each batch (this process's rows of a global batch); with a mesh they are global,
        batch-sharded arrays."""
        parts = []
        for batch in batches:
            if self.mesh is not None:
                from clapjax.train import sharding
                batch = sharding.global_batch_from_local(batch, self.mesh)
            parts.append(fn(state, batch))
        return parts

    def embed_audio(self, model) -> tuple[jax.Array, dict[int, str]]:
        """(N, D) embeddings of every clip and {clip index: why it could not be read}; an unreadable clip's
        row is a silent clip's embedding (callers drop or refuse it)."""
        graphdef, state = nnx.split(model)
        fns = _model_functions(graphdef)
        cfg, n, failures = model.config, len(self.set), {}
        parts = []
        for part in self._embed(fns["audio"], state, self._audio_batches(self._batch_plan(n), cfg.frontend,
                                                                         cfg.enable_fusion, failures)):
            parts.append(part)
            if self.progress is not None:
                self.progress(min(self.batch_size, n - (len(parts) - 1) * self.batch_size))
        return fns["concat"](parts, n), failures

    def embed_texts(self, model, texts: Sequence[str]) -> jax.Array:
        """(len(texts), D) text embeddings, in the same fixed-size batches."""
        graphdef, state = nnx.split(model)
        batches = (self.tokenizer([texts[i] for i in rows]) for rows in self._batch_plan(len(texts)))
        fns = _model_functions(graphdef)
        return fns["concat"](self._embed(fns["text"], state, batches), len(texts))

    @staticmethod
    def logit_scale(model) -> jax.Array:
        """exp(logit_scale_a): what LAION's retrieval logits are scaled by."""
        graphdef, state = nnx.split(model)
        return _model_functions(graphdef)["scale"](state)

    def _group_metrics(self, audio, text, k: int) -> dict[str, float]:
        groups = np.asarray(self.set.groups)
        if groups.shape != (len(self.set),):
            raise ValueError(f"evaluation set {self.set.name}: groups has shape {groups.shape}, "
                             f"expected one id per clip ({len(self.set)},)")
        out = r1_ceiling(groups, [k] * len(groups))
        match = attribute_match_top1(audio, text, jnp.asarray(groups), jnp.asarray(np.repeat(groups, k)))
        out.update(M.to_python(match))
        return out

    # --- the evaluation ------------------------------------------------------------------------------
    def __call__(self, model) -> EvalResult:
        n = len(self.set)
        audio, failures = self.embed_audio(model)
        if failures:
            names = [self.set.keys[i] if self.set.keys else str(i) for i in sorted(failures)]
            raise ValueError(f"evaluation set {self.set.name}: {len(failures)} clips could not be read: "
                             + "; ".join(f"{k}: {failures[i]}" for k, i in zip(names[:5], sorted(failures))))
        counts = {len(c) for c in self.set.captions}
        k = counts.pop() if len(counts) == 1 else 1
        texts = [c for caps in self.set.captions for c in caps] if k > 1 else [c[0] for c in self.set.captions]
        text = self.embed_texts(model, texts)
        scale = self.logit_scale(model)
        if k > 1:
            metrics = M.to_python(M.clotho_audiocaps_metrics(audio, text, scale, captions_per_clip=k,
                                                             a2t_map=self.a2t_map))
        else:
            metrics = M.to_python(M.retrieval_metrics(audio, text, scale))
        chance = {f"retrieval/{key}": v for key, v in M.chance_levels(n).items()}
        if self.set.groups is not None:
            metrics.update(self._group_metrics(audio, text, k))
            share = np.unique(self.set.groups, return_counts=True)[1]
            chance["retrieval/attribute_match@1"] = float((share ** 2).sum() / n ** 2)  # a random pick's group
        for name, task in self.set.zero_shot.items():
            prompts = [t.format(c) for c in task.classes for t in task.templates]
            emb = self.embed_texts(model, prompts)
            classes = M.class_embeddings(emb.reshape(len(task.classes), len(task.templates), -1))
            zs = M.zero_shot_metrics(audio, classes, jnp.asarray(task.labels, jnp.int32))
            metrics.update(M.to_python(zs, prefix=f"zero_shot/{name}/"))
            c = len(task.classes)
            chance.update({f"zero_shot/{name}/top1": 1 / c, f"zero_shot/{name}/top5": min(5, c) / c})
        out = EvalResult(metrics, chance)
        if self.keep and jax.process_count() == 1:
            out.audio_embeddings, out.text_embeddings = np.asarray(audio), np.asarray(text)
        return out


def format_table(result: EvalResult, title: str = "") -> str:
    """R@1 / R@5 / mAP@10 both ways and zero-shot accuracy, each beside its chance level."""
    m, c = result.metrics, result.chance
    lines = [title] if title else []
    lines.append(f"{'metric':<34}{'value':>9}{'chance':>9}{'× chance':>10}")

    def row(name, value, base):
        ratio = f"{value / base:>10.1f}" if base else f"{'':>10}"
        lines.append(f"{name:<34}{value:>9.4f}{base:>9.4f}{ratio}")
    for d in ("text_to_audio", "audio_to_text"):
        for k in ("R@1", "R@5", "mAP@10", "attribute_match@1"):
            if f"{d}_{k}" in m:
                row(f"{d} {k}", m[f"{d}_{k}"], c[f"retrieval/{k}"])
        if f"{d}_R@1_ceiling" in m:
            lines.append(f"{d + ' R@1 ceiling':<34}{m[f'{d}_R@1_ceiling']:>9.4f}   (a perfect model, "
                         f"guessing among identically described clips)")
    for key in sorted(k for k in m if k.startswith("zero_shot/") and k.endswith(("top1", "top5"))):
        row(key.replace("zero_shot/", "zero-shot "), m[key], c[key])
    return "\n".join(lines)


# --- `clapjax eval CKPT DATA` -----------------------------------------------------------------------

def eval_set_from_spec(spec: str, sample_rate: int, clip_samples: int) -> EvalSet:
    """'synthetic[:split[:n[:seed]]]', a manifest (.jsonl/.csv), or tar shards (dir, glob, brace range)."""
    if spec.startswith("synthetic"):
        from clapjax import synthetic as S
        parts = spec.split(":")[1:]
        split = parts[0] if parts else "heldout"
        n = int(parts[1]) if len(parts) > 1 else 256
        seed = int(parts[2]) if len(parts) > 2 else 0
        return EvalSet.from_synthetic(S.synthetic_dataset(seed, n, split, sample_rate=sample_rate,
                                                          clip_samples=clip_samples))
    from clapjax.train.data_sources import Manifest, TarShards
    source = Manifest(spec) if spec.endswith((".jsonl", ".json", ".csv")) else TarShards(spec)
    return EvalSet.from_source(source, sample_rate)


def main(argv: Sequence[str] | None = None) -> int:
    from clapjax.train.benchmark_sets import AUDIOCAPS_PATTERN
    p = argparse.ArgumentParser(prog="clapjax eval", description="retrieval and zero-shot metrics of a model: on "
                                "a data set (synthetic, manifest, shards) or on the papers' benchmarks (BENCH:PATH)")
    p.add_argument("checkpoint", metavar="MODEL", help="a clapjax model directory (`clapjax convert`, a training "
                   "export), a laion .pt, an HF ClapModel directory or .safetensors, an HF repo id or a laion release name")
    p.add_argument("data", nargs="+", metavar="DATA", help="'synthetic[:split[:n[:seed]]]', a manifest .jsonl/.csv, "
                   "tar shards; or one or more BENCH:PATH, BENCH one of esc50, urbansound8k, gtzan, clotho, audiocaps "
                   "and PATH the directory its release unpacks to (docs/evaluating.md)")
    p.add_argument("--tokenizer", help="tokenizer directory (vocab.json + merges.txt, …); default: the model's own")
    p.add_argument("--revision", help="the Hub commit, branch or tag of a repo id")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="per-clip crop seed")
    p.add_argument("--json", help="also write the metrics here (benchmarks: one object per benchmark)")
    b = p.add_argument_group("benchmarks")
    b.add_argument("--prompt", action="append", default=[], metavar="[BENCH=]TEMPLATE",
                   help="zero-shot prompt, '{}' = the class name, for every zero-shot benchmark or for BENCH "
                   "(default LAION's: 'This is a sound of {}.', GTZAN 'This is a {} song.')")
    b.add_argument("--audiocaps-pattern", default=AUDIOCAPS_PATTERN,
                   help="AudioCaps clip file names under PATH, from {youtube_id} and {start_time}")
    b.add_argument("--cache-dir", help="root of the audio-embedding cache (default: the conversion cache's)")
    b.add_argument("--no-cache", action="store_true", help="embed the audio again; read and write no cache")
    b.add_argument("--workers", type=int, help="audio decoding threads (default: the usable cores)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    from clapjax.train import benchmark_run
    specs = benchmark_run.benchmark_specs(args.data)
    if specs is not None:
        return benchmark_run.main(args, specs)
    from clapjax import saved_model
    from clapjax.convert import pretrained
    found = pretrained.find(args.checkpoint, revision=args.revision, tokenizer=args.tokenizer is None,
                            log=lambda s: None)
    model = saved_model.restore(found.model_dir)
    fe = model.config.frontend
    tok = found.choose_tokenizer(args.tokenizer)
    if tok is None:
        raise pretrained.NoOwnTokenizer(args.checkpoint)
    es = eval_set_from_spec(args.data[0], fe.sample_rate, fe.clip_samples)
    result = Evaluator(es, tok, batch_size=args.batch_size, seed=args.seed)(model)
    print(format_table(result, f"{es.name}: {len(es)} clips"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"metrics": result.metrics, "chance": result.chance}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
