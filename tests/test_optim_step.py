"""Optimizer (LAION's AdamW recipe), config files/overrides and the jitted train step (issue 5).

The optimizer is compared with torch.optim.AdamW driven by LAION's own `cosine_lr` and weight-decay
split; the step runs the tiny CLAP (train/configs/tiny.py) on 8 CPU devices: logit-scale clamp,
frozen tower, non-finite batch skipped with the state unchanged, GradCache accumulation equal to
the gradient of the loss over every micro-batch's embeddings, bf16 compute keeping f32 state.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference as ref
from clapjax.train import config as C
from clapjax.train import optim, sharding
from clapjax.train import step as S
from clapjax.train.batches import RandomBatches

FAST_COMPILE = "compiler_options.xla_backend_optimization_level=0"  # CPU compiles ~5× faster


# --- config ----------------------------------------------------------------------------------------

def test_config_files_overrides_and_json(tmp_path):
    cfg = C.load_config("tiny", ["optim.lr=3", "optim.freeze=text_branch", "model.audio_overrides.drop_path_rate=0",
                                 "train.steps=7", "mesh.rules='fsdp'"])
    assert cfg.optim.lr == 3.0 and isinstance(cfg.optim.lr, float)
    assert tuple(cfg.optim.freeze) == ("text_branch",)
    assert cfg.train.steps == 7 and cfg.mesh.rules == "fsdp"
    assert C.model_config(cfg).audio.drop_path_rate == 0
    assert C.load_config(C.CONFIGS_DIR + "/tiny.py:fsdp").mesh.rules == "fsdp"
    back = C.from_json(C.to_json(cfg))
    assert C.to_dict(back) == C.to_dict(cfg)
    with pytest.raises(ValueError, match="optim.lrr"):
        C.load_config("tiny", ["optim.lrr=1"])
    with pytest.raises(ValueError, match="loss.name"):
        C.load_config("tiny", ["loss.name=infonce"])
    with pytest.raises(ValueError, match="unknown groups"):
        C.load_config("tiny", ["optim.freeze=('towers',)"])
    with pytest.raises(FileNotFoundError):
        C.load_config("no_such_config")
    own = tmp_path / "mine.py"
    own.write_text("from clapjax.train.config import base_config\n"
                   "def get_config(arg):\n    c = base_config()\n    c.seed = int(arg)\n    return c\n")
    assert C.load_config(f"{own}:5").seed == 5
    full = C.model_config(C.load_config("htsat_roberta", ["model.dtype=bfloat16", "model.remat=True"]))
    assert full.audio.embed_dim == 96 and full.text.hidden_size == 768
    p = full.precision
    assert p.audio.dtype == p.text.dtype == "bfloat16" and p.audio.param_dtype == "float32"
    assert p.audio.remat and p.text.remat


# --- optimizer -------------------------------------------------------------------------------------

def test_schedule_equals_laion_cosine_lr():
    ref.laion_clap()
    import torch
    from laion_clap.training.scheduler import cosine_lr
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    adjust = cosine_lr(opt, 5e-4, 10, 50)
    ours = optim.lr_schedule(5e-4, 10, 50)
    for step in range(50):   # ours is float32 (a traced function of the step): a few f32 ulps of lr
        assert abs(float(ours(step)) - adjust(step)) <= 1e-6 * 5e-4, step


def _laion_excluded(name: str, ndim: int) -> bool:
    """LAION's training/main.py `exclude` lambda, verbatim in meaning."""
    return ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


