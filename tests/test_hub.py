"""Names → models through huggingface_hub's real resolution code, offline, against a Hub cache built in its
on-disk layout (tests/hub_cache.py): HF repo ids and laion-clap release names to converted models equal to the
PyTorch ones, the conversion cache (hit, revision, corrupt entry, two processes at once), the messages for
what is not cached, and the model's own tokenizer against the tokenizers laion_clap itself calls."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import hub_cache
import reference as ref
from clapjax import saved_model
from clapjax.app.api import CLAP
from clapjax.convert import conversion_cache, hub, pipeline, pretrained
from clapjax.tokenizer import Tokenizer, train_byte_level_bpe
from test_tokenizer_reference import CORPUS, TRICKY

REPO = "laion/clap-htsat-unfused"
MAX_ABS, MIN_COS = ref.END_TO_END_MAX_ABS, ref.END_TO_END_MIN_COS


@pytest.fixture(scope="module")
def hub_root(tmp_path_factory):
    """The Hub cache, pointed at by HF_HUB_CACHE and by the constant huggingface_hub read it into at import."""
    import huggingface_hub.constants
    root = tmp_path_factory.mktemp("hub")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_CACHE", str(root))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield root


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    return train_byte_level_bpe(CORPUS * 4, tmp_path_factory.mktemp("bpe"), vocab_size=300)


@pytest.fixture(scope="module")
def clap_repo(hub_root, bpe_dir, tmp_path_factory):
    """laion/clap-htsat-unfused: an older commit, and main (model.safetensors beside a pytorch_model.bin
    of other weights: the safetensors file is the one to read)."""
    d = tmp_path_factory.mktemp("clap-repo")
    old_files, old = hub_cache.write_clap_repo_files(d / "old", bpe_dir, seed=1)
    old_commit = hub_cache.add_commit(hub_root, REPO, old_files, ref=None)
    files, model = hub_cache.write_clap_repo_files(d / "main", bpe_dir, seed=0, bin_seed=2)
    commit = hub_cache.add_commit(hub_root, REPO, files)
    return {"model": model, "commit": commit, "old": old, "old_commit": old_commit, "bpe": bpe_dir}


@pytest.fixture(scope="module")
def text_tower_repos(hub_root, tmp_path_factory):
    """roberta-base, facebook/bart-base and bert-base-uncased as their repos hold the tokenizer: vocab files,
    tokenizer.json, config.json; bert-base-uncased's tokenizer_config.json says only do_lower_case."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizer, RobertaTokenizer
    d = tmp_path_factory.mktemp("towers")
    # vocabularies of other sizes than the ClapModel repo's: picking the wrong tokenizer changes the ids
    for repo, model_type, size in (("roberta-base", "roberta", 250), ("facebook/bart-base", "bart", 270)):
        vocab = train_byte_level_bpe(CORPUS * 4, d / f"{model_type}-bpe", vocab_size=size)
        saved = d / model_type
        RobertaTokenizer(vocab=f"{vocab}/vocab.json", merges=f"{vocab}/merges.txt").save_pretrained(saved)
        (saved / "config.json").write_text(json.dumps({"model_type": model_type, "vocab_size": size}))
        hub_cache.add_commit(hub_root, repo, {"vocab.json": f"{vocab}/vocab.json", "merges.txt": f"{vocab}/merges.txt",
                                              "tokenizer.json": str(saved / "tokenizer.json"),
                                              "config.json": str(saved / "config.json")})
    wordpiece = d / "wordpiece"
    wordpiece.mkdir()
    trainer = BertWordPieceTokenizer(lowercase=True)
    trainer.train_from_iterator(CORPUS * 4, vocab_size=300, min_frequency=1,
                                special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    trainer.save_model(str(wordpiece))
    BertTokenizer(vocab=str(wordpiece / "vocab.txt")).save_pretrained(wordpiece / "saved")
    (wordpiece / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 512}))
    (wordpiece / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 300}))
    hub_cache.add_commit(hub_root, "bert-base-uncased", {
        "vocab.txt": str(wordpiece / "vocab.txt"), "tokenizer.json": str(wordpiece / "saved" / "tokenizer.json"),
        "tokenizer_config.json": str(wordpiece / "tokenizer_config.json"), "config.json": str(wordpiece / "config.json")})


