"""Preprocess: every bad-utterance check, the skip/fail policy, normalisation and shards."""
import json
import shutil

import numpy as np
import pytest

from conftest import make_spring2022
from project import config
from ctclab.data import Shard, preprocess
from ctclab.errors import CtclabError


@pytest.fixture
def s22(tmp_path):
    return make_spring2022(tmp_path / "raw", n=8) / "hw3p2_student_data" / "hw3p2_student_data"


def break_utterances(base):
    """One broken utterance per check; returns the problem expected for each file name."""
    t, m = base / "train" / "transcript", base / "train" / "mfcc"
    np.save(m / "train_0000.npy", np.full((40, 13), np.nan, np.float32))
    np.save(m / "train_0001.npy", np.zeros((40, 12), np.float32))
    np.save(t / "train_0002.npy", np.array(["<sos>", "SIL", "QQ", "<eos>"]))
    np.save(t / "train_0003.npy", np.array(["<sos>", "<eos>"]))
    np.save(m / "train_0004.npy", np.zeros((2, 13), np.float32))
    (t / "train_0005.npy").unlink()
    shutil.copy(t / "train_0006.npy", t / "train_9999.npy")
    (m / "train_0007.npy").write_bytes(b"not an npy file")
    return {"train_0000.npy": "non-finite", "train_0001.npy": "feature dim 12, expected 13",
            "train_0002.npy": "unknown symbols ['QQ']", "train_0003.npy": "no labels",
            "train_0004.npy": "2 frames for", "train_0005.npy": "no matching transcript",
            "train_9999.npy": "transcript has no matching mfcc", "train_0007.npy": "cannot be read"}


def test_each_check_catches_its_problem_and_skip_keeps_the_rest(s22, tmp_path):
    expected = break_utterances(s22)
    meta = preprocess(s22.parents[1], tmp_path / "out", config("features", on_bad="skip"))
    report = json.loads((tmp_path / "out" / "bad_utterances.json").read_text())
    found = {r["file"].rsplit("/", 1)[1]: r["problem"] for r in report}
    assert set(found) == set(expected)
    for name, problem in expected.items():
        assert problem in found[name], (name, found[name])
    assert meta.utterances["train"] == 1 and meta.bad_utterances == 8
    assert Shard(tmp_path / "out" / "train").ids == ["train_0006"]


def test_fail_policy_stops_with_one_line_and_still_writes_the_report(s22, tmp_path):
    break_utterances(s22)
    with pytest.raises(CtclabError, match=r"8 bad utterances in all") as err:
        preprocess(s22.parents[1], tmp_path / "out", config("features", on_bad="fail"))
    assert "\n" not in str(err.value)
    assert len(json.loads((tmp_path / "out" / "bad_utterances.json").read_text())) == 8
    assert not (tmp_path / "out" / "train").exists()


