"""MLflow tracking: where the store is, and one run per training with params, metrics, tags, artifacts.

The default store is the sqlite file mlflow.db at the repository root, as an absolute URI, so
`dvc exp run --queue/--temp` executions (which run in a copy under .dvc/tmp/exps) log into the
same store. `tracking.uri` or MLFLOW_TRACKING_URI override it (a remote `mlflow server` too).
"""
from __future__ import annotations

import os
from pathlib import Path


def project_root(path: str | Path) -> Path:
    """The real repository root, also from inside a DVC experiment's temp copy."""
    path = Path(path).resolve()
    parts = path.parts
    for i in range(len(parts) - 2):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return path


# Read once: mlflow.set_tracking_uri() itself exports MLFLOW_TRACKING_URI, so a later read would
# see our own last choice instead of the user's.
_USER_URI = os.environ.get("MLFLOW_TRACKING_URI", "")


def tracking_uri(configured: str, root: str | Path) -> str:
    if configured:
        return configured
    if _USER_URI:
        return _USER_URI
    return f"sqlite:///{project_root(root) / 'mlflow.db'}"


def _configure(configured_uri: str, experiment: str, root: Path) -> str:
    """Point MLflow at the store and experiment; return the experiment id. With the default
    store, artifacts go to <repo>/mlartifacts (absolute), not into a DVC temp copy."""
    import mlflow

    uri = tracking_uri(configured_uri, root)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (project_root(root) / "mlartifacts").as_uri()
    try:
        return client.create_experiment(experiment, artifact_location=location)
    except Exception:  # created meanwhile by a parallel queue worker
        return client.get_experiment_by_name(experiment).experiment_id


def _git(root: Path, *args: str) -> str:
    import subprocess

    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def provenance_tags(root: Path, data_hash: str, device: str) -> dict[str, str]:
    import platform

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
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or platform.machine(),
        "cpu_count": str(os.cpu_count()),
        "host": platform.node(),
    }
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    for key in ("CTCLAB_STUDY", "CTCLAB_VARIANT", "CTCLAB_SEED", "CTCLAB_PARENT_RUN_ID"):
        if os.environ.get(key):
            tags[key.removeprefix("CTCLAB_").lower()] = os.environ[key]
    if os.environ.get("CTCLAB_PARENT_RUN_ID"):
        tags["mlflow.parentRunId"] = os.environ["CTCLAB_PARENT_RUN_ID"]
    return tags


def start_run(configured_uri: str, experiment: str, root: Path, run_id: str | None = None,
              run_name: str | None = None):
    """Start a new run (or continue `run_id`); returns the active mlflow run."""
    import mlflow

    exp_id = _configure(configured_uri, experiment, root)
    if run_id:
        return mlflow.start_run(run_id=run_id)
    name = run_name or os.environ.get("DVC_EXP_NAME") or None
    return mlflow.start_run(experiment_id=exp_id, run_name=name)


def resume_run(configured_uri: str, root: Path, run_id: str):
    """Continue a finished run (evaluate and submit log into the training's run)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(configured_uri, root))
    return mlflow.start_run(run_id=run_id)


def pip_freeze() -> str:
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "pip", "freeze"], capture_output=True, text=True).stdout
