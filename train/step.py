"""The jitted, functional train step and the train state it maps.

The model is split once into a `ModelTemplate` (graphdef + the abstract Variables) and flat
`{dotted.path: array}` dicts; the train state is a plain dict of arrays, so sharding, the optimizer,
Orbax and resharding on restore all see ordinary pytrees:

    state = {'params': {...}, 'batch_stats': {...}, 'opt_state': optax state,
             'step': int32, 'rng': uint32[2] key data, 'nonfinite_streak': int32, 'nonfinite_total': int32}

`params` also holds the loss's own parameters under `loss.` (SigLIP's log temperature and bias).

One step (LAION's train_one_epoch body): key = fold_in(rng, step); towers in train mode
(`deterministic=False`: dropout, drop-path, SpecAugment, BatchNorm batch statistics); the loss
in float32; optax update; the log logit scales clamped to [0, ln 100]. If the loss or any gradient
is not finite the whole state except `step` and the counters is left as it was (`nonfinite_*`
count it; the loop stops after `train.max_nonfinite_in_row`), so a checkpoint never holds a
non-finite value.

Gradient accumulation (`optim.accum_steps = k > 1`) is GradCache: embed the k micro-batches
without gradients, take the loss and its gradient with respect to all B embeddings (every
negative of the global batch is kept), then re-run each micro-batch forward and pull its slice of
the embedding gradient back through the towers (vjp), summing parameter gradients. Peak activation
memory is one micro-batch. Each micro-batch takes a contiguous piece of every device's rows, so
splitting and re-joining the batch moves no data between devices; the embeddings are re-joined in
a different row order than the batch, which the contrastive losses do not see (they are invariant
to permuting pairs).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from clapjax.audio.io import audio_input_keys
from clapjax.model import CLAPConfig, CLAPModel
from clapjax.train import losses, optim, sharding

Flat = dict[str, jax.Array]


# --- the split model -------------------------------------------------------------------------------

def path_key(path) -> str:
    return ".".join(str(p) for p in path)


@dataclasses.dataclass(frozen=True)
class ModelTemplate:
    """What is static about the model: its graphdef and each variable's path, type and metadata."""

    graphdef: Any
    params: Mapping[str, tuple[tuple, nnx.Variable]]
    batch_stats: Mapping[str, tuple[tuple, nnx.Variable]]
    config: CLAPConfig

    @classmethod
    def from_model(cls, model: CLAPModel) -> "ModelTemplate":
        graphdef, params, stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
        other = [path_key(p) for p, _ in nnx.to_flat_state(rest)]
        if other:
            raise ValueError(f"the model holds variables that are neither Param nor BatchStat: {other[:5]}")
        return cls(graphdef, {path_key(p): (tuple(p), v) for p, v in nnx.to_flat_state(params)},
                   {path_key(p): (tuple(p), v) for p, v in nnx.to_flat_state(stats)}, model.config)

    @classmethod
    def abstract(cls, cfg: CLAPConfig) -> "ModelTemplate":
        return cls.from_model(nnx.eval_shape(lambda: CLAPModel(cfg, nnx.Rngs(0))))

    def kinds(self) -> dict[str, type]:
        return {k: type(v) for k, (_, v) in self.params.items()}

    def merge(self, params: Mapping[str, jax.Array], batch_stats: Mapping[str, jax.Array]) -> CLAPModel:
        p = nnx.from_flat_state({path: var.replace(params[k]) for k, (path, var) in self.params.items()})
        s = nnx.from_flat_state({path: var.replace(batch_stats[k])
                                      for k, (path, var) in self.batch_stats.items()})
        return nnx.merge(self.graphdef, p, s)

    def abstract_state(self) -> nnx.State:
        """The model's variables as one nnx State (Params and BatchStats, with their metadata)."""
        both = {**{p: v for p, v in self.params.values()}, **{p: v for p, v in self.batch_stats.values()}}
        return nnx.from_flat_state(both)


def flatten_state(state: nnx.State) -> tuple[Flat, Flat]:
    """An nnx State of the model → (params, batch_stats) flat dicts of arrays."""
    params, stats = {}, {}
    for path, var in nnx.to_flat_state(state):
        (params if isinstance(var, nnx.Param) else stats)[path_key(path)] = var.get_value()
    return params, stats


