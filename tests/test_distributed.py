"""DDP through torchrun on the CPU (gloo): the train stage launched on 2 processes learns what one
process learns from the same global batches, logs one MLflow run, and a rank that dies ends the
group in one line, after which the group resumes where it was."""
from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time

import mlflow
import psutil
import pytest
import torch

from ctclab.checkpoint import RESUME_DIR
from ctclab.inference import load_checkpoint
from project import env, merge, project_with_data, run_train, stage, stage_command

# dropout off: one process draws one mask for the whole batch, two ranks draw one each
SAME_MATH = {"model": {"conv_lstm": {"lstm_layers": 2, "dropout": {"embedding": 0.0, "lstm": 0.0, "classifier": 0.0}}},
             "train": {"epochs": 3, "batch_size": 4}}
TWO_RANKS = merge(SAME_MATH, {"train": {"distributed": {"nproc": 2}}})


def history(project) -> list[dict]:
    with open(project / "metrics/train_history.csv") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def runs(project) -> list:
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["ctclab"], output_format="list")


@pytest.fixture(scope="module")
def two_ranks(processed, tmp_path_factory):
    project = project_with_data(tmp_path_factory.mktemp("ddp") / "p", processed, TWO_RANKS)
    return project, stage(project, "train")


def test_two_gloo_ranks_learn_what_one_process_learns_and_log_one_run(two_ranks, processed, tmp_path):
    project, result = two_ranks
    single = project_with_data(tmp_path, processed, SAME_MATH)
    run_train(single)
    one, two = history(single), history(project)
    print("\nepoch | train_loss 1 process | train_loss 2 ranks | dev_loss 1 process | dev_loss 2 ranks")
    for a, b in zip(one, two):  # README and the closing note quote this table
        print(f"{a['epoch']:.0f} | {a['train_loss']:.6f} | {b['train_loss']:.6f} | {a['dev_loss']:.6f} | {b['dev_loss']:.6f}")
    assert [r["epoch"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        assert b["dev_loss"] == pytest.approx(a["dev_loss"], rel=1e-4)
        assert b["lr"] == pytest.approx(a["lr"], rel=1e-9)
    # the same global batch: a dropped or doubled share would move the loss by far more
    assert two[0]["train_loss"] != pytest.approx(one[1]["train_loss"], rel=1e-3)

    [run] = runs(project)  # rank 0 alone talks to MLflow
    assert run.data.tags["world_size"] == "2" and run.data.params["train.distributed.nproc"] == "2"
    assert run.info.status == "FINISHED"
    assert [h.step for h in mlflow.MlflowClient().get_metric_history(run.info.run_id, "train_loss")] == [1, 2, 3]
    assert result.stdout.count("train: best dev greedy distance") == 1  # printed by rank 0 only
    assert "Traceback" not in result.stderr


def test_a_killed_rank_ends_the_group_in_one_line_and_the_group_resumes(two_ranks, processed, tmp_path):
    reference, _ = two_ranks
    # a resume checkpoint after every batch (a runtime-only key: the same training as the reference)
    project = project_with_data(tmp_path, processed, merge(TWO_RANKS, {"train": {"checkpoint_minutes": 1e-6}}))
    launcher = subprocess.Popen(stage_command(project, "train"), cwd=project, env=env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline, victim = time.monotonic() + 300, None
    while victim is None and time.monotonic() < deadline and launcher.poll() is None:
        pointers = list((project / RESUME_DIR).glob("*.json"))
        if pointers and json.loads(pointers[0].read_text())["epoch"] >= 1:
            victim = next((p for p in psutil.Process(launcher.pid).children(recursive=True)
                           if p.environ().get("RANK") == "1"), None)
        time.sleep(0.02)
    assert victim is not None, launcher.communicate()[1][-3000:]
    victim.send_signal(signal.SIGKILL)
    _, err = launcher.communicate(timeout=300)

    assert launcher.returncode == 128 + signal.SIGKILL, err
    assert err.strip().splitlines()[-1].startswith(
        f"ctclab: error: train: rank 1 of 2 failed (Signal 9 (SIGKILL) received by PID {victim.pid}); "
        "torchrun stopped the other ranks"), err
    assert "Traceback" not in err
    assert not (project / "metrics/train.json").exists()

    resumed = stage(project, "train")
    assert "train: resuming epoch" in resumed.stderr
    want, got = load_checkpoint(reference / "models/last.pt"), load_checkpoint(project / "models/last.pt")
    assert all(torch.equal(want["model"][k], got["model"][k]) for k in want["model"])
    assert history(project) == [pytest.approx(row, rel=1e-9) for row in history(reference)]
    [run] = runs(project)
    assert run.info.status == "FINISHED"
    assert [h.step for h in mlflow.MlflowClient().get_metric_history(run.info.run_id, "dev_loss")] == [1, 2, 3]


def test_the_failure_reported_is_the_cause_not_a_rank_that_torchrun_stopped(tmp_path, monkeypatch):
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler, ProcessFailure

    from ctclab.distributed import PeerLost, failure_text, first_failure
    from ctclab.errors import CtclabError

    def failed(rank: int, exitcode: int, error: Exception | None = None) -> ProcessFailure:
        path = tmp_path / f"error{rank}.json"
        if error is not None:  # what the worker wrote through torchrun's own error handler
            monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(path))
            ErrorHandler().record_exception(error)
        return ProcessFailure(rank, 1000 + rank, exitcode, str(path))

    # rank 1 killed; rank 0, already exiting over its lost peer, then ended by torchrun's SIGTERM
    rank, failure = first_failure({0: failed(0, -signal.SIGTERM), 1: failed(1, -signal.SIGKILL)})
    assert rank == 1 and failure_text(failure) == "Signal 9 (SIGKILL) received by PID 1001"
    # a rank's own error before a rank that only saw its collective break
    rank, failure = first_failure({0: failed(0, 1, PeerLost("RuntimeError: Connection closed by peer")),
                                   1: failed(1, 2, CtclabError("train: out of memory on a batch of 64 utterances"))})
    assert rank == 1 and failure_text(failure) == "train: out of memory on a batch of 64 utterances"
