"""`clapjax eval MODEL BENCH:PATH …` on stand-ins of the five benchmarks in their releases' layouts
(tests/benchmark_standins.py): every layout parses, the tables and JSON come out with missing and unreadable
clips named, a random model scores near chance, a model that knows the answer scores 1, and a second run with
another prompt embeds no audio (its embeddings come from the cache). The tiny model is embedded once per module.
"""
import glob
import json
import os

import numpy as np
import pytest

import benchmark_standins as S
from helpers import tiny_clap_model
from clapjax.train import benchmark_run as R
from clapjax.train import benchmark_sets as B
from clapjax.train import evaluate as E

BENCHES = ("esc50", "urbansound8k", "gtzan", "clotho", "audiocaps")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from clapjax import saved_model
    from clapjax import synthetic
    root = tmp_path_factory.mktemp("benchmarks")
    dirs = {"esc50": S.write_esc50(str(root / "ESC-50-master")),
            "urbansound8k": S.write_urbansound8k(str(root / "UrbanSound8K")),
            "gtzan": S.write_gtzan(str(root / "Data"), corrupt="jazz"),
            "clotho": S.write_clotho(str(root / "clotho")),
            "audiocaps": S.write_audiocaps(str(root / "audiocaps"), missing=2)}
    saved_model.save(str(root / "model"), tiny_clap_model())
    synthetic.train_tokenizer(root / "tok", n=300, vocab_size=300)
    return root, dirs


@pytest.fixture(scope="module")
def first_run(data):
    root, dirs = data
    out = root / "out.json"
    argv = [str(root / "model")] + [f"{b}:{dirs[b]}" for b in BENCHES] + [
        "--tokenizer", str(root / "tok"), "--batch-size", "8", "--json", str(out), "--cache-dir", str(root / "cache"),
        "--no-progress"]
    import contextlib
    import io
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert E.main(argv) == 0
    return json.loads(out.read_text()), printed.getvalue()


def test_every_layout_parses(data, tmp_path):
    _, dirs = data
    esc = B.read_benchmark("ESC50", dirs["esc50"])
    assert len(esc) == 50 and esc.classes[11] == "sea waves" and esc.labels.tolist() == list(range(50))
    assert esc.files[0].endswith("audio/1-100032-A-0.wav") and sorted(set(esc.folds.tolist())) == [1, 2, 3, 4, 5]
    assert esc.prompt == "This is a sound of {}." and esc.readme == B.RankProtocol(1, "This is a sound of {}")
    us = B.read_benchmark("us8k", dirs["urbansound8k"])
    assert us.files[3].endswith("audio/fold4/100035-3-0-0.wav") and us.classes[3] == "dog bark" and len(us) == 10
    gt = B.read_benchmark("gtzan", dirs["gtzan"])
    assert gt.prompt == "This is a {} song." and len(gt) == 10 and gt.files[5].endswith("jazz/jazz.00054.wav")
    original = B.read_benchmark("gtzan", S.write_gtzan(str(tmp_path / "gtzan"), original=True))
    assert original.files[0].endswith("genres/blues/blues.00000.au") and original.labels.tolist() == list(range(10))
    clotho = B.read_benchmark("clotho", dirs["clotho"])
    assert clotho.captions[3] == S.clotho_captions(3) and clotho.files[3].endswith("Footsteps on Gravel, Morning.wav")
    caps = B.read_benchmark("audiocaps", dirs["audiocaps"])
    assert caps.listed == 4 and len(caps) == 3 and caps.missing == ["-3Kv4fdm7Uk_30.wav"]
    assert caps.captions[2] == S.audiocaps_captions(3)      # grouped by clip, caption order kept
    # what a wrong release gets told
    bad = tmp_path / "bad"
    (bad / "meta").mkdir(parents=True)
    (bad / "meta" / "esc50.csv").write_text("filename,fold,category\n1-1-A-0.wav,1,dog\n")
    with pytest.raises(ValueError, match=r"lacks the columns \['target'\]"):
        B.read_benchmark("esc50", str(bad))
    (bad / "meta" / "esc50.csv").write_text("filename,fold,target,category\n1-1-A-0.wav,1,0,cat\n")
    with pytest.raises(ValueError, match="row 2: target=0 category='cat' is not a class"):
        B.read_benchmark("esc50", str(bad))
    with pytest.raises(FileNotFoundError, match="none of the 1 clips"):
        (bad / "meta" / "esc50.csv").write_text("filename,fold,target,category\n1-1-A-0.wav,1,0,dog\n")
        B.read_benchmark("esc50", str(bad))
    with pytest.raises(ValueError, match="unknown benchmark 'vggsound'"):
        B.read_benchmark("vggsound", str(bad))


