"""Key tables for the HTS-AT audio tower: LAION's `audio_branch.*` and HF's `ClapAudioModel` layouts.

Both tables are at tower level (no `audio_branch.` / `audio_model.` prefix); the CLAP-level
converter mounts them with `KeyTable.prefixed`. They are strict in keymap's sense: every source
key is loaded or ignored for a written reason, and recomputed buffers are ignored only when their
stored value equals what we recompute (a different value means a different model, and the load
fails naming the key).

PANN tables live in `convert.pann_keys`.
"""
from __future__ import annotations

import re

import numpy as np

from clapjax import saved_model
from clapjax.audio import frontend as fe
from clapjax.audio import swin
from clapjax.audio.htsat import HTSAT
from clapjax.convert import keymap

# Front-end copies in LAION checkpoints are float32 values of float64 formulas; 1e-6 absorbs the
# last-ulp differences between torch/librosa and our construction while catching any other bank.
FRONTEND_ATOL = 1e-6
BN_COUNTER = "PyTorch BatchNorm step counter; unused with a fixed momentum"
SED_HEAD = ("tscam_conv", "head")  # our targets that HF's ClapAudioModel does not have


def _block(model: HTSAT, key: str) -> swin.SwinTransformerBlock:
    m = re.search(r"layers\.(\d+)\.blocks\.(\d+)\.", key)
    i, j = int(m.group(1)), int(m.group(2))
    if i >= len(model.layers) or j >= len(model.layers[i].blocks):
        raise ValueError(f"this model has no block layers.{i}.blocks.{j}")
    return model.layers[i].blocks[j]


def _relative_index_check(model: HTSAT):
    return keymap.expect_equal(lambda key, sd: swin.relative_position_index(_block(model, key).window),
                               "relative position index")


def _attn_mask_check(model: HTSAT):
    def expected(key, sd):
        mask = _block(model, key).attention_mask()
        if mask is None:
            raise ValueError("this model's block has no shifted-window mask (no shift)")
        return mask
    return keymap.expect_equal(expected, "shifted-window attention mask")


def _frontend_ignores(model: HTSAT) -> list[keymap.Ignore]:
    cfg = model.cfg.frontend

    def stft(key, sd):
        real, imag = fe.stft_kernels(cfg)
        return real if "conv_real" in key else imag
    return [
        keymap.Ignore(r"spectrogram_extractor\.stft\.conv_(real|imag)\.weight",
                      "torchlibrosa STFT kernels: recomputed by clapjax.audio.frontend",
                      keymap.expect_equal(stft, "STFT kernel", FRONTEND_ATOL)),
        keymap.Ignore(r"logmel_extractor\.melW", "torchlibrosa Slaney mel filterbank: recomputed by "
                      "clapjax.audio.frontend",
                      keymap.expect_equal(lambda k, sd: fe.mel_filterbank(cfg, "slaney"), "mel filterbank",
                                          FRONTEND_ATOL)),
    ]


def htsat_laion_table(model: HTSAT) -> keymap.KeyTable:
    """Our HTSAT ⇄ LAION `HTSAT_Swin_Transformer.state_dict()` (keys without `audio_branch.`).

    Names map 1:1 (derived from the module tree). Ignored, each checked where it has a value:
    the STFT kernels and `melW` (must equal our front end within 1e-6), every block's
    `relative_position_index` and the shifted blocks' `attn_mask` (must equal our constants exactly),
    and `num_batches_tracked`. A model built with `sed_head=False` also ignores LAION's
    `tscam_conv.*` / `head.*` (the config chose to drop them).
    """
    ignores = _frontend_ignores(model) + [
        keymap.Ignore(r"layers\.\d+\.blocks\.\d+\.attn\.relative_position_index",
                      "Swin relative position index: a constant of the window size",
                      _relative_index_check(model)),
        keymap.Ignore(r"layers\.\d+\.blocks\.\d+\.attn_mask", "Swin shifted-window mask: a constant of the geometry",
                      _attn_mask_check(model)),
        keymap.Ignore(r"(.+\.)?num_batches_tracked", BN_COUNTER, keymap.batch_norm_counter),
    ]
    if model.tscam_conv is None:
        ignores.append(keymap.Ignore(r"(tscam_conv|head)\.(weight|bias)",
                                     "SED head not built (HTSATConfig.sed_head=False)"))
    return keymap.KeyTable(keymap.derive_entries(model), ignores)