def batch_stats_of(model: nnx.Module) -> Flat:
    return {path_key(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.BatchStat))}


# --- forward pieces --------------------------------------------------------------------------------

def model_inputs(model_cfg: CLAPConfig, batch: Mapping[str, jax.Array]) -> tuple[dict, dict]:
    """(audio, text) dicts for `CLAPModel` from a batch dict (the data pipeline's keys)."""
    need = audio_input_keys(model_cfg.enable_fusion)
    missing = [k for k in need + ("input_ids",) if k not in batch]
    if missing:
        raise ValueError(f"batch lacks {missing}; it has {sorted(batch)}")
    audio = {k: batch[k] for k in need}
    text = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
    return audio, text


def step_rngs(key: jax.Array) -> nnx.Rngs:
    k_drop, k_aug, k_default = jax.random.split(key, 3)
    return nnx.Rngs(default=k_default, dropout=k_drop, augment=k_aug)


def embed(template: ModelTemplate, params: Flat, batch_stats: Flat, batch, key) -> tuple[tuple, Flat]:
    """Train-mode forward: ((audio, text, audio_mlp, text_mlp) in f32, updated batch stats)."""
    model = template.merge(params, batch_stats)
    audio, text = model_inputs(template.config, batch)
    a, t, a_mlp, t_mlp, _, _ = model(audio, text, deterministic=False, rngs=step_rngs(key))
    feats = tuple(x.astype(jnp.float32) for x in (a, t) + ((a_mlp, t_mlp) if a_mlp is not None else ()))
    return feats, batch_stats_of(model)


def loss_from_features(name: str, feats: tuple, params: Flat, mesh) -> jax.Array:
    """The configured loss (`losses.LOSSES`) on global embeddings; scales read from `params` (log form)."""
    return losses.LOSSES[name].fn(feats, params, mesh)


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _select(pred, new, old):
    return jax.tree.map(lambda n, o: jnp.where(pred, n, o), new, old)


# --- gradients -------------------------------------------------------------------------------------

