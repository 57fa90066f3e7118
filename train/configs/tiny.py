"""A tiny CLAP (HTSAT 2 stages × width 8, 1-layer RoBERTa × 32, 1 s clips) for tests and smoke runs.

Every code path of the full model is there (front end, BatchNorm, SpecAugment, Swin windows,
drop-path, RoBERTa, projections, transform heads); only the sizes are small, so a step on 8 CPU
devices takes milliseconds once compiled. `arg` picks a variant: 'fsdp' shards the parameters.
"""
from clapjax.train.config import base_config


def get_config(arg=None):
    c = base_config()
    c.model.audio_overrides = dict(
        embed_dim=8, spec_size=64, depths=(1, 1), num_heads=(1, 1), window_size=8, num_classes=10,
        frontend=dict(sample_rate=48000, window_size=1024, hop_size=480, mel_bins=32, fmin=50.0,
                      fmax=14000.0, clip_samples=48000))
    c.model.text_overrides = dict(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=80)
    c.model.joint_embed_shape = 16
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 2
    c.train.steps = 6
    c.train.batch_size = 16
    c.checkpoint.every = 2
    c.checkpoint.keep_last = 2
    c.data = dict(kind="random", vocab_size=300, text_length=77)
    if arg == "fsdp":
        c.mesh.rules = "fsdp"
        c.mesh.data, c.mesh.fsdp = 1, -1
    elif arg not in (None, ""):
        raise ValueError(f"tiny config: unknown variant {arg!r} (expected '' or 'fsdp')")
    return c
