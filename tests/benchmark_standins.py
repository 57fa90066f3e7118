"""Small stand-ins for the benchmarks' public releases, in each release's own layout: its metadata file with
the real header and every class name, real-looking file names, audio at the release's sample rate (a few clips;
clips shorter than the release's where the reader does not depend on their length).

    write_esc50(dir)        ESC-50-master/: meta/esc50.csv + audio/{fold}-{src}-{take}-{target}.wav, 5 s 44.1 kHz
    write_urbansound8k(dir) UrbanSound8K/: metadata/UrbanSound8K.csv + audio/foldN/{fsID}-{classID}-{occ}-{slice}.wav
    write_gtzan(dir)        Kaggle's Data/: genres_original/<genre>/<genre>.000NN.wav, 22.05 kHz (2 s, not 30 s)
    write_clotho(dir)       clotho_captions_evaluation.csv + evaluation/*.wav, 44.1 kHz (3 s, not 15-30 s)
    write_audiocaps(dir)    test.csv (5 rows a clip) + {youtube_id}_{start_time}.wav (2 s, not 10 s)

Each clip is a tone of its own pitch plus a little noise, so clips differ.
"""
from __future__ import annotations

import csv
import os

import numpy as np
import soundfile as sf

from clapjax.train import benchmark_sets as B

ESC10 = {"dog", "rooster", "rain", "sea_waves", "crackling_fire", "crying_baby", "sneezing", "clock_tick",
         "helicopter", "chainsaw"}


def _tone(n: int, seconds: float, sr: int) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    rng = np.random.default_rng(n)
    return (0.3 * np.sin(2 * np.pi * (110 + 37 * n) * t) + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


def _write_csv(path: str, header: list[str], rows: list[list]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _wav(path: str, n: int, seconds: float, sr: int) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sf.write(path, _tone(n, seconds, sr), sr, subtype="PCM_16")


def write_esc50(root: str) -> str:
    """One 5 s clip per class (50), folds 1-5 in turn; the first row is the release's own first row."""
    rows = []
    for target, name in enumerate(B.ESC50_CLASSES):
        category = name.replace(" ", "_")
        fold, src, take = target % 5 + 1, 100032 + 1000 * target, "A"
        filename = f"{fold}-{src}-{take}-{target}.wav"
        rows.append([filename, fold, target, category, category in ESC10, src, take])
        _wav(os.path.join(root, "audio", filename), target, 5.0, 44100)
    _write_csv(os.path.join(root, "meta", "esc50.csv"),
               ["filename", "fold", "target", "category", "esc10", "src_file", "take"], rows)
    return root


def write_urbansound8k(root: str) -> str:
    """One clip per class (10), folds 1-10, at the mixed rates the release has (44.1 / 48 / 22.05 kHz)."""
    rows = []
    rates = (44100, 48000, 22050)
    for class_id, name in enumerate(B.URBANSOUND8K_CLASSES):
        fs_id, fold = 100032 + class_id, class_id + 1
        filename = f"{fs_id}-{class_id}-0-0.wav"
        rows.append([filename, fs_id, 0.0, 0.317551 + class_id, 1, fold, class_id, name.replace(" ", "_")])
        _wav(os.path.join(root, "audio", f"fold{fold}", filename), 60 + class_id, 1.5, rates[class_id % 3])
    _write_csv(os.path.join(root, "metadata", "UrbanSound8K.csv"),
               ["slice_file_name", "fsID", "start", "end", "salience", "fold", "classID", "class"], rows)
    return root


def write_gtzan(root: str, *, original: bool = False, corrupt: str | None = None) -> str:
    """One clip per genre; Kaggle's layout (genres_original/, .wav) or the original tarball's (genres/, .au).
    `corrupt`: a genre whose clip holds bytes no decoder reads (Kaggle's jazz.00054.wav is such a file)."""
    folder, ext, fmt = ("genres", ".au", "AU") if original else ("genres_original", ".wav", "WAV")
    for n, genre in enumerate(B.GTZAN_CLASSES):
        number = 54 if genre == corrupt else n
        path = os.path.join(root, folder, genre, f"{genre}.{number:05d}{ext}")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if genre == corrupt:
            with open(path, "wb") as f:
                f.write(b"RIFF\x00\x00\x00\x00not audio at all" * 8)
        else:
            sf.write(path, _tone(80 + n, 2.0, 22050), 22050, subtype="PCM_16", format=fmt)
    return root


CLOTHO_FILES = ("Santa Motor.wav", "01 Crows.wav", "bird_chirp_forest.wav", "Footsteps on Gravel, Morning.wav")


def clotho_captions(i: int) -> list[str]:
    return [f"clip {i} caption {k}, with a comma and \"quotes\"" for k in range(1, 6)]


def write_clotho(root: str) -> str:
    rows = []
    for i, name in enumerate(CLOTHO_FILES):
        rows.append([name] + clotho_captions(i))
        _wav(os.path.join(root, "evaluation", name), 120 + i, 3.0, 44100)
    _write_csv(os.path.join(root, "clotho_captions_evaluation.csv"),
               ["file_name"] + [f"caption_{k}" for k in range(1, 6)], rows)
    return root


AUDIOCAPS_CLIPS = (("--0w1YA1Hm4", 30), ("-1nilez17Dg", 0), ("-3Kv4fdm7Uk", 30), ("-AheI8Epim4", 10))


def audiocaps_captions(i: int) -> list[str]:
    return [f"audiocaps clip {i} says thing {k}" for k in range(5)]


def write_audiocaps(root: str, *, missing: int | None = None) -> str:
    """5 caption rows per clip, interleaved as the release's are not grouped; clip `missing` is not downloaded."""
    rows, audiocap_id = [], 103549
    for k in range(5):
        for i, (yt, start) in enumerate(AUDIOCAPS_CLIPS):
            rows.append([audiocap_id, yt, start, audiocaps_captions(i)[k]])
            audiocap_id += 1
    for i, (yt, start) in enumerate(AUDIOCAPS_CLIPS):
        if i != missing:
            _wav(os.path.join(root, f"{yt}_{start}.wav"), 140 + i, 2.0, 44100)
    _write_csv(os.path.join(root, "test.csv"), ["audiocap_id", "youtube_id", "start_time", "caption"], rows)
    return root
