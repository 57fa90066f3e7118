"""Metrics equal laion_clap's `get_metrics` / `evaluate_clotho_audiocaps` / zero-shot `accuracy` / the zero-shot
script's ranking on random features and on features with exact ties (duplicated rows, quantised embeddings, a
clip whose captions are all the same), also when the inputs are batch-sharded over 8 devices."""
import contextlib
import importlib.util
import os
import sys
import types
from unittest import mock

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clapjax.train import metrics as M
from clapjax.train import torch_argsort
import reference
from helpers import tiny_clap_model

_HEAP_SORT = torch_argsort._heap_sort


def _unit(rng, n, d=16):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _train():
    reference.laion_clap()
    from laion_clap.training import train
    return train


def _close(ours: dict, theirs: dict, prefix: str = ""):
    ours = M.to_python(ours)
    assert set(ours) == {k[len(prefix):] for k in theirs}, (sorted(ours), sorted(theirs))
    for k, v in ours.items():
        ref = float(theirs[prefix + k])
        assert v == pytest.approx(ref, rel=1e-5, abs=1e-6), (k, v, ref)


def _quantised(rng, n, d=16, nonzero=4):
    """Unit rows of `nonzero` entries ±1/2: every dot product is a multiple of 1/4 in [-1, 1], so most
    logits of a row tie exactly; with a scale of few mantissa bits (14.25) every logit is exact in
    float32 whatever the summation order, in torch and in XLA alike."""
    x = np.zeros((n, d), np.float32)
    for row in x:
        row[rng.choice(d, nonzero, replace=False)] = rng.choice([-0.5, 0.5], nonzero)
    return x


def _renormalised(x):
    """x after torch's F.normalize: what LAION's evaluation ranks when the model returns x."""
    import torch
    return torch.nn.functional.normalize(torch.from_numpy(x), dim=-1).numpy()


def _ties_matter(rows, targets):
    """Some target's LAION rank is not its stable rank: the case exercises torch's tie order."""
    stable = np.stack([np.asarray(M.ranks(rows, t)) for t in np.asarray(targets).reshape(len(rows), -1).T], 1)
    return bool((stable != np.asarray(M.laion_ranks(rows, targets)).reshape(stable.shape)).any())


def _sharded(*arrays):
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(8), ("data",))
    return [jax.device_put(a, NamedSharding(mesh, P("data"))) for a in arrays]


@pytest.mark.parametrize("n", [40, 64])
def test_get_metrics_equal(n, rng):
    import torch
    train = _train()
    a, t = _unit(rng, n), _unit(rng, n)
    scale = 1 / 0.07
    theirs = train.get_metrics(torch.from_numpy(a), torch.from_numpy(t), torch.tensor(scale))
    _close(M.retrieval_metrics(a, t, scale), theirs)
    # sharded over 8 devices (64 rows divide): same numbers
    if n % 8 == 0:
        _close(M.retrieval_metrics(*_sharded(a, t), scale), theirs)
    # the numbers are not trivially equal to chance or perfect
    r1 = float(theirs["text_to_audio_R@1"])
    assert 0 <= r1 < 0.3 and theirs["audio_to_text_mean_rank"] > 5


def test_get_metrics_mlp_equal(rng):
    import torch
    train = _train()
    n = 48
    a, t, am, tm = (_unit(rng, n) for _ in range(4))
    sa, st = 14.3, 9.1
    theirs = train.get_metrics(*(torch.from_numpy(x) for x in (a, t)), torch.tensor(sa),
                               audio_features_mlp=torch.from_numpy(am), text_features_mlp=torch.from_numpy(tm),
                               logit_scale_t=torch.tensor(st), mlp_loss=True)
    _close(M.retrieval_metrics(a, t, sa, am, tm, st), theirs)