@pytest.fixture(scope="module")
def laion_release(hub_root, tmp_path_factory):
    """lukewys/laion_clap holding 630k-best.pt (a random HTSAT-tiny + RoBERTa-base laion-clap model)."""
    model = ref.laion_clap_model("HTSAT-tiny", "roberta", seed=3)
    path = hub_cache.write_laion_release(tmp_path_factory.mktemp("laion") / "630k-best.pt", model)
    commit = hub_cache.add_commit(hub_root, hub.LAION_REPO, {"630k-best.pt": path})
    return model, commit


@pytest.fixture
def conversions(monkeypatch):
    """Every call of the converter, counted (the proof that a cached entry converts nothing)."""
    calls = []
    real = pipeline.convert

    def counted(src, out, **kw):
        calls.append(src)
        return real(src, out, **kw)
    monkeypatch.setattr(pipeline, "convert", counted)
    return calls


def quiet(_):
    pass


def test_hf_repo_name_to_the_pytorch_models_embeddings(clap_repo, text_tower_repos, hub_root, tmp_path, conversions):
    from transformers import ClapProcessor
    found = pretrained.find(REPO, conversion_cache_dir=tmp_path, log=quiet)
    assert conversions == [os.path.join(hub_cache.repo_dir(hub_root, REPO), "snapshots", clap_repo["commit"])]
    record = saved_model.read_provenance(found.model_dir)
    assert record["repo_id"] == REPO and record["revision"] == clap_repo["commit"] and record["name"] == REPO
    assert "model.safetensors" in record["repo_files"] and "pytorch_model.bin" not in record["repo_files"]
    weights = next(f for f in record["files"] if f["name"] == "model.safetensors")
    blob = os.path.realpath(os.path.join(conversions[0], "model.safetensors"))
    assert weights["sha256"] == os.path.basename(blob) == conversion_cache.sha256(blob)  # the LFS etag is its sha256
    assert record["key_report"]["ok"] and os.path.isfile(os.path.join(found.model_dir, saved_model.REPORT))

    clap = CLAP(saved_model.restore(found.model_dir), found.tokenizer())
    processor = ClapProcessor.from_pretrained(REPO)  # transformers' own reading of the same cached repo
    rng = np.random.default_rng(0)
    waves = [rng.uniform(-0.6, 0.6, n).astype(np.float32) for n in (480000, 130000)]
    inputs = processor(audio=waves, sampling_rate=48000, truncation="rand_trunc", padding="repeatpad",
                       return_tensors="pt")
    texts = ["a dog barks", "the cat sings loudly near the river", TRICKY[-1]]
    t_in = processor(text=texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    model = clap_repo["model"]
    with torch.no_grad():
        audio = model.get_audio_features(input_features=inputs["input_features"]).pooler_output.numpy()
        text = model.get_text_features(input_ids=t_in["input_ids"], attention_mask=t_in["attention_mask"]).pooler_output
    np.testing.assert_array_equal(found.tokenizer()(texts)["input_ids"], t_in["input_ids"].numpy())
    for ours, theirs in ((clap.get_audio_embedding_from_data(waves, quantize=False), audio),
                         (clap.get_text_embedding(texts), text.numpy())):
        max_abs, cos = ref.compare(ours, theirs)
        print(f"{REPO} stand-in: max-abs {max_abs:.3g}, min cos {cos:.8f}")
        assert max_abs <= MAX_ABS and cos >= MIN_COS

    again = pretrained.find(REPO, conversion_cache_dir=tmp_path, log=quiet)
    assert again == found and len(conversions) == 1  # the second call converted nothing


def test_revision_selects_the_snapshot(clap_repo, tmp_path, conversions):
    old = pretrained.find(REPO, revision=clap_repo["old_commit"], conversion_cache_dir=tmp_path, log=quiet)
    main = pretrained.find(REPO, revision="main", conversion_cache_dir=tmp_path, log=quiet)
    assert old.model_dir != main.model_dir and len(conversions) == 2
    assert saved_model.read_provenance(old.model_dir)["revision"] == clap_repo["old_commit"]
    for found, model in ((old, clap_repo["old"]), (main, clap_repo["model"])):
        ours = saved_model.restore(found.model_dir).text_branch.embeddings.word_embeddings.embedding.get_value()
        np.testing.assert_array_equal(np.asarray(ours), model.text_model.embeddings.word_embeddings.weight.detach())


def test_laion_release_name_to_laions_text_embeddings(laion_release, text_tower_repos, tmp_path, conversions):
    from transformers import RobertaTokenizer
    model, commit = laion_release
    found = pretrained.find("630k-best", conversion_cache_dir=tmp_path, log=quiet)
    record = saved_model.read_provenance(found.model_dir)
    assert record["repo_id"] == hub.LAION_REPO and record["revision"] == commit
    assert record["repo_files"] == ["630k-best.pt"]
    assert found.tokenizer_kind == "roberta"
    assert os.path.dirname(found.tokenizer_dir).endswith(os.path.join("models--roberta-base", "snapshots"))
    assert pretrained.find("630k-best.pt", conversion_cache_dir=tmp_path, log=quiet) == found
    assert len(conversions) == 1  # the other spelling is the same file: converted once

    texts = ["a dog barks", "rain falls on a tin roof while thunder rolls far away", TRICKY[-1]]
    tokens = RobertaTokenizer.from_pretrained("roberta-base")(texts, padding="max_length", truncation=True,
                                                             max_length=77, return_tensors="pt")  # laion's call
    with torch.no_grad():
        theirs = model.get_text_embedding(dict(tokens)).numpy()
    clap = CLAP(saved_model.restore(found.model_dir), found.tokenizer())
    max_abs, cos = ref.compare(clap.get_text_embedding(texts), theirs)
    print(f"630k-best stand-in text: max-abs {max_abs:.3g}, min cos {cos:.8f}")
    assert max_abs <= MAX_ABS and cos >= MIN_COS


def test_sharded_repo_fetches_the_index_and_its_shards(hub_root, bpe_dir, tmp_path):
    files, _ = hub_cache.write_clap_repo_files(tmp_path / "src", bpe_dir, seed=4, max_shard_size="1MB")
    shards = sorted(n for n in files if n.startswith("model-") and n.endswith(".safetensors"))
    assert len(shards) > 1 and "model.safetensors.index.json" in files
    commit = hub_cache.add_commit(hub_root, "laion/larger_clap_general", files)
    located = hub.locate("laion/larger_clap_general")
    assert located.revision == commit and {"model.safetensors.index.json", *shards} <= set(located.files)
    assert [os.path.basename(f) for f in conversion_cache.source_files(located.path)] == \
        ["config.json", "model.safetensors.index.json", *shards]


def test_what_is_not_cached_is_one_message_naming_repo_file_and_remedy(clap_repo, hub_root, tmp_path):
    with pytest.raises(hub.NotInCache) as err:
        pretrained.find("laion/larger_clap_music", conversion_cache_dir=tmp_path)
    message = str(err.value)
    assert "laion/larger_clap_music" in message and "config.json" in message
    assert "`clapjax download laion/larger_clap_music`" in message and "HF_HUB_OFFLINE" in message
    assert "nor is there a local file or directory named 'laion/larger_clap_music'" in message
    with pytest.raises(hub.NotInCache, match=r"music_speech_epoch_15_esc_89\.25\.pt of the Hugging Face repo "
                                             r"lukewys/laion_clap .*`clapjax download music_speech_epoch_15_esc_89\.25`"):
        pretrained.find("music_speech_epoch_15_esc_89.25", conversion_cache_dir=tmp_path)
    # a repo whose config is cached but not its weights: each weight file it could have is named
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "clap"}))
    commit = hub_cache.add_commit(hub_root, "laion/clap-htsat-fused", {"config.json": str(config)})
    with pytest.raises(hub.NotInCache, match=rf"model\.safetensors / .* / pytorch_model\.bin.* of the Hugging Face "
                                             rf"repo laion/clap-htsat-fused at revision {commit}"):
        hub.locate("laion/clap-htsat-fused")
    # the Hub said it has no such file (huggingface_hub's .no_exist): that is not 'missing from the cache'
    for filename in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                     "pytorch_model.bin.index.json"):
        hub_cache.mark_missing(hub_root, "laion/clap-htsat-fused", commit, filename)
    with pytest.raises(FileNotFoundError, match="laion/clap-htsat-fused holds no weights"):
        hub.locate("laion/clap-htsat-fused")
    with pytest.raises(FileNotFoundError, match="not a laion-clap release name .* not a Hugging Face repo id"):
        hub.locate("no-such-thing")
    assert not os.path.exists(tmp_path / "converted")


