"""CLAPConfig: the precision section (and the saved layout before it), and the one audio-input protocol."""
import dataclasses
import json

import numpy as np
import pytest
from flax import nnx

from clapjax import saved_model
from clapjax.audio import io as audio_io
from clapjax.audio.frontend import FrontEndConfig
from clapjax.model import CLAPConfig, CLAPModel, Precision, TowerPrecision

# config.json dicts written by `CLAPConfig.to_dict` before the precision section (commit d79b1f6): each tower
# config held its own dtype / param_dtype / remat / remat_policy (PANN: no remat fields)
_FRONT = {"sample_rate": 48000, "window_size": 1024, "hop_size": 480, "mel_bins": 64, "fmin": 50.0, "fmax": 14000.0,
          "clip_samples": 480000}
OLD_HTSAT_ROBERTA = {
    "amodel": "HTSAT-tiny", "tmodel": "roberta", "joint_embed_shape": 512, "mlp_act": "relu", "transform_heads": True,
    "audio": {"frontend": _FRONT, "spec_size": 256, "patch_size": 4, "patch_stride": [4, 4], "in_chans": 1,
              "num_classes": 527, "embed_dim": 96, "depths": [2, 2, 6, 2], "num_heads": [4, 8, 16, 32],
              "window_size": 8, "mlp_ratio": 4.0, "qkv_bias": True, "drop_path_rate": 0.0, "layer_norm_eps": 1e-05,
              "enable_fusion": True, "fusion_type": "aff_2d", "aff_r": 4, "sed_head": True, "spec_augment": True,
              "time_drop_width": 64, "time_stripes_num": 2, "freq_drop_width": 8, "freq_stripes_num": 2,
              "remat": True, "remat_policy": "nothing_saveable", "dtype": "bfloat16", "param_dtype": "float32",
              "model_type": "HTSAT"},
    "text": {"vocab_size": 50265, "hidden_size": 768, "num_hidden_layers": 2, "num_attention_heads": 12,
             "intermediate_size": 3072, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
             "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 514, "type_vocab_size": 1,
             "layer_norm_eps": 1e-05, "pad_token_id": 1, "position_style": "roberta", "remat": False,
             "remat_policy": None, "dtype": "bfloat16", "param_dtype": "float32"}}
OLD_PANN_CLIP = {
    "amodel": "PANN-6", "tmodel": "transformer", "joint_embed_shape": 512, "mlp_act": "relu", "transform_heads": True,
    "audio": {"model_name": "Cnn6", "frontend": _FRONT, "class_num": 527, "enable_fusion": False, "fusion_type": "None",
              "block_dropout": 0.2, "head_dropout": 0.5, "spec_augment": True, "dtype": "float32",
              "param_dtype": "float32", "model_type": "PANN"},
    "text": {"vocab_size": 49408, "context_length": 77, "width": 512, "heads": 8, "layers": 12, "act": "gelu",
             "layer_norm_eps": 1e-05, "remat": False, "remat_policy": None, "dtype": "float32",
             "param_dtype": "float32"}}
NEW_HTSAT_ROBERTA = CLAPConfig.from_laion(
    "HTSAT-tiny", "roberta", True, audio_overrides=dict(drop_path_rate=0.0), text_overrides=dict(num_hidden_layers=2),
    precision=Precision(audio=TowerPrecision("bfloat16", "float32", True, "nothing_saveable"),
                        text=TowerPrecision("bfloat16")))


def _saved(tmp_path, config: dict) -> str:
    """A model directory's config.json as `saved_model.save` writes it."""
    (tmp_path / saved_model.CONFIG).write_text(json.dumps({"source_format": "laion", **config}))
    return str(tmp_path)


@pytest.mark.parametrize("old,new", [(OLD_HTSAT_ROBERTA, NEW_HTSAT_ROBERTA),
                                     (OLD_PANN_CLIP, CLAPConfig.from_laion("PANN-6", "transformer"))],
                         ids=["htsat-roberta-bf16-remat", "pann-clip-f32"])
def test_a_config_saved_before_the_precision_section_loads_to_the_same_model(tmp_path, old, new):
    loaded, fmt = saved_model.read_config(_saved(tmp_path, old))
    assert loaded == new and fmt == "laion"
    assert CLAPConfig.from_dict(json.loads(json.dumps(new.to_dict()))) == new   # today's layout round-trips
    assert not {"dtype", "param_dtype", "remat", "remat_policy"} & (set(new.to_dict()["audio"]) |
                                                                    set(new.to_dict()["text"]))


