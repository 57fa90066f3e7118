"""LAION-CLAP's HTSAT-tiny + RoBERTa-base recipe (training/params.py defaults).

`arg`: 'fusion' trains the aff_2d fused model; 'mlp' uses the mlp-loss (--clap-mlploss);
'bf16' computes in bfloat16 with float32 parameters. Several can be combined with commas.
"""
from clapjax.train.config import base_config


def get_config(arg=None):
    c = base_config()
    c.train.batch_size = 768     # LAION's HTSAT runs: 8 GPUs × 96
    c.train.steps = 45 * 2000
    opts = {a for a in (arg or "").split(",") if a}
    unknown = opts - {"fusion", "mlp", "bf16"}
    if unknown:
        raise ValueError(f"htsat_roberta config: unknown variants {sorted(unknown)}")
    if "fusion" in opts:
        c.model.enable_fusion = True
    if "mlp" in opts:
        c.loss.name = "clip_mlp"
    if "bf16" in opts:
        c.model.dtype = "bfloat16"
    return c