def test_torch_argsort_order_replayed(rng):
    """train/torch_argsort replays torch.argsort(descending=True) on CPU: unstable past 16 entries."""
    import torch
    for n in (1, 16, 17, 40, 333):
        for levels in (1, 3, 50):
            row = rng.integers(0, levels, n).astype(np.float32)
            want = torch.argsort(torch.from_numpy(row), descending=True).numpy()
            np.testing.assert_array_equal(torch_argsort.descending_order(row), want, err_msg=f"{n} {levels}")
    zeros = torch_argsort.descending_order(np.zeros(40, np.float32))
    assert list(zeros[:3]) == [30, 21, 22]          # not 0, 1, 2: equal values do not keep their order
    # the heapsort fallback: McIlroy's adversary against the replay builds a row that exhausts
    # introsort's depth limit (values fixed as the sort asks, in tied pairs), then torch sorts it too
    n, heap_sorts = 300, []
    gas, val, state = n, [n] * n, {"solid": 0, "candidate": 0}

    class Lazy:
        def __init__(self, i):
            self.i = i

        def __gt__(self, other):
            x, y = self.i, other.i
            if val[x] == gas and val[y] == gas:
                val[x if x == state["candidate"] else y] = state["solid"] // 2
                state["solid"] += 1
            if val[x] == gas:
                state["candidate"] = x
            elif val[y] == gas:
                state["candidate"] = y
            return val[x] > val[y]

        def __lt__(self, other):
            return other.__gt__(self)
    torch_argsort._introsort_loop([Lazy(i) for i in range(n)], list(range(n)), 0, n, 2 * (n.bit_length() - 1))
    row = np.asarray(val, np.float32)
    with mock.patch.object(torch_argsort, "_heap_sort", side_effect=lambda *a: heap_sorts.append(1)
                           or _HEAP_SORT(*a)):
        got = torch_argsort.descending_order(row)
    assert heap_sorts and len(np.unique(row)) < n
    np.testing.assert_array_equal(got, torch.argsort(torch.from_numpy(row), descending=True).numpy())
    with pytest.raises(ValueError, match="NaN"):
        torch_argsort.descending_order(np.array([1.0, np.nan], np.float32))


def test_get_metrics_equal_with_ties(rng):
    """Duplicated clips and captions (a scale with a long mantissa) and quantised embeddings (every
    row full of exact ties): LAION's numbers, its torch tie order included, sharded or not."""
    import torch
    train = _train()
    n = 48
    a, t = _unit(rng, n), _unit(rng, n)
    a[30:40], t[10:20], t[40:44] = a[:10], t[:10], t[:4]       # 10 clips and 14 captions twice
    quantised = (_quantised(rng, n), _quantised(rng, n))
    for (a, t), scale in (((a, t), 1 / 0.07), (quantised, 14.25)):
        theirs = train.get_metrics(torch.from_numpy(a), torch.from_numpy(t), torch.tensor(scale))
        _close(M.retrieval_metrics(a, t, scale), theirs)
        _close(M.retrieval_metrics(*_sharded(a, t), scale), theirs)
        labels = np.arange(n)
        assert _ties_matter(M.logits(a, t, scale), labels) and _ties_matter(M.logits(t, a, scale), labels)


def test_perfect_and_reversed_rankings():
    eye = np.eye(12, dtype=np.float32)
    m = M.to_python(M.retrieval_metrics(eye, eye, 1.0))
    assert m["audio_to_text_R@1"] == 1 and m["text_to_audio_mean_rank"] == 1 and m["audio_to_text_mAP@10"] == 1
    # exact ties in rows of at most 16 entries: torch's sort is then one insertion sort, stable, so
    # identical texts put clip i at rank i
    ones = np.ones((12, 4), np.float32)
    m = M.to_python(M.retrieval_metrics(ones, ones, 1.0))
    assert m["text_to_audio_mean_rank"] == pytest.approx(6.5) and m["text_to_audio_R@1"] == pytest.approx(1 / 12)
    with pytest.raises(ValueError, match="one caption per clip"):
        M.retrieval_metrics(eye, eye[:5], 1.0)
    with pytest.raises(ValueError, match="together"):
        M.retrieval_metrics(eye, eye, 1.0, eye)


