"""Names → local files: a path, a Hugging Face repo id holding a `ClapModel`, or a laion-clap release name.

    locate("converted/")                   a local path, as `pipeline.read_source` takes it (or a clapjax model)
    locate("laion/clap-htsat-unfused")     config.json + the weights (model.safetensors preferred over
                                           pytorch_model.bin, either possibly sharded) + tokenizer and
                                           preprocessor files, from one commit
    locate("630k-audioset-best")           `lukewys/laion_clap`'s file, where laion_clap's `load_ckpt` downloads it

Files come through huggingface_hub's own download and cache code (`hf_hub_download`): its cache
(`HF_HUB_CACHE`, or `cache_dir=`), its offline switch (`HF_HUB_OFFLINE=1`: what is cached works).
A file that is neither cached nor reachable is one `NotInCache` error naming the repo, the revision,
the files and how to get them. Nothing here runs at import: only `locate` and `fetch` touch the Hub.
"""
from __future__ import annotations

import dataclasses
import json
import os

from clapjax.convert import hf

LAION_REPO = "lukewys/laion_clap"  # laion_clap.hook.CLAP_Module.load_ckpt's download_link
LAION_RELEASES = ("630k-best", "630k-audioset-best", "630k-fusion-best", "630k-audioset-fusion-best",
                  "music_audioset_epoch_15_esc_90.14", "music_speech_epoch_15_esc_89.25",
                  "music_speech_audioset_epoch_15_esc_89.98")
CONFIG, PREPROCESSOR = "config.json", "preprocessor_config.json"
# what a transformers tokenizer reads from a model repo; the set that loads is checked by clapjax.tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "vocab.txt")
COMPLETE_TOKENIZERS = (("tokenizer.json", "tokenizer_config.json"), ("vocab.json", "merges.txt"), ("vocab.txt",))


class NotInCache(FileNotFoundError):
    """Files that are neither in the local Hub cache nor reachable (offline, or no network)."""

    def __init__(self, repo_id: str, files, revision: str | None, name: str | None = None, note: str = ""):
        self.repo_id, self.files, self.revision = repo_id, tuple(files), revision
        at = f" at revision {revision}" if revision else ""
        which = " / ".join(self.files)
        hf_cli = f"hf download {repo_id}" + (f" {self.files[0]}" if len(self.files) == 1 else "")
        super().__init__(
            f"{which} of the Hugging Face repo {repo_id}{at} is not in the local Hub cache and cannot be downloaded "
            f"(HF_HUB_OFFLINE=1, or no network). Get it on a machine with network with "
            f"`clapjax download {name or repo_id}` (or `{hf_cli}`) and copy its Hub cache "
            f"(HF_HUB_CACHE, default ~/.cache/huggingface/hub) here{note}")


@dataclasses.dataclass(frozen=True)
class Located:
    path: str                       # a local file or directory: what `pipeline.read_source` reads
    repo_id: str | None = None      # None: a local path the user named
    revision: str | None = None     # the commit the files came from
    files: tuple[str, ...] = ()     # the repo's file names that were fetched
    tokenizer_dir: str | None = None  # the repo's own tokenizer files, when it has a complete set

    @property
    def provenance(self) -> dict:
        return {"repo_id": self.repo_id, "revision": self.revision, "repo_files": list(self.files)}


def release_file(name: str) -> str | None:
    """`630k-best` or `630k-best.pt` → `630k-best.pt`; None for any other name."""
    stem = name[:-3] if name.endswith(".pt") else name
    return f"{stem}.pt" if stem in LAION_RELEASES else None


