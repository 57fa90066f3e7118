"""PyTorch reference models built offline: parity tests and `clapjax convert --verify`.

laion_clap imports torchvision at import time, and PyPI's torchvision is a CUDA build that fails
beside the CPU torch wheel; the reference code paths we compare against never call it, so a stub
module stands in. laion_clap also calls `RobertaModel.from_pretrained('roberta-base')` (or BERT's /
BART's) while constructing CLAP; offline we return a randomly initialised model of that shape.
"""
from __future__ import annotations

import contextlib
import os
import sys
import types

# roberta-base's config.json (RobertaConfig() defaults differ: 512 positions, 2 types, eps 1e-12).
ROBERTA_BASE = dict(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                    intermediate_size=3072, hidden_act="gelu", hidden_dropout_prob=0.1,
                    attention_probs_dropout_prob=0.1, max_position_embeddings=514, type_vocab_size=1,
                    initializer_range=0.02, layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0,
                    eos_token_id=2)
# bert-base-uncased's config.json.
BERT_BASE = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, hidden_act="gelu", max_position_embeddings=512,
                 type_vocab_size=2, layer_norm_eps=1e-12, pad_token_id=0)
# facebook/bart-base's config.json (the parts that shape the encoder).
BART_BASE = dict(vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6,
                 encoder_attention_heads=12, decoder_attention_heads=12, encoder_ffn_dim=3072,
                 decoder_ffn_dim=3072, max_position_embeddings=1024, activation_function="gelu",
                 scale_embedding=False, pad_token_id=1, bos_token_id=0, eos_token_id=2)


def install_torchvision_stub() -> None:
    if "torchvision" in sys.modules:
        return
    from transformers.utils import import_utils
    import_utils.is_torchvision_available()  # cache "absent" before the stub exists
    tv = types.ModuleType("torchvision")
    tv.__path__ = []
    tv.__version__ = "0.0.0-stub"
    ops = types.ModuleType("torchvision.ops")
    ops.__path__ = []
    misc = types.ModuleType("torchvision.ops.misc")
    tr = types.ModuleType("torchvision.transforms")
    ds = types.ModuleType("torchvision.datasets")

    class _Unavailable:
        def __init__(self, *a, **k):
            raise RuntimeError("torchvision stub: not available in the test environment")
    misc.FrozenBatchNorm2d = type("FrozenBatchNorm2d", (_Unavailable,), {})
    for n in ["Normalize", "Compose", "RandomResizedCrop", "InterpolationMode", "ToTensor", "Resize", "CenterCrop"]:
        setattr(tr, n, type(n, (_Unavailable,), {}))
    tv.ops, ops.misc, tv.transforms, tv.datasets = ops, misc, tr, ds
    sys.modules.update({"torchvision": tv, "torchvision.ops": ops, "torchvision.ops.misc": misc,
                        "torchvision.transforms": tr, "torchvision.datasets": ds})


def laion_clap():
    """Import laion_clap offline (stub installed first). Importing it loads three tokenizers from the
    hub at module level; offline mode makes that fail fast instead of retrying for minutes."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    install_torchvision_stub()
    import laion_clap as lc
    return lc


@contextlib.contextmanager
def offline_roberta(**overrides):
    """Make `RobertaModel.from_pretrained` return a random model of roberta-base's shape."""
    from unittest import mock
    from transformers import RobertaConfig, RobertaModel
    cfg = RobertaConfig(**{**ROBERTA_BASE, **overrides})
    with mock.patch.object(RobertaModel, "from_pretrained",
                           classmethod(lambda cls, *a, **k: RobertaModel(cfg))):
        yield


@contextlib.contextmanager
def offline_text_towers(**roberta_overrides):
    """`from_pretrained` of each transformers tower laion_clap builds (roberta-base, bert-base-uncased,
    facebook/bart-base) returns a random model of that checkpoint's shape."""
    from unittest import mock
    from transformers import BartConfig, BartModel, BertConfig, BertModel
    with offline_roberta(**roberta_overrides), \
            mock.patch.object(BertModel, "from_pretrained",
                              classmethod(lambda cls, *a, **k: BertModel(BertConfig(**BERT_BASE)))), \
            mock.patch.object(BartModel, "from_pretrained",
                              classmethod(lambda cls, *a, **k: BartModel(BartConfig(**BART_BASE)))):
        yield


def laion_model_cfg(amodel: str = "HTSAT-tiny", tmodel: str = "roberta") -> dict:
    """laion_clap's model config dict for `amodel`, with `tmodel` set as create_model does."""
    import json
    lc = laion_clap()
    path = os.path.join(os.path.dirname(lc.__file__), "clap_module", "model_configs", f"{amodel}.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["text_cfg"]["model_type"] = tmodel
    return cfg


def laion_clap_model(amodel: str = "HTSAT-tiny", tmodel: str = "roberta", fusion: bool = False,
                     seed: int = 0, text_layers: int = 12):
    """A random-init laion_clap `CLAP` in eval mode (no SpecAugment, no dropout); `text_layers` sizes
    a RoBERTa text tower only."""
    import torch
    laion_clap()
    from laion_clap.clap_module.model import CLAP
    cfg = laion_model_cfg(amodel, tmodel)
    torch.manual_seed(seed)
    with offline_text_towers(num_hidden_layers=text_layers):
        model = CLAP(**cfg, enable_fusion=fusion, fusion_type="aff_2d" if fusion else "None")
    return model.eval()


def torch_state_dict(module) -> dict:
    """A torch module's state dict as numpy arrays (what the converter sees)."""
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def randomize_batch_norms(module, generator, mel=None, input_norms=("bn0",)) -> None:
    """Random affine parameters and running statistics for every BatchNorm of a torch `module`, so a
    parity test really exercises them (fresh ones are the identity). The input BatchNorms named in
    `input_norms` get `mel`'s per-bin mean and variance instead, so the activations stay in range."""
    import torch
    with torch.no_grad():
        for name, mod in module.named_modules():
            if not isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                continue
            if name in input_norms and mel is not None:
                axes = tuple(range(mel.ndim - 1))
                mod.running_mean.copy_(torch.from_numpy(mel.mean(axes)))
                mod.running_var.copy_(torch.from_numpy(mel.var(axes)))
            else:
                mod.running_mean.normal_(0.0, 0.3, generator=generator)
                mod.running_var.uniform_(0.5, 2.0, generator=generator)
            mod.weight.uniform_(0.5, 1.5, generator=generator)
            mod.bias.normal_(0.0, 0.2, generator=generator)
