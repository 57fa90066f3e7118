"""The three implementations side by side with the same random weights (throughput does not depend
on the values): laion_clap's own `CLAP_Module` (its public hook), clapjax's public `CLAP` holding the
hook's weights through the converter's table, and transformers' ClapModel (random weights of the
same architecture; as in HF it takes log-mel features, so its rows exclude the front end)."""
from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class Trio:
    laion: Any      # laion_clap.CLAP_Module (its .model is the torch CLAP)
    clapjax: Any    # clapjax.CLAP
    hf: Any         # transformers ClapModel (unfused) or ClapAudioModelWithProjection (fused)
    config: Any     # clapjax CLAPConfig


def build(fusion: bool, text_layers: int) -> Trio:
    import torch
    from flax import nnx

    from clapjax.app.api import CLAP
    from clapjax.convert import keymap as K, laion, torch_reference as R
    from clapjax.model import CLAPConfig, CLAPModel

    lc = R.laion_clap()
    torch.manual_seed(0)
    with R.offline_roberta(num_hidden_layers=text_layers):
        hook = lc.CLAP_Module(enable_fusion=fusion, amodel="HTSAT-tiny", tmodel="roberta", device="cpu")
    hook.model.eval()
    sd = R.torch_state_dict(hook.model)
    cfg = CLAPConfig.from_laion("HTSAT-tiny", "roberta", fusion, text_overrides={"num_hidden_layers": text_layers})
    model = nnx.eval_shape(lambda: CLAPModel(cfg, nnx.Rngs(0)))
    K.load_state_dict(model, sd, laion.laion_table(model))
    clap = CLAP(model)

    from transformers import ClapAudioConfig, ClapAudioModelWithProjection, ClapConfig, ClapModel
    if fusion:
        hf = ClapAudioModelWithProjection(ClapAudioConfig(enable_fusion=True)).eval()
    else:
        hf = ClapModel(ClapConfig(text_config=dict(layer_norm_eps=1e-5, num_hidden_layers=text_layers))).eval()
    return Trio(hook, clap, hf, cfg)


def tiny(fusion: bool) -> Trio:
    """Smoke runs: clapjax alone on the tiny config's model (1 s clips); laion_clap's HTSAT sizes are
    fixed by name, so there is no tiny reference to compare with."""
    from clapjax.app.api import CLAP
    from clapjax.train import config as C
    cfg = C.load_config("tiny", [f"model.enable_fusion={fusion}"])
    model_cfg = C.model_config(cfg)
    return Trio(None, CLAP(random_model(model_cfg)), None, model_cfg)


def random_model(model_cfg):
    """A random-init CLAPModel from one jitted init at XLA's lowest backend optimisation (it runs
    once): eagerly, every initializer of every shape compiles its own small program, ~3× slower."""
    import jax
    from flax import nnx
    from clapjax.model import CLAPModel
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: CLAPModel(model_cfg, nnx.Rngs(0))))
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    state = jax.jit(lambda: nnx.state(CLAPModel(model_cfg, nnx.Rngs(0))), compiler_options=options)()
    return nnx.merge(graphdef, state)