def _laion_clotho(train, a, t, scale):
    """Run laion_clap's evaluate_clotho_audiocaps on fixed features through a stand-in model/loader."""
    import torch
    n = len(a)
    a_t, t_t = torch.from_numpy(a), torch.from_numpy(t)

    def model(audios, texts, device):
        if audios is None and texts is None:
            return torch.tensor(scale), torch.tensor(1.0)
        if texts is None:
            return a_t[audios["idx"]]
        return t_t[texts["input_ids"][:, 0]]

    def tokenizer(texts, tmodel="roberta"):  # caption strings are their text row numbers
        return {"input_ids": torch.tensor([[int(s)] for s in texts])}

    batches = []
    for start in range(0, n, 16):
        idx = list(range(start, min(n, start + 16)))
        batches.append({"idx": torch.tensor(idx), "__url__": ["/data/clotho/test/0.tar"] * len(idx),
                        "full_text": [[str(5 * i + d) for d in range(5)] for i in idx]})
    data = {"val": types.SimpleNamespace(dataloader=batches)}
    args = types.SimpleNamespace(tmodel="roberta")
    with mock.patch("laion_clap.training.data.tokenizer", tokenizer):
        out = train.evaluate_clotho_audiocaps(model, data, 0, args, contextlib.nullcontext, "cpu")
    return out["clotho-test"]


def test_clotho_audiocaps_equal(rng):
    train = _train()
    n = 40
    a, t = _unit(rng, n, 8), _unit(rng, 5 * n, 8)  # d=8: several captions land in the top 10
    theirs = _laion_clotho(train, a, t, 1 / 0.07)
    _close(M.clotho_audiocaps_metrics(a, t, 1 / 0.07), theirs, prefix="clotho-test/")
    sharded = M.clotho_audiocaps_metrics(*_sharded(a, t), 1 / 0.07)
    _close(sharded, theirs, prefix="clotho-test/")
    # 'sorted' numbers the hits by rank; by the rearrangement inequality it is never above LAION's
    # caption-order numbering, and here (captions hitting out of order) it is below
    srt = M.to_python(M.clotho_audiocaps_metrics(a, t, 1 / 0.07, a2t_map="sorted"))
    assert srt["audio_to_text_mAP@10"] < float(theirs["clotho-test/audio_to_text_mAP@10"])
    assert srt["audio_to_text_R@1"] == pytest.approx(float(theirs["clotho-test/audio_to_text_R@1"]))
    with pytest.raises(ValueError, match="need 200 texts"):
        M.clotho_audiocaps_metrics(a, t[:-1], 1.0)


def test_clotho_audiocaps_equal_with_ties(rng):
    """A clip whose 5 captions are the same, duplicated clips, quantised embeddings: LAION's numbers."""
    train = _train()
    n = 40
    a, t = _renormalised(_unit(rng, n, 8)), _renormalised(_unit(rng, 5 * n, 8))
    t[15:20] = t[15]                     # clip 3's five captions are one
    t[50:55] = t[10:15]                  # clip 10 has clip 2's captions
    a[20:24] = a[4:8]                    # clips 20-23 are clips 4-7
    quantised = (_quantised(rng, n, 8), _quantised(rng, 5 * n, 8))
    for (a, t), scale in (((_renormalised(a), _renormalised(t)), 1 / 0.07), (quantised, 14.25)):
        theirs = _laion_clotho(train, a, t, scale)
        _close(M.clotho_audiocaps_metrics(a, t, scale), theirs, prefix="clotho-test/")
        _close(M.clotho_audiocaps_metrics(*_sharded(a, t), scale), theirs, prefix="clotho-test/")
        own = np.arange(n)[:, None] * 5 + np.arange(5)[None, :]
        assert _ties_matter(M.logits(a, t, scale), own)


