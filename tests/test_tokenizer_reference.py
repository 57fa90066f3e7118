"""The tokenizer wrapper against references it does not share code with: LAION-CLAP's own CLIP
`tokenize` (with the BPE file laion_clap ships) for the 'transformer' kind, and `tokenizers`-library
tokenizers configured by hand as roberta-base / bert-base-uncased are (their post-processing,
truncation and padding spelled out here) for the RoBERTa, BART and BERT kinds, on captions chosen to
break tokenizers."""
import json

import numpy as np
import pytest

from clapjax.tokenizer import CONTEXT_LENGTH, Tokenizer, train_byte_level_bpe, write_clip_vocabulary

LONG = " ".join(["a very long caption about a dog that barks"] * 12)  # ~100 words: past 77 tokens
TRICKY = [
    "A dog barks!", "", "   ", "Hello,   World!!  ", "tab\tand\nnewline\r\nruns",
    "\u00a0nbsp\u3000ideographic space",
    "café naïve résumé", "CAFÉ Ñandú ÜBER", "e\u0301 decomposed accent", "ΟΔΟΣ Greek capitals",
    "dog 🐶 barking 🎉🎉", "狗在叫 ワンワン 개가 짖다", "rock &amp; roll &lt;3 &#233; &amp;amp;",
    "it’s “quoted” — a dash…", "ﬁsh ＦＵＬＬ width", "cafÃ© mojibake", "I'M LOUD and it's 5:30pm, isn't it?",
    "don't-stop(now)...?!", "numbers 1234567 3.14", LONG, LONG.upper(),
]


def _assert_rows_equal(ours, ids, mask, texts):
    for row, text in enumerate(texts):
        np.testing.assert_array_equal(ours["input_ids"][row], ids[row], err_msg=f"input_ids of {text!r}")
        np.testing.assert_array_equal(ours["attention_mask"][row], mask[row], err_msg=f"attention_mask of {text!r}")


# --- CLIP ('transformer'): LAION's own tokenize ----------------------------------------------------

@pytest.fixture(scope="module")
def laion_tokenizer():
    from reference import laion_clap
    laion_clap()
    from laion_clap.clap_module import tokenizer as laion_tok
    return laion_tok


@pytest.fixture(scope="module")
def clip_dir(laion_tokenizer, tmp_path_factory):
    return write_clip_vocabulary(laion_tokenizer.default_bpe(), tmp_path_factory.mktemp("clip"))


def test_clip_vocabulary_is_laions(laion_tokenizer, clip_dir):
    vocab = json.load(open(f"{clip_dir}/vocab.json", encoding="utf-8"))
    laion = dict(laion_tokenizer._tokenizer.encoder)
    laion["<|startoftext|>"] = laion.pop("<start_of_text>")  # Hugging Face's names, same ids
    laion["<|endoftext|>"] = laion.pop("<end_of_text>")
    assert vocab == laion and len(vocab) == 49408


def _laion_clip(laion_tokenizer, texts):
    ids = laion_tokenizer.tokenize(texts, context_length=CONTEXT_LENGTH).numpy()
    # LAION returns ids only; a row's real tokens are SOT .. EOT, or all 77 when the caption was cut
    ends = [min(len(laion_tokenizer._tokenizer.encode(t)) + 2, CONTEXT_LENGTH) for t in texts]
    return ids, (np.arange(CONTEXT_LENGTH) < np.array(ends)[:, None]).astype(np.int32)


@pytest.mark.parametrize("saved", [False, True], ids=["vocab+merges", "tokenizer.json"])
def test_clip_matches_laion_tokenize(laion_tokenizer, clip_dir, tmp_path, saved):
    tok = Tokenizer(clip_dir, kind="transformer")
    if saved:
        tok.save(tmp_path / "saved")
        assert (tmp_path / "saved" / "tokenizer.json").is_file()
        tok = Tokenizer(tmp_path / "saved", kind="transformer")
    ours = tok(TRICKY)
    ids, mask = _laion_clip(laion_tokenizer, TRICKY)
    _assert_rows_equal(ours, ids, mask, TRICKY)
    assert ours["input_ids"].dtype == np.int32 and tok.pad_token_id == 0


def test_clip_cuts_long_captions_as_laion_does(laion_tokenizer, clip_dir):
    ours = Tokenizer(clip_dir, kind="transformer")([LONG, "a dog barks"])["input_ids"]
    eot = laion_tokenizer._tokenizer.encoder["<end_of_text>"]
    # cut at 77 after SOT/EOT were added: the row ends on a word and holds no EOT at all
    assert ours[0, 0] == eot - 1 and eot not in ours[0] and ours[0, -1] != 0
    assert list(ours[1, :6]) == [eot - 1, 320, 1929, 1040, 662, eot] and not ours[1, 6:].any()  # a dog bar ks


def test_clip_cleaning_changes_ids(clip_dir, laion_tokenizer):
    """The cases where Hugging Face's CLIPTokenizer alone (NFC + lowercase) gives other ids than
    LAION: a reference that is not LAION's would not notice the wrapper skipping the cleaning."""
    from transformers import CLIPTokenizer
    plain = CLIPTokenizer(vocab=f"{clip_dir}/vocab.json", merges=f"{clip_dir}/merges.txt")
    for text in ["rock &amp; roll", "it’s “quoted”", "ﬁsh ＦＵＬＬ", "cafÃ© mojibake"]:
        laion = laion_tokenizer.tokenize([text])[0].numpy()
        hf = plain([text], padding="max_length", max_length=CONTEXT_LENGTH)["input_ids"][0]
        assert not np.array_equal(laion, hf), text