@pytest.mark.parametrize("amodel,tmodel", [("HTSAT-tiny", "roberta"), ("PANN-14", "transformer")])
def test_weight_decay_mask_is_laions_rule_on_the_pytorch_names(amodel, tmodel):
    from flax import nnx

    from clapjax.convert import keymap as K
    from clapjax.model import CLAPConfig, CLAPModel
    model = nnx.eval_shape(lambda: CLAPModel(CLAPConfig.from_laion(amodel, tmodel), nnx.Rngs(0)))
    template = S.ModelTemplate.from_model(model)
    params = {k: v for k, (_, v) in template.params.items()}
    mask = optim.decay_mask(params, template.kinds())
    torch_name = {e.target: e.sources[0] for e in K.derive_entries(model)}
    for key, value in params.items():
        assert mask[key] == (not _laion_excluded(torch_name[key], value.ndim)), (key, torch_name[key])
    decayed = [k for k, m in mask.items() if m]
    assert "logit_scale_a" not in decayed and not any(k.endswith((".bias", ".scale")) for k in decayed)
    assert len(decayed) > 20 and len(decayed) < len(mask)


def _torch_adamw_run(params, grads, cfg, total):
    """torch AdamW with LAION's (decay / no-decay) groups, lr from LAION's cosine_lr × group multiplier."""
    import torch
    ref.laion_clap()
    from laion_clap.training.scheduler import _warmup_lr
    tparams = {k: torch.nn.Parameter(torch.tensor(np.asarray(v))) for k, v in params.items()}
    groups = []
    for k, p in tparams.items():
        wd = 0.0 if _laion_excluded(k, p.ndim) else cfg.weight_decay
        groups.append({"params": [p], "weight_decay": wd, "mult": cfg.lr_mult[optim.param_group(k)]})
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    history = []
    for step, g in enumerate(grads):
        if step < cfg.warmup_steps:
            lr = _warmup_lr(cfg.lr, cfg.warmup_steps, step)
        else:
            lr = 0.5 * (1 + np.cos(np.pi * (step - cfg.warmup_steps) / (total - cfg.warmup_steps))) * cfg.lr
        for group in opt.param_groups:
            group["lr"] = lr * group["mult"]
        for k, p in tparams.items():
            p.grad = torch.tensor(np.asarray(g[k]))
        opt.step()
        history.append({k: p.detach().numpy().copy() for k, p in tparams.items()})
    return history


def _toy_params(rng):
    shapes = {"audio_branch.layers.0.mlp.fc1.kernel": (4, 3), "audio_branch.layers.0.mlp.fc1.bias": (3,),
              "audio_branch.bn0.scale": (3,), "text_branch.encoder.layer.0.output.dense.kernel": (3, 5),
              "audio_projection.0.kernel": (3, 3), "logit_scale_a": ()}
    return {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}


def test_adamw_equals_torch_with_laion_groups_and_lr_multipliers(rng):
    cfg = C.load_config("tiny", ["optim.lr_mult.text_branch=0.1", "optim.lr_mult.heads=2.0",
                                 "optim.warmup_steps=2"]).optim
    params = _toy_params(rng)
    grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()} for _ in range(6)]
    tx = optim.make_optimizer(cfg, 6, params)
    state, p = tx.init(params), {k: jnp.asarray(v) for k, v in params.items()}
    for step, (g, want) in enumerate(zip(grads, _torch_adamw_run(params, grads, cfg, 6))):
        updates, state = tx.update({k: jnp.asarray(v) for k, v in g.items()}, state, p)
        p = {k: p[k] + updates[k] for k in p}
        for k in p:
            np.testing.assert_allclose(np.asarray(p[k]), want[k], rtol=0, atol=2e-6, err_msg=f"{k} step {step}")


