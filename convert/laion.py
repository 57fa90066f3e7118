"""LAION-CLAP checkpoints: read (`.pt`), detect the variant from the weights, and the CLAP key table.

LAION's files are `torch.save` dicts `{"epoch", "name", "state_dict", "optimizer", …}` (or a bare
state dict) whose keys carry DDP's `module.` prefix. The variant is read off the tensors:
HTSAT size from the patch-embed width and block counts, PANN type from its conv blocks, fusion from
`mel_conv2d`, the STFT size from the stored kernels, fmax from the stored mel bank, the text tower
from its key names. Overrides (`amodel=`, `tmodel=`, `fusion=`) are checked against that. The
detected names fix the whole configuration, as they do in LAION's `create_model`; the key table then
checks every tensor against it, so a tensor of another shape is an error, never a different model.
"""
from __future__ import annotations

import re
from typing import Mapping

import numpy as np
from flax import nnx

from clapjax.audio import frontend as fe
from clapjax.audio import swin
from clapjax.audio.htsat import HTSAT
from clapjax.convert import keymap as K
from clapjax.convert.audio_keys import htsat_laion_table
from clapjax.convert.pann_keys import pann_laion_table
from clapjax.convert.text_keys import laion_text_table
from clapjax.convert.torch_pickle import load_torch_file
from clapjax.model import LAION_AUDIO_CONFIGS, LAION_TEXT_LAYERS, CLAPConfig, CLAPModel

HTSAT_SIZES = {96: ("tiny", (2, 2, 6, 2)), 128: ("base", (2, 2, 12, 2)), 256: ("large", (2, 2, 12, 2))}


def read_state_dict(path) -> dict[str, np.ndarray]:
    """A LAION `.pt` → flat {key: array} without the `module.` prefix (code in the pickle never runs).
    Only the state dict's storages are read: the optimizer state beside it is 2× the weights."""
    obj = load_torch_file(path, entry="state_dict")
    return unwrap_state_dict(obj, str(path))


def unwrap_state_dict(obj, where: str) -> dict[str, np.ndarray]:
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where}: expected a state dict or a dict holding 'state_dict', got {type(obj).__name__}")
    if not obj:
        raise ValueError(f"{where}: the state dict is empty")
    require_tensors(obj, where)
    prefixed = [k.startswith("module.") for k in obj]
    if any(prefixed) and not all(prefixed):
        raise ValueError(f"{where}: some keys have DDP's 'module.' prefix and some do not")
    return {k[7:] if k.startswith("module.") else k: v for k, v in obj.items()}


def require_tensors(sd: Mapping, where: str) -> None:
    """Every entry a named tensor: a pickled number or nested dict among them is refused by name."""
    bad = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, np.ndarray)]
    if bad:
        raise ValueError(f"{where}: not a state dict of tensors (entries {bad[:5]} are not tensors)")


# --- detection ------------------------------------------------------------------------------------

def _count(sd, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd if (m := rx.match(k))})