@pytest.mark.parametrize("damage", ["truncated variables file", "one byte changed", "edited config",
                                    "entry list deleted"])
def test_corrupt_entry_is_detected_and_rebuilt(damage, clap_repo, tmp_path, conversions):
    first = pretrained.find(REPO, conversion_cache_dir=tmp_path, tokenizer=False, log=quiet).model_dir
    victim = max((os.path.join(r, n) for r, _, ns in os.walk(os.path.join(first, saved_model.VARIABLES))
                  for n in ns), key=os.path.getsize)
    if damage == "truncated variables file":
        with open(victim, "r+b") as f:
            f.truncate(os.path.getsize(victim) // 2)
    elif damage == "one byte changed":  # same size: only the content hash sees it
        with open(victim, "r+b") as f:
            f.seek(os.path.getsize(victim) // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
    elif damage == "edited config":
        with open(os.path.join(first, saved_model.CONFIG), "a") as f:
            f.write(" ")
    else:
        os.remove(os.path.join(first, conversion_cache.ENTRY))
    logged = []
    again = pretrained.find(REPO, conversion_cache_dir=tmp_path, tokenizer=False, log=logged.append).model_dir
    assert again == first and len(conversions) == 2
    assert any(line.startswith(f"conversion cache: rebuilding {first}") for line in logged)
    key = os.path.basename(first)
    assert conversion_cache.entry_problem(first, key) is None
    assert sorted(os.listdir(tmp_path / "converted")) == [key]
    saved_model.restore(first)


CHILD = r"""
import os, sys, time
from clapjax.convert import conversion_cache, pipeline
src, cache, sync, me = sys.argv[1:]
real = pipeline.convert

def convert_then_wait(*args, **kw):  # both processes hold a finished conversion before either puts it in place
    report = real(*args, **kw)
    open(os.path.join(sync, me), "w").close()
    hang_guard = time.monotonic() + 600
    while len(os.listdir(sync)) < 2:
        if time.monotonic() > hang_guard:
            sys.exit("the other process never finished converting")
        time.sleep(0.05)
    return report
pipeline.convert = convert_then_wait
print(conversion_cache.converted(src, cache_dir=cache, log=lambda s: None))
"""


def test_two_processes_converting_at_once_end_with_one_valid_entry(clap_repo, hub_root, tmp_path):
    src = os.path.join(hub_cache.repo_dir(hub_root, REPO), "snapshots", clap_repo["commit"])
    sync = tmp_path / "sync"
    sync.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, src, str(tmp_path / "cache"), str(sync), str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    paths = {out.strip() for out, _ in outs}
    assert len(paths) == 1 and sorted(os.listdir(sync)) == ["0", "1"]
    entry = paths.pop()
    assert sorted(os.listdir(tmp_path / "cache" / "converted")) == [os.path.basename(entry)]
    assert conversion_cache.entry_problem(entry, os.path.basename(entry)) is None


# --- the model's own tokenizer -------------------------------------------------------------------------

def _laion_tokenize(tmodel, texts):
    """laion_clap.training.data.tokenizer: the class and repo it loads, called as it calls them."""
    if tmodel == "transformer":
        ref.laion_clap()
        from laion_clap.clap_module import tokenizer as clip
        ids = clip.tokenize(texts, context_length=77).numpy()
        return {"input_ids": ids}
    from transformers import BartTokenizer, BertTokenizer, RobertaTokenizer
    cls, repo = {"roberta": (RobertaTokenizer, "roberta-base"), "bert": (BertTokenizer, "bert-base-uncased"),
                 "bart": (BartTokenizer, "facebook/bart-base")}[tmodel]
    out = cls.from_pretrained(repo)(texts, padding="max_length", truncation=True, max_length=77, return_tensors="np")
    return dict(out)


@pytest.mark.parametrize("tmodel", ["roberta", "bert", "bart", "transformer"])
def test_text_towers_own_tokenizer_gives_laions_ids(tmodel, text_tower_repos, tmp_path):
    directory = pretrained.text_tower_tokenizer_dir(tmodel, conversion_cache_dir=tmp_path)
    ours = Tokenizer(directory, kind=tmodel)(TRICKY)
    theirs = _laion_tokenize(tmodel, TRICKY)
    assert set(theirs) <= set(ours) and len(theirs) >= (3 if tmodel == "bert" else 1)
    for k, v in theirs.items():
        np.testing.assert_array_equal(ours[k], v, err_msg=k)
    if tmodel == "transformer":  # written once into clapjax's cache, found there again
        assert directory.startswith(str(tmp_path / "tokenizers")) and \
            pretrained.text_tower_tokenizer_dir(tmodel, conversion_cache_dir=tmp_path) == directory


def test_a_model_directory_finds_its_tokenizer_by_its_recorded_source(clap_repo, hub_root, tmp_path, conversions):
    entry = pretrained.find(REPO, conversion_cache_dir=tmp_path, tokenizer=False, log=quiet).model_dir
    snapshot = os.path.join(hub_cache.repo_dir(hub_root, REPO), "snapshots", clap_repo["commit"])
    found = pretrained.find(entry)  # the cache entry named as a clapjax model directory
    assert found.model_dir == entry and found.tokenizer_dir == snapshot and len(conversions) == 1
    # converted without a record of its source (as `clapjax convert` and training write models): no tokenizer
    pipeline.convert(snapshot, str(tmp_path / "plain"), log=quiet)
    assert saved_model.read_provenance(str(tmp_path / "plain")) is None
    assert pretrained.find(str(tmp_path / "plain")).tokenizer() is None


def test_from_pretrained_by_name_gives_the_pytorch_models_embeddings(clap_repo, laion_release, text_tower_repos,
                                                                     tmp_path, conversions):
    """`CLAP.from_pretrained(NAME)` with no tokenizer argument: the HF repo's own tokenizer, and for a laion
    release its text tower's (roberta-base), as each reference tokenizes."""
    from transformers import ClapProcessor, RobertaTokenizer
    texts = ["a dog barks", "rain falls on a tin roof while thunder rolls far away", TRICKY[-1]]
    clap = CLAP.from_pretrained(REPO, conversion_cache_dir=tmp_path, compilation_cache=None)
    t_in = ClapProcessor.from_pretrained(REPO)(text=texts, padding="max_length", max_length=77, truncation=True,
                                               return_tensors="pt")
    laion_model, _ = laion_release
    laion = CLAP.from_pretrained("630k-best", conversion_cache_dir=tmp_path, compilation_cache=None)
    tokens = RobertaTokenizer.from_pretrained("roberta-base")(texts, padding="max_length", truncation=True,
                                                             max_length=77, return_tensors="pt")
    with torch.no_grad():
        hf_text = clap_repo["model"].get_text_features(**t_in).pooler_output.numpy()
        laion_text = laion_model.get_text_embedding(dict(tokens)).numpy()
    for name, ours, theirs in ((REPO, clap.get_text_embedding(texts), hf_text),
                               ("630k-best", laion.get_text_embedding(texts), laion_text)):
        max_abs, cos = ref.compare(ours, theirs)
        print(f"from_pretrained({name!r}) text: max-abs {max_abs:.3g}, min cos {cos:.8f}")
        assert max_abs <= MAX_ABS and cos >= MIN_COS
    assert len(conversions) == 2
    # an explicit tokenizer still wins; False: none looked up
    explicit = Tokenizer(clap_repo["bpe"], kind="roberta")
    assert CLAP.from_pretrained(REPO, tokenizer=explicit, conversion_cache_dir=tmp_path,
                                compilation_cache=None).tokenizer is explicit
    assert CLAP.from_pretrained(REPO, tokenizer=False, conversion_cache_dir=tmp_path,
                                compilation_cache=None).tokenizer is None
    assert len(conversions) == 2


# the names issue 15 promises, each to embeddings in one line (the README's release tables list them)
HF_NAMES = ("laion/clap-htsat-unfused", "laion/clap-htsat-fused", "laion/larger_clap_general",
            "laion/larger_clap_music", "laion/larger_clap_music_and_speech")


def test_every_listed_name_goes_to_embeddings_in_one_line(hub_root, bpe_dir, clap_repo, laion_release, text_tower_repos,
                                                          tmp_path):
    """Each listed HF repo id holds its own tiny ClapModel stand-in (its text embeddings must be that model's,
    so no name is served another's files); every laion release name resolves to its own file of
    lukewys/laion_clap. The release files here share one stand-in's bytes (one full-size conversion, not
    seven): what this shows is name → file → converted model, the conversion itself is checked above."""
    from transformers import ClapProcessor
    texts = ["a dog barks", "rain falls"]
    for n, name in enumerate(HF_NAMES):
        if name != REPO:  # REPO's own commits come from the clap_repo fixture
            files, _ = hub_cache.write_clap_repo_files(tmp_path / "src" / str(n), bpe_dir, seed=10 + n)
            hub_cache.add_commit(hub_root, name, files)
    for n, name in enumerate(HF_NAMES):
        ours = CLAP.from_pretrained(name, conversion_cache_dir=tmp_path / "cache", compilation_cache=None)
        snapshot = hub.locate(name).path
        torch.manual_seed(0)
        from transformers import ClapModel
        model = ClapModel.from_pretrained(snapshot).eval()
        t_in = ClapProcessor.from_pretrained(snapshot)(text=texts, padding="max_length", max_length=77,
                                                      truncation=True, return_tensors="pt")
        with torch.no_grad():
            theirs = model.get_text_features(input_ids=t_in["input_ids"],
                                             attention_mask=t_in["attention_mask"]).pooler_output.numpy()
        max_abs, cos = ref.compare(ours.get_text_embedding(texts), theirs)
        assert max_abs <= MAX_ABS and cos >= MIN_COS, (name, max_abs, cos)

    _, commit = laion_release
    release = os.path.join(hub_cache.repo_dir(hub_root, hub.LAION_REPO), "snapshots", commit, "630k-best.pt")
    hub_cache.add_commit(hub_root, hub.LAION_REPO, {f"{name}.pt": release for name in hub.LAION_RELEASES})
    for name in hub.LAION_RELEASES:
        for spelling in (name, f"{name}.pt"):
            located = hub.locate(spelling)
            assert located.repo_id == hub.LAION_REPO and os.path.basename(located.path) == f"{name}.pt"
        clap = CLAP.from_pretrained(name, conversion_cache_dir=tmp_path / "cache", compilation_cache=None)
        assert clap.get_text_embedding(texts).shape == (2, clap.model.config.joint_embed_shape), name
