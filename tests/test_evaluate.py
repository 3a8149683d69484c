"""Submissions in each competition's format and order, and the optional upload."""
import csv
import json
from pathlib import Path

import mlflow
import pytest
import torch

from conftest import make_fall2022, make_spring2022
from project import config, model_config
from ctclab import models, storage, tracking
from ctclab.data import Shard, preprocess
from ctclab.errors import CtclabError
from ctclab.evaluate import evaluate
from ctclab.submission import submit, write_submission
from ctclab.labels import F22_CHARS, INDEX, S22_CHARS


def setup_project(tmp_path, raw_root, dim):
    """Preprocessed replica + an untrained model checkpoint + a training run in a tmp store."""
    preprocess(raw_root, tmp_path / "processed", config("features"))
    torch.manual_seed(0)
    model = models.build(model_config(hidden=8, embed_dim=8, lstm_layers=1), dim)
    buf = tmp_path / "models"
    buf.mkdir()
    torch.save({"model_spec": model.spec(), "model": model.state_dict()}, buf / "best.pt")
    with tracking.open_store(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path).training_run("t", None, {}, {}, "r") as run:
        run.set_tags({"checkpoint_sha256": storage.sha256_file(buf / "best.pt")})
    return run.run_id


def do_submit(tmp_path, **kw):
    return submit(config("decode", beam_width=3), kw.pop("upload", False), "11-785-s22-hw3p2",
                  tmp_path / "processed", tmp_path / "models", tmp_path / "sub.csv", tmp_path / "metrics",
                  tmp_path, **kw)


def test_spring2022_submission_header_order_and_rows(tmp_path):
    setup_project(tmp_path, make_spring2022(tmp_path / "raw", n=7), 13)
    result = do_submit(tmp_path)
    rows = list(csv.reader(open(tmp_path / "sub.csv")))
    assert rows[0] == ["id", "predictions"] and len(rows) == 8 and result["rows"] == 7
    assert [int(r[0]) for r in rows[1:]] == list(range(7))
    assert all(set(r[1]) <= set(S22_CHARS[1:]) for r in rows[1:])
    order_csv = tmp_path / "raw/hw3p2_student_data/hw3p2_student_data/test/test_order.csv"
    wanted = [Path(l.split(",")[0]).stem for l in order_csv.read_text().splitlines()[1:]]
    assert Shard(tmp_path / "processed/test").ids == wanted  # rows follow test_order.csv
    assert "test_lev_beam" not in result  # Kaggle test sets have no transcripts


@pytest.mark.parametrize("fmt, expected", [
    ("spring2022", "id,predictions\n0,.AN.\n1,\n2,Z\n"),
    ("fall2022", "index,label\n0,-@G-\n1,\n2,Z\n"),
])
def test_submission_rows_are_the_competitions_exact_strings(tmp_path, fmt, expected):
    sil, ae, ng, zh = INDEX["SIL"], INDEX["AE"], INDEX["NG"], INDEX["ZH"]
    write_submission(tmp_path / "s.csv", [[sil, ae, ng, sil], [], [zh]], fmt)
    assert (tmp_path / "s.csv").read_text() == expected


def test_fall2022_submission_uses_its_header_and_character_map(tmp_path):
    setup_project(tmp_path, make_fall2022(tmp_path / "raw", dim=28, n=5), 28)
    result = do_submit(tmp_path)
    rows = list(csv.reader(open(tmp_path / "sub.csv")))
    assert rows[0] == ["index", "label"] and len(rows) == 6 and result["format"] == "fall2022"
    assert all(set(r[1]) <= set(F22_CHARS[1:]) for r in rows[1:])
    assert Shard(tmp_path / "processed/test").ids == sorted(Shard(tmp_path / "processed/test").ids)


class RecordingApi:
    def __init__(self, fail=False):
        self.calls, self.fail = [], fail

    def competition_submit(self, file_name, message, competition):
        if self.fail:
            raise RuntimeError("400 Client Error: submission refused")
        self.calls.append((file_name, message, competition))


def test_upload_names_the_run_and_a_refusal_keeps_the_csv(tmp_path):
    run_id = setup_project(tmp_path, make_spring2022(tmp_path / "raw", n=4), 13)
    api = RecordingApi()
    do_submit(tmp_path, upload=True, kaggle_api=api)
    assert api.calls == [(str(tmp_path / "sub.csv"), f"ctclab MLflow run {run_id}", "11-785-s22-hw3p2")]
    (tmp_path / "sub.csv").unlink()
    with pytest.raises(CtclabError, match="submission refused.*kept at") as err:
        do_submit(tmp_path, upload=True, kaggle_api=RecordingApi(fail=True))
    assert "\n" not in str(err.value) and (tmp_path / "sub.csv").is_file()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert mlflow.get_run(run_id).data.tags["kaggle_upload"] == "failed"


def test_evaluate_logs_worst_utterances(tmp_path):
    run_id = setup_project(tmp_path, make_spring2022(tmp_path / "raw", n=5), 13)
    r = evaluate(config("decode", beam_width=3), tmp_path / "processed", tmp_path / "models", tmp_path / "metrics", tmp_path)
    assert json.loads((tmp_path / "metrics/eval.json").read_text()) == r and r["beam_width"] == 3
    text = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").download_artifacts(
        run_id, "evaluate/worst_utterances_beam3.tsv", str(tmp_path))
    lines = Path(text).read_text().splitlines()
    assert lines[0] == "id\tdistance\treference\thypothesis" and len(lines) == 6
