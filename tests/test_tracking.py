"""MLflow tracking: where the store is, training runs and their resumption, study parent/child runs."""
from pathlib import Path

import mlflow
import pytest

from ctclab import tracking
from ctclab.errors import CtclabError


@pytest.fixture
def store(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_default_store_is_the_real_repo_root_also_from_a_dvc_temp_copy(tmp_path, monkeypatch):
    monkeypatch.setattr(tracking, "_USER_URI", "")
    inside = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpab12" / "sub"
    assert tracking.tracking_uri("", inside) == f"sqlite:///{tmp_path / 'repo' / 'mlflow.db'}"
    assert tracking.tracking_uri("http://127.0.0.1:5005", inside) == "http://127.0.0.1:5005"
    monkeypatch.setattr(tracking, "_USER_URI", "sqlite:////elsewhere.db")
    assert tracking.tracking_uri("", inside) == "sqlite:////elsewhere.db"


def test_experiment_artifacts_live_beside_the_default_store(tmp_path, monkeypatch):
    monkeypatch.setattr(tracking, "_USER_URI", "")
    exp_id = tracking.experiment_id("", "e1", tmp_path)
    assert tracking.experiment_id("", "e1", tmp_path) == exp_id  # found, not created twice
    location = mlflow.MlflowClient().get_experiment(exp_id).artifact_location
    assert location == (tmp_path / "mlartifacts").as_uri()


def test_experiments_are_tagged_as_model_training_also_older_ones(tmp_path, store):
    mlflow.set_tracking_uri(store)
    client = mlflow.MlflowClient()
    older = client.create_experiment("older")  # as an earlier ctclab made it: no kind tag
    assert "mlflow.experimentKind" not in client.get_experiment(older).tags
    for name in ("new", "older"):
        exp_id = tracking.experiment_id(store, name, tmp_path)
        assert client.get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"


def test_training_run_logs_once_and_a_resumed_run_is_the_same_run(tmp_path, store):
    params, tags = {"model.hidden": 8, "train.seed": 1}, {"device": "cpu", "parameter_count": 42}
    with tracking.training_run(store, "t", tmp_path, None, params, tags, "conv_lstm-h8-s1") as run:
        run.log_metrics({"dev_loss": 2.0}, step=1)
        first = run.run_id
    with tracking.training_run(store, "t", tmp_path, first, {"model.hidden": 999}, {"device": "cuda"}, "x") as run:
        run.log_metrics({"dev_loss": 1.0}, step=2)
        assert run.run_id == first
    client = mlflow.MlflowClient(store)
    r = client.get_run(first)
    assert r.data.params == {"model.hidden": "8", "train.seed": "1"}  # not overwritten on resume
    assert r.data.tags["device"] == "cpu" and r.data.tags["parameter_count"] == "42"
    assert r.info.run_name == "conv_lstm-h8-s1"
    assert [(m.step, m.value) for m in client.get_metric_history(first, "dev_loss")] == [(1, 2.0), (2, 1.0)]
    freeze = client.download_artifacts(first, "environment/pip-freeze.txt", str(tmp_path))
    assert "mlflow==" in Path(freeze).read_text()


def test_training_runs_record_system_metrics(tmp_path, store, monkeypatch):
    import time

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    with tracking.training_run(store, "t", tmp_path, None, {}, {}, "r") as run:
        time.sleep(1.5)
    metrics = mlflow.MlflowClient(store).get_run(run.run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics and "system/system_memory_usage_megabytes" in metrics


def test_provenance_names_commit_dirt_and_versions(tmp_path):
    import subprocess

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "f").write_text("x")
    subprocess.run(["git", "add", "f"], cwd=tmp_path, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c"], cwd=tmp_path, check=True)
    clean = tracking.provenance_tags(tmp_path, "abc", "cpu", "x86_64")
    assert len(clean["mlflow.source.git.commit"]) == 40 and clean["git_dirty"] == "false"
    assert clean["mlflow.source.git.branch"] in ("master", "main") and clean["data_hash"] == "abc"
    (tmp_path / "f").write_text("changed")
    assert tracking.provenance_tags(tmp_path, "abc", "cpu", "x86_64")["git_dirty"] == "true"
    outside = tmp_path / "not-a-repo"
    outside.mkdir()
    (outside / ".git").write_text("gitdir: /nonexistent")  # git fails here: the tag says so
    assert tracking.provenance_tags(outside, "abc", "cpu", "x86_64")["mlflow.source.git.commit"] == "unknown"


def test_study_parent_and_child_runs(tmp_path, store):
    assert tracking.find_parent(store, "s/kaiming", tmp_path, "kaiming", smoke=True) is None
    parent = tracking.create_parent(store, "s/kaiming", tmp_path, "kaiming", True, "kaiming (smoke)", "q?", "name: k\n")
    assert tracking.find_parent(store, "s/kaiming", tmp_path, "kaiming", smoke=True) == parent
    assert tracking.find_parent(store, "s/kaiming", tmp_path, "kaiming", smoke=False) is None
    labels = {"study": "kaiming", "variant": "on", "seed": "0"}
    # the variant's own training: a child of the parent, in the parent's experiment
    with tracking.training_run(store, "s", tmp_path, None, {"model.kaiming": True}, {"parameter_count": 7, **labels},
                               "on-s0", parent.run_id) as run:
        for epoch, v in ((1, 5.0), (2, 3.0)):
            run.log_metrics({"dev_lev_greedy": v, "epoch_seconds": 10.0}, step=epoch)
    assert tracking.is_study_child(run.run_id, parent.run_id, labels)
    assert not tracking.is_study_child(run.run_id, parent.run_id, {**labels, "variant": "off"})
    [own] = tracking.children(parent)
    assert own.run_id == run.run_id and mlflow.MlflowClient(store).get_run(run.run_id).info.experiment_id == parent.experiment_id
    # another variant evaluating the same trained model gets a child run of its own
    child = tracking.log_study_child(run.run_id, parent.run_id, {**labels, "variant": "b8"},
                                     {"decode.beam_width": 8}, {"eval_dev_lev_beam": 2.5}, {"evaluate/worst.tsv": "id\n"})
    record = next(r for r in tracking.children(parent) if r.run_id == child)
    assert record.status == "FINISHED" and record.tags["variant"] == "b8" and record.tags["training_run_id"] == run.run_id
    assert record.params == {"model.kaiming": "True", "decode.beam_width": "8"}
    assert record.metrics["eval_dev_lev_beam"] == 2.5 and record.metrics["train_seconds"] == 20.0
    assert record.tags["parameter_count"] == "7"
    assert tracking.metric_history(child, "dev_lev_greedy") == [(1, 5.0), (2, 3.0)]


def test_the_run_of_a_checkpoint_is_found_by_its_bytes(tmp_path, store):
    ckpt = tmp_path / "best.pt"
    ckpt.write_bytes(b"weights")
    digest = __import__("hashlib").sha256(b"weights").hexdigest()
    with pytest.raises(CtclabError) as err:  # nothing recorded it yet
        tracking.checkpoint_run(store, tmp_path, ckpt)
    assert "best.pt: no training run in sqlite:///" in str(err.value) and "\n" not in str(err.value)
    ids = []
    for experiment in ("ctclab", "ctclab/study"):  # any experiment; a rerun writing the same bytes is newer
        with tracking.training_run(store, experiment, tmp_path, None, {}, {"checkpoint_sha256": digest}, "r") as run:
            ids.append(run.run_id)
    assert tracking.checkpoint_run(store, tmp_path, ckpt) == ids[-1]
    with pytest.raises(CtclabError, match="missing.pt: no checkpoint; run the train stage first"):
        tracking.checkpoint_run(store, tmp_path, tmp_path / "missing.pt")
