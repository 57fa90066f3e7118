"""Fine-tune a converted CLAP checkpoint on a folder of audio files with captions (docs/finetuning.md).

Copy this file and edit the paths, or override them on the command line:

    clapjax train finetune --workdir runs/ft init.checkpoint=converted/ \
        data.path=my_sounds/captions.jsonl data.tokenizer=roberta-base/

The model (architecture and every weight) comes from `init.checkpoint`; the `model` section only
sets precision (model.dtype='bfloat16' for mixed precision). The trained model is written to
WORKDIR/model/ in the converter's format, so `clapjax eval` / `zero-shot` / `export` read it.

`arg` picks which parameter groups train (several can be combined with commas):
  ''             everything (LAION's fine-tuning)
  'freeze_text'  the text tower stays as converted (LAION's --freeze-text)
  'freeze_audio' the audio tower stays as converted
  'heads'        only the projections, transform heads and logit scales train (both towers frozen)
"""
from clapjax.train.config import base_config

VARIANTS = {"": (), "freeze_text": ("text_branch",), "freeze_audio": ("audio_branch",),
            "heads": ("audio_branch", "text_branch")}


def get_config(arg=None):
    opts = [a for a in (arg or "").split(",") if a]
    unknown = sorted(set(opts) - set(VARIANTS))
    if unknown:
        raise ValueError(f"finetune config: unknown variants {unknown}; expected some of {sorted(v for v in VARIANTS if v)}")
    c = base_config()
    c.init.checkpoint = "converted/"          # `clapjax convert 630k-audioset-best.pt converted/`
    c.export.model = True                     # WORKDIR/model/ at the end
    # a small learning rate and a short warm-up: the towers already know audio and text
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 50
    c.optim.weight_decay = 0.0
    c.optim.grad_clip_norm = 1.0
    c.optim.freeze = tuple(sorted({g for o in opts for g in VARIANTS[o]}))
    c.train.steps = 500                       # a few hundred epochs of a 40-clip folder
    c.train.batch_size = 32                   # global; a multiple of the device count
    c.train.log_every = 10
    c.checkpoint.every = 250
    c.checkpoint.keep_last = 2
    # a manifest of local files: one JSON object per line, {"path": ..., "caption": ... | "captions": [...]};
    # paths relative to the manifest. A small folder repeats for as many epochs as the steps need.
    c.data = dict(kind="manifest", path="my_sounds/captions.jsonl", tokenizer="roberta-base/",
                  shuffle="global")
    return c