def is_repo_id(name: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id
    if name.count("/") != 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def locate(name: str, *, revision: str | None = None, cache_dir: str | None = None) -> Located:
    """The local files `name` stands for, fetched into the Hub cache when they are not there."""
    if os.path.exists(name):  # a path wins over a name spelled the same
        if revision is not None:
            raise ValueError(f"revision={revision!r} was given for the local path {name!r}; a revision selects a "
                             "commit of a Hugging Face repo")
        path = os.path.abspath(name)
        return Located(path, tokenizer_dir=path if os.path.isdir(path) and _has_tokenizer(os.listdir(path)) else None)
    release = release_file(name)
    if release is not None:
        path = fetch(LAION_REPO, release, revision=revision, cache_dir=cache_dir, name=name)
        if path is None:
            raise FileNotFoundError(f"{LAION_REPO} has no {release}" + (f" at revision {revision}" if revision else ""))
        return Located(path, LAION_REPO, _commit_of(path), (release,))
    if is_repo_id(name):
        return _locate_model_repo(name, revision, cache_dir)
    raise FileNotFoundError(
        f"{name!r}: no such file or directory, not a laion-clap release name (one of {', '.join(LAION_RELEASES)}, "
        "with or without .pt), and not a Hugging Face repo id (ORG/NAME)")


def fetch(repo_id: str, filename: str, *, revision: str | None = None, cache_dir: str | None = None,
          name: str | None = None) -> str | None:
    """The cached path of `filename` (downloaded if needed and allowed); None when the repo has no such file
    (the Hub said so, now or on an earlier download); NotInCache when that cannot be known."""
    from huggingface_hub import _CACHED_NO_EXIST, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import (LocalEntryNotFoundError, RemoteEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)
    try:
        return hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir)
    except RemoteEntryNotFoundError:
        return None
    except LocalEntryNotFoundError:
        if try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision) is _CACHED_NO_EXIST:
            return None
        raise NotInCache(repo_id, [filename], revision, name) from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"the Hugging Face repo {repo_id} has no revision {revision!r}") from None
    except RepositoryNotFoundError:  # also gated / private without a token
        raise FileNotFoundError(f"{repo_id}: no such Hugging Face repo, or it is private or gated (log in with "
                                "`hf auth login`)") from None


def _has_tokenizer(names) -> bool:
    return any(set(group) <= set(names) for group in COMPLETE_TOKENIZERS)


def _commit_of(path: str) -> str:
    # huggingface_hub's layout: <cache>/models--ORG--NAME/snapshots/<commit>/<file>
    return os.path.basename(os.path.dirname(path))


def _locate_model_repo(repo_id: str, revision: str | None, cache_dir: str | None) -> Located:
    try:
        config = fetch(repo_id, CONFIG, revision=revision, cache_dir=cache_dir)
    except NotInCache as err:  # the name may as well be a mistyped path
        raise NotInCache(repo_id, err.files, revision,
                         note=f" (nor is there a local file or directory named {repo_id!r})") from None
    if config is None:
        raise FileNotFoundError(f"the Hugging Face repo {repo_id} has no {CONFIG}: not a transformers ClapModel repo")
    with open(config) as f:
        model_type = json.load(f).get("model_type")
    if model_type != "clap":
        raise ValueError(f"{repo_id}: {CONFIG} says model_type {model_type!r}, expected 'clap' (a ClapModel)")
    commit = _commit_of(config)  # every other file from this same commit, even if the branch moves meanwhile

    def get(filename):
        return fetch(repo_id, filename, revision=commit, cache_dir=cache_dir)
    weights = _fetch_weights(repo_id, commit, get)
    found = {CONFIG, *weights}
    if get(PREPROCESSOR) is not None:
        found.add(PREPROCESSOR)
    tokenizer, unknown = [], []
    for filename in TOKENIZER_FILES:
        try:
            if get(filename) is not None:
                tokenizer.append(filename)
        except NotInCache:
            unknown.append(filename)
    complete = _has_tokenizer(tokenizer)
    if not complete and unknown:
        raise NotInCache(repo_id, unknown, commit)
    found.update(tokenizer)
    snapshot = os.path.dirname(config)
    return Located(snapshot, repo_id, commit, tuple(sorted(found)), snapshot if complete else None)


def _fetch_weights(repo_id: str, commit: str, get) -> list[str]:
    """transformers' order of preference (safetensors first); only the first file the repo has is fetched."""
    uncached = []
    for filename in hf.WEIGHT_FILES:
        try:
            path = get(filename)
        except NotInCache:
            uncached.append(filename)
            continue
        if path is None:
            continue
        if not filename.endswith(".index.json"):
            return [filename]
        shards = hf.shard_names(path)
        missing = [s for s in shards if get(s) is None]
        if missing:
            raise FileNotFoundError(f"{repo_id}: {filename} places tensors in {', '.join(missing)}, which the repo "
                                    "does not have")
        return [filename, *shards]
    if uncached:
        raise NotInCache(repo_id, uncached, commit)
    raise FileNotFoundError(f"the Hugging Face repo {repo_id} holds no weights (none of {', '.join(hf.WEIGHT_FILES)})")