# --- Hugging Face -----------------------------------------------------------------------------

HF_PREFIX = "audio_encoder."
_HF_RENAMES = [  # (our LAION-style key fragment, HF fragment); the HF conversion script's map, inverted
    (re.compile(r"^bn0\."), "batch_norm."),
    (re.compile(r"\.norm1\."), ".layernorm_before."),
    (re.compile(r"\.norm2\."), ".layernorm_after."),
    (re.compile(r"\.attn\.proj\."), ".attention.output.dense."),
    (re.compile(r"\.attn\.relative_position_bias_table$"), ".attention.self.relative_position_bias_table"),
    (re.compile(r"\.mlp\.fc1\."), ".intermediate.dense."),
    (re.compile(r"\.mlp\.fc2\."), ".output.dense."),
]


def _hf_key(key: str) -> str:
    for pattern, repl in _HF_RENAMES:
        key = pattern.sub(repl, key)
    return HF_PREFIX + key


def hf_absent_targets(model: HTSAT) -> set[str]:
    """Our variables that HF's `ClapAudioModel` has no tensor for (the SED head, when built)."""
    return {t for t in saved_model.model_variables(model) if t.split(".", 1)[0] in SED_HEAD}


def _keep_current(target: str, var) -> keymap.Entry:
    """An entry with no source: loading keeps the variable's current value, export writes nothing."""
    return keymap.Entry(target, (), lambda: np.asarray(var.get_value()), lambda value: ())


def htsat_hf_table(model: HTSAT, *, keep_sed_head: bool = False) -> keymap.KeyTable:
    """Our HTSAT ⇄ transformers `ClapAudioModel.state_dict()` (keys `audio_encoder.*`).

    HF splits each Swin `qkv` into `attention.self.{query,key,value}` (fused back here), renames the
    block layers (norm1→layernorm_before, attn.proj→attention.output.dense, mlp.fc1/fc2→
    intermediate.dense/output.dense, bn0→batch_norm) and has no front-end tensors, attention masks
    or SED head (`tscam_conv`, `head`).

    The SED head: build the model with `HTSATConfig.from_hf(...)` (sed_head=False) and the table is
    complete. For a model that has the head, its targets (`hf_absent_targets`) get no entry and a load
    fails naming them, unless `keep_sed_head=True`, which marks them "keep the model's current
    value" (e.g. a head loaded from a LAION checkpoint earlier, or left at init). Everything else is
    strict either way. Ignored: `relative_position_index` (checked equal) and `num_batches_tracked`.
    """
    absent = hf_absent_targets(model)
    entries = [e for e in keymap.derive_entries(model, _hf_key) if e.target not in absent]
    table = keymap.KeyTable(entries, [
        keymap.Ignore(re.escape(HF_PREFIX) + r"layers\.\d+\.blocks\.\d+\.attention\.self\.relative_position_index",
                      "Swin relative position index: a constant of the window size", _relative_index_check(model)),
        keymap.Ignore(re.escape(HF_PREFIX) + r"(.+\.)?num_batches_tracked", BN_COUNTER, keymap.batch_norm_counter),
    ])
    qkv = []
    for target in (e.target for e in entries):
        m = re.fullmatch(r"(layers\.\d+\.blocks\.\d+)\.attn\.qkv\.(kernel|bias)", target)
        if m:
            base = f"{HF_PREFIX}{m.group(1)}.attention.self"
            leaf = "weight" if m.group(2) == "kernel" else "bias"
            qkv.append(keymap.fused_linear(target, [f"{base}.{n}.{leaf}" for n in ("query", "key", "value")],
                                           m.group(2)))
    table = table.replace(qkv)
    if keep_sed_head and absent:
        variables = saved_model.model_variables(model)
        table = table + keymap.KeyTable([_keep_current(t, variables[t]) for t in sorted(absent)])
    return table
