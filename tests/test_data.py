"""The Grain input pipeline: LAION tar shards with bad samples, manifests, the synthetic source,
shard order, exact resume, and two `jax.distributed` processes reading disjoint shards."""
import io
import json
import logging
import os
import sys
import tarfile
import textwrap

import numpy as np
import pytest
import soundfile as sf

from clapjax.audio import io as audio_io
from clapjax.audio.frontend import FrontEndConfig
from clapjax.tokenizer import Tokenizer, train_byte_level_bpe
from clapjax.train import data as D
from clapjax.train.data_sources import Manifest, SyntheticSource, TarShards, decode, expand_paths, Raw

from test_multihost import run_group

SR = 48000
FE = FrontEndConfig(clip_samples=SR // 2)   # 0.5 s clips keep decoding and cropping cheap
WORDS = ["dog", "bell", "rain", "car", "bird", "door", "wind", "drum"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [f"a {w} sound number {i}" for w in WORDS for i in range(20)]
    return Tokenizer(train_byte_level_bpe(texts * 3, tmp_path_factory.mktemp("tok"), vocab_size=300))


def _flac(seconds: float, sr: int, seed: int, channels: int = 1) -> bytes:
    x = 0.3 * np.random.default_rng(seed).standard_normal((int(seconds * sr), channels)).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, x, sr, format="FLAC")
    return buf.getvalue()


def _float_wav(seconds: float, sr: int, seed: int, channels: int = 1, poison: float | None = None) -> bytes:
    """A 32-bit float WAV (the one common format that can hold NaN / inf); `poison` replaces one
    sample of the last channel."""
    x = 0.3 * np.random.default_rng(seed).standard_normal((int(seconds * sr), channels)).astype(np.float32)
    if poison is not None:
        x[len(x) // 2, -1] = poison
    buf = io.BytesIO()
    sf.write(buf, x, sr, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_shards(root, n=50, per_shard=10, bad=None):
    """LAION-style shards: <key>.flac + <key>.json, sizes.json. `bad` maps sample number → defect
    (or to 'wav': a good float WAV instead of the flac)."""
    bad = bad or {}
    os.makedirs(root, exist_ok=True)
    sizes = {}
    for s in range(0, n, per_shard):
        name = f"shard-{s // per_shard:06d}.tar"
        with tarfile.open(os.path.join(root, name), "w") as tf:
            for i in range(s, min(n, s + per_shard)):
                key, kind = f"s{i:04d}", bad.get(i)
                seconds = (0.25, 0.5, 0.8)[i % 3]               # filled, exact and cropped clips
                sr, ch = ((16000, 2) if i % 7 == 0 else (SR, 1))  # some need resampling and a downmix
                defects = {"corrupt": b"fLaC" + bytes(range(256)) * 4, "empty_audio": b""}
                wavs = {"wav": None, "nan_wav": np.nan, "inf_wav": -np.inf}
                if kind in wavs:
                    _add(tf, f"{key}.wav", _float_wav(seconds, sr, i, ch, wavs[kind]))
                else:
                    _add(tf, f"{key}.flac", defects[kind] if kind in defects else _flac(seconds, sr, i, ch))
                text = {"empty_caption": "", "blank_list": ["", "  "]}.get(kind, WORDS[i % 8] if i % 2 else
                                                                               [f"a {WORDS[i % 8]} {j}" for j in range(5)])
                if kind != "no_caption":
                    _add(tf, f"{key}.json", json.dumps({"text": text, "original_data": {"i": i}}).encode())
        sizes[name] = min(n, s + per_shard) - s
    with open(os.path.join(root, "sizes.json"), "w") as f:
        json.dump(sizes, f)
    return root


def _keys(it):
    out = []
    for b in it:
        out.extend(b["key"].tolist())
    return out


def test_two_bad_samples_among_50_are_skipped_counted_and_logged(tmp_path, tok, caplog):
    root = write_shards(tmp_path / "shards", bad={7: "corrupt", 23: "no_caption"})
    cfg = D.DataConfig(global_batch_size=8, num_epochs=1, drop_remainder=False, with_keys=True,
                       max_bad_fraction=0.05)
    it = D.make_iterator(TarShards(str(root)), tok, FE, cfg, process_index=0, process_count=1)
    with caplog.at_level(logging.WARNING, logger="clapjax.train.data"):
        keys = _keys(it)
    expected = {f"shard-{i // 10:06d}.tar/s{i:04d}" for i in range(50)} - {"shard-000000.tar/s0007",
                                                                            "shard-000002.tar/s0023"}
    assert sorted(keys) == sorted(expected)          # 48 samples, each once, no stand-ins
    stats = it.stats
    assert stats["seen"] == 50 and stats["bad"] == 2
    reasons = dict(stats["bad_keys"])
    assert "cannot decode .flac" in reasons["shard-000000.tar/s0007"]
    assert "no caption" in reasons["shard-000002.tar/s0023"]
    logged = caplog.text
    assert "shard-000000.tar/s0007" in logged and "shard-000002.tar/s0023" in logged


def test_ten_bad_of_50_stops_with_a_clear_message(tmp_path, tok):
    kinds = ["corrupt", "no_caption", "empty_caption", "empty_audio", "blank_list"]
    bad = {i: kinds[j % 5] for j, i in enumerate(range(3, 50, 5))}
    assert len(bad) == 10
    root = write_shards(tmp_path / "shards", bad=bad)
    cfg = D.DataConfig(global_batch_size=8, num_epochs=1, drop_remainder=False, max_bad_fraction=0.05)
    it = D.make_iterator(TarShards(str(root)), tok, FE, cfg, process_index=0, process_count=1)
    with pytest.raises(D.TooManyBadSamples) as err:
        for _ in it:
            pass
    msg = str(err.value)
    assert "10 of 50 samples read were bad (20.0 %)" in msg and "max_bad_fraction=5 %" in msg
    assert "s0003" in msg and "cannot decode" in msg and "no caption" in msg and "empty .flac" in msg
    # with a mid-epoch check after 20 samples the run stops before the epoch ends
    cfg = D.DataConfig(global_batch_size=8, num_epochs=1, max_bad_fraction=0.05, bad_check_after=20)
    it = D.make_iterator(TarShards(str(root)), tok, FE, cfg, process_index=0, process_count=1)
    with pytest.raises(D.TooManyBadSamples, match=r"of 2\d samples read"):
        for _ in it:
            pass


def test_samples_decoding_to_nan_or_inf_are_skipped_by_name_and_never_batched(tmp_path, tok, caplog):
    """Float WAV members holding a NaN or an inf (one mono 48 kHz, one 16 kHz stereo with the NaN in
    one channel, which the downmix and the resampler would smear over the clip) are bad samples:
    skipped, counted and logged by shard/key, never in a batch; a clean float WAV trains. With
    max_bad_fraction=0 the first one stops the run, naming it."""
    bad = {3: "nan_wav", 8: "inf_wav", 14: "nan_wav", 5: "wav"}       # 14 is a 16 kHz stereo clip
    root = write_shards(tmp_path / "shards", n=20, bad=bad)
    cfg = D.DataConfig(global_batch_size=4, num_epochs=1, drop_remainder=False, with_keys=True,
                       max_bad_fraction=0.2)
    it = D.make_iterator(TarShards(str(root)), tok, FE, cfg, process_index=0, process_count=1)
    with caplog.at_level(logging.WARNING, logger="clapjax.train.data"):
        batches = list(it)
    poisoned = {f"shard-{i // 10:06d}.tar/s{i:04d}" for i in (3, 8, 14)}
    keys = [k for b in batches for k in b["key"].tolist()]
    assert sorted(keys) == sorted({f"shard-{i // 10:06d}.tar/s{i:04d}" for i in range(20)} - poisoned)
    assert all(np.isfinite(b["waveform"]).all() for b in batches)
    stats = it.stats
    assert stats["bad"] == 3 and {k for k, _ in stats["bad_keys"]} == poisoned
    assert all("1 non-finite (NaN/inf) samples" in reason for _, reason in stats["bad_keys"]), stats["bad_keys"]
    assert all(k in caplog.text for k in poisoned)
    strict = D.DataConfig(global_batch_size=4, num_epochs=1, max_bad_fraction=0.0, bad_check_after=1,
                          shuffle="none", cycle_length=1)
    it = D.make_iterator(TarShards(str(root)), tok, FE, strict, process_index=0, process_count=1)
    with pytest.raises(D.TooManyBadSamples, match=r"shard-000000\.tar/s0003 \(\.wav: 1 non-finite"):
        list(it)


def test_resume_mid_epoch_continues_with_the_exact_batches(tmp_path, tok):
    root = write_shards(tmp_path / "shards", n=30, per_shard=6, bad={4: "corrupt"})
    cfg = D.DataConfig(global_batch_size=4, window_size=8, cycle_length=2, num_threads=2, max_bad_fraction=0.1)

    def make():
        return D.make_iterator(TarShards(str(root)), tok, FE, cfg, process_index=0, process_count=1)
    it = make()
    for _ in range(3):              # 12 of 30 samples: mid-epoch
        next(it)
    state = json.loads(json.dumps(it.get_state()))   # as a checkpoint stores it
    reference = [next(it) for _ in range(12)]        # runs on through epochs 1 and 2
    resumed = make()
    resumed.set_state(state)
    for want in reference:
        got = next(resumed)
        assert set(got) == set(want)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert resumed.stats["bad"] == it.stats["bad"] == 2   # the corrupt sample, once per epoch so far
    # epochs reshuffle: epoch 1's order differs from epoch 0's
    idx = np.concatenate([b["index"] for b in reference])
    assert len(set(idx[-24:].tolist())) >= 20
    other = D.make_iterator(TarShards(str(root)), tok, FE, D.DataConfig(global_batch_size=4, seed=1),
                            process_index=0, process_count=1)
    with pytest.raises(ValueError, match="different pipeline"):
        other.set_state(state)


def test_order_interleaves_shards_and_shuffles_in_windows():
    groups = [np.arange(0, 4), np.arange(10, 13), np.arange(20, 24)]
    assert D.interleave(groups, 2).tolist() == [0, 10, 1, 11, 2, 12, 3, 20, 21, 22, 23]
    none = D.DataConfig(global_batch_size=1, shuffle="none", cycle_length=3)
    assert D.epoch_order(groups, 0, none, 0).tolist() == [0, 10, 20, 1, 11, 21, 2, 12, 22, 3, 23]
    win = D.DataConfig(global_batch_size=1, window_size=4, cycle_length=1)
    o0, o1 = D.epoch_order(groups, 0, win, 0), D.epoch_order(groups, 1, win, 0)
    assert sorted(o0) == sorted(np.concatenate(groups)) and o0.tolist() != o1.tolist()
    for w in range(0, 11, 4):        # a window holds consecutive records of the shard order
        block = o0[w:w + 4]
        assert max(block) - min(block) <= 13
    np.testing.assert_array_equal(o0, D.epoch_order(groups, 0, win, 0))
    glob = D.DataConfig(global_batch_size=1, shuffle="global")
    assert sorted(D.epoch_order(groups, 0, glob, 0)) == sorted(np.concatenate(groups))


def test_manifests_jsonl_and_csv_with_resampling_and_a_missing_file(tmp_path, tok):
    audio = tmp_path / "audio"
    audio.mkdir()
    rng = np.random.default_rng(0)
    sf.write(audio / "a.wav", 0.2 * rng.standard_normal((8000, 2)).astype(np.float32), 16000)   # 0.5 s stereo
    sf.write(audio / "b.flac", 0.2 * rng.standard_normal(30000).astype(np.float32), SR)
    lines = [{"path": "audio/a.wav", "captions": ["x one", "x two"]}, {"path": "audio/b.flac", "caption": "b"},
             {"path": "audio/missing.wav", "text": "gone"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    cfg = D.DataConfig(global_batch_size=3, num_epochs=1, drop_remainder=False, with_keys=True,
                       max_bad_fraction=0.5, shuffle="none")
    it = D.make_iterator(Manifest(str(tmp_path / "m.jsonl")), tok, FE, cfg, process_index=0, process_count=1)
    (batch,) = list(it)
    assert batch["key"].tolist() == ["audio/a.wav", "audio/b.flac"]
    assert it.stats["bad"] == 1 and "no such audio file" in it.stats["bad_keys"][0][1]
    # record 0 is exactly LAION's preparation of librosa's 48 kHz mono load, with the record's rng
    x = audio_io.quantize_int16(audio_io.load_audio(audio / "a.wav", SR))
    rng0 = np.random.default_rng((0, 0, 0))
    want = audio_io.get_audio_features(x, FE, "rand_trunc", "repeatpad", rng=rng0)
    np.testing.assert_array_equal(batch["waveform"][0], want["waveform"])
    cap = ["x one", "x two"][int(rng0.integers(2))]
    np.testing.assert_array_equal(batch["input_ids"][0], tok([cap])["input_ids"][0])
    # Clotho's CSV layout: file_name + caption_1..caption_5
    (tmp_path / "clotho.csv").write_text("file_name,caption_1,caption_2,caption_3,caption_4,caption_5\n"
                                         "audio/b.flac,c1,c2,c3,c4,c5\n")
    m = Manifest(str(tmp_path / "clotho.csv"))
    assert m.read(0).texts == ["c1", "c2", "c3", "c4", "c5"] and m.key(0) == "audio/b.flac"
    (tmp_path / "bad.csv").write_text("name,label\nx,y\n")
    with pytest.raises(ValueError, match="path column"):
        Manifest(str(tmp_path / "bad.csv"))


def test_synthetic_source_and_fusion_batches(tok):
    from clapjax import synthetic as S
    src = SyntheticSource(S.synthetic_dataset(0, 12, clip_samples=SR // 2))
    it = D.make_iterator(src, tok, FE, D.DataConfig(global_batch_size=4), process_index=0, process_count=1)
    b = next(it)
    assert b["waveform"].shape == (4, SR // 2) and b["waveform"].dtype == np.float32
    assert b["input_ids"].shape == (4, 77) and b["input_ids"].dtype == np.int32
    assert (b["attention_mask"].sum(1) > 5).all() and "key" not in b
    np.testing.assert_array_equal(b["waveform"][0], audio_io.quantize_int16(src.dataset.waveform(b["index"][0])))
    fused = D.make_iterator(src, tok, FE, D.DataConfig(global_batch_size=2, truncating="fusion"),
                            process_index=0, process_count=1)
    f = next(fused)
    assert f["mel_fusion"].shape == (2, 4, FE.clip_frames, FE.mel_bins) and "waveform" not in f
    assert f["longer"].dtype == bool and not f["longer"].any()
    src2 = D.source_from_config({"kind": "synthetic", "n": 5, "split": "heldout", "clip_samples": SR})
    assert src2.num_records == 5 and src2.key(0).startswith("synthetic-heldout")


def test_tar_errors_and_decoding(tmp_path, tok):
    root = write_shards(tmp_path / "shards", n=20)
    ts = TarShards(str(root))
    assert ts.num_records == 20 and ts.key(13) == "shard-000001.tar/s0013"
    assert len(expand_paths(str(root / "shard-{000000..000001}.tar"))) == 2
    # a 16 kHz stereo flac decodes to the librosa-resampled mean of its channels
    raw = ts.read(14)
    x16, _ = sf.read(io.BytesIO(raw.audio), dtype="float32")
    import librosa
    np.testing.assert_allclose(decode(raw, SR), librosa.resample(x16.mean(1), orig_sr=16000, target_sr=SR),
                               atol=1e-6)
    with pytest.raises(ValueError, match="empty"):
        decode(Raw("k", b"", ext="flac"), SR)
    with pytest.raises(ValueError, match="not divisible"):
        D.make_iterator(ts, tok, FE, D.DataConfig(global_batch_size=3), process_index=0, process_count=2)
    with pytest.raises(ValueError, match="at least one shard"):
        ts.groups(2, 3)
    sizes = json.loads((root / "sizes.json").read_text())
    sizes["shard-000000.tar"] = 11
    (root / "sizes.json").write_text(json.dumps(sizes))
    with pytest.raises(ValueError, match="sizes.json says 11"):
        TarShards(str(root)).groups(0, 1)
    gz = tmp_path / "z.tar"
    with tarfile.open(gz, "w:gz") as tf:
        _add(tf, "a.json", b"{}")
    with pytest.raises(ValueError, match="uncompressed tar"):
        TarShards(str(gz))


_WORKER = textwrap.dedent("""
    import json, os, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]),
                               initialization_timeout=60)
    import numpy as np
    from jax.experimental import multihost_utils
    from clapjax.audio.frontend import FrontEndConfig
    from clapjax.tokenizer import Tokenizer
    from clapjax.train import data as D
    from clapjax.train.data_sources import TarShards
    tok = Tokenizer(sys.argv[4])
    cfg = D.DataConfig(global_batch_size=4, num_epochs=1, drop_remainder=False, with_keys=True, num_threads=1)
    it = D.make_iterator(TarShards(sys.argv[3]), tok, FrontEndConfig(clip_samples=24000), cfg)
    keys = [k for b in it for k in b["key"].tolist()]
    counts = multihost_utils.process_allgather(np.array([len(keys)]))   # the collective works
    with open(sys.argv[5], "w") as f:
        json.dump({"process": jax.process_index(), "count": jax.process_count(), "keys": keys,
                   "all_counts": counts.reshape(-1).tolist()}, f)
    jax.distributed.shutdown()
""")


def test_two_processes_read_disjoint_shards_covering_the_dataset(tmp_path, tok):
    root = write_shards(tmp_path / "shards", n=50, per_shard=8)     # 7 shards: 4 + 3
    tok.save(tmp_path / "tok")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    results = run_group(lambda port: [[sys.executable, "-c", _WORKER, f"127.0.0.1:{port}", str(i), str(root),
                                       str(tmp_path / "tok"), str(tmp_path / f"keys{i}.json")] for i in range(2)],
                        env, timeout=240)
    for rc, out in results:
        assert rc == 0, out[-3000:]
    res = [json.loads((tmp_path / f"keys{i}.json").read_text()) for i in range(2)]
    assert [r["process"] for r in res] == [0, 1] and all(r["count"] == 2 for r in res)
    k0, k1 = res[0]["keys"], res[1]["keys"]
    assert len(k0) == len(set(k0)) and len(k1) == len(set(k1))            # no duplicate within the epoch
    assert not set(k0) & set(k1)                                           # disjoint
    assert set(k0) | set(k1) == {f"shard-{i // 8:06d}.tar/s{i:04d}" for i in range(50)}   # the dataset
    assert {k.split("/")[0] for k in k0} == {f"shard-{i:06d}.tar" for i in (0, 2, 4, 6)}  # whole shards each
    assert res[0]["all_counts"] == res[1]["all_counts"] == [len(k0), len(k1)]


def test_training_on_tar_shards_counts_bad_samples_and_stops_on_too_many(tmp_path):
    """Issue 6's acceptance through the training loop: 2 bad of 50 → trains, 2 counted; 10 of 50 → stops."""
    from clapjax.train import config as C
    from clapjax.train import loop as L
    from clapjax.train.batches import make_data_iterator
    from clapjax.train.metrics import read_metrics
    tokdir = train_byte_level_bpe([f"a {w} sound {i}" for w in WORDS for i in range(20)] * 3, tmp_path / "tok",
                                  vocab_size=300)

    def run(name, bad):
        cfg = C.load_config("tiny", ["train.steps=7", "train.batch_size=8", "checkpoint.every=100"])
        cfg.compilation_cache = str(tmp_path / "jax-cache")
        cfg.compiler_options = {"xla_backend_optimization_level": 0}
        cfg.data = dict(kind="tar", shards=str(write_shards(tmp_path / name, bad=bad)), tokenizer=str(tokdir),
                        max_bad_fraction=0.05, window_size=16)
        it = make_data_iterator(cfg, C.model_config(cfg))
        return it, (lambda: L.train(cfg, str(tmp_path / f"work-{name}"), it, log=lambda *a, **k: None))
    it, go = run("two", {7: "corrupt", 23: "no_caption"})
    summary = go()                                   # 7 steps × 8 = 56 samples: past the end of epoch 0
    assert summary["step"] == 7 and not summary["stopped"]
    assert it.stats["bad"] == 2 and {k for k, _ in it.stats["bad_keys"]} == {"shard-000000.tar/s0007",
                                                                             "shard-000002.tar/s0023"}
    losses = [r["loss"] for r in read_metrics(str(tmp_path / "work-two"))]
    assert len(losses) == 7 and all(np.isfinite(losses))
    _, go = run("ten", {i: ("corrupt", "no_caption")[i % 2] for i in range(2, 50, 5)})
    with pytest.raises(D.TooManyBadSamples, match=r"10 of 50 samples read were bad"):
        go()