def test_adam_has_no_weight_decay_and_freezing_keeps_no_state(rng):
    params = _toy_params(rng)
    grads = {k: np.ones_like(v) for k, v in params.items()}
    cfg = C.load_config("tiny", ["optim.name=adam", "optim.freeze=('text_branch', 'logit_scale')",
                                 "optim.grad_clip_norm=0.5"]).optim
    tx = optim.make_optimizer(cfg, 10, params)
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    frozen = optim.frozen_mask(cfg, params)
    for k, u in updates.items():
        assert (np.all(np.asarray(u) == 0)) == frozen[k], k
    # Adam's moments exist for the trainable parameters only
    trainable = sum(v.size for k, v in params.items() if not frozen[k])
    moments = sum(np.size(x) for x in jax.tree.leaves(state) if np.ndim(x) > 0 or np.size(x) == 1) - 2
    assert moments <= 2 * trainable + 2
    # Adam (no decay): the first update of a parameter with zero gradient is exactly zero
    zero = {k: np.zeros_like(v) for k, v in params.items()}
    up0, _ = optim.make_optimizer(cfg, 10, params).update(zero, optim.make_optimizer(cfg, 10, params).init(params), params)
    assert all(np.all(np.asarray(u) == 0) for u in up0.values())
    # AdamW decays the decayed parameters even with zero gradient, and only those
    wcfg = C.load_config("tiny", ["optim.weight_decay=0.5"]).optim
    tx = optim.make_optimizer(wcfg, 10, params)
    up, _ = tx.update(zero, tx.init(params), params)
    mask = optim.decay_mask(params)
    for k, u in up.items():
        assert bool(np.any(np.asarray(u) != 0)) == mask[k], k


# --- the compiled step on the tiny CLAP ------------------------------------------------------------

def _batch(cfg, index=0, nan=False):
    it = RandomBatches(cfg.train.batch_size, C.model_config(cfg).frontend.clip_samples, 300, seed=3,
                       nan_steps=(index,) if nan else ())
    it.set_state({"index": index})
    b = next(it)
    return {k: v for k, v in b.items() if k != "index"}


@pytest.fixture(scope="module")
def frozen_text_run():
    cfg = C.load_config("tiny", [FAST_COMPILE, "optim.freeze=text_branch", "optim.warmup_steps=1"])
    mc = C.model_config(cfg)
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
    setup = S.build_setup(cfg, mc, mesh)
    state = S.init_state(setup, cfg, mc, 0)
    return cfg, setup, state, S.train_step(setup, donate=False)


