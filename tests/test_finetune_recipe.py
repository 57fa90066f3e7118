"""docs/finetuning.md, followed literally: every block of the page, in order, in one session, on a generated
folder of 40 captioned clips; the fine-tuned model must retrieve the clips from their captions better than the
checkpoint it started from.

The starting checkpoint (`converted/`) is the tiny config's model with random weights, written in the
converter's format by tests/docs_snippets.py (a full-size laion-clap conversion would not fine-tune in
minutes on a CPU; the page's commands do not depend on the size). `roberta-base/` is a small BPE trained on
the clips' caption vocabulary. Also here: init.checkpoint's strictness (a missing / extra / mis-shaped
variable fails naming it) and the model config taken from the checkpoint.
"""
import json
import os

import numpy as np
import pytest

import docs_snippets as D

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = "docs/finetuning.md"


def test_finetune_recipe_beats_the_starting_checkpoint(tmp_path, capsys):
    D.link_repo(str(tmp_path), REPO)
    D.write_small_checkpoint(tmp_path / "converted", seed=3)
    D.write_tokenizer(tmp_path / "roberta-base")
    D.write_captioned_folder(tmp_path / "my_sounds", n=40)
    blocks = D.runnable(D.read_page(os.path.join(REPO, PAGE), label=PAGE))
    assert any("clapjax train finetune --workdir runs/ft" in b.code for b in blocks)
    with capsys.disabled(), D.Session(tmp_path, D.docs_env(REPO), timeout=540) as session:
        for block in blocks:
            session.run(block)
    before = json.loads((tmp_path / "before.json").read_text())["metrics"]
    after = json.loads((tmp_path / "after.json").read_text())["metrics"]
    print(f"fine-tune recipe: text→audio R@1 {before['text_to_audio_R@1']:.3f} → {after['text_to_audio_R@1']:.3f}, "
          f"R@5 {before['text_to_audio_R@5']:.3f} → {after['text_to_audio_R@5']:.3f}")
    assert after["text_to_audio_R@1"] > before["text_to_audio_R@1"]
    losses = [json.loads(line)["loss"] for line in (tmp_path / "runs/ft/metrics.jsonl").read_text().splitlines()]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    # the exported model is the starting one's architecture, and says where it came from
    saved = json.loads((tmp_path / "runs/ft/model/config.json").read_text())
    start = json.loads((tmp_path / "converted/config.json").read_text())
    assert saved == start


# --- init.checkpoint, without training ----------------------------------------------------------------

@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return D.write_small_checkpoint(tmp_path_factory.mktemp("ft") / "converted", seed=1)


def _setup(ckpt, *overrides):
    from clapjax.train import config as C, sharding, step as S
    cfg = C.load_config("finetune", [f"init.checkpoint={ckpt}", "compiler_options.xla_backend_optimization_level=0",
                                     *overrides])
    mc = C.model_config(cfg)
    setup = S.build_setup(cfg, mc, sharding.make_mesh({"data": -1, "fsdp": 1}))
    return cfg, mc, setup


def test_init_checkpoint_loads_every_variable_and_takes_its_architecture(small, tmp_path):
    from clapjax import saved_model
    from clapjax.saved_model import model_variables
    from clapjax.train import model_io, step as S
    cfg, mc, setup = _setup(small, "model.dtype=bfloat16", "model.audio_overrides.drop_path_rate=0.0")
    saved, _ = saved_model.read_config(small)
    assert mc.audio.embed_dim == saved.audio.embed_dim == 8 and mc.joint_embed_shape == 16  # not the base config's
    assert mc.precision.audio.dtype == mc.precision.text.dtype == "bfloat16" and mc.audio.drop_path_rate == 0.0
    state = S.init_state(setup, cfg, mc, seed=123)
    lines = []
    state = model_io.load_checkpoint(cfg, setup, state, log=lines.append)
    want = {k: np.asarray(v.get_value()) for k, v in model_variables(saved_model.restore(small)).items()}
    got = {**state["params"], **state["batch_stats"]}
    assert set(want) <= set(got) and len(want) > 50
    for k, v in want.items():
        assert np.array_equal(np.asarray(got[k]), v), k
    assert "every model variable" in lines[0]
    # exported again: the same variables, bit for bit
    model_io.export_model(cfg, setup, state, mc, str(tmp_path / "model"))
    again = {k: np.asarray(v.get_value()) for k, v in model_variables(saved_model.restore(str(tmp_path / "model"))).items()}
    assert all(np.array_equal(again[k], want[k]) for k in want)
    assert saved_model.read_config(str(tmp_path / "model"))[1] == "clapjax-train"


