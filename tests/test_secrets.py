"""Kaggle credentials never reach anything ctclab writes: the whole pipeline with data.source:
kaggle and submit.upload: true against a stand-in Kaggle API, then every file searched for the key."""
import json
import shutil
import sys

import kaggle_standin
from conftest import make_spring2022
from project import env, make_project, run

KEY = "ctclabFAKEkey7d3c9e51a0b2"          # in the environment
FILE_KEY = "ctclabFAKEfilekey91f0c2b7e4"  # in kaggle.json


def test_kaggle_keys_appear_in_nothing_the_pipeline_writes(tmp_path):
    data = make_spring2022(tmp_path / "replica")
    archive = shutil.make_archive(str(tmp_path / "hw3p2"), "zip", data)
    config_dir = tmp_path / "kaggle-config"
    config_dir.mkdir()
    (config_dir / "kaggle.json").write_text(json.dumps({"username": "fakeuser", "key": FILE_KEY}))
    project = make_project(tmp_path / "project", {"data": {"source": "kaggle"}, "submit": {"upload": True},
                                                  "train": {"epochs": 1}})
    standin = kaggle_standin.serve(archive)
    try:
        credentials = {"KAGGLE_USERNAME": "fakeuser", "KAGGLE_KEY": KEY, "KAGGLE_CONFIG_DIR": str(config_dir)}
        out = run(project, sys.executable, "-m", "ctclab", "run", env={**standin.client_env(env(), tmp_path / "home"),
                                                                          **credentials})
    finally:
        standin.shutdown()
    logs = out.stdout + out.stderr
    assert "submit: uploaded submission/submission.csv to 11-785-s22-hw3p2" in logs
    assert KEY not in logs and FILE_KEY not in logs
    assert len(standin.submissions) == 1 and standin.submissions[0]["data"].startswith(b"id,predictions\n")
    sent = {r["headers"].get("Authorization") for r in standin.requests if r["method"] == "POST"}
    assert len(sent) == 1 and None not in sent  # the key went to the API, in its header
    assert not [r for r in standin.requests if r["method"] == "CONNECT"]  # never the real Kaggle
    written = [p for p in project.rglob("*") if p.is_file() and ".git" not in p.parts]
    assert any(p.name == "mlflow.db" for p in written) and any(p.name == "dvc.lock" for p in written)
    leaks = [str(p.relative_to(project)) for p in written
             if KEY.encode() in p.read_bytes() or FILE_KEY.encode() in p.read_bytes()]
    assert leaks == []