def _laion_zero_shot(audio, classes, labels, scale):
    """Run LAION's zero-shot script (evaluate/eval_zeroshot_classification.py, which imports as a
    top-level script) on fixed features through a stand-in model and loader; its figures come back
    through the wandb.log it calls."""
    import torch
    lc = reference.laion_clap()
    import laion_clap.training as training
    from laion_clap.clap_module import utils as clap_utils
    from laion_clap.training import data as laion_data, logger, params, train
    logged = {}
    wandb = types.SimpleNamespace(log=lambda record: logged.update(record))
    modules = {"wandb": wandb, "clap_module": lc.clap_module, "clap_module.utils": clap_utils,
               "training": training, "training.logger": logger, "training.data": laion_data,
               "training.train": train, "training.params": params}
    path = os.path.join(os.path.dirname(lc.__file__), "evaluate", "eval_zeroshot_classification.py")

    class Model:
        def eval(self):
            return self

        def __call__(self, audios, texts, device):
            if audios is None and texts is None:
                return torch.tensor(scale), torch.tensor(1.0)
            if texts is None:
                return torch.from_numpy(audio)[audios["idx"]]
            return torch.from_numpy(classes)[texts["input_ids"][:, 0]]

    def tokenizer(texts, tmodel="roberta"):   # prompts "This is a sound of c{index}." → the class index
        return {"input_ids": torch.tensor([[int(s.split(" c")[-1].rstrip("."))] for s in texts])}

    one_hot = np.eye(len(classes), dtype=np.float32)[labels]
    batches = [{"idx": torch.arange(i, min(i + 16, len(audio))), "class_label": torch.from_numpy(one_hot[i:i + 16])}
               for i in range(0, len(audio), 16)]
    args = types.SimpleNamespace(device="cpu", val_dataset_names=["ESC50"], tmodel="roberta", datasetnames=["esc50"],
                                 wandb=True, class_index_dict={f"c{i}": i for i in range(len(classes))})
    with mock.patch.dict(sys.modules, modules), mock.patch.object(laion_data, "tokenizer", tokenizer):
        spec = importlib.util.spec_from_file_location("eval_zeroshot_classification", path)
        script = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(script)
        script.evaluate_zeroshot(Model(), {"val": types.SimpleNamespace(dataloader=batches)}, 0, args, None)
    return {k[len("val/esc50_"):]: v for k, v in logged.items() if k.startswith("val/esc50_")}


def test_zero_shot_ranking_equals_laion_script(rng):
    """zero_shot_ranking_metrics = the zero-shot script's mean/median rank, R@1/5/10, mAP@10 (class index
    as ground truth), on random features and on quantised ones full of ties, 50 classes as ESC-50."""
    n, c = 64, 50
    labels = rng.integers(0, c, n)
    cases = (((_renormalised(_unit(rng, n)), _renormalised(_unit(rng, c))), 1 / 0.07),
             ((_quantised(rng, n), _quantised(rng, c)), 14.25))
    for (audio, classes), scale in cases:
        theirs = _laion_zero_shot(audio, classes, labels, scale)
        assert set(theirs) == {"mean_rank", "median_rank", "R@1", "R@5", "R@10", "mAP@10"}
        theirs["num_samples"] = n
        _close(M.zero_shot_ranking_metrics(audio, classes, labels, scale), theirs)
        _close(M.zero_shot_ranking_metrics(*_sharded(audio), classes, labels, scale), theirs)
        ours = M.to_python(M.zero_shot_metrics(audio, classes, labels))
        assert ours["top1"] == pytest.approx(theirs["R@1"]) and ours["top5"] == pytest.approx(theirs["R@5"])
    assert _ties_matter(M.logits(audio, classes, scale), labels)
    with pytest.raises(ValueError, match="not a class index"):
        M.zero_shot_ranking_metrics(audio, classes, np.full(n, c))
    with pytest.raises(ValueError, match="one class index per clip"):
        M.zero_shot_ranking_metrics(audio, classes, labels[:-1])


def test_zero_shot_equals_laion_accuracy(rng):
    import torch
    _train()
    from laion_clap.training.zero_shot import accuracy
    n, c, tpl = 60, 12, 3
    audio = _unit(rng, n)
    cls = M.class_embeddings(rng.standard_normal((c, tpl, 16)).astype(np.float32))
    labels = rng.integers(0, c, n)
    logits = 100.0 * torch.from_numpy(audio) @ torch.from_numpy(np.array(cls)).T
    # LAION's accuracy() calls float() on a 1-element array, which NumPy 2 refuses: give its module a
    # float() that accepts one, leaving the function itself untouched
    import laion_clap.training.zero_shot as zs
    with mock.patch.object(zs, "float", lambda x: float(np.asarray(x).reshape(())), create=True):
        top1, top5 = accuracy(logits, torch.from_numpy(labels), topk=(1, 5))
    ours = M.to_python(M.zero_shot_metrics(audio, cls, labels))
    assert ours["top1"] == pytest.approx(top1 / n) and ours["top5"] == pytest.approx(top5 / n)
    # mAP@10 of a single label = mean reciprocal rank cut at 10
    order = np.argsort(-np.asarray(logits), axis=1)
    r = np.argmax(order == labels[:, None], axis=1)
    assert ours["mAP@10"] == pytest.approx(np.mean(np.where(r < 10, 1 / (r + 1), 0)), rel=1e-6)
    # label -1 clips are left out
    masked = labels.copy()
    masked[:20] = -1
    sub = M.to_python(M.zero_shot_metrics(audio[20:], cls, labels[20:]))
    assert M.to_python(M.zero_shot_metrics(audio, cls, masked)) == pytest.approx(sub)