def test_a_config_that_contradicts_itself_is_refused_naming_the_fields(tmp_path):
    both = {**OLD_HTSAT_ROBERTA, "precision": {"audio": {"dtype": "float32"}}}
    with pytest.raises(ValueError, match=r"audio\.dtype='bfloat16' but precision\.audio\.dtype='float32'"):
        saved_model.read_config(_saved(tmp_path, both))
    # both layouts at once are fine where they agree
    agreeing = {**OLD_HTSAT_ROBERTA, "precision": {"text": {"dtype": "bfloat16"}}}
    assert CLAPConfig.from_dict(agreeing) == NEW_HTSAT_ROBERTA
    with pytest.raises(ValueError, match=r"precision\.text: unknown fields \['dtpye'\]"):
        CLAPConfig.from_dict({**NEW_HTSAT_ROBERTA.to_dict(), "precision": {"text": {"dtpye": "bfloat16"}}})
    with pytest.raises(ValueError, match="dtype='float33'"):
        TowerPrecision(dtype="float33")
    with pytest.raises(ValueError, match="remat_policy='save_all'"):
        TowerPrecision(remat=True, remat_policy="save_all")


def test_the_towers_and_heads_are_built_with_their_sides_precision():
    import jax.numpy as jnp
    cfg = CLAPConfig.from_laion("PANN-6", "transformer", precision=Precision(audio=TowerPrecision("bfloat16")))
    model = nnx.eval_shape(lambda: CLAPModel(cfg, nnx.Rngs(0)))
    assert model.audio_branch.compute_dtype == jnp.bfloat16 and model.text_branch.compute_dtype == jnp.float32
    assert jnp.dtype(model.audio_projection[0].dtype) == jnp.bfloat16
    assert jnp.dtype(model.text_transform.sequential[0].dtype) == jnp.float32
    remat = CLAPConfig.from_laion("PANN-6", "transformer", precision=Precision(audio=TowerPrecision(remat=True)))
    with pytest.raises(ValueError, match="PANN audio tower has no activation checkpointing"):
        nnx.eval_shape(lambda: CLAPModel(remat, nnx.Rngs(0)))


def test_the_trainer_sets_each_towers_precision_from_one_section():
    from clapjax.train import config as C
    mc = C.model_config(C.load_config("tiny", ["model.dtype=bfloat16", "model.text_overrides.dtype=float32",
                                               "model.remat=True"]))
    assert mc.precision == Precision(audio=TowerPrecision("bfloat16", remat=True),
                                     text=TowerPrecision("float32", remat=True))


# --- one audio-input protocol ------------------------------------------------------------------------

SHORT_FRONT = FrontEndConfig(clip_samples=48000)  # 1 s clips: 101 frames


@pytest.mark.parametrize("amodel,fused,overrides", [
    ("HTSAT-tiny", False, dict(embed_dim=8, spec_size=128, depths=(1, 1), num_heads=(1, 1))),
    ("HTSAT-tiny", True, dict(embed_dim=8, spec_size=128, depths=(1, 1), num_heads=(1, 1))),
    ("PANN-6", False, {}),
    ("PANN-14", True, {}),
])
def test_every_audio_tower_takes_the_mapping_the_one_builder_makes(amodel, fused, overrides):
    """Traced only (no compile): the builder's keys are the tower's, and `output_width` is its embedding's width."""
    cfg = CLAPConfig.from_laion(amodel, "roberta", fused, audio_overrides=overrides,
                                text_overrides=dict(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=64))
    cfg = dataclasses.replace(cfg, audio=dataclasses.replace(cfg.audio, frontend=SHORT_FRONT))
    model = nnx.eval_shape(lambda: CLAPModel(cfg, nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    clips = [0.1 * rng.standard_normal(n).astype(np.float32) for n in (72000, 24000)]  # one longer, one short
    batch = audio_io.model_audio_input(clips, cfg.frontend, cfg.enable_fusion)
    assert tuple(batch) == audio_io.audio_input_keys(fused) == (("mel_fusion", "longer") if fused else ("waveform",))
    if fused:
        np.testing.assert_array_equal(batch["longer"], [True, False])
    out = nnx.eval_shape(lambda m, b: m.encode_audio(b)["embedding"], model, batch)
    assert out.shape == (2, cfg.audio.output_width) == (2, cfg.audio_width)
    other = audio_io.model_audio_input(clips, cfg.frontend, not fused)
    with pytest.raises(ValueError, match=r"needs inputs\['mel_fusion'\]" if fused else r"needs inputs\['waveform'\]"):
        nnx.eval_shape(lambda m, b: m.encode_audio(b), model, other)
