"""Helpers shared by test modules (fixtures live in conftest.py)."""
import shutil

import pytest

# fp32 parity with the PyTorch reference: max-abs difference (the project's bar unless a test says why not)
TOL = 1e-5

# the one place that says how to get the system tools (scripts/system_packages.sh knows the package names)
INSTALL_HINT = "run `bash scripts/system_packages.sh` (it installs them, or prints the command to run)"


def require_tools(*names: str) -> None:
    """Fail, never skip, when a test's file generator is missing: a missing tool must not pass a test vacuously."""
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        pytest.fail(f"this test needs {', '.join(missing)} to write its audio files; {INSTALL_HINT}", pytrace=False)


def comparable_metrics(records: list[dict]) -> list[tuple]:
    """The per-step figures of metrics.jsonl that a resumed run must reproduce bit for bit."""
    return [(m["step"], m["loss"], m["grad_norm"], m["finite"], m["nonfinite_total"], m["scale_a"]) for m in records]


def restore_train_state(checkpointer, abstract_state, step: int) -> dict:
    """Only the train state of checkpoint `step`, onto the shardings `abstract_state` names (also for a
    checkpoint written by another process count, whose data states `Checkpointer.restore` refuses)."""
    import orbax.checkpoint as ocp
    state = ocp.args.PyTreeRestore(item=abstract_state,
                                   restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))
    return dict(checkpointer.manager.restore(step, args=ocp.args.Composite(state=state)).state)


def saved_data_states(checkpointer, step: int) -> dict:
    """The `data` item of checkpoint `step` as saved: the process count and every process's iterator state."""
    import orbax.checkpoint as ocp
    return checkpointer.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]


def random_roberta(*, pooler: bool = True, seed: int = 0, **geometry):
    """A transformers RobertaModel with roberta-base's config but `geometry` (sizes), random weights
    from torch seed `seed`."""
    import torch
    from transformers import RobertaConfig, RobertaModel
    from clapjax.convert.torch_reference import ROBERTA_BASE
    torch.manual_seed(seed)
    return RobertaModel(RobertaConfig(**{**ROBERTA_BASE, **geometry}), add_pooling_layer=pooler)


def tiny_clap_model():
    """A CLAP of a few thousand parameters (HTSAT-tiny + RoBERTa shapes, 1 s clips, 32 mel rows) for evaluation tests."""
    from flax import nnx
    from clapjax.model import CLAPConfig, CLAPModel
    cfg = CLAPConfig.from_laion(
        "HTSAT-tiny", "roberta", joint_embed_shape=16,
        audio_overrides=dict(embed_dim=8, spec_size=64, depths=(1, 1), num_heads=(1, 1), window_size=8,
                             num_classes=10, frontend=dict(sample_rate=48000, window_size=1024, hop_size=480,
                                                           mel_bins=32, fmin=50.0, fmax=14000.0,
                                                           clip_samples=48000)),
        text_overrides=dict(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=80))
    return CLAPModel(cfg, nnx.Rngs(0))
