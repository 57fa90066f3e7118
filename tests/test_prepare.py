"""`clapjax prepare` and the pre-decoded shards: the same records, ids, bad samples and batches as the
original tars or manifest (same seed, bit for bit), resume after an interruption, parallel == serial."""
import dataclasses
import json
import os
import pickle
import shutil

import numpy as np
import pytest
import soundfile as sf

from clapjax.audio import io as audio_io
from clapjax.train import data as D
from clapjax.train import prepare as P
from clapjax.audio.io import int16_of_quantized
from clapjax.train.array_records import META_FILE, ArrayRecordShards, pcm_to_float
from clapjax.train.data_sources import Manifest, TarShards, decode

from test_data import FE, SR, tok, write_shards  # noqa: F401  (tok: the module's tokenizer fixture)

BAD = {2: "corrupt", 5: "no_caption", 9: "nan_wav", 13: "blank_list", 14: "empty_audio"}


@pytest.fixture(scope="module")
def tars(tmp_path_factory):
    """18 samples in 4 tar shards (5 bad ones, float WAVs and 16 kHz stereo among them)."""
    return str(write_shards(tmp_path_factory.mktemp("tars") / "shards", n=18, per_shard=5, bad=BAD))


@pytest.fixture(scope="module")
def prepared(tars, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("prepared") / "out")
    summary = P.prepare(TarShards(tars), out, P.PrepareConfig(workers=0), log=lambda s: None)
    return out, summary


def _files(directory):
    return {n: open(os.path.join(directory, n), "rb").read() for n in sorted(os.listdir(directory))}


def _batches(source, tok, cfg, **process):
    it = D.make_iterator(source, tok, FE, cfg, **({"process_index": 0, "process_count": 1} | process))
    return list(it), it.stats


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]), k


def test_shards_hold_the_tars_records_in_order_with_bad_ones_kept(tars, prepared):
    out, summary = prepared
    tar, ar = TarShards(tars), ArrayRecordShards(out)
    assert (summary.records, summary.bad, summary.shards, summary.kept) == (18, 5, 4, 0)
    assert ar.num_records == tar.num_records and list(ar.sizes) == list(tar.sizes)
    for p, n in ((0, 1), (0, 2), (1, 2), (2, 3)):
        assert [g.tolist() for g in ar.groups(p, n)] == [g.tolist() for g in tar.groups(p, n)]
    for i in range(tar.num_records):
        a, t = ar.read(i), tar.read(i)
        assert a.key == t.key == ar.key(i)
        if i in BAD:
            assert a.problem and a.audio is None
            continue
        assert a.sample_rate == SR and a.audio.dtype == np.float32
        assert np.array_equal(a.audio, audio_io.quantize_int16(decode(t, SR)))   # bit for bit
        assert np.array_equal(audio_io.quantize_int16(a.audio), a.audio)       # the pipeline's round trip: a no-op
    assert summary.bytes == sum(os.path.getsize(p) for p in ar.paths)
    copy = pickle.loads(pickle.dumps(ar))           # as worker processes get it: readers reopen there
    assert copy.key(17) == ar.key(17) and np.array_equal(copy.read(17).audio, ar.read(17).audio)
    assert "on disk" in summary.line() and "x the source's" in summary.line()


@pytest.mark.parametrize("shuffle", ["window", "global"])
def test_same_seed_same_batches_as_the_tars_bit_for_bit(tars, prepared, tok, shuffle):
    cfg = D.DataConfig(global_batch_size=4, seed=3, num_epochs=2, shuffle=shuffle, window_size=6, cycle_length=2,
                       drop_remainder=False, with_keys=True, max_bad_fraction=0.5, num_threads=2)
    ours, ours_stats = _batches(D.source_from_config({"kind": "array_record", "shards": prepared[0]}), tok, cfg)
    theirs, their_stats = _batches(D.source_from_config({"kind": "tar", "shards": tars}), tok, cfg)
    _assert_same(ours, theirs)
    assert ours_stats == their_stats and ours_stats["bad"] == 2 * len(BAD)   # the same bad keys and reasons
    # a second process of two reads the same shards as from the tars
    _assert_same(_batches(ArrayRecordShards(prepared[0]), tok, cfg, process_index=1, process_count=2)[0],
                 _batches(TarShards(tars), tok, cfg, process_index=1, process_count=2)[0])


def test_float32_pcm_matches_the_tars_without_the_int16_round_trip(tars, tok, tmp_path):
    out = str(tmp_path / "f32")
    P.prepare(TarShards([os.path.join(tars, "shard-000001.tar")]), out, P.PrepareConfig(workers=0, pcm="float32"),
              log=lambda s: None)
    cfg = D.DataConfig(global_batch_size=2, num_epochs=1, quantize=False, drop_remainder=False, with_keys=True,
                       max_bad_fraction=0.5)
    ours, ours_stats = _batches(ArrayRecordShards(out), tok, cfg)
    theirs, their_stats = _batches(TarShards([os.path.join(tars, "shard-000001.tar")]), tok, cfg)
    _assert_same(ours, theirs)
    assert ours_stats == their_stats


