"""A model name → a saved model to restore and the model's own tokenizer: what `clapjax.CLAP.from_pretrained`
and the CLI's MODEL arguments take.

    found = pretrained.find("laion/clap-htsat-unfused")     # or a path, or "630k-audioset-best"
    model = saved_model.restore(found.model_dir)
    tokenizer = found.tokenizer()                            # None when the model has none of its own

A clapjax model directory is used as it is; any other source is converted strictly into the conversion
cache (once per content). The own tokenizer is the HF repo's tokenizer files when it has them, else the
one the text tower was trained with: laion-clap's `roberta-base`, `bert-base-uncased`, `facebook/bart-base`
(fetched like the model, from the Hub cache), or LAION's CLIP BPE that laion_clap ships (tmodel
'transformer'). A model trained by clapjax records no source, so it has no tokenizer of its own.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import tempfile
from typing import Callable

from clapjax import saved_model
from clapjax.convert import conversion_cache, hub
from clapjax.tokenizer import CONTEXT_LENGTH, KIND_FILES, Tokenizer, write_clip_vocabulary

# laion_clap.training.data's tokenizers, by LAION's tmodel name
TEXT_TOWER_TOKENIZERS = {"roberta": "roberta-base", "bert": "bert-base-uncased", "bart": "facebook/bart-base"}
CLIP_BPE = "bpe_simple_vocab_16e6.txt.gz"  # in laion_clap/clap_module/, as its tokenize reads it


@dataclasses.dataclass(frozen=True)
class Found:
    model_dir: str
    tokenizer_dir: str | None   # None: no tokenizer of its own
    tokenizer_kind: str         # clapjax.tokenizer's kind: the model's tmodel

    def tokenizer(self, max_length: int = CONTEXT_LENGTH) -> Tokenizer | None:
        if self.tokenizer_dir is None:
            return None
        return Tokenizer(self.tokenizer_dir, kind=self.tokenizer_kind, max_length=max_length)

    def choose_tokenizer(self, choice, max_length: int = CONTEXT_LENGTH) -> Tokenizer | None:
        """The tokenizer a caller asked for: None → the model's own (None when it has none), False → none,
        a directory → that one, a Tokenizer → itself."""
        if choice is None:
            return self.tokenizer(max_length)
        if choice is False:
            return None
        if isinstance(choice, (str, os.PathLike)):
            return Tokenizer(os.fspath(choice), kind=self.tokenizer_kind, max_length=max_length)
        return choice


class NoOwnTokenizer(ValueError):
    """A text command on a model that has no tokenizer of its own, and none was given."""

    def __init__(self, name: str):
        super().__init__(f"{name} has no tokenizer of its own (a model trained or converted by clapjax from a local "
                         "file records none): this command needs one, pass --tokenizer DIR (vocab.json + merges.txt, "
                         "or tokenizer.json)")


def find(name: str, *, revision: str | None = None, cache_dir: str | None = None,
         conversion_cache_dir: str | None = None, tokenizer: bool = True,
         log: Callable[[str], None] = print) -> Found:
    """`cache_dir`: the Hub cache (huggingface_hub's default when None); `conversion_cache_dir`: clapjax's
    (see conversion_cache.cache_root). `tokenizer=False` skips finding the own tokenizer."""
    if _is_saved_model(name):
        if revision is not None:
            raise ValueError(f"revision={revision!r} was given for the clapjax model directory {name!r}")
        model_dir, repo_tokenizer = os.path.abspath(name), None
    else:
        located = hub.locate(name, revision=revision, cache_dir=cache_dir)
        model_dir = conversion_cache.converted(located.path, provenance={"name": name, **located.provenance},
                                               cache_dir=conversion_cache_dir, log=log)
        repo_tokenizer = located.tokenizer_dir
    cfg, _ = saved_model.read_config(model_dir)
    if not tokenizer:
        return Found(model_dir, None, cfg.tmodel)
    directory = repo_tokenizer or own_tokenizer_dir(model_dir, cfg.tmodel, cache_dir=cache_dir,
                                                    conversion_cache_dir=conversion_cache_dir)
    return Found(model_dir, directory, cfg.tmodel)


def _is_saved_model(name: str) -> bool:
    if not os.path.isfile(os.path.join(name, saved_model.CONFIG)):
        return False
    try:
        saved_model.read_config(name)
    except ValueError:  # an HF ClapModel directory: its config.json is transformers'
        return False
    return True


def own_tokenizer_dir(model_dir: str, tmodel: str, *, cache_dir=None, conversion_cache_dir=None) -> str | None:
    """The tokenizer directory of a converted model: its HF repo's files, else its text tower's; None for a
    model with no recorded source (trained by clapjax, or converted before sources were recorded)."""
    record = saved_model.read_provenance(model_dir)
    if record is None:
        return None
    repo, revision = record.get("repo_id"), record.get("revision")
    if repo and repo != hub.LAION_REPO:  # a model repo: its own tokenizer files, if it has a set
        located = hub.locate(repo, revision=revision, cache_dir=cache_dir)
        if located.tokenizer_dir is not None:
            return located.tokenizer_dir
    return text_tower_tokenizer_dir(tmodel, cache_dir=cache_dir, conversion_cache_dir=conversion_cache_dir)


def text_tower_tokenizer_dir(tmodel: str, *, cache_dir=None, conversion_cache_dir=None) -> str:
    """The tokenizer laion-clap trains and tokenizes `tmodel` captions with."""
    if tmodel == "transformer":
        return clip_tokenizer_dir(conversion_cache_dir)
    if tmodel not in TEXT_TOWER_TOKENIZERS:
        raise ValueError(f"no known tokenizer for the text tower {tmodel!r}; pass tokenizer=DIR")
    repo = TEXT_TOWER_TOKENIZERS[tmodel]
    paths = []
    for filename in KIND_FILES[tmodel]:
        path = hub.fetch(repo, filename)
        if path is None:
            raise FileNotFoundError(f"the Hugging Face repo {repo} has no {filename} (the {tmodel} tokenizer's file)")
        paths.append(path)
    return os.path.dirname(paths[0])


def clip_tokenizer_dir(conversion_cache_dir=None) -> str:
    """vocab.json + merges.txt written once from the CLIP BPE file laion_clap ships (found without importing
    laion_clap, which needs PyTorch)."""
    spec = importlib.util.find_spec("laion_clap")
    bpe = os.path.join(os.path.dirname(spec.origin), "clap_module", CLIP_BPE) if spec and spec.origin else None
    if bpe is None or not os.path.isfile(bpe):
        raise FileNotFoundError(f"the CLIP text tower's tokenizer is LAION's BPE ({CLIP_BPE}), which ships in the "
                                "laion_clap package: `pip install --no-deps laion-clap==1.1.7`, or pass tokenizer=DIR")
    target = os.path.join(conversion_cache.cache_root(conversion_cache_dir), "tokenizers",
                          f"clip-{conversion_cache.sha256(bpe)[:16]}")
    if not os.path.isfile(os.path.join(target, "merges.txt")):  # merges.txt is written last
        os.makedirs(os.path.dirname(target), exist_ok=True)
        work = tempfile.mkdtemp(prefix=".building-", dir=os.path.dirname(target))
        try:
            write_clip_vocabulary(bpe, os.path.join(work, "clip"))
            try:
                os.rename(os.path.join(work, "clip"), target)
            except OSError:  # another process put it there first
                if not os.path.isfile(os.path.join(target, "merges.txt")):
                    raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target
