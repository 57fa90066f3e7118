"""Key table for LAION-CLAP's PANN audio branch (`audio_branch.*` of a PANN CLAP, tower level).

Source keys are those of `laion_clap.clap_module.pann_model.Cnn6/Cnn10/Cnn14` (no `audio_branch.`
prefix; mount the table with `KeyTable.prefixed` for a whole CLAP). Every parameter and BatchNorm
running statistic is derived from our module tree; the frozen front-end buffers that LAION saves
are ignored only after checking they equal what `clapjax.audio.frontend` recomputes.
"""
from __future__ import annotations

import functools

from clapjax.audio import frontend
from clapjax.audio.pann import PANN
from clapjax.convert.keymap import Ignore, KeyTable, batch_norm_counter, derive_entries, expect_equal

FRONTEND_ATOL = 1e-6  # both sides are float32 casts of the same float64 formulas

NUM_BATCHES_TRACKED = Ignore(
    r"(.+\.)?num_batches_tracked",
    "BatchNorm step counter: PyTorch uses it only when momentum=None, which LAION never sets",
    batch_norm_counter)


def pann_laion_table(model: PANN) -> KeyTable:
    """Strict table: LAION PANN state dict (tower level) ↔ `model`."""
    if not isinstance(model, PANN):
        raise ValueError(f"pann_laion_table needs a clapjax PANN, got {type(model).__name__}")
    cfg = model.config.frontend

    @functools.lru_cache(maxsize=None)
    def kernels():
        return frontend.stft_kernels(cfg)

    ignores = [
        Ignore(r"spectrogram_extractor\.stft\.conv_real\.weight",
               "frozen STFT kernel (cos·hann): recomputed from the front-end config",
               expect_equal(lambda k, sd: kernels()[0], "STFT real kernel", FRONTEND_ATOL)),
        Ignore(r"spectrogram_extractor\.stft\.conv_imag\.weight",
               "frozen STFT kernel (−sin·hann): recomputed from the front-end config",
               expect_equal(lambda k, sd: kernels()[1], "STFT imaginary kernel", FRONTEND_ATOL)),
        Ignore(r"logmel_extractor\.melW",
               "frozen Slaney mel filterbank: recomputed from the front-end config",
               expect_equal(lambda k, sd: frontend.mel_filterbank(cfg, "slaney"), "Slaney mel filterbank",
                            FRONTEND_ATOL)),
        NUM_BATCHES_TRACKED,
    ]
    return KeyTable(derive_entries(model), ignores)
