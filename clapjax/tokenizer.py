"""Tokenizer: a thin wrapper over a Hugging Face tokenizer read from a local directory.

Called the way LAION-CLAP calls it: pad to `max_length` 77, truncate. It never downloads: a
missing or incomplete directory is an error naming the files expected. It also refuses the trap
transformers 5 sets offline, where a tokenizer built from nothing silently has only its 5
special tokens (every caption becomes `<s></s>`).

The CLIP kind ('transformer') follows LAION's own `clap_module.tokenize`, not Hugging Face's
CLIPTokenizer call, which differs from it in three ways that change the ids: LAION cleans captions
with ftfy and a double HTML unescape, cuts a long caption at `max_length` tokens without putting
EOT back, and pads with 0.
"""
from __future__ import annotations

import gzip
import html
import json
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
        if kind == "transformer":
            self._clip_clean = _clip_cleaner()
            self._sot, self._eot = _special_ids(self._tok, directory)
            # captions arrive cleaned and lowercased as LAION cleans them; the backend's own NFC pass
            # would re-compose what LAION leaves decomposed
            self._tok.backend_tokenizer.normalizer = None
            self._pad_id = 0  # LAION's CLIP rows are zero-filled
        elif self._tok.pad_token_id is None:
            raise ValueError(f"tokenizer in {directory!r} has no padding token")
        else:
            self._pad_id = int(self._tok.pad_token_id)

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    @property
    def pad_token_id(self) -> int:
        return self._pad_id

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
        if self.kind == "transformer":
            return self._clip_encode(texts)
        # BERT's token types asked for by name: a bare tokenizer.json does not list them as an input
        enc = self._tok(texts, padding="max_length", truncation=True, max_length=self.max_length,
                        return_token_type_ids=self.kind == "bert", return_tensors="np")
        out = {"input_ids": enc["input_ids"].astype(np.int32),
               "attention_mask": enc["attention_mask"].astype(np.int32)}
        if self.kind == "bert":
            out["token_type_ids"] = enc["token_type_ids"].astype(np.int32)
        return out

    def _clip_encode(self, texts: list[str]) -> dict[str, np.ndarray]:
        pieces = self._tok([self._clip_clean(t) for t in texts], add_special_tokens=False)["input_ids"]
        ids = np.full((len(texts), self.max_length), self._pad_id, np.int32)
        mask = np.zeros_like(ids)
        for row, body in enumerate(pieces):
            # LAION truncates after adding SOT/EOT: a long caption ends on a caption token, not on EOT
            # (its tower then pools at the largest id, as clapjax's does)
            tokens = [self._sot, *body, self._eot][: self.max_length]
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def save(self, directory: str | os.PathLike) -> None:
        self._tok.save_pretrained(os.fspath(directory))


CLIP_SPECIALS = ("<|startoftext|>", "<|endoftext|>")  # Hugging Face's names for LAION's SOT / EOT


def _special_ids(tok, directory: str) -> list[int]:
    # the BPE vocabulary's own entries: CLIPTokenizer appends missing specials as new ids, which
    # LAION's 49408-row token embedding does not have
    vocab = tok.backend_tokenizer.get_vocab(with_added_tokens=False)
    missing = [t for t in CLIP_SPECIALS if t not in vocab]
    if missing:
        raise ValueError(f"CLIP tokenizer in {directory!r} has no {' / '.join(missing)} in its vocabulary")
    return [vocab[t] for t in CLIP_SPECIALS]


def _clip_cleaner():
    try:
        import ftfy
    except ImportError:
        raise ImportError("the CLIP ('transformer') tokenizer cleans captions with ftfy as LAION-CLAP "
                          "does: pip install ftfy") from None
    import regex

    def clean(text: str) -> str:  # LAION's basic_clean, whitespace_clean, then lower()
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        return regex.sub(r"\s+", " ", text).strip().lower()
    return clean


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


def write_clip_vocabulary(bpe_gz: str | os.PathLike, directory: str | os.PathLike) -> str:
    """Write vocab.json + merges.txt for the CLIP kind from CLIP's `bpe_simple_vocab_16e6.txt.gz`
    (laion_clap ships it in `clap_module/`): ids as LAION numbers them, 256 byte symbols, the same
    256 ending a word, one per merge, then SOT and EOT (49406, 49407)."""
    from tokenizers.pre_tokenizers import ByteLevel
    directory = os.fspath(directory)
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]  # the 48894 merges LAION's (and OpenAI's) tokenizer reads
    # GPT-2's byte symbols: printable bytes stand for themselves, the other 68 are chr(256 + n) in
    # byte order, so code point order is the order CLIP numbers them in
    symbols = sorted(ByteLevel.alphabet())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + list(CLIP_SPECIALS)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({token: i for i, token in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return directory
