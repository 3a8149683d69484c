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


def tracking_uri(configured: str, root: str | Path) -> str:
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{project_root(root) / 'mlflow.db'}"
