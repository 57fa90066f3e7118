"""Tokenizer: a thin wrapper over a Hugging Face tokenizer read from a local directory.

Called the way LAION-CLAP calls it: pad to `max_length` 77, truncate. It never downloads: a
missing or incomplete directory is an error naming the files expected. It also refuses the trap
transformers 5 sets offline, where a tokenizer built from nothing silently has only its 5
special tokens (every caption becomes `<s></s>`).
"""
from __future__ import annotations

import os
from typing import Iterable, Sequence

import numpy as np

CONTEXT_LENGTH = 77
# files per tokenizer kind, besides the self-describing tokenizer.json + tokenizer_config.json
KIND_FILES = {
    "roberta": ("vocab.json", "merges.txt"),
    "bart": ("vocab.json", "merges.txt"),
    "bert": ("vocab.txt",),
    "transformer": ("vocab.json", "merges.txt"),  # CLIP BPE
}
MIN_VOCAB = 16  # anything smaller is an empty/broken vocabulary, not a real one


class Tokenizer:
    def __init__(self, directory: str | os.PathLike, *, kind: str = "roberta",
                 max_length: int = CONTEXT_LENGTH):
        directory = os.fspath(directory)
        if kind not in KIND_FILES:
            raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {sorted(KIND_FILES)}")
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"tokenizer directory {directory!r} does not exist "
                                    "(clapjax never downloads tokenizers: pass a local directory)")
        self.kind, self.max_length, self.directory = kind, max_length, directory
        self._tok = _load(directory, kind)
        n = len(self._tok)
        if n < MIN_VOCAB:
            raise ValueError(f"tokenizer in {directory!r} has only {n} tokens: the vocabulary did not load")
        if self._tok.pad_token_id is None:
            raise ValueError(f"tokenizer in {directory!r} has no padding token")

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    @property
    def pad_token_id(self) -> int:
        return int(self._tok.pad_token_id)

    def __call__(self, texts: str | Sequence[str]) -> dict[str, np.ndarray]:
        """`texts` → dict of int32 arrays (N, max_length): input_ids, attention_mask[, token_type_ids]."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            raise ValueError("no texts to tokenize")
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise TypeError(f"texts must be strings; items {bad[:5]} are not")
        enc = self._tok(texts, padding="max_length", truncation=True, max_length=self.max_length,
                        return_tensors="np")
        out = {"input_ids": enc["input_ids"].astype(np.int32),
               "attention_mask": enc["attention_mask"].astype(np.int32)}
        if self.kind == "bert":
            out["token_type_ids"] = enc["token_type_ids"].astype(np.int32)
        return out

    def save(self, directory: str | os.PathLike) -> None:
        self._tok.save_pretrained(os.fspath(directory))


def _load(directory: str, kind: str):
    from transformers import AutoTokenizer, BertTokenizer, CLIPTokenizer, RobertaTokenizer

    def has(*names):
        return all(os.path.isfile(os.path.join(directory, n)) for n in names)
    if has("tokenizer.json", "tokenizer_config.json"):
        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    need = KIND_FILES[kind]
    if not has(*need):
        missing = [n for n in need if not has(n)]
        raise FileNotFoundError(
            f"tokenizer directory {directory!r} is incomplete for a {kind} tokenizer: expected "
            f"{' + '.join(need)} (missing {', '.join(missing)}), or tokenizer.json + tokenizer_config.json")
    path = {n: os.path.join(directory, n) for n in need}
    if kind in ("roberta", "bart"):
        # transformers 5 takes vocab=/merges= (the v4 names vocab_file=/merges_file= are silently ignored).
        return RobertaTokenizer(vocab=path["vocab.json"], merges=path["merges.txt"])
    if kind == "transformer":
        return CLIPTokenizer(vocab=path["vocab.json"], merges=path["merges.txt"])
    return BertTokenizer(vocab=path["vocab.txt"])


def train_byte_level_bpe(texts: Iterable[str], directory: str | os.PathLike, vocab_size: int = 2000) -> str:
    """Train a RoBERTa-style byte-level BPE (special ids <s>=0 <pad>=1 </s>=2 <unk>=3 <mask>=4, as
    roberta-base) on `texts` and write vocab.json + merges.txt to `directory`."""
    from tokenizers import ByteLevelBPETokenizer
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(list(texts), vocab_size=vocab_size, min_frequency=2,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(directory)
    return directory
