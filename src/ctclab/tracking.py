"""MLflow, and only here: where the store is, training runs, evaluation logging, study parent and
child runs, and reading runs back for reports. Every other module calls these functions.

The default store is the sqlite file mlflow.db at the repository root, as an absolute URI, so
`dvc exp run --queue/--temp` executions (which run in a copy under .dvc/tmp/exps) log into the
same store; artifacts go to <repo>/mlartifacts. `tracking.uri` or MLFLOW_TRACKING_URI override
it (a remote `mlflow server` too).
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow

from .errors import CtclabError
from .project import real_root

# Read once: mlflow.set_tracking_uri() itself exports MLFLOW_TRACKING_URI, so a later read would
# see our own last choice instead of the user's.
_USER_URI = os.environ.get("MLFLOW_TRACKING_URI", "")


def tracking_uri(configured: str, root: str | Path) -> str:
    if configured:
        return configured
    if _USER_URI:
        return _USER_URI
    return f"sqlite:///{real_root(root) / 'mlflow.db'}"


def experiment_id(configured_uri: str, experiment: str, root: str | Path) -> str:
    """Point MLflow at the store and return the experiment's id, creating it if needed."""
    uri = tracking_uri(configured_uri, root)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        return exp.experiment_id
    location = (real_root(root) / "mlartifacts").as_uri() if uri.startswith("sqlite:///") else None
    try:
        return client.create_experiment(experiment, artifact_location=location)
    except Exception:  # created meanwhile by a parallel queue worker
        return client.get_experiment_by_name(experiment).experiment_id


