"""MLflow tracking: where the store is, training runs and their resumption, study parent/child runs (ctclab.study_runs)."""
from pathlib import Path

import mlflow
import pytest

from ctclab import provenance, study_runs, tracking
from ctclab.errors import CtclabError


@pytest.fixture
def store(tmp_path):
    return tracking.open_store(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path)


def test_default_store_is_the_real_repo_root_also_from_a_dvc_temp_copy(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    inside = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpab12" / "sub"
    assert tracking.tracking_uri("", inside) == f"sqlite:///{tmp_path / 'repo' / 'mlflow.db'}"
    assert tracking.tracking_uri("http://127.0.0.1:5005", inside) == "http://127.0.0.1:5005"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere.db")  # read when asked, not at import
    assert tracking.tracking_uri("", inside) == "sqlite:////elsewhere.db"


def test_two_stores_in_one_process_keep_apart_and_leave_mlflow_global_state_alone(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before = mlflow.get_tracking_uri()
    a, b = (tracking.open_store(f"sqlite:///{tmp_path / name}.db", tmp_path) for name in ("a", "b"))
    with a.training_run("t", None, {"x": 1}, {}, "in-a") as run_a:
        with b.training_run("t", None, {"x": 2}, {}, "in-b") as run_b:
            run_a.log_metrics({"m": 1.0}, step=1)
            run_b.log_metrics({"m": 2.0}, step=1)
    assert a.metric_history(run_a.run_id, "m") == [(1, 1.0)] and b.metric_history(run_b.run_id, "m") == [(1, 2.0)]
    with pytest.raises(mlflow.exceptions.MlflowException):
        a.record(run_b.run_id)  # b's run is not in a
    assert a.record(run_a.run_id).status == "FINISHED" and b.record(run_b.run_id).params == {"x": "2"}
    assert mlflow.get_tracking_uri() == before and mlflow.active_run() is None
    assert "MLFLOW_TRACKING_URI" not in __import__("os").environ


def test_experiment_artifacts_live_beside_the_default_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = tracking.open_store("", tmp_path)
    exp_id = store.experiment_id("e1")
    assert store.experiment_id("e1") == exp_id  # found, not created twice
    location = store.client.get_experiment(exp_id).artifact_location
    assert location == (tmp_path / "mlartifacts").as_uri()


def test_experiments_are_tagged_as_model_training_also_older_ones(tmp_path, store):
    client = mlflow.MlflowClient(store.uri)
    older = client.create_experiment("older")  # as an earlier ctclab made it: no kind tag
    assert "mlflow.experimentKind" not in client.get_experiment(older).tags
    for name in ("new", "older"):
        exp_id = store.experiment_id(name)
        assert client.get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"


def test_training_run_logs_once_and_a_resumed_run_is_the_same_run(tmp_path, store):
    params, tags = {"model.hidden": 8, "train.seed": 1}, {"device": "cpu", "parameter_count": 42}
    with store.training_run("t", None, params, tags, "conv_lstm-h8-s1") as run:
        run.log_metrics({"dev_loss": 2.0}, step=1)
        first = run.run_id
    with store.training_run("t", first, {"model.hidden": 999}, {"device": "cuda"}, "x") as run:
        assert store.record(first).status == "RUNNING"
        run.log_metrics({"dev_loss": 1.0}, step=2)
        assert run.run_id == first
    client = mlflow.MlflowClient(store.uri)
    r = client.get_run(first)
    assert r.info.status == "FINISHED"
    assert r.data.params == {"model.hidden": "8", "train.seed": "1"}  # not overwritten on resume
    assert r.data.tags["device"] == "cpu" and r.data.tags["parameter_count"] == "42"
    assert r.info.run_name == "conv_lstm-h8-s1"
    assert {"mlflow.user", "mlflow.source.name", "mlflow.source.type"} <= set(r.data.tags)  # the UI's User and Source
    assert [(m.step, m.value) for m in client.get_metric_history(first, "dev_loss")] == [(1, 2.0), (2, 1.0)]
    freeze = client.download_artifacts(first, "environment/pip-freeze.txt", str(tmp_path))
    assert "mlflow==" in Path(freeze).read_text()


def test_a_run_ended_early_or_by_an_error_keeps_that_status(store):
    with store.training_run("t", None, {}, {}, "killed") as run:
        run.end("KILLED")
    assert store.record(run.run_id).status == "KILLED"
    with pytest.raises(RuntimeError):
        with store.training_run("t", None, {}, {}, "failed") as run:
            raise RuntimeError("boom")
    assert store.record(run.run_id).status == "FAILED"


def test_training_runs_record_system_metrics(tmp_path, store, monkeypatch):
    import time

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    with store.training_run("t", None, {}, {}, "r") as run:
        deadline = time.monotonic() + 60  # until the monitor's first batch is in the store
        while not store.record(run.run_id).metrics and time.monotonic() < deadline:
            time.sleep(0.05)
    metrics = store.record(run.run_id).metrics
    assert "system/cpu_utilization_percentage" in metrics and "system/system_memory_usage_megabytes" in metrics


def test_provenance_names_commit_dirt_and_versions(tmp_path):
    import subprocess

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "f").write_text("x")
    subprocess.run(["git", "add", "f"], cwd=tmp_path, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c"], cwd=tmp_path, check=True)
    clean = provenance.tags(tmp_path, "abc", "cpu", "x86_64")
    assert len(clean["mlflow.source.git.commit"]) == 40 and clean["git_dirty"] == "false"
    assert clean["mlflow.source.git.branch"] in ("master", "main") and clean["data_hash"] == "abc"
    (tmp_path / "f").write_text("changed")
    dirty = provenance.tags(tmp_path, "abc", "cpu", "x86_64")
    assert dirty["git_dirty"] == "true" and dirty["git_dirty_files"] == "f" and clean["git_dirty_files"] == ""
    assert "+changed" in provenance.git_diff(tmp_path)
    outside = tmp_path / "not-a-repo"
    outside.mkdir()
    (outside / ".git").write_text("gitdir: /nonexistent")  # git fails here: the tag says so
    assert provenance.tags(outside, "abc", "cpu", "x86_64")["mlflow.source.git.commit"] == "unknown"


def test_study_parent_and_child_runs(tmp_path, store):
    assert study_runs.find_parent(store, "s/kaiming", "kaiming", smoke=True) is None
    parent = study_runs.create_parent(store, "s/kaiming", "kaiming", True, "kaiming (smoke)", "q?", "name: k\n")
    assert study_runs.find_parent(store, "s/kaiming", "kaiming", smoke=True) == parent
    assert study_runs.find_parent(store, "s/kaiming", "kaiming", smoke=False) is None
    assert store.record(parent.run_id).status == "FINISHED"
    labels = {"study": "kaiming", "variant": "on", "seed": "0"}
    # the variant's own training: a child of the parent, in the parent's experiment
    with store.training_run("s", None, {"model.kaiming": True}, {"parameter_count": 7, **labels}, "on-s0",
                            parent.run_id) as run:
        for epoch, v, seconds, share in ((1, 5.0, 10.0, 1.0), (2, 3.0, 30.0, 0.5)):
            run.log_metrics({"dev_lev_greedy": v, "epoch_seconds": seconds, "cpu_share": share}, step=epoch)
    # the share weighted by the epochs' seconds
    assert store.train_timing(run.run_id) == {"train_seconds": 40.0, "train_cpu_share": (10 * 1.0 + 30 * 0.5) / 40}
    assert study_runs.is_child(store, run.run_id, parent.run_id, labels)
    assert not study_runs.is_child(store, run.run_id, parent.run_id, {**labels, "variant": "off"})
    [own] = parent.children()
    assert own.run_id == run.run_id and store.client.get_run(run.run_id).info.experiment_id == parent.experiment_id
    # another variant evaluating the same trained model gets a child run of its own
    child = study_runs.log_child(store, run.run_id, parent.run_id, {**labels, "variant": "b8"},
                                 {"decode.beam_width": 8}, {"eval_dev_lev_beam": 2.5}, {"evaluate/worst.tsv": "id\n"})
    record = next(r for r in parent.children() if r.run_id == child)
    assert record.status == "FINISHED" and record.tags["variant"] == "b8" and record.tags["training_run_id"] == run.run_id
    assert record.params == {"model.kaiming": "True", "decode.beam_width": "8"}
    assert record.metrics["eval_dev_lev_beam"] == 2.5 and record.metrics["train_seconds"] == 40.0
    assert record.metrics["train_cpu_share"] == 0.625
    assert record.tags["parameter_count"] == "7"
    assert store.metric_history(child, "dev_lev_greedy") == [(1, 5.0), (2, 3.0)]


def test_the_run_of_a_checkpoint_is_found_by_its_bytes(tmp_path, store):
    ckpt = tmp_path / "best.pt"
    ckpt.write_bytes(b"weights")
    digest = __import__("hashlib").sha256(b"weights").hexdigest()
    with pytest.raises(CtclabError) as err:  # nothing recorded it yet
        store.checkpoint_run(ckpt)
    assert "best.pt: no training run in sqlite:///" in str(err.value) and "\n" not in str(err.value)
    ids = []
    for experiment in ("ctclab", "ctclab/study"):  # any experiment; a rerun writing the same bytes is newer
        with store.training_run(experiment, None, {}, {"checkpoint_sha256": digest}, "r") as run:
            ids.append(run.run_id)
    assert store.checkpoint_run(ckpt) == ids[-1]
    with pytest.raises(CtclabError, match="missing.pt: no checkpoint; run the train stage first"):
        store.checkpoint_run(tmp_path / "missing.pt")


def test_a_server_that_takes_the_connection_but_never_answers_is_one_line_within_10_s(tmp_path):
    """The README's promise, as written: within 10 s, measured here, even when the port accepts."""
    import socket
    import time

    from ctclab.errors import CtclabError
    from ctclab.tracking import open_store

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # connections complete in the kernel's backlog; nothing ever reads or answers
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        t0 = time.monotonic()
        with pytest.raises(CtclabError) as err:
            open_store(uri, tmp_path)
        elapsed = time.monotonic() - t0
    assert elapsed < 10, elapsed
    assert str(err.value).startswith(f"tracking.uri {uri}: no MLflow server answers there (ReadTimeout)")


@pytest.mark.parametrize("damage", ["garbage", "cut short"])
def test_a_damaged_store_file_is_one_line_naming_it_before_anything_runs(tmp_path, damage):
    import random

    from ctclab.errors import CtclabError
    from ctclab.tracking import open_store

    good = open_store(f"sqlite:///{tmp_path / 'good.db'}", tmp_path)
    with good.training_run("t", None, {"a": 1}, {}, "r"):
        pass
    data = (tmp_path / "good.db").read_bytes()
    damaged = tmp_path / "mlflow.db"
    written = random.Random(0).randbytes(len(data)) if damage == "garbage" else data[: len(data) // 2]
    damaged.write_bytes(written)
    with pytest.raises(CtclabError) as err:
        open_store("", tmp_path)  # the default store: mlflow.db at the root
    line = str(err.value)
    assert line.startswith(f"{damaged}: not a readable MLflow store (sqlite: ") and "\n" not in line
    assert line.endswith("move it aside (mv mlflow.db mlflow.db.broken) and a new one starts")
    assert damaged.read_bytes() == written  # left as it was, for the user to rescue