def _micro_batches(batch, k: int, shards: int, mesh):
    """(B, …) → (k, B/k, …): micro-batch j = the j-th contiguous piece of every device's rows."""
    def split(x):
        b = x.shape[0]
        if b % (shards * k):
            raise ValueError(f"batch {b} is not divisible by {shards} batch shards × {k} micro-batches")
        y = x.reshape((shards, k, b // (shards * k)) + x.shape[1:]).swapaxes(0, 1)
        y = y.reshape((k, b // k) + x.shape[1:])
        return sharding.constrain(y, (None, "batch") + (None,) * (x.ndim - 1), mesh)
    return jax.tree.map(split, batch)


def grads_direct(template, loss_name, mesh, params, batch_stats, batch, key):
    def loss_fn(p):
        feats, stats = embed(template, p, batch_stats, batch, key)
        return loss_from_features(loss_name, feats, p, mesh), stats
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, grads, stats


def grads_gradcache(template, loss_name, mesh, params, batch_stats, batch, key, k: int):
    """GradCache: all negatives kept, activation memory of one micro-batch."""
    micro = _micro_batches(batch, k, sharding.num_batch_shards(mesh), mesh)
    keys = jax.vmap(lambda j: jax.random.fold_in(key, j))(jnp.arange(k))
    frozen_params = jax.lax.stop_gradient(params)

    def embed_pass(stats, xs):
        mb, kj = xs
        feats, stats = embed(template, frozen_params, stats, mb, kj)
        return stats, feats
    # BatchNorm in train mode normalises with the micro-batch's own statistics, so re-running a
    # micro-batch with the initial running stats (pass 2) gives the pass-1 outputs exactly; the
    # running stats advance once per micro-batch, here.
    new_stats, feats = jax.lax.scan(embed_pass, batch_stats, (micro, keys))   # each (k, m, d)

    def join(f):   # (k, m, d) → (m·k, d): device-local rows stay on their device
        return sharding.constrain(f.swapaxes(0, 1).reshape((-1, f.shape[-1])), ("batch", None), mesh)

    def unjoin(g, like):
        return g.reshape((like.shape[1], like.shape[0], like.shape[2])).swapaxes(0, 1)

    def loss_of(flat_feats, p):
        return loss_from_features(loss_name, flat_feats, p, mesh)
    joined = tuple(join(f) for f in feats)
    loss, (g_feats, g_direct) = jax.value_and_grad(loss_of, argnums=(0, 1))(joined, params)
    g_feats = tuple(unjoin(g, f) for g, f in zip(g_feats, feats))

    def pull(acc, xs):
        mb, kj, gf = xs
        _, vjp = jax.vjp(lambda p: embed(template, p, batch_stats, mb, kj)[0], params)
        (g,) = vjp(gf)
        return jax.tree.map(jnp.add, acc, g), None
    grads, _ = jax.lax.scan(pull, g_direct, (micro, keys, g_feats))
    return loss, grads, new_stats


# --- the step --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StepSettings:
    loss: str = "clip"
    accum_steps: int = 1
    total_steps: int = 1
    optim: Any = None            # the config's optim section (for the logged learning rate)
    compiler_options: Mapping | None = None   # XLA options for every compile (e.g. faster CPU compiles)

    @classmethod
    def from_config(cls, cfg) -> "StepSettings":
        return cls(loss=cfg.loss.name, accum_steps=int(cfg.optim.accum_steps), total_steps=int(cfg.train.steps),
                   optim=cfg.optim, compiler_options=dict(cfg.compiler_options) or None)


def train_step_fn(template: ModelTemplate, tx: optax.GradientTransformation, mesh, settings: StepSettings,
                  frozen: Mapping[str, bool] | None = None) -> Callable:
    """The pure step `(state, batch) -> (state, metrics)` (not jitted; see `make_train_step`)."""
    frozen = dict(frozen or {})

    def step(state, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        params = {k: jax.lax.stop_gradient(v) if frozen.get(k) else v for k, v in state["params"].items()}
        if settings.accum_steps > 1:
            loss, grads, stats = grads_gradcache(template, settings.loss, mesh, params, state["batch_stats"],
                                                 batch, key, settings.accum_steps)
        else:
            loss, grads, stats = grads_direct(template, settings.loss, mesh, params, state["batch_stats"],
                                              batch, key)
        finite = jnp.isfinite(loss) & _all_finite(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_params = optim.clamp_logit_scales(optax.apply_updates(state["params"], updates))
        streak = jnp.where(finite, 0, state["nonfinite_streak"] + 1).astype(jnp.int32)
        new_state = {
            "params": _select(finite, new_params, state["params"]),
            "batch_stats": _select(finite, stats, state["batch_stats"]),
            "opt_state": _select(finite, opt_state, state["opt_state"]),
            "step": state["step"] + 1,
            "rng": state["rng"],
            "nonfinite_streak": streak,
            "nonfinite_total": state["nonfinite_total"] + (~finite).astype(jnp.int32),
        }
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "finite": finite,
                   "nonfinite_streak": streak, "nonfinite_total": new_state["nonfinite_total"],
                   "scale_a": jnp.exp(new_state["params"].get("logit_scale_a", jnp.zeros(()))),
                   "scale_t": jnp.exp(new_state["params"].get("logit_scale_t", jnp.zeros(())))}
        if settings.optim is not None:
            # the rate this update used: optax counts applied updates only (a skipped step reverts it)
            applied = state["step"] - state["nonfinite_total"]
            metrics["lr"] = optim.learning_rate(settings.optim, settings.total_steps, applied)
        return new_state, metrics
    return step


def make_train_step(template: ModelTemplate, tx, mesh, settings: StepSettings, state_shardings,
                    frozen: Mapping[str, bool] | None = None, donate: bool = True) -> Callable:
    """`jax.jit` of the step with the state's shardings in and out, the batch sharded over the batch
    axes, metrics replicated, and the old state donated."""
    fn = train_step_fn(template, tx, mesh, settings, frozen)
    batch_sh, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    return jax.jit(fn, in_shardings=(state_shardings, batch_sh), out_shardings=(state_shardings, rep),
                   donate_argnums=(0,) if donate else (), compiler_options=settings.compiler_options or None)


# --- the state -------------------------------------------------------------------------------------

def loss_param_init(cfg) -> dict[str, float]:
    """The loss's own parameters at their configured initial values (only SigLIP has any)."""
    own = losses.LOSSES[cfg.loss.name].own_params
    if not own:
        return {}
    log_t, bias = own
    return {log_t: float(cfg.loss.siglip_init_log_t), bias: float(cfg.loss.siglip_init_bias)}


def _flat_shardings(state_tree) -> dict:
    """A sharding State (from sharding.state_shardings) → {dotted.path: NamedSharding}."""
    return {path_key(p): v.get_value() if isinstance(v, nnx.Variable) else v for p, v in nnx.to_flat_state(state_tree)}


def _optimizer_shardings(opt_abs, params_abs: Mapping, param_sh: Mapping, rep):
    """Moments shard like their parameter (found by the flat dict key on the leaf's path, same
    shape); counts and other scalars are replicated. Works through masked / multi-transform
    states, whose frozen entries hold no leaf."""
    def pick(path, leaf):
        for entry in reversed(path):
            name = getattr(entry, "key", None)
            if isinstance(name, str) and name in params_abs:
                return param_sh[name] if tuple(leaf.shape) == tuple(params_abs[name].shape) else rep
        return rep
    return jax.tree_util.tree_map_with_path(pick, opt_abs)


@dataclasses.dataclass
class Setup:
    """Everything static about a run: the split model, optimizer, mesh and the state's shardings."""

    template: ModelTemplate
    tx: optax.GradientTransformation
    mesh: Any
    rules: Mapping
    shardings: dict                    # same structure as the train state
    abstract: dict                     # ShapeDtypeStructs (with shardings) of the train state
    frozen: dict[str, bool]
    settings: StepSettings


def build_setup(cfg, model_cfg: CLAPConfig, mesh) -> Setup:
    """Abstract train state and its shardings; allocates nothing."""
    rules = sharding.RULES[cfg.mesh.rules]
    template = ModelTemplate.abstract(model_cfg)
    model_sh = _flat_shardings(sharding.state_shardings(template.abstract_state(), mesh, rules))
    rep = sharding.replicated(mesh)
    loss_init = loss_param_init(cfg)
    params_abs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, (_, v) in template.params.items()}
    params_abs.update({k: jax.ShapeDtypeStruct((), jnp.float32) for k in loss_init})
    param_sh = {k: model_sh.get(k, rep) for k in params_abs}
    stats_abs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, (_, v) in template.batch_stats.items()}
    stats_sh = {k: model_sh[k] for k in stats_abs}
    tx = optim.make_optimizer(cfg.optim, int(cfg.train.steps), params_abs, template.kinds())
    opt_abs = jax.eval_shape(tx.init, params_abs)
    opt_sh = _optimizer_shardings(opt_abs, params_abs, param_sh, rep)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    abstract = {"params": params_abs, "batch_stats": stats_abs, "opt_state": opt_abs, "step": scalar,
                "rng": jax.ShapeDtypeStruct((2,), jnp.uint32), "nonfinite_streak": scalar, "nonfinite_total": scalar}
    shardings = {"params": param_sh, "batch_stats": stats_sh, "opt_state": opt_sh, "step": rep, "rng": rep,
                 "nonfinite_streak": rep, "nonfinite_total": rep}
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return Setup(template, tx, mesh, rules, shardings, abstract, optim.frozen_mask(cfg.optim, params_abs),
                 StepSettings.from_config(cfg))


def init_state(setup: Setup, cfg, model_cfg: CLAPConfig, seed: int) -> dict:
    """A fresh train state, created already sharded (one jit with out_shardings)."""
    loss_init = loss_param_init(cfg)

    def init():
        model = CLAPModel(model_cfg, nnx.Rngs(seed))
        params, stats = flatten_state(nnx.state(model))
        params.update({k: jnp.asarray(v, jnp.float32) for k, v in loss_init.items()})
        zero = jnp.zeros((), jnp.int32)
        return {"params": params, "batch_stats": stats, "opt_state": setup.tx.init(params), "step": zero,
                "rng": jax.random.key_data(jax.random.key(seed + 1)), "nonfinite_streak": zero,
                "nonfinite_total": zero}
    return jax.jit(init, out_shardings=setup.shardings, compiler_options=setup.settings.compiler_options)()


def train_step(setup: Setup, donate: bool = True) -> Callable:
    return make_train_step(setup.template, setup.tx, setup.mesh, setup.settings, setup.shardings, setup.frozen,
                           donate)


def param_count(state: Mapping) -> int:
    return int(sum(math.prod(np.shape(x)) for x in jax.tree.leaves(state["params"])))
