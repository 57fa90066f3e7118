"""Metrics equal laion_clap's `get_metrics` / `evaluate_clotho_audiocaps` / zero-shot `accuracy` on random
features, also when the inputs are batch-sharded over 8 devices."""
import contextlib
import types
from unittest import mock

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clapjax.train import metrics as M
import reference


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


def test_perfect_and_reversed_rankings():
    eye = np.eye(12, dtype=np.float32)
    m = M.to_python(M.retrieval_metrics(eye, eye, 1.0))
    assert m["audio_to_text_R@1"] == 1 and m["text_to_audio_mean_rank"] == 1 and m["audio_to_text_mAP@10"] == 1
    # exact ties are broken by index (stable): identical texts put clip i at rank i
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