def test_export_carries_the_source_layout_and_its_buffers_over(small, tmp_path):
    """A model fine-tuned from a laion-clap conversion exports back as laion-clap: the layout name and the
    checked buffers (STFT kernels, position ids, …) of the starting checkpoint go with it."""
    import shutil
    from clapjax import saved_model
    from clapjax.train import model_io, step as S
    src = tmp_path / "from-laion"
    shutil.copytree(small, src)
    meta = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**meta, "source_format": "laion"}))
    buffers = {"text_branch.embeddings.position_ids": np.arange(514)[None]}
    np.savez(src / saved_model.EXTRAS, **buffers)
    cfg, mc, setup = _setup(str(src))
    state = S.init_state(setup, cfg, mc, seed=0)
    model_io.export_model(cfg, setup, state, mc, str(tmp_path / "model"))
    assert saved_model.read_config(str(tmp_path / "model"))[1] == "laion"
    extras = saved_model.read_extras(str(tmp_path / "model"))
    assert np.array_equal(extras["text_branch.embeddings.position_ids"], buffers["text_branch.embeddings.position_ids"])


def _tamper(small, tmp_path, fn):
    """A copy of the checkpoint with its variables rewritten by `fn(flat dict)`."""
    import shutil
    from clapjax import saved_model
    from clapjax.saved_model import model_variables
    flat = {k: np.asarray(v.get_value()) for k, v in model_variables(saved_model.restore(small)).items()}
    fn(flat)
    out = tmp_path / "tampered"
    shutil.copytree(small, out)
    shutil.rmtree(out / saved_model.VARIABLES)
    import orbax.checkpoint as ocp
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(str(out / saved_model.VARIABLES), saved_model._nested(flat))
    return str(out)


@pytest.mark.parametrize("damage, named", [
    (lambda f: f.pop("text_projection.0.kernel"), "missing: text_projection.0.kernel"),
    (lambda f: f.update({"audio_branch.extra.kernel": np.zeros(3, np.float32)}), "not in the model: audio_branch.extra.kernel"),
    (lambda f: f.update({"logit_scale_a": np.zeros((2,), np.float32)}), "shape differs: logit_scale_a (2,)"),
])
def test_init_checkpoint_that_does_not_fit_fails_naming_the_key(small, tmp_path, damage, named):
    """The check load_checkpoint makes first, from the Orbax metadata, before any value is read."""
    from clapjax import saved_model
    from clapjax.saved_model import model_variables
    from clapjax.train import model_io
    bad = _tamper(small, tmp_path, damage)
    expected = {k: v.shape for k, v in model_variables(saved_model.abstract_model(saved_model.read_config(small)[0])).items()}
    model_io.check_checkpoint(small, expected)  # the intact one fits
    with pytest.raises(ValueError, match="does not fit the model") as err:
        model_io.check_checkpoint(bad, expected)
    assert named in str(err.value)


def test_init_checkpoint_config_errors_name_the_key(small, tmp_path):
    from clapjax.train import config as C
    with pytest.raises(ValueError, match="model.tmodel='bert'"):
        C.model_config(C.load_config("finetune", [f"init.checkpoint={small}", "model.tmodel=bert"]))
    with pytest.raises(ValueError, match="leave init.text and init.audio empty"):
        C.load_config("finetune", [f"init.checkpoint={small}", "init.text=roberta/"])
    with pytest.raises(ValueError, match="no config.json"):
        C.load_config("finetune", [f"init.checkpoint={tmp_path}"])
    with pytest.raises(ValueError, match="model.audio_overrides.no_such_setting"):
        C.model_config(C.load_config("finetune", [f"init.checkpoint={small}", "model.audio_overrides.no_such_setting=1"]))
    assert C.load_config("finetune:freeze_text,heads", [f"init.checkpoint={small}"]).optim.freeze == ("audio_branch", "text_branch")