def test_global_normalisation_uses_train_statistics_only(s22, tmp_path):
    meta = preprocess(s22.parents[1], tmp_path / "out", config("features", normalize="global"))
    train, dev = Shard(tmp_path / "out" / "train"), Shard(tmp_path / "out" / "dev")
    np.testing.assert_allclose(np.asarray(train.features).mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(np.asarray(train.features).std(0), 1, atol=1e-3)
    raw_dev = np.load(s22 / "dev" / "mfcc" / f"{dev.ids[0]}.npy")
    mean, std = np.array(meta.global_stats["mean"]), np.array(meta.global_stats["std"])
    np.testing.assert_allclose(dev.item(0)[0], (raw_dev - mean) / std, atol=1e-4)


def test_shards_round_trip_and_hash_is_stable(tiny_corpus, tmp_path):
    a = preprocess(tiny_corpus, tmp_path / "a", config("features", normalize="none"))
    b = preprocess(tiny_corpus, tmp_path / "b", config("features", normalize="none"))
    assert a.data_hash == b.data_hash and a.layout == "ctclab"
    shard = Shard(tmp_path / "a" / "dev")
    x, _ = shard.item(len(shard) - 1)
    np.testing.assert_array_equal(x, np.load(tiny_corpus / "dev" / "mfcc" / f"{shard.ids[-1]}.npy"))
    c = preprocess(tiny_corpus, tmp_path / "c", config("features", normalize="utterance"))
    assert c.data_hash != a.data_hash


def long_utterances(root, n, frames=3000, dim=40):
    """A Spring-2022 replica whose features dominate memory: n utterances of frames × dim float32."""
    base = make_spring2022(root, dim=dim, n=n) / "hw3p2_student_data" / "hw3p2_student_data"
    rng = np.random.default_rng(0)
    for split in ("train", "dev", "test"):
        for f in (base / split / "mfcc").glob("*.npy"):
            np.save(f, rng.standard_normal((frames, dim)).astype(np.float32))
    return root


@pytest.mark.parametrize("normalize", ["utterance", "global"])
def test_preprocess_memory_does_not_grow_with_the_number_of_utterances(tmp_path, normalize):
    import tracemalloc

    peaks = {}
    for n in (4, 32):
        raw = long_utterances(tmp_path / f"raw{n}", n)
        tracemalloc.start()
        meta = preprocess(raw, tmp_path / f"out{n}", config("features", normalize=normalize))
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert meta.frames["train"] == 3000 * n
    one_split = 32 * 3000 * 40 * 4  # what holding the 32-utterance train split would take: 15 MB
    assert peaks[32] < 1.3 * peaks[4] + 1_000_000 and peaks[32] < one_split / 4, peaks


def test_zero_frame_utterances_are_reported(s22, tmp_path):
    np.save(s22 / "train" / "mfcc" / "train_0003.npy", np.zeros((0, 13), np.float32))
    meta = preprocess(s22.parents[1], tmp_path / "out", config("features"))
    report = json.loads((tmp_path / "out" / "bad_utterances.json").read_text())
    assert [(r["file"].rsplit("/", 1)[1], r["problem"]) for r in report] == [
        ("train_0003.npy", "0 frames; expected at least one feature frame")]
    assert meta.utterances["train"] == 7
    np.save(s22 / "test" / "mfcc" / "test_0001.npy", np.zeros((0, 13), np.float32))
    with pytest.raises(CtclabError, match="bad test utterances would leave rows out of the submission"):
        preprocess(s22.parents[1], tmp_path / "out2", config("features"))


@pytest.mark.parametrize("text", ['{"layout": "ctclab", "feature_dim"', '{"layout": "ctclab"}', "[]"],
                         ids=["cut short", "keys missing", "not an object"])
def test_a_damaged_meta_json_is_one_line_naming_the_fix(tmp_path, processed, text):
    from ctclab.data import read_meta

    shutil.copytree(processed, tmp_path / "p")
    assert read_meta(tmp_path / "p").feature_dim == 13
    (tmp_path / "p/meta.json").write_text(text)
    with pytest.raises(CtclabError) as err:
        read_meta(tmp_path / "p")
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'p/meta.json'}: not a meta.json preprocess wrote") and "\n" not in message
    assert message.endswith("re-make it with `dvc repro -f preprocess`")


@pytest.mark.parametrize("name", ["features.npy", "frame_offsets.npy", "labels.npy", "label_offsets.npy", "ids.json"])
@pytest.mark.parametrize("damage", ["cut short", "garbage", "empty"])
def test_a_damaged_shard_file_is_one_line_naming_it_and_the_fix(tmp_path, processed, name, damage):
    import random

    from ctclab.data import Shard

    shutil.copytree(processed / "dev", tmp_path / "dev")
    path = tmp_path / "dev" / name
    good = path.read_bytes()
    path.write_bytes({"cut short": good[: len(good) // 2], "garbage": random.Random(name).randbytes(len(good)),
                      "empty": b""}[damage])
    with pytest.raises(CtclabError) as err:
        Shard(tmp_path / "dev")
    message = str(err.value)
    assert message.startswith(str(tmp_path / "dev")) and "\n" not in message
    assert message.endswith("re-make them with `dvc repro -f preprocess` (or `dvc checkout` if they are cached)")