def test_int16_samples_read_back_as_quantize_int16_gives_them():
    every = np.arange(-32767, 32768).astype(np.int16)     # all quantize_int16 can make (it never makes -32768)
    x = pcm_to_float(every)
    assert np.array_equal(x, (every / 32767.0).astype(np.float32))   # quantize_int16's own last step, in float64
    assert np.array_equal(audio_io.quantize_int16(x), x)              # so the pipeline's round trip is a no-op
    assert np.array_equal(int16_of_quantized(x), every)
    with pytest.raises(ValueError, match="not an int16 round trip"):
        int16_of_quantized(np.float32([0.1]))


def test_parallel_workers_write_the_same_files_as_one_process(tars, prepared, tmp_path):
    out = str(tmp_path / "parallel")
    summary = P.prepare(TarShards(tars), out, P.PrepareConfig(workers=2), log=lambda s: None)
    assert _files(out) == _files(prepared[0])
    assert summary == dataclasses.replace(prepared[1], directory=out)


def test_an_interrupted_prepare_keeps_finished_shards_and_redoes_the_partial_one(tars, prepared, tmp_path,
                                                                                 monkeypatch):
    out, tars = str(tmp_path / "resumed"), str(shutil.copytree(tars, tmp_path / "tars"))
    real, calls = P.prepared_record, []

    def dies_in_the_second_shard(raw, *args):
        calls.append(raw.key)
        if len(calls) == 7:
            raise KeyboardInterrupt   # the user's ^C, two records into shard 2
        return real(raw, *args)

    monkeypatch.setattr(P, "prepared_record", dies_in_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        P.prepare(TarShards(tars), out, P.PrepareConfig(workers=0), log=lambda s: None)
    monkeypatch.undo()
    meta = json.load(open(os.path.join(out, META_FILE)))
    assert [s["done"] for s in meta["shards"]] == [True, False, False, False] and not meta["complete"]
    assert os.path.exists(os.path.join(out, ".shard-000001.array_record.partial"))
    with pytest.raises(ValueError, match="has not finished"):
        ArrayRecordShards(out)
    first = os.stat(os.path.join(out, "shard-000000.array_record"))

    summary = P.prepare(TarShards(tars), out, P.PrepareConfig(workers=0), log=lambda s: None)
    assert summary.kept == 1 and summary.records == 18
    kept = os.stat(os.path.join(out, "shard-000000.array_record"))
    assert (kept.st_ino, kept.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)    # not rewritten
    assert _files(out) == _files(prepared[0])                                        # as if never interrupted

    with open(os.path.join(tars, "shard-000003.tar"), "ab") as f:   # a tar that changed since: made again
        f.write(bytes(512))
    assert P.prepare(TarShards(tars), out, P.PrepareConfig(workers=0), log=lambda s: None).kept == 3
    assert _files(out).keys() == _files(prepared[0]).keys()

    with pytest.raises(ValueError, match="other settings"):
        P.prepare(TarShards(tars), out, P.PrepareConfig(workers=0, pcm="float32"), log=lambda s: None)


def test_a_manifest_prepares_to_the_same_batches(tmp_path, tok):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(7):
        sr = (SR, 16000, 44100)[i % 3]
        name = f"clip{i}.{'flac' if i % 2 else 'wav'}"
        sf.write(tmp_path / name, 0.2 * rng.standard_normal(int(sr * (0.3 + 0.1 * i))).astype(np.float32), sr)
        rows.append({"path": name, "captions": [f"a sound {i}", f"noise {i}"]})
    rows.insert(3, {"path": "missing.wav", "caption": "gone"})
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = str(tmp_path / "out")
    summary = P.prepare(P.open_source(str(manifest)), out, P.PrepareConfig(workers=0, rows_per_shard=3),
                        log=lambda s: None)
    assert (summary.records, summary.bad, summary.shards) == (8, 1, 3)
    cfg = D.DataConfig(global_batch_size=2, seed=1, num_epochs=1, shuffle="global", drop_remainder=False,
                       with_keys=True, max_bad_fraction=0.5)
    for process in ({"process_index": 0, "process_count": 1}, {"process_index": 1, "process_count": 2}):
        ours, ours_stats = _batches(ArrayRecordShards(out), tok, cfg, **process)
        theirs, their_stats = _batches(Manifest(str(manifest)), tok, cfg, **process)
        _assert_same(ours, theirs)
        assert ours_stats == their_stats
    with pytest.raises(ValueError, match="whole directory"):
        ArrayRecordShards([os.path.join(out, "m-00000.array_record")])


def test_the_command_line(tars, tmp_path, capsys):
    out = str(tmp_path / "cli")
    assert P.main([os.path.join(tars, "shard-00000{0..1}.tar"), out, "--workers", "0"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("prepared 10 records (3 bad) in 2 shards") and "x the source's" in last
    assert ArrayRecordShards(os.path.join(out, "*.array_record")).num_records == 10
    with pytest.raises(ValueError, match="not empty and not a prepared directory"):
        P.main([tars, tars])
    with pytest.raises(ValueError, match="not a prepared directory"):
        ArrayRecordShards(tars)