def test_a_folder_holds_the_same_audio_for_the_cli_and_the_benchmark_reader(tmp_path):
    # one list of audio file types (clapjax.audio.io): the original GTZAN's .au files are audio to both
    from clapjax.app import cli
    root = S.write_gtzan(str(tmp_path / "gtzan"), original=True)
    listed = cli.audio_paths([root])
    assert len(listed) == 10 and sorted(listed) == sorted(B.read_benchmark("gtzan", root).files)


def test_eval_prints_a_table_per_benchmark_and_json(first_run):
    out, printed = first_run
    assert list(out) == list(BENCHES)
    esc = out["esc50"]
    assert esc["scored"] == esc["listed"] == 50 and not esc["missing"] and not esc["cached"]
    assert {"R@1", "mAP@10", "mean_rank", "fold1/R@1", "fold5/R@1", "readme_fold1/R@10",
            "readme_fold1/median_rank"} <= set(esc["metrics"])
    assert esc["metrics"]["fold1/num_samples"] == 10 and esc["chance"]["R@1"] == pytest.approx(1 / 50)
    assert esc["prompts"] == {"": "This is a sound of {}.", "readme_fold1/": "This is a sound of {}"}
    assert "fold10/R@1" in out["urbansound8k"]["metrics"] and out["urbansound8k"]["chance"]["R@1"] == 0.1
    gtzan = out["gtzan"]
    assert gtzan["scored"] == 9 and list(gtzan["unreadable"]) == ["genres_original/jazz/jazz.00054.wav"]
    assert gtzan["metrics"]["num_samples"] == 9 and gtzan["prompts"][""] == "This is a {} song."
    caps = out["audiocaps"]
    assert caps["listed"] == 4 and caps["scored"] == 3 and caps["missing"] == ["-3Kv4fdm7Uk_30.wav"]
    assert caps["metrics"]["num_samples"] == 3 and caps["chance"]["text_to_audio_R@1"] == pytest.approx(1 / 3)
    assert {"text_to_audio_R@10", "audio_to_text_mAP@10"} <= set(out["clotho"]["metrics"])
    for bench in BENCHES:
        assert f"{bench}: " in printed
    assert "esc50: 50 of 50 clips scored" in printed and "readme_fold1/R@1" in printed
    assert "1 unreadable, left out of every figure: genres_original/jazz/jazz.00054.wav (" in printed
    assert "1 missing, left out of every figure: -3Kv4fdm7Uk_30.wav" in printed
    assert "audiocaps: 3 of 4 clips scored" in printed


def test_a_random_model_scores_near_chance(first_run):
    out, _ = first_run
    esc = out["esc50"]["metrics"]
    assert esc["R@1"] <= 0.2 and 10 <= esc["mean_rank"] <= 41      # chance: 0.02 and 25.5


def _one_hot(index, size):
    return np.eye(size, dtype=np.float32)[np.asarray(index)]