def _detect_audio(sd) -> str:
    if "audio_branch.patch_embed.proj.weight" in sd:
        width = sd["audio_branch.patch_embed.proj.weight"].shape[0]
        if width not in HTSAT_SIZES:
            raise ValueError(f"audio_branch.patch_embed.proj.weight has width {width}, none of HTSAT "
                             "tiny/base/large (96/128/256)")
        name, depths = HTSAT_SIZES[width]
        found = tuple(_count(sd, rf"audio_branch\.layers\.{i}\.blocks\.(\d+)\.") for i in range(len(depths)))
        if found != depths:
            raise ValueError(f"HTSAT-{name} has block depths {depths}, the weights have {found} "
                             f"(audio_branch.layers.<i>.blocks.<j>.*)")
        candidates = [n for n in LAION_AUDIO_CONFIGS if n.startswith(f"HTSAT-{name}")]
    elif "audio_branch.conv_block1.conv1.weight" in sd:
        blocks = _count(sd, r"audio_branch\.conv_block(\d+)\.")
        model = {4: "Cnn6", 5: "Cnn10", 6: "Cnn14"}.get(blocks)
        if model is None:
            raise ValueError(f"a PANN audio branch with {blocks} conv blocks (audio_branch.conv_block<n>.*) "
                             "is none of Cnn6/10/14")
        candidates = [n for n, c in LAION_AUDIO_CONFIGS.items() if c.get("model_name") == model]
    else:
        raise ValueError("no audio branch found: neither audio_branch.patch_embed.proj.weight (HTSAT) nor "
                         "audio_branch.conv_block1.conv1.weight (PANN) is present")
    # the front end is in the weights: STFT size from the kernels, fmax from the mel bank
    kernel, mel = sd.get("audio_branch.spectrogram_extractor.stft.conv_real.weight"), \
        sd.get("audio_branch.logmel_extractor.melW")
    fits = []
    for n in candidates:
        front = fe.FrontEndConfig.from_laion(LAION_AUDIO_CONFIGS[n])
        if kernel is not None and kernel.shape[-1] != front.window_size:
            continue
        if mel is not None and (mel.shape != (front.window_size // 2 + 1, front.mel_bins) or
                                np.abs(mel - fe.mel_filterbank(front, "slaney")).max() > 1e-6):
            continue
        fits.append(n)
    if not fits:
        raise ValueError("audio_branch.spectrogram_extractor.stft.conv_real.weight / "
                         f"audio_branch.logmel_extractor.melW match the front end of none of {candidates}")
    # equal front ends (e.g. PANN-14 and PANN-14-tiny-transformer): the plain name first
    return min(fits, key=len)


def _detect_text(sd) -> str:
    if "text_branch.embeddings.word_embeddings.weight" in sd:
        types = sd["text_branch.embeddings.token_type_embeddings.weight"].shape[0] \
            if "text_branch.embeddings.token_type_embeddings.weight" in sd else 1
        return "bert" if types > 1 else "roberta"
    if "text_branch.shared.weight" in sd or "text_branch.encoder.layers.0.fc1.weight" in sd:
        return "bart"
    if "token_embedding.weight" in sd and any(k.startswith("text_branch.resblocks.") for k in sd):
        return "transformer"
    raise ValueError("no text branch found: none of text_branch.embeddings.word_embeddings.weight (RoBERTa/"
                     "BERT), text_branch.shared.weight (BART) or token_embedding.weight + "
                     "text_branch.resblocks.* (CLIP transformer) is present")


def detect(sd: Mapping[str, np.ndarray], *, amodel: str | None = None, tmodel: str | None = None,
           fusion: bool | None = None) -> CLAPConfig:
    """The CLAPConfig the weights describe; overrides must agree with them."""
    found_a, found_t = _detect_audio(sd), _detect_text(sd)
    found_f = "audio_branch.patch_embed.mel_conv2d.weight" in sd or "audio_branch.mel_conv2d.0.weight" in sd
    problems = []
    if amodel is not None and amodel != found_a:
        # names the weights cannot tell apart (same tower and front end) are accepted as given
        if LAION_AUDIO_CONFIGS.get(amodel) != LAION_AUDIO_CONFIGS[found_a]:
            problems.append(f"--amodel {amodel} but the weights are {found_a}")
    if tmodel is not None and tmodel != found_t:
        problems.append(f"--tmodel {tmodel} but the weights hold a {found_t} text branch")
    if fusion is not None and fusion != found_f:
        problems.append(f"--fusion {fusion} but the weights are {'fused (mel_conv2d present)' if found_f else 'unfused'}")
    if problems:
        raise ValueError("the weights contradict the options: " + "; ".join(problems))
    # LAION's CLAP always builds the released text towers (roberta-base, bert-base-uncased,
    # bart-base, or the CLIP transformer of the model config) and 512-d joint heads: the config is
    # fixed by the names, and every tensor is then checked against it
    if found_t == "transformer" and amodel is None:
        layers = _count(sd, r"text_branch\.resblocks\.(\d+)\.")
        same = [n for n, c in LAION_AUDIO_CONFIGS.items()
                if c == LAION_AUDIO_CONFIGS[found_a] and LAION_TEXT_LAYERS.get(n, 12) == layers]
        found_a = same[0] if same else found_a
    return CLAPConfig.from_laion(amodel or found_a, found_t, found_f)


# --- the CLAP-level table ---------------------------------------------------------------------------

def _module_table(model, name: str) -> K.KeyTable:
    return K.KeyTable(K.derive_entries(getattr(model, name))).prefixed(name, f"{name}.")


FRONTEND_BUFFERS = ("spectrogram_extractor.stft.conv_real.weight", "spectrogram_extractor.stft.conv_imag.weight",
                    "logmel_extractor.melW")


def audio_buffer_keys(audio) -> tuple[str, ...]:
    """The buffers every LAION audio branch state dict holds beside our variables (tower level):
    the front end, each BatchNorm's counter, each Swin block's position index and shift mask."""
    keys = list(FRONTEND_BUFFERS)
    for path, node in nnx.iter_graph(audio):
        dotted = ".".join(map(str, path))
        if isinstance(node, nnx.BatchNorm):
            keys.append(f"{dotted}.num_batches_tracked")
        elif isinstance(node, swin.SwinTransformerBlock):
            keys.append(f"{dotted}.attn.relative_position_index")
            if node.attention_mask() is not None:
                keys.append(f"{dotted}.attn_mask")
    return tuple(keys)


def laion_table(model: CLAPModel) -> K.KeyTable:
    audio = model.audio_branch
    tower = htsat_laion_table(audio) if isinstance(audio, HTSAT) else pann_laion_table(audio)
    tower.required = audio_buffer_keys(audio)
    table = tower.prefixed("audio_branch", "audio_branch.") + laion_text_table(model.text_branch)
    heads = ["audio_projection", "text_projection"]
    if model.audio_transform is not None:
        heads += ["audio_transform", "text_transform"]
    for name in heads:
        table = table + _module_table(model, name)
    return table + K.copied("logit_scale_a", "logit_scale_t")