def test_class_embeddings_are_laions_prompt_average(rng):
    emb = rng.standard_normal((4, 3, 8)).astype(np.float32)
    ref = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
    ref = ref.mean(1)
    ref /= np.linalg.norm(ref, axis=-1, keepdims=True)
    np.testing.assert_allclose(M.class_embeddings(emb), ref, rtol=1e-6, atol=1e-6)


def test_chance_levels():
    c = M.chance_levels(100)
    assert c["R@1"] == 0.01 and c["R@10"] == 0.1 and c["mean_rank"] == 50.5
    assert c["mAP@10"] == pytest.approx(sum(1 / r for r in range(1, 11)) / 100)
    with pytest.raises(ValueError):
        M.chance_levels(0)


# --- the evaluator on a tiny CLAP --------------------------------------------------------------------

def test_evaluator_on_synthetic_heldout(tmp_path):
    from clapjax import synthetic as S
    from clapjax.audio import io as audio_io
    from clapjax.train import evaluate as E
    from clapjax.train import sharding
    model = tiny_clap_model()
    tok = S.train_tokenizer(tmp_path / "tok", n=300, vocab_size=300)
    ds = S.synthetic_dataset(0, 20, "heldout", clip_samples=48000)
    es = E.EvalSet.from_synthetic(ds)
    assert set(es.zero_shot) <= set(S.ZERO_SHOT_CLASSES) and {"kind", "pitch", "loudness", "duration"} <= set(es.zero_shot)
    # batches sharded over a 4×2 mesh of the 8 host devices (batch 8 → one row per device)
    mesh = sharding.make_mesh({"data": 4, "fsdp": 2})
    res = E.Evaluator(es, tok, batch_size=6, mesh=mesh, keep_embeddings=True)(model)
    m = res.metrics
    assert res.audio_embeddings.shape == (20, 16) and res.text_embeddings.shape == (100, 16)
    # embeddings are the model's on LAION-prepared clips; metrics are the 5-caption protocol on them
    x = audio_io.quantize_int16(ds.waveform(3))
    want = model.get_audio_embedding({"waveform": audio_io.get_audio_features(x, model.config.frontend)["waveform"][None]})
    np.testing.assert_allclose(res.audio_embeddings[3], np.asarray(want)[0], atol=1e-5)
    want = model.get_text_embedding(tok([ds.captions[2][4]]))
    np.testing.assert_allclose(res.text_embeddings[2 * 5 + 4], np.asarray(want)[0], atol=1e-5)
    ref = M.to_python(M.clotho_audiocaps_metrics(res.audio_embeddings, res.text_embeddings,
                                                 float(np.exp(model.logit_scale_a[...]))))
    for k, v in ref.items():
        assert m[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    assert {"zero_shot/kind/top1", "zero_shot/pitch/mAP@10", "zero_shot/loudness/top5"} <= set(m)
    assert res.chance["retrieval/R@1"] == 1 / 20 and res.chance["zero_shot/kind/top1"] == 1 / 7
    want = E.r1_ceiling(ds.description_groups(), [5] * 20)
    assert m["text_to_audio_R@1_ceiling"] == want["text_to_audio_R@1_ceiling"]
    assert 0 <= m["text_to_audio_attribute_match@1"] <= 1 and "audio_to_text_attribute_match@1" in m
    table = E.format_table(res, "held-out")
    assert "text_to_audio R@1" in table and "zero-shot kind/top1" in table


def test_r1_ceiling_is_a_perfect_attribute_models_expected_r1():
    """A perfect attribute-level model (one-hot group embeddings) ties every clip of a group; over
    every order of the clips (ties fall to the lower index) its mean R@1 is the ceiling exactly."""
    import itertools
    from clapjax.train import evaluate as E
    groups, k = np.array([0, 0, 1, 2, 2]), 2
    ceiling = E.r1_ceiling(groups, [k] * len(groups))
    assert ceiling["text_to_audio_R@1_ceiling"] == pytest.approx((1 / 2 + 1 / 2 + 1 + 1 / 2 + 1 / 2) / 5)
    r1 = {"text_to_audio_R@1": [], "audio_to_text_R@1": []}
    for order in itertools.permutations(range(len(groups))):
        g = groups[list(order)]
        audio = np.eye(3, dtype=np.float32)[g]
        m = M.to_python(M.clotho_audiocaps_metrics(audio, np.repeat(audio, k, axis=0), 1.0, captions_per_clip=k))
        for key in r1:
            r1[key].append(m[key])
        match = M.to_python(E.attribute_match_top1(audio, np.repeat(audio, k, axis=0), g, np.repeat(g, k)))
        assert match == {"text_to_audio_attribute_match@1": 1.0, "audio_to_text_attribute_match@1": 1.0}
    for key, values in r1.items():
        assert np.mean(values) == pytest.approx(ceiling[f"{key}_ceiling"], abs=1e-6), key
    # a model that confuses groups 1 and 2 (clip 2's embedding is group 2's) misses clip 2 both ways
    audio = np.eye(3, dtype=np.float32)[[0, 0, 2, 2, 2]]
    text = np.repeat(np.eye(3, dtype=np.float32)[groups], k, axis=0)
    match = M.to_python(E.attribute_match_top1(audio, text, groups, np.repeat(groups, k)))
    assert match["audio_to_text_attribute_match@1"] == pytest.approx(4 / 5)
    # clip 2's captions match no clip (the first, clip 0, wins the tie); group 2's find clip 2 first
    assert match["text_to_audio_attribute_match@1"] == pytest.approx(4 / 10)
    with pytest.raises(ValueError, match="one entry per clip"):
        E.r1_ceiling(groups, [k] * 4)


def test_eval_command_on_a_manifest(tmp_path, capsys):
    import json
    import soundfile as sf
    from clapjax import synthetic as S
    from clapjax import saved_model
    from clapjax.train import evaluate as E
    model = tiny_clap_model()
    saved_model.save(str(tmp_path / "ckpt"), model)
    S.train_tokenizer(tmp_path / "tok", n=300, vocab_size=300)
    ds = S.synthetic_dataset(1, 6, "heldout", clip_samples=48000)
    rows = []
    for i in range(6):
        sf.write(tmp_path / f"{i}.wav", ds.waveform(i), 48000, subtype="FLOAT")
        rows.append(json.dumps({"path": f"{i}.wav", "caption": ds.captions[i][0]}))
    rows.append(json.dumps({"path": "gone.wav", "caption": "missing"}))   # skipped, logged
    (tmp_path / "m.jsonl").write_text("\n".join(rows))
    assert E.main([str(tmp_path / "ckpt"), str(tmp_path / "m.jsonl"), "--tokenizer", str(tmp_path / "tok"),
                   "--batch-size", "4", "--json", str(tmp_path / "out.json")]) == 0
    out = json.loads((tmp_path / "out.json").read_text())
    m = out["metrics"]
    assert m["num_samples"] == 6 and 1 <= m["text_to_audio_mean_rank"] <= 6   # get_metrics: one caption each
    assert out["chance"]["retrieval/R@1"] == pytest.approx(1 / 6)
    printed = capsys.readouterr().out
    assert "manifest: 6 clips" in printed and "text_to_audio R@1" in printed
    es = E.eval_set_from_spec("synthetic:train:5:3", 48000, 48000)
    assert len(es) == 5 and es.keys[0] == "synthetic-train-3-0000000"