def test_a_model_that_knows_the_answer_scores_one(data):
    """Text 'embeddings' that name the class (or the clip) and audio embeddings planted at the answer."""
    _, dirs = data
    for name in ("esc50", "urbansound8k", "gtzan"):
        bench = B.read_benchmark(name, dirs[name])
        c = len(bench.classes)
        by_prompt = {t.format(cls): i for i, cls in enumerate(bench.classes) for t in (bench.prompt, B.README_PROMPT)}
        kept = np.arange(len(bench))
        metrics, _, _ = R.score_zero_shot(bench, _one_hot(bench.labels, c), kept,
                                          lambda texts: _one_hot([by_prompt[t] for t in texts], c), 1.0)
        for key, value in metrics.items():
            want = 1.0 if key.endswith(("R@1", "R@5", "R@10", "mAP@10", "mean_rank", "median_rank")) else value
            assert value == want, (name, key)
    # retrieval: caption k of clip i scores 1 − 0.001·k with clip i, ≤ 0.004 with the others. No ties: LAION's
    # audio→text mAP@10 numbers a clip's captions in caption order, so tied captions could score it above 1
    for name in ("clotho", "audiocaps"):
        bench = B.read_benchmark(name, dirs[name])
        n = len(bench)
        by_caption = {cap: (i, k) for i, caps in enumerate(bench.captions) for k, cap in enumerate(caps)}
        audio = np.concatenate([_one_hot(range(n), n), np.full((n, 1), 0.1, np.float32)], axis=1)

        def embed(texts):
            i, k = np.asarray([by_caption[t] for t in texts]).T
            return np.concatenate([_one_hot(i, n), -0.01 * k[:, None].astype(np.float32)], axis=1)
        metrics, _, _ = R.score_retrieval(bench, audio, np.arange(n), embed, 1.0)
        for key in ("text_to_audio_R@1", "audio_to_text_R@1", "text_to_audio_mAP@10", "audio_to_text_mAP@10"):
            assert metrics[key] == 1.0, (name, key)


def test_another_prompt_embeds_no_audio_and_planted_embeddings_score_one(data, first_run, capsys):
    """The second run reads the audio embeddings from the cache: planting there the real model's embedding of
    each clip's class prompt makes every ESC-50 figure perfect."""
    from clapjax import saved_model
    from clapjax.tokenizer import Tokenizer
    from clapjax.train import eval_cache
    root, dirs = data
    bench = B.read_benchmark("esc50", dirs["esc50"])
    key = eval_cache.entry_key(eval_cache.model_identity(str(root / "model")), "esc50", bench.root,
                               eval_cache.file_list_identity(bench.root, bench.files), 0, "random")
    path = eval_cache.entry_path(key, str(root / "cache"))
    assert os.path.isfile(path) and len(glob.glob(str(root / "cache" / "eval" / "*.npz"))) == len(BENCHES)
    model = saved_model.restore(str(root / "model"))
    prompt = "a recording of {}"
    ev = E.Evaluator(E.EvalSet("prompts", [[""]], lambda idx: []), Tokenizer(str(root / "tok")), batch_size=8)
    classes = np.asarray(ev.embed_texts(model, [prompt.format(c) for c in bench.classes]))
    eval_cache.save(path, classes[bench.labels], np.arange(len(bench)), {})
    out = root / "second.json"
    assert E.main([str(root / "model"), f"esc50:{dirs['esc50']}", "--tokenizer", str(root / "tok"), "--batch-size",
                   "8", "--json", str(out), "--cache-dir", str(root / "cache"), "--prompt", prompt]) == 0
    esc = json.loads(out.read_text())["esc50"]
    assert esc["cached"] and esc["prompts"] == {"": prompt, "readme_fold1/": prompt}
    assert esc["metrics"]["R@1"] == 1.0 and esc["metrics"]["fold3/R@1"] == 1.0
    assert esc["metrics"]["readme_fold1/R@1"] == 1.0 and esc["metrics"]["readme_fold1/mean_rank"] == 1.0
    assert "[audio embeddings from the cache]" in capsys.readouterr().out


def test_bad_commands_say_what_is_wrong(data):
    root, dirs = data
    model = str(root / "model")
    with pytest.raises(ValueError, match="a synthetic spec, manifest or shards is evaluated alone"):
        E.main([model, f"esc50:{dirs['esc50']}", "synthetic"])
    with pytest.raises(ValueError, match="exactly one '{}'"):
        E.main([model, f"esc50:{dirs['esc50']}", "--prompt", "no slot"])
    with pytest.raises(ValueError, match="each benchmark once"):
        E.main([model, f"esc50:{dirs['esc50']}", f"ESC-50:{dirs['esc50']}"])


