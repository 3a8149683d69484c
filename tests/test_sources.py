"""fetch (`local`, `kaggle`) and preprocess on exact replicas of the HW3P2 layouts."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import make_fall2022, make_spring2022, zip_folder
from ctclab import kaggle, sources
from project import config
from ctclab.data import Shard, preprocess
from ctclab.errors import CtclabError
from ctclab.labels import INDEX

REPO = Path(__file__).resolve().parents[1]


def fetch_and_preprocess(tmp_path, cfg, **kw):
    layout = sources.fetch(cfg, tmp_path / "raw", progress=False, **kw)
    meta = preprocess(tmp_path / "raw", tmp_path / "processed", config("features"))
    return layout, meta


def test_spring2022_zip_local_fetch_strips_markers_and_keeps_test_order(tmp_path):
    src = make_spring2022(tmp_path / "download")
    archive = zip_folder(src, tmp_path / "11-785-s22-hw3p2.zip")
    layout, meta = fetch_and_preprocess(tmp_path, config("data", source="local", path=str(archive)))
    assert layout.kind == "spring2022" and layout.submission_format == "spring2022"
    assert meta.feature_dim == 13 and meta.utterances == {"train": 6, "dev": 6, "test": 6}
    test = Shard(tmp_path / "processed" / "test")
    order = [r.split(",")[0] for r in (layout.root / "test/test_order.csv").read_text().splitlines()[1:]]
    assert test.ids == [Path(o).stem for o in order] and test.ids != sorted(test.ids)
    train = Shard(tmp_path / "processed" / "train")
    raw = np.load(layout.root / "train/transcript" / f"{train.ids[0]}.npy")
    assert raw[0] == "<sos>" and raw[-1] == "<eos>"
    x, y = train.item(0)
    assert y.tolist() == [INDEX[s] for s in raw[1:-1]]
    np.testing.assert_allclose(x.mean(0), 0, atol=1e-4)  # per-utterance normalisation


@pytest.mark.parametrize("raw_subdir", [True, False])
def test_fall2022_folder_with_28_dim_features(tmp_path, raw_subdir):
    src = make_fall2022(tmp_path / "src", dim=28, raw_subdir=raw_subdir)
    layout, meta = fetch_and_preprocess(tmp_path, config("data", source="local", path=str(src)))
    assert layout.kind == "fall2022" and layout.submission_format == "fall2022"
    assert meta.feature_dim == 28 and meta.bad_utterances == 0
    dev = Shard(tmp_path / "processed" / "dev")
    assert dev.feature_dim == 28
    raw = np.load(layout.splits["dev"].transcript_dir / f"{dev.ids[0]}.npy")
    assert raw[0] == "[SOS]" and "[SIL]" in raw
    assert dev.item(0)[1].tolist() == [INDEX["SIL" if s == "[SIL]" else s] for s in raw[1:-1]]
    test = Shard(tmp_path / "processed" / "test")
    assert test.ids == sorted(test.ids) and meta.labelled["test"] is False


def test_kaggle_fetch_downloads_and_extracts(tmp_path, monkeypatch):
    archive = zip_folder(make_spring2022(tmp_path / "remote"), tmp_path / "remote.zip")

    class FakeApi:  # stands in for KaggleApi: no Kaggle host is reachable from here
        def competition_download_files(self, competition, path, quiet):
            assert competition == "11-785-s22-hw3p2"
            Path(path, f"{competition}.zip").write_bytes(archive.read_bytes())

    layout, meta = fetch_and_preprocess(tmp_path, config("data", source="kaggle"), kaggle_api=FakeApi())
    assert layout.kind == "spring2022" and meta.utterances["train"] == 6
    assert not (tmp_path / "raw.download").exists()


def test_kaggle_failure_is_one_line_without_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "s3cr3t-key-value")

    class RefusingApi:
        def competition_download_files(self, competition, path, quiet):
            raise OSError("403 Forbidden for key s3cr3t-key-value\nmore detail")

    with pytest.raises(CtclabError) as err:
        sources.fetch(config("data", source="kaggle"), tmp_path / "raw", kaggle_api=RefusingApi())
    message = str(err.value)
    assert "s3cr3t-key-value" not in message and "***" in message and "\n" not in message
    assert not (tmp_path / "raw").exists()


@pytest.mark.parametrize("offset", [190, 195, 199])
def test_a_key_across_the_200_character_cut_leaves_no_prefix(tmp_path, monkeypatch, offset):
    key = "K3y-0123456789abcdef"
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", key)

    class RefusingApi:
        def competition_download_files(self, competition, path, quiet):
            raise OSError("x" * offset + key + " rest of the message")

    with pytest.raises(CtclabError) as err:
        sources.fetch(config("data", source="kaggle"), tmp_path / "raw", kaggle_api=RefusingApi())
    message = str(err.value)
    assert all(key[:n] not in message for n in range(4, len(key) + 1)), message
    assert message.count("\n") == 0 and "x" * 150 in message


def run_stage(project: Path, script: str, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, str(REPO / "pipeline" / script), "--out", "data/raw"], cwd=project, env=env,
                          capture_output=True, text=True)


def test_missing_kaggle_credentials_is_one_clear_line(tmp_path):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text().replace("source: synthetic", "source: kaggle"))
    env = {"HOME": str(tmp_path), "KAGGLE_CONFIG_DIR": str(tmp_path / "none"), "KAGGLE_USERNAME": "",
           "KAGGLE_KEY": "", "KAGGLE_API_TOKEN": ""}
    r = run_stage(tmp_path, "fetch.py", env)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert "no credentials found" in r.stderr and "kaggle.json" in r.stderr


def test_unrecognised_layout_is_one_clear_line(tmp_path):
    (tmp_path / "stuff" / "audio").mkdir(parents=True)
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text().replace(
        "source: synthetic", "source: local").replace('path: ""', f"path: {tmp_path / 'stuff'}"))
    r = run_stage(tmp_path, "fetch.py")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "no recognised dataset layout (found audio/)" in r.stderr
    assert not (tmp_path / "data" / "raw").exists()


# Every place a Kaggle credential can come from (the kaggle package's documented ones), written
# here rather than read from the code: dropping one from the scrubbing must fail its case.
CREDENTIAL_SOURCES = ["env KAGGLE_KEY", "env KAGGLE_API_TOKEN", "kaggle.json key", "access_token file"]


@pytest.mark.parametrize("source", CREDENTIAL_SOURCES)
def test_every_credential_source_is_scrubbed(tmp_path, monkeypatch, source):
    for var in ("KAGGLE_KEY", "KAGGLE_API_TOKEN", "KAGGLE_USERNAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path))
    secret = "s3cr3t" + source.split()[-1].replace("_", "")
    kind, name = source.split(" ", 1)
    if kind == "env":
        monkeypatch.setenv(name, secret)
        monkeypatch.setenv("KAGGLE_USERNAME", "u")
    elif kind == "kaggle.json":
        (tmp_path / "kaggle.json").write_text(json.dumps({"username": "u", "key": secret}))
    else:
        (tmp_path / "access_token").write_text(secret + "\n")
    assert kaggle.has_credentials()
    assert kaggle.scrub(f"refused: {secret}!") == "refused: ***!"


@pytest.mark.parametrize("damage", ["cut short", "garbage", "damaged member"])
def test_a_damaged_archive_is_one_line_and_leaves_nothing_behind(tmp_path, damage):
    archive = zip_folder(make_spring2022(tmp_path / "download"), tmp_path / "11-785-s22-hw3p2.zip")
    data = bytearray(archive.read_bytes())
    if damage == "cut short":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = bytearray(os.urandom(len(data)))
    else:  # a byte in the middle of the largest member's data: its CRC (or inflate) fails
        import zipfile

        with zipfile.ZipFile(archive) as z:
            big = max(z.infolist(), key=lambda i: i.compress_size)
        start = big.header_offset + 30 + len(big.filename.encode()) + len(big.extra)
        data[start + big.compress_size // 2] ^= 0xFF
    archive.write_bytes(bytes(data))
    with pytest.raises(CtclabError) as err:
        sources.fetch(config("data", source="local", path=str(archive)), tmp_path / "raw", progress=False)
    assert str(err.value).startswith(f"{archive}: not a valid zip file") and "\n" not in str(err.value)
    assert not (tmp_path / "raw").exists() and not (tmp_path / "raw.partial").exists()
