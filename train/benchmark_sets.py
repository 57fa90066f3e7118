"""The papers' benchmarks, each read from the layout its public release unpacks to.

    bench = read_benchmark("esc50", "ESC-50-master")      # meta/esc50.csv + audio/*.wav
    bench.files, bench.labels, bench.classes, bench.prompt

| name | layout read | task |
|---|---|---|
| `esc50` | `meta/esc50.csv` (filename,fold,target,category,esc10,src_file,take), `audio/*.wav` | zero-shot, 50 classes, 5 folds |
| `urbansound8k` | `metadata/UrbanSound8K.csv` (slice_file_name,fsID,start,end,salience,fold,classID,class), `audio/foldN/` | zero-shot, 10 classes, 10 folds |
| `gtzan` | `genres_original/<genre>/*.wav` (Kaggle) or `genres/<genre>/*.au|wav` (the original) | zero-shot, 10 genres |
| `clotho` | `clotho_captions_evaluation.csv` (file_name,caption_1..caption_5), `evaluation/*.wav` | retrieval, 5 captions a clip |
| `audiocaps` | `test.csv` (audiocap_id,youtube_id,start_time,caption), clips named by a pattern | retrieval, 5 captions a clip |

Class names and prompts are LAION's: `class_labels/*_space.json` of LAION-AI/CLAP (the datasets' own names
with '_' read as ' ', in the datasets' own class order) and the prompts of its
`evaluate/eval_zeroshot_classification.py` ("This is a sound of {}.", GTZAN "This is a {} song."). ESC-50 also
carries the protocol of LAION's README (fold 1, prompt "This is a sound of {}" without the full stop).

A clip the metadata lists but whose file is absent is kept out of `files` and named in `missing`; decoding
problems are found when the clip is read (train/benchmark_run.py reports them by name).
"""
from __future__ import annotations

import csv
import dataclasses
import os

import numpy as np

from clapjax.audio.io import AUDIO_EXTENSIONS

SOUND_PROMPT = "This is a sound of {}."   # LAION's eval_zeroshot_classification.py, every set but GTZAN
SONG_PROMPT = "This is a {} song."        # the same script, GTZAN
README_PROMPT = "This is a sound of {}"   # LAION's README ESC-50 example: "This is a sound of " + label

# LAION-AI/CLAP class_labels/ESC50_class_labels_indices_space.json, in index (= ESC-50 `target`) order
ESC50_CLASSES = (
    "dog", "rooster", "pig", "cow", "frog", "cat", "hen", "insects", "sheep", "crow", "rain", "sea waves",
    "crackling fire", "crickets", "chirping birds", "water drops", "wind", "pouring water", "toilet flush",
    "thunderstorm", "crying baby", "sneezing", "clapping", "breathing", "coughing", "footsteps", "laughing",
    "brushing teeth", "snoring", "drinking sipping", "door wood knock", "mouse click", "keyboard typing",
    "door wood creaks", "can opening", "washing machine", "vacuum cleaner", "clock alarm", "clock tick",
    "glass breaking", "helicopter", "chainsaw", "siren", "car horn", "engine", "train", "church bells",
    "airplane", "fireworks", "hand saw")
# class_labels/UrbanSound8K_class_labels_indices.json (= UrbanSound8K `classID` order)
URBANSOUND8K_CLASSES = ("air conditioner", "car horn", "children playing", "dog bark", "drilling",
                        "engine idling", "gun shot", "jackhammer", "siren", "street music")
# class_labels/GTZAN_class_labels.json (= the genre folder names)
GTZAN_CLASSES = ("blues", "classical", "country", "disco", "hiphop", "jazz", "metal", "pop", "reggae", "rock")

CAPTIONS_PER_CLIP = 5                                  # Clotho and AudioCaps test: LAION's 5-caption protocol
AUDIOCAPS_PATTERN = "{youtube_id}_{start_time}.wav"    # default clip name under the AudioCaps directory


@dataclasses.dataclass(frozen=True)
class RankProtocol:
    """LAION README's zero-shot report: R@1/5/10, mAP@10 and mean/median rank on one fold with its prompt."""
    fold: int      # the fold scored (ESC-50: 1, 400 clips)
    prompt: str    # its prompt template, '{}' = the class name


