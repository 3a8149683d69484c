"""The MLflow model ctclab logs, without pickle: weights and spec in one torch file that loads with
`torch.load(weights_only=True)`, and a pyfunc loader module (this one) that MLflow imports by name.

    mlflow.pyfunc.load_model("models:/<id>").predict(mfcc)   # raw MFCC [B, T, 13] → log-probs [B, T', 41]
    mlflow models serve -m models:/<id> --env-manager local   # the same, over HTTP
    ctclab predict --model models:/<id> --mfcc DIR            # ctclab.tracking.Store.load_model → Recognizer

The model folder holds MLmodel (`python_function` flavour, `loader_module: ctclab.logged_model`),
`recognizer.pt`, and ctclab's source under code/ for a machine without ctclab installed. Loading
runs no code from the file itself, so it works with MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false (which
makes MLflow refuse pickled models, such as those ctclab logged before this format: README).
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from . import checkpoint, inference, models, storage

WEIGHTS = "recognizer.pt"
RELOG = "log it again: `dvc repro -f train` logs a new model"


def save(recognizer: models.Recognizer, path: str | Path) -> None:
    """Spec, weights and feature normalisation, tensors and plain data only."""
    stats = recognizer.stats()
    buf = io.BytesIO()
    torch.save({"model_spec": recognizer.model.spec(), "model": recognizer.model.state_dict(),
                "normalize": recognizer.normalize,
                "stats": {k: v.tolist() for k, v in stats.items()} if stats else None}, buf)
    storage.write_bytes(path, buf.getvalue())


def load(path: str | Path) -> models.Recognizer:
    saved = checkpoint.read(path, RELOG)
    return models.Recognizer(inference.model_from(saved, path, RELOG), saved["normalize"], saved["stats"])


class PyfuncRecognizer:
    """What `mlflow.pyfunc.load_model` returns for a ctclab model: equal-length raw MFCC in."""

    def __init__(self, recognizer: models.Recognizer):
        self.recognizer = recognizer

    def get_raw_model(self) -> models.Recognizer:
        return self.recognizer

    def predict(self, data, params=None) -> np.ndarray:
        with torch.no_grad():
            return self.recognizer(torch.from_numpy(np.asarray(data, dtype=np.float32))).numpy()


def _load_pyfunc(data_path: str, model_config=None) -> PyfuncRecognizer:
    """MLflow's pyfunc entry point (`loader_module`); `data_path` is the model's recognizer.pt."""
    return PyfuncRecognizer(load(data_path))