def _tree_equal(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_step_clamps_log_scales_freezes_text_and_keeps_shardings(frozen_text_run):
    cfg, setup, state, step = frozen_text_run
    rep = sharding.replicated(setup.mesh)
    params = dict(state["params"], logit_scale_a=jax.device_put(jnp.float32(10.0), rep),
                  logit_scale_t=jax.device_put(jnp.float32(-3.0), rep))
    state = {**state, "params": params}
    new, metrics = step(state, sharding.shard_batch(_batch(cfg), setup.mesh))
    assert bool(metrics["finite"]) and np.isfinite(float(metrics["loss"]))
    assert float(new["params"]["logit_scale_a"]) == np.float32(math.log(100.0))
    assert float(new["params"]["logit_scale_t"]) == 0.0
    text = [k for k in params if k.startswith("text_branch.")]
    audio = [k for k in params if k.startswith("audio_branch.") and "kernel" in k]
    assert text and all(np.array_equal(new["params"][k], params[k]) for k in text)
    assert all(not np.array_equal(new["params"][k], params[k]) for k in audio)
    assert not np.array_equal(new["batch_stats"]["audio_branch.bn0.mean"], state["batch_stats"]["audio_branch.bn0.mean"])
    assert int(new["step"]) == 1
    for k, x in new["params"].items():
        assert x.sharding == setup.shardings["params"][k], k


def test_nonfinite_batch_is_skipped_and_counted(frozen_text_run):
    cfg, setup, state, step = frozen_text_run
    s1, _ = step(state, sharding.shard_batch(_batch(cfg, 0), setup.mesh))
    s2, m2 = step(s1, sharding.shard_batch(_batch(cfg, 1, nan=True), setup.mesh))
    assert not bool(m2["finite"]) and not np.isfinite(float(m2["loss"]))
    assert int(m2["nonfinite_total"]) == 1 and int(m2["nonfinite_streak"]) == 1
    for part in ("params", "batch_stats", "opt_state"):
        assert _tree_equal(s2[part], s1[part]), part
    assert int(s2["step"]) == 2
    s3, m3 = step(s2, sharding.shard_batch(_batch(cfg, 2), setup.mesh))
    assert bool(m3["finite"]) and int(m3["nonfinite_total"]) == 1 and int(m3["nonfinite_streak"]) == 0
    assert not _tree_equal(s3["params"], s2["params"])


def test_gradcache_equals_the_gradient_over_all_negatives(frozen_text_run):
    """k=2 micro-batches: GradCache's loss and gradients equal jax.grad of the loss over the
    concatenated embeddings of every micro-batch (train mode, drop-path and SpecAugment on)."""
    cfg, setup, state, _ = frozen_text_run      # the same tiny model; only its initial state is used
    mesh = setup.mesh
    batch = sharding.shard_batch(_batch(cfg), mesh)
    key, k, t = jax.random.key(7), 2, setup.template
    opts = dict(cfg.compiler_options)

    cached = jax.jit(lambda p, bs, b: S.grads_gradcache(t, "clip_mlp", mesh, p, bs, b, key, k), compiler_options=opts)

    def reference(p, bs, b):
        micro = S._micro_batches(b, k, sharding.num_batch_shards(mesh), mesh)
        keys = [jax.random.fold_in(key, j) for j in range(k)]

        def loss_fn(p):
            stats, parts = bs, []
            for j in range(k):
                feats, stats = S.embed(t, p, stats, jax.tree.map(lambda x: x[j], micro), keys[j])
                parts.append(feats)
            joined = tuple(jnp.concatenate(f) for f in zip(*parts))   # micro-batch-major order
            naive = sum(S.loss_from_features("clip_mlp", f, p, mesh) for f in parts) / k
            return S.loss_from_features("clip_mlp", joined, p, mesh), (stats, naive)
        (loss, (stats, naive)), grads = jax.value_and_grad(loss_fn, has_aux=True)(p)
        return loss, grads, stats, naive

    loss, grads, stats = cached(state["params"], state["batch_stats"], batch)
    ref_loss, ref_grads, ref_stats, naive = jax.jit(reference, compiler_options=opts)(
        state["params"], state["batch_stats"], batch)
    assert abs(float(loss) - float(ref_loss)) <= 1e-5
    assert abs(float(loss) - float(naive)) > 1e-3      # negatives across micro-batches are in the loss
    for name, g in grads.items():
        g, r = np.asarray(g), np.asarray(ref_grads[name])
        # f32 sums in another order: relative to the leaf's scale (HTSAT's patch bias grads reach 1e6)
        assert np.max(np.abs(g - r)) <= 1e-4 * np.max(np.abs(r)) + 1e-6, name
    assert any(np.max(np.abs(np.asarray(g))) > 0 for g in grads.values())
    for name in stats:
        np.testing.assert_allclose(np.asarray(stats[name]), np.asarray(ref_stats[name]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("extra", [["loss.name=siglip"], ["loss.name=siglip_ring", "optim.accum_steps=2"]])
def test_bf16_compute_keeps_f32_params_optimizer_state_and_loss(extra):
    """Traced only (no compile): bf16 towers with remat, SigLIP (all-gather, and ring under GradCache)."""
    cfg = C.load_config("tiny", ["model.dtype=bfloat16", "model.remat=True"] + extra)
    mc = C.model_config(cfg)
    assert mc.precision.audio.dtype == mc.precision.text.dtype == "bfloat16"
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
    setup = S.build_setup(cfg, mc, mesh)
    fn = S.train_step_fn(setup.template, setup.tx, mesh, setup.settings)
    b = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _batch(cfg))
    new, metrics = jax.eval_shape(fn, setup.abstract, b)
    assert {x.dtype for x in jax.tree.leaves(new["params"])} == {jnp.dtype("float32")}
    assert {x.dtype for x in jax.tree.leaves(new["opt_state"]) if x.ndim} == {jnp.dtype("float32")}
    assert metrics["loss"].dtype == jnp.float32
    assert {"loss.siglip_log_t", "loss.siglip_bias"} <= set(new["params"])
