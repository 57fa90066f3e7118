"""`clapjax convert --verify`: the PyTorch reference built from the same weights must agree.

For a LAION source we build laion_clap's `CLAP` for the detected variant and load the state dict
strictly (as `CLAP_Module.load_ckpt` does); for an HF source, transformers' `ClapModel`. Both get the
same generated inputs as our converted model: noise clips (one shorter than 10 s, so the repeat-pad
path runs) and captions of varied length as token ids. Embedding agreement is reported as max-abs
and cosine; beyond tolerance the command fails.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from clapjax.convert import pipeline
from clapjax.model import CLAPModel

MAX_ABS, MIN_COS = 1e-4, 0.99999


@dataclasses.dataclass
class Agreement:
    audio_max_abs: float
    audio_min_cos: float
    text_max_abs: float
    text_min_cos: float

    @property
    def ok(self) -> bool:
        return (self.audio_max_abs <= MAX_ABS and self.text_max_abs <= MAX_ABS
                and self.audio_min_cos >= MIN_COS and self.text_min_cos >= MIN_COS)

    def __str__(self) -> str:
        return (f"verify: audio max-abs {self.audio_max_abs:.3g} min-cos {self.audio_min_cos:.7f}; "
                f"text max-abs {self.text_max_abs:.3g} min-cos {self.text_min_cos:.7f} "
                f"(tolerance max-abs ≤ {MAX_ABS:g}, cos ≥ {MIN_COS}) → {'OK' if self.ok else 'FAILED'}")


def _compare(ours: np.ndarray, theirs: np.ndarray) -> tuple[float, float]:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    cos = np.sum(ours * theirs, 1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1))
    return float(np.abs(ours - theirs).max()), float(cos.min())


def _inputs(model: CLAPModel, seed: int = 0):
    rng = np.random.default_rng(seed)
    n = model.config.frontend.clip_samples
    waves = [rng.uniform(-0.5, 0.5, n).astype(np.float32), rng.uniform(-0.5, 0.5, n * 2 // 5).astype(np.float32)]
    pad = getattr(model.config.text, "pad_token_id", 1)
    vocab = getattr(model.config.text, "vocab_size", 1000)
    ids = np.full((3, 77), pad, np.int64)
    mask = np.zeros_like(ids)
    for i, k in enumerate((5, 77, 30)):
        ids[i, :k] = rng.integers(5, vocab, k)
        ids[i, 0], ids[i, k - 1] = 0, 2
        mask[i, :k] = 1
    return waves, {"input_ids": ids, "attention_mask": mask}


def verify(src_path: str, ckpt_dir: str) -> Agreement:
    from flax import nnx
    from clapjax.audio import io as audio_io
    from clapjax import saved_model
    from clapjax.embedding import embedding_functions
    model = saved_model.restore(ckpt_dir)
    cfg = model.config
    if cfg.tmodel != "roberta":
        raise NotImplementedError(f"--verify builds the reference for RoBERTa text towers; this model's is "
                                  f"{cfg.tmodel}")
    src = pipeline.read_source(src_path)
    waves, text = _inputs(model)
    audio_in = audio_io.model_audio_input(waves, cfg.frontend, cfg.enable_fusion)
    graphdef, state = nnx.split(model)
    audio_fn, text_fn = embedding_functions(graphdef)
    ours_a, ours_t = np.asarray(audio_fn(state, audio_in)), np.asarray(text_fn(state, text))
    ref = _laion_reference if src.fmt == "laion" else _hf_reference
    theirs_a, theirs_t = ref(src, cfg, audio_in, text)
    return Agreement(*_compare(ours_a, theirs_a), *_compare(ours_t, theirs_t))


def _laion_reference(src, cfg, audio_in, text):
    import torch
    from clapjax.convert import torch_reference as R
    R.laion_clap()
    from laion_clap.clap_module.model import CLAP as LaionCLAP
    laion_cfg = R.laion_model_cfg(cfg.amodel, cfg.tmodel)
    t = cfg.text
    size = dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, num_hidden_layers=t.num_hidden_layers,
                num_attention_heads=t.num_attention_heads, intermediate_size=t.intermediate_size,
                max_position_embeddings=t.max_position_embeddings, type_vocab_size=t.type_vocab_size)
    with R.offline_roberta(**size):
        model = LaionCLAP(**laion_cfg, enable_fusion=cfg.enable_fusion,
                          fusion_type="aff_2d" if cfg.enable_fusion else "None").eval()
    sd = {k: torch.from_numpy(np.array(v)) for k, v in src.state_dict.items()}
    if "text_branch.embeddings.position_ids" in sd and \
            "text_branch.embeddings.position_ids" not in model.state_dict():
        del sd["text_branch.embeddings.position_ids"]  # what laion_clap 1.1.7 does on transformers >= 4.31
    model.load_state_dict(sd, strict=True)
    with torch.no_grad():
        n = len(next(iter(audio_in.values())))
        batch = []
        for i in range(n):
            item = {"longer": torch.tensor([bool(audio_in.get("longer", np.zeros(n, bool))[i])])}
            if "waveform" in audio_in:
                item["waveform"] = torch.from_numpy(audio_in["waveform"][i])
            else:
                item["waveform"] = torch.zeros(cfg.frontend.clip_samples)
                item["mel_fusion"] = torch.from_numpy(audio_in["mel_fusion"][i])
            batch.append(item)
        a = model.get_audio_embedding(batch).numpy()
        t = model.get_text_embedding({k: torch.from_numpy(v) for k, v in text.items()}).numpy()
    return a, t


def _hf_reference(src, cfg, audio_in, text):
    import torch
    from transformers import ClapModel
    model = ClapModel(src.hf_config).eval()
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in src.state_dict.items()}, strict=True)
    fe = cfg.frontend
    with torch.no_grad():
        if "waveform" in audio_in:
            from clapjax.audio.frontend import log_mel
            feats = np.array(log_mel(audio_in["waveform"], fe, "slaney"))[:, None]  # a writable copy for torch
            out = model.get_audio_features(input_features=torch.from_numpy(feats))
        else:
            out = model.get_audio_features(input_features=torch.from_numpy(audio_in["mel_fusion"]),
                                           is_longer=torch.from_numpy(audio_in["longer"][:, None]))
        a = out.pooler_output.numpy()
        t = model.get_text_features(**{k: torch.from_numpy(v) for k, v in text.items()}).pooler_output.numpy()
    return a, t