@dataclasses.dataclass
class Benchmark:
    """One benchmark's clips as its release lays them out, with what scoring needs."""
    name: str                          # 'esc50', 'urbansound8k', 'gtzan', 'clotho', 'audiocaps'
    root: str                          # the dataset directory given (absolute)
    files: list[str]                   # absolute path of each clip present, in metadata order
    missing: list[str]                 # clips the metadata lists whose file is absent (paths relative to root)
    task: str                          # 'zero_shot' or 'retrieval'
    classes: tuple[str, ...] = ()      # zero-shot: LAION's class names, in label order
    labels: np.ndarray | None = None   # zero-shot: (clips,) class index of each present clip
    folds: np.ndarray | None = None    # (clips,) fold of each present clip; None when the release has none
    prompt: str = ""                   # zero-shot: LAION's prompt template
    captions: list[list[str]] | None = None   # retrieval: the 5 captions of each present clip
    readme: RankProtocol | None = None        # ESC-50: LAION README's protocol as well

    def __len__(self) -> int:
        return len(self.files)

    @property
    def listed(self) -> int:
        """Clips the release's metadata lists (present + missing)."""
        return len(self.files) + len(self.missing)


def _read_csv(path: str, columns: tuple[str, ...]) -> list[dict[str, str]]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found (the release's metadata file)")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = tuple(reader.fieldnames or ())
        absent = [c for c in columns if c not in header]
        if absent:
            raise ValueError(f"{path}: header {list(header)} lacks the columns {absent}")
        rows = list(reader)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def _int(row: dict, column: str, path: str, line: int) -> int:
    try:
        return int(row[column])
    except (TypeError, ValueError):
        raise ValueError(f"{path} row {line}: {column}={row[column]!r} is not an integer") from None


def _class_labels(rows, path: str, index_col: str, name_col: str, classes: tuple[str, ...]) -> np.ndarray:
    """Each row's class index, checked against LAION's list: the row's name ('_' as ' ') at its index."""
    labels = []
    for line, row in enumerate(rows, 2):
        index, name = _int(row, index_col, path, line), row[name_col].replace("_", " ")
        if not 0 <= index < len(classes) or classes[index] != name:
            raise ValueError(f"{path} row {line}: {index_col}={index} {name_col}={row[name_col]!r} is not a class "
                             f"of LAION's list ({len(classes)} classes, index {index} is "
                             f"{classes[index] if 0 <= index < len(classes) else 'out of range'!r})")
        labels.append(index)
    return np.asarray(labels, np.int32)


def _split_present(root: str, rel_paths: list[str]) -> tuple[list[int], list[str]]:
    """(indices of the listed clips whose file exists, relative paths of those that do not)."""
    present = [i for i, rel in enumerate(rel_paths) if os.path.isfile(os.path.join(root, rel))]
    kept = set(present)
    return present, [rel for i, rel in enumerate(rel_paths) if i not in kept]


def _zero_shot(name, root, rel_paths, labels, folds, classes, prompt, readme=None) -> Benchmark:
    present, missing = _split_present(root, rel_paths)
    return Benchmark(name, root, [os.path.join(root, rel_paths[i]) for i in present], missing, "zero_shot",
                     classes, labels[present], None if folds is None else folds[present], prompt, readme=readme)


def read_esc50(root: str) -> Benchmark:
    path = os.path.join(root, "meta", "esc50.csv")
    rows = _read_csv(path, ("filename", "fold", "target", "category"))
    labels = _class_labels(rows, path, "target", "category", ESC50_CLASSES)
    folds = np.asarray([_int(r, "fold", path, n) for n, r in enumerate(rows, 2)], np.int32)
    return _zero_shot("esc50", root, [os.path.join("audio", r["filename"]) for r in rows], labels, folds,
                      ESC50_CLASSES, SOUND_PROMPT, RankProtocol(1, README_PROMPT))


def read_urbansound8k(root: str) -> Benchmark:
    path = os.path.join(root, "metadata", "UrbanSound8K.csv")
    rows = _read_csv(path, ("slice_file_name", "fold", "classID", "class"))
    labels = _class_labels(rows, path, "classID", "class", URBANSOUND8K_CLASSES)
    folds = np.asarray([_int(r, "fold", path, n) for n, r in enumerate(rows, 2)], np.int32)
    rel = [os.path.join("audio", f"fold{f}", r["slice_file_name"]) for f, r in zip(folds, rows)]
    return _zero_shot("urbansound8k", root, rel, labels, folds, URBANSOUND8K_CLASSES, SOUND_PROMPT)


def read_gtzan(root: str) -> Benchmark:
    """`root` may be the folder holding the genre folders, or any folder above it up to the Kaggle
    download's (`Data/genres_original/`) or the original tarball's (`genres/`)."""
    candidates = [root] + [os.path.join(root, *p) for p in (("genres_original",), ("genres",),
                                                             ("Data", "genres_original"))]
    base = next((c for c in candidates if all(os.path.isdir(os.path.join(c, g)) for g in GTZAN_CLASSES)), None)
    if base is None:
        raise FileNotFoundError(f"{root}: no GTZAN genre folders ({', '.join(GTZAN_CLASSES)}) in it or in its "
                                "genres_original/, genres/ or Data/genres_original/")
    rel, labels = [], []
    for label, genre in enumerate(GTZAN_CLASSES):
        names = sorted(n for n in os.listdir(os.path.join(base, genre)) if n.lower().endswith(AUDIO_EXTENSIONS))
        rel += [os.path.relpath(os.path.join(base, genre, n), root) for n in names]
        labels += [label] * len(names)
    if not rel:
        raise ValueError(f"{base}: the genre folders hold no audio files ({', '.join(AUDIO_EXTENSIONS)})")
    return _zero_shot("gtzan", root, rel, np.asarray(labels, np.int32), None, GTZAN_CLASSES, SONG_PROMPT)


def _retrieval(name, root, rel_paths, captions) -> Benchmark:
    present, missing = _split_present(root, rel_paths)
    return Benchmark(name, root, [os.path.join(root, rel_paths[i]) for i in present], missing, "retrieval",
                     captions=[captions[i] for i in present])


def read_clotho(root: str) -> Benchmark:
    """Clotho v2's evaluation split: the captions CSV beside `evaluation/` (the unpacked clotho_audio_evaluation.7z)."""
    path = os.path.join(root, "clotho_captions_evaluation.csv")
    columns = tuple(f"caption_{k}" for k in range(1, CAPTIONS_PER_CLIP + 1))
    rows = _read_csv(path, ("file_name",) + columns)
    for line, r in enumerate(rows, 2):
        empty = [c for c in columns if not (r[c] or "").strip()]
        if empty:
            raise ValueError(f"{path} row {line} ({r['file_name']}): empty {empty}")
    return _retrieval("clotho", root, [os.path.join("evaluation", r["file_name"]) for r in rows],
                      [[r[c] for c in columns] for r in rows])


def read_audiocaps(root: str, pattern: str = AUDIOCAPS_PATTERN) -> Benchmark:
    """AudioCaps test: `test.csv` has one row per caption; the clip is (youtube_id, start_time), 5 captions each.
    The clips are the user's own downloads, found at `root/pattern` ({youtube_id}, {start_time} fields)."""
    path = os.path.join(root, "test.csv")
    rows = _read_csv(path, ("audiocap_id", "youtube_id", "start_time", "caption"))
    clips: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        clips.setdefault((r["youtube_id"], r["start_time"]), []).append(r["caption"])
    wrong = [f"{y}@{s} ({len(c)})" for (y, s), c in clips.items() if len(c) != CAPTIONS_PER_CLIP]
    if wrong:
        raise ValueError(f"{path}: LAION's protocol needs {CAPTIONS_PER_CLIP} captions a clip; these clips have "
                         f"another count: {', '.join(wrong[:10])}{' …' if len(wrong) > 10 else ''}")
    try:
        rel = [pattern.format(youtube_id=y, start_time=s) for y, s in clips]
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"AudioCaps clip pattern {pattern!r}: {err!r}; it may use {{youtube_id}} and "
                         "{start_time}") from None
    if len(set(rel)) != len(rel):
        raise ValueError(f"AudioCaps clip pattern {pattern!r} gives two clips the same file name; "
                         "include {youtube_id} and {start_time}")
    return _retrieval("audiocaps", root, rel, list(clips.values()))


READERS = {"esc50": read_esc50, "urbansound8k": read_urbansound8k, "gtzan": read_gtzan, "clotho": read_clotho,
           "audiocaps": read_audiocaps}
ALIASES = {"esc-50": "esc50", "us8k": "urbansound8k", "clotho-v2": "clotho"}


def benchmark_name(name: str) -> str | None:
    """The benchmark a (case-insensitive) name or alias means, None when it is none."""
    n = name.lower()
    n = ALIASES.get(n, n)
    return n if n in READERS else None


def read_benchmark(name: str, root: str, *, audiocaps_pattern: str = AUDIOCAPS_PATTERN) -> Benchmark:
    key = benchmark_name(name)
    if key is None:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(READERS)}")
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{key}: {root} is not a directory")
    bench = read_audiocaps(root, audiocaps_pattern) if key == "audiocaps" else READERS[key](root)
    if not bench.files:
        raise FileNotFoundError(f"{key}: none of the {bench.listed} clips its metadata lists is under {root} "
                                f"(first missing: {bench.missing[0]})")
    return bench