# --- RoBERTa / BART / BERT: tokenizers-library references -----------------------------------------

CORPUS = [f"{a} {b} {c}" for a in ("a dog", "the cat", "café crowd", "an ÜBER car", "rock and roll", "狗 dog")
          for b in ("barks", "sings loudly", "honks", "hums", "it's 5:30pm")
          for c in ("outside!", "(far away)...", "near the river", "isn't it?", "🐶🎉")]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    return train_byte_level_bpe(CORPUS * 4, tmp_path_factory.mktemp("bpe"), vocab_size=500)


@pytest.fixture(scope="module")
def wordpiece_dir(tmp_path_factory):
    from tokenizers import BertWordPieceTokenizer
    directory = tmp_path_factory.mktemp("wordpiece")
    trainer = BertWordPieceTokenizer(lowercase=True)
    trainer.train_from_iterator(CORPUS * 4, vocab_size=300, min_frequency=1,
                                special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    trainer.save_model(str(directory))
    return str(directory)


def _roberta_reference(directory):
    """roberta-base's tokenizer: byte-level BPE without a prefix space, `<s> … </s>`, pad `<pad>`=1."""
    from tokenizers import ByteLevelBPETokenizer, processors
    ref = ByteLevelBPETokenizer(f"{directory}/vocab.json", f"{directory}/merges.txt", add_prefix_space=False)
    ref.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), add_prefix_space=False)
    return ref, ("<pad>", 1)


def _bert_reference(directory):
    """bert-base-uncased's: BERT normalizer (lowercase, accents stripped, CJK split), WordPiece,
    `[CLS] … [SEP]`, pad `[PAD]`=0."""
    from tokenizers import BertWordPieceTokenizer, processors
    ref = BertWordPieceTokenizer(f"{directory}/vocab.txt", lowercase=True, clean_text=True,
                                 handle_chinese_chars=True, strip_accents=None)
    ref.post_processor = processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2))
    return ref, ("[PAD]", 0)


def _encode(reference, texts):
    ref, (pad, pad_id) = reference
    ref.enable_truncation(max_length=CONTEXT_LENGTH)
    ref.enable_padding(length=CONTEXT_LENGTH, pad_id=pad_id, pad_token=pad)
    enc = ref.encode_batch(texts)
    return ([e.ids for e in enc], [e.attention_mask for e in enc], [e.type_ids for e in enc])


@pytest.mark.parametrize("kind", ["roberta", "bart", "bert"])
@pytest.mark.parametrize("source", ["vocab files", "saved tokenizer.json", "reference tokenizer.json"])
def test_matches_tokenizers_library(kind, source, bpe_dir, wordpiece_dir, tmp_path):
    directory = wordpiece_dir if kind == "bert" else bpe_dir
    build = _bert_reference if kind == "bert" else _roberta_reference
    tok = Tokenizer(directory, kind=kind)
    if source == "saved tokenizer.json":
        tok.save(tmp_path / "saved")
        tok = Tokenizer(tmp_path / "saved", kind=kind)
    elif source == "reference tokenizer.json":  # written by the tokenizers library, not by transformers
        ref, (pad, _) = build(directory)
        ref.save(str(tmp_path / "tokenizer.json"))
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": pad}))
        tok = Tokenizer(tmp_path, kind=kind)
    ours = tok(TRICKY)
    ids, mask, types = _encode(build(directory), TRICKY)
    _assert_rows_equal(ours, ids, mask, TRICKY)
    if kind == "bert":
        np.testing.assert_array_equal(ours["token_type_ids"], types)
    long_row = ours["input_ids"][TRICKY.index(LONG)]
    assert ours["attention_mask"][TRICKY.index(LONG)].all() and long_row[-1] == (3 if kind == "bert" else 2)
    empty = TRICKY.index("")
    assert ours["attention_mask"][empty].sum() == 2 and (ours["input_ids"][empty, 2:] == tok.pad_token_id).all()


def test_bert_uncased_lowercases_and_strips_accents(wordpiece_dir):
    tok = Tokenizer(wordpiece_dir, kind="bert")
    np.testing.assert_array_equal(tok(["CAFÉ CROWD"])["input_ids"], tok(["cafe crowd"])["input_ids"])
    assert 1 in tok(["狗在叫"])["input_ids"][0]  # characters outside the small vocabulary are [UNK]


def test_clip_vocabulary_without_sot_eot_is_refused(clip_dir, tmp_path):
    vocab = json.load(open(f"{clip_dir}/vocab.json", encoding="utf-8"))
    vocab["<start_of_text>"] = vocab.pop("<|startoftext|>")  # LAION's own name, not the one HF files use
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text(open(f"{clip_dir}/merges.txt", encoding="utf-8").read())
    with pytest.raises(ValueError, match=r"no <\|startoftext\|> in its vocabulary"):
        Tokenizer(tmp_path, kind="transformer")