def test_published_figures_stand_beside_the_rows_of_their_protocol(data):
    from clapjax.train import published
    _, dirs = data
    bench = B.read_benchmark("esc50", dirs["esc50"])
    metrics = {k: 0.5 for k in ("R@1", "fold1/R@1", "readme_fold1/R@1", "readme_fold1/mean_rank")}
    want = published.figures("630k-audioset-best", "esc50")
    got = R.published_figures(["/some/model/dir", "630k-audioset-best"], bench, metrics)
    assert got == {"readme_fold1/R@1": want["R@1"], "readme_fold1/mean_rank": want["mean_rank"]}
    music = R.published_figures(["music_audioset_epoch_15_esc_90.14"], bench, metrics)
    assert music == {"R@1": published.figures("music_audioset_epoch_15_esc_90.14", "esc50")["R@1"]}
    assert R.published_figures(["/some/model/dir"], bench, metrics) == {}
    # the table names each published figure's protocol: GTZAN's music figures used another prompt than ours
    gtzan = R.published_figures(["music_audioset_epoch_15_esc_90.14"], B.read_benchmark("gtzan", dirs["gtzan"]),
                                {"R@1": 0.5})
    row = R.BenchmarkResult("gtzan", "/d", 10, 10, [], {}, {"": B.SONG_PROMPT}, {"R@1": 0.5}, {"R@1": 0.1},
                            {"R@1": gtzan["R@1"].value}, [f"{gtzan['R@1'].protocol} ({gtzan['R@1'].source})"])
    assert "published: GTZAN zero-shot top-1 accuracy over the 10 genres, prompt 'This audio is a <genre> song.'" \
        in R.format_benchmark(row)


def test_audio_to_text_chance_is_a_random_rankings_expected_score():
    """Over every ranking of 2 clips × 2 captions (4 texts), the mean of LAION's audio→text figures is the chance
    level (each audio ranks the texts in the same order: by linearity the mean is the same)."""
    import itertools
    from clapjax.train import metrics as M
    got = {f"{k}": [] for k in ("R@1", "R@5", "mAP@10")}
    for order in itertools.permutations(range(4)):
        text = (4.0 - np.asarray(order, np.float32))[:, None]      # text j ranks order[j]-th
        m = M.to_python(M.clotho_audiocaps_metrics(np.ones((2, 1), np.float32), text, 1.0, captions_per_clip=2))
        for key in got:
            got[key].append(m[f"audio_to_text_{key}"])
    want = R.audio_to_text_chance(2, 2)
    for key, values in got.items():
        assert np.mean(values) == pytest.approx(want[key]), key


def test_readme_rows_are_laions_readme_computation(data):
    """LAION's README ESC-50 example, in PyTorch (argsort of audio·textᵀ, the rank of the truth, its summary) on
    random embeddings of the fold-1 clips gives the readme_fold1/ figures."""
    import torch
    _, dirs = data
    bench = B.read_benchmark("esc50", dirs["esc50"])
    rng = np.random.default_rng(3)
    audio = rng.standard_normal((len(bench), 8)).astype(np.float32)
    audio /= np.linalg.norm(audio, axis=1, keepdims=True)
    prompt_emb = {}

    def embed(texts):
        for t in texts:
            prompt_emb.setdefault(t, rng.standard_normal(8).astype(np.float32))
        return np.stack([prompt_emb[t] / np.linalg.norm(prompt_emb[t]) for t in texts])
    metrics, _, _ = R.score_zero_shot(bench, audio, np.arange(len(bench)), embed, 33.3)
    fold1 = bench.folds == 1
    text = torch.tensor(embed([B.README_PROMPT.format(c) for c in bench.classes]))
    ground_truth = torch.tensor(bench.labels[fold1]).view(-1, 1)
    ranking = torch.argsort(torch.tensor(audio[fold1]) @ text.t(), descending=True)
    preds = torch.where(ranking == ground_truth)[1].numpy()
    want = {"mean_rank": preds.mean() + 1, "median_rank": np.floor(np.median(preds)) + 1,
            "mAP@10": np.mean(np.where(preds < 10, 1 / (preds + 1), 0.0))}
    want.update({f"R@{k}": np.mean(preds < k) for k in (1, 5, 10)})
    for key, value in want.items():
        assert metrics[f"readme_fold1/{key}"] == pytest.approx(value, abs=1e-6), key