def _git(root: Path, *args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def provenance_tags(root: Path, data_hash: str, device: str, device_name: str) -> dict[str, str]:
    import torch

    dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
    tags = {
        "git_commit": _git(root, "rev-parse", "HEAD") or "unknown",
        "git_dirty": str(bool(dirty)).lower(),
        "data_hash": data_hash,
        "torch_version": torch.__version__,
        "cuda_version": str(torch.version.cuda),
        "cudnn_version": str(torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None),
        "device": device,
        "device_name": device_name,
        "cpu_count": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        # trainings run side by side with this one (a study's -j): timings compare only at equal values
        "parallel_jobs": os.environ.get("CTCLAB_PARALLEL_JOBS", "1"),
        "host": platform.node(),
    }
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    return tags


def pip_freeze() -> str:
    return subprocess.run([sys.executable, "-m", "pip", "freeze"], capture_output=True, text=True).stdout


class RunLog:
    """The active MLflow run, as the few calls the pipeline makes."""

    def __init__(self, run):
        self._run = run
        self.run_id = run.info.run_id

    @property
    def uri(self) -> str:
        return mlflow.get_tracking_uri()

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        mlflow.log_metrics(metrics, step=step)

    def set_tags(self, tags: dict) -> None:
        mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_text(self, text: str, artifact_path: str) -> None:
        mlflow.log_text(text, artifact_path)

    def log_artifact(self, path: str | Path, folder: str) -> None:
        mlflow.log_artifact(str(path), folder)

    def __enter__(self) -> "RunLog":
        self._run.__enter__()
        return self

    def __exit__(self, *exc):
        return self._run.__exit__(*exc)


def training_run(configured_uri: str, experiment: str, root: Path, resume_run_id: str | None,
                 params: dict, tags: dict) -> RunLog:
    """A new training run with its params, provenance tags and `pip freeze`, or — when resuming an
    interrupted training — the same run again, as it was."""
    exp_id = experiment_id(configured_uri, experiment, root)
    if resume_run_id:
        return RunLog(mlflow.start_run(run_id=resume_run_id))
    run = RunLog(mlflow.start_run(experiment_id=exp_id, run_name=os.environ.get("DVC_EXP_NAME") or None))
    mlflow.log_params(params)
    run.set_tags(tags)
    run.log_text(pip_freeze(), "environment/pip-freeze.txt")
    return run


def continue_run(configured_uri: str, root: Path, run_id: str) -> RunLog:
    """Log into a finished run again (evaluate and submit log into the training's run)."""
    mlflow.set_tracking_uri(tracking_uri(configured_uri, root))
    return RunLog(mlflow.start_run(run_id=run_id))


# --- studies: a parent run per study, a child run per variant × seed --------------------------------
@dataclass(frozen=True)
class RunRecord:
    """What a report needs of one finished child run, read back from the store."""
    run_id: str
    status: str
    start_time: int
    params: dict
    metrics: dict
    tags: dict


def _record(run) -> RunRecord:
    return RunRecord(run.info.run_id, run.info.status, run.info.start_time, dict(run.data.params),
                     dict(run.data.metrics), dict(run.data.tags))


@dataclass(frozen=True)
class ParentRun:
    run_id: str
    experiment_id: str


def find_parent(configured_uri: str, experiment: str, root: Path, study: str, smoke: bool) -> ParentRun | None:
    exp_id = experiment_id(configured_uri, experiment, root)
    found = mlflow.MlflowClient().search_runs(
        [exp_id], f"tags.ctclab_study_parent = '{study}' and tags.smoke = '{str(smoke).lower()}'",
        order_by=["attributes.start_time DESC"], max_results=1)
    return ParentRun(found[0].info.run_id, exp_id) if found else None


def create_parent(configured_uri: str, experiment: str, root: Path, study: str, smoke: bool, run_name: str,
                  question: str, study_yaml: str) -> ParentRun:
    exp_id = experiment_id(configured_uri, experiment, root)
    client = mlflow.MlflowClient()
    run = client.create_run(exp_id, run_name=run_name,
                            tags={"ctclab_study_parent": study, "study": study, "smoke": str(smoke).lower(),
                                  "question": question})
    client.log_text(run.info.run_id, study_yaml, "study.yaml")
    client.set_terminated(run.info.run_id)
    return ParentRun(run.info.run_id, exp_id)


def children(parent: ParentRun) -> list[RunRecord]:
    runs = mlflow.MlflowClient().search_runs([parent.experiment_id], f"tags.mlflow.parentRunId = '{parent.run_id}'",
                                             max_results=5000)
    return [_record(r) for r in runs]


def metric_history(run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in mlflow.MlflowClient().get_metric_history(run_id, key)]


def log_parent_artifacts(parent: ParentRun, paths: list[Path], folder: str) -> None:
    client = mlflow.MlflowClient()
    for p in paths:
        client.log_artifact(parent.run_id, str(p), folder)


# Learning curves copied into each child under epoch/…, apart from the final scores of the same name.
CURVES = ("train_loss", "dev_loss", "dev_lev_greedy", "dev_per", "lr", "epoch_seconds")


def log_study_child(uri: str, training_run_id: str, parent_run_id: str, labels: dict, extra_params: dict,
                    metrics: dict, texts: dict[str, str]) -> str:
    """One child run per study variant × seed under the study's parent: the training run's params,
    learning curves and provenance tags, plus this evaluation. Several variants may share one
    cached training run (e.g. a beam-width study trains once per seed)."""
    client = mlflow.MlflowClient(uri)
    parent, training = client.get_run(parent_run_id), client.get_run(training_run_id)
    tags = {k: v for k, v in training.data.tags.items() if not k.startswith("mlflow.")}
    tags.update({"mlflow.parentRunId": parent_run_id, "training_run_id": training_run_id,
                 "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""), **labels})
    child = client.create_run(parent.info.experiment_id, run_name=f"{labels['variant']}-s{labels['seed']}", tags=tags)
    run_id = child.info.run_id
    params = {**training.data.params, **extra_params}
    client.log_batch(run_id, params=[mlflow.entities.Param(k, str(v)) for k, v in params.items()])
    history = []
    for key in CURVES:
        history += [mlflow.entities.Metric(f"epoch/{key}", m.value, m.timestamp, m.step)
                    for m in client.get_metric_history(training_run_id, key)]
    now = int(time.time() * 1000)
    final = {**metrics, "train_seconds": sum(m.value for m in history if m.key == "epoch/epoch_seconds"),
             "parameter_count": float(training.data.tags.get("parameter_count", "nan"))}
    history += [mlflow.entities.Metric(k, float(v), now, 0) for k, v in final.items()]
    for start in range(0, len(history), 900):  # the REST API takes at most 1000 metrics a call
        client.log_batch(run_id, metrics=history[start:start + 900])
    for path, text in texts.items():
        client.log_text(run_id, text, path)
    client.set_terminated(run_id)
    return run_id


def training_run_info(models_dir: Path) -> dict:
    """The MLflow run (id and store) that the train stage wrote beside its checkpoints."""
    path = Path(models_dir) / "mlflow_run.json"
    if not path.is_file():
        raise CtclabError(f"{path}: missing; run the train stage first (dvc repro train)")
    return json.loads(path.read_text())
