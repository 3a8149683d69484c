"""MLflow, and only here: where the store is, training runs, evaluation logging, study parent and
child runs, and reading runs back for reports. Every other module calls these functions.

The default store is the sqlite file mlflow.db at the repository root, as an absolute URI, so
`dvc exp run --queue/--temp` executions (which run in a copy under .dvc/tmp/exps) log into the
same store; artifacts go to <repo>/mlartifacts. `tracking.uri` or MLFLOW_TRACKING_URI override
it (a remote `mlflow server` too).

What a run carries: params, per-epoch metrics, provenance tags (the git commit MLflow's UI shows,
hardware, threads), `pip freeze` (and `git diff` when the tree was dirty), system metrics (CPU,
memory; GPU through pynvml), the data as a dataset input, and the best checkpoint as an MLflow
model (loadable by URI, registrable). Studies log into their own experiment, `<experiment>/<study>`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np

from . import storage
from .errors import CtclabError
from .project import real_root
from .results import CURVES, EPOCH_SECONDS, RUN_SCHEMA, TRAIN_SECONDS

# Read once: mlflow.set_tracking_uri() itself exports MLFLOW_TRACKING_URI, so a later read would
# see our own last choice instead of the user's.
_USER_URI = os.environ.get("MLFLOW_TRACKING_URI", "")
SERVER_TIMEOUT_S = 10
# What a tracking server that went away raises (after MLflow's retries, which connect() shortens).
UNREACHABLE = (mlflow.exceptions.MlflowException, OSError)
# Without it MLflow 3's UI guesses the experiment's kind and may open the GenAI (traces) view.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


@contextlib.contextmanager
def _quiet(logger: str):
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def tracking_uri(configured: str, root: str | Path) -> str:
    if configured:
        return configured
    if _USER_URI:
        return _USER_URI
    return f"sqlite:///{real_root(root) / 'mlflow.db'}"


def connect(configured_uri: str, root: str | Path) -> str:
    """Point MLflow at the store; a server that does not answer is one line within seconds (MLflow
    itself would retry for minutes), before any training starts."""
    uri = tracking_uri(configured_uri, root)
    if uri.startswith(("http://", "https://")):
        import requests

        try:
            requests.get(f"{uri.rstrip('/')}/health", timeout=SERVER_TIMEOUT_S).raise_for_status()
        except requests.RequestException as err:
            raise CtclabError(f"tracking.uri {uri}: no MLflow server answers there ({type(err).__name__}); start it, "
                              "or set tracking.uri / MLFLOW_TRACKING_URI to a reachable one") from None
        # MLflow's defaults (7 retries, doubling from 2 s) would stall a training for minutes per call
        # once the server is lost; a value the user set is kept.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    mlflow.set_tracking_uri(uri)
    return uri


def experiment_id(configured_uri: str, experiment: str, root: str | Path) -> str:
    """Point MLflow at the store and return the experiment's id, creating it if needed."""
    uri = connect(configured_uri, root)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        if not EXPERIMENT_KIND.items() <= exp.tags.items():  # made before ctclab tagged its kind
            for key, value in EXPERIMENT_KIND.items():
                client.set_experiment_tag(exp.experiment_id, key, value)
        return exp.experiment_id
    location = (real_root(root) / "mlartifacts").as_uri() if uri.startswith("sqlite:///") else None
    try:
        return client.create_experiment(experiment, artifact_location=location, tags=EXPERIMENT_KIND)
    except Exception:  # created meanwhile by a parallel queue worker
        return client.get_experiment_by_name(experiment).experiment_id


def ui_address(experiment_id_: str) -> str:
    """Where the experiment opens in the MLflow UI: the server itself, or `ctclab ui` for a local store."""
    # workflowType: MLflow 3.17's UI picks GenAI or model-training pages from a browser-wide switch
    # (GenAI unless changed), not from the experiment's kind tag; the parameter sets it.
    page = f"#/experiments/{experiment_id_}/runs?workflowType=machine_learning"
    uri = mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{page}"
    return f"http://127.0.0.1:5000/{page} (after `ctclab ui`)"


def _git(root: Path, *args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def provenance_tags(root: Path, data_hash: str, device: str, device_name: str) -> dict[str, str]:
    import torch

    dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
    tags = {
        # MLflow's own keys: the UI shows the commit in its Version column
        "mlflow.source.git.commit": _git(root, "rev-parse", "HEAD") or "unknown",
        "mlflow.source.git.branch": _git(root, "rev-parse", "--abbrev-ref", "HEAD") or "unknown",
        "git_dirty": str(bool(dirty)).lower(),
        "data_hash": data_hash,
        "torch_version": torch.__version__,
        "cuda_version": str(torch.version.cuda),
        "cudnn_version": str(torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None),
        "device": device,
        "device_name": device_name,
        "cpu_count": str(os.cpu_count()),
        "cpu_model": cpu_model(),
        "torch_threads": str(torch.get_num_threads()),
        # trainings run side by side with this one (a study's -j): timings compare only at equal values
        "parallel_jobs": os.environ.get("CTCLAB_PARALLEL_JOBS", "1"),
        "host": platform.node(),
        # which names the run's params and metrics have (ctclab.results; untagged runs are schema 1)
        "ctclab_schema": str(RUN_SCHEMA),
    }
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    return tags


def cpu_model() -> str:
    """The CPU's model name: CPU floats (and so bit-identity) depend on it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pip_freeze() -> str:
    return subprocess.run([sys.executable, "-m", "pip", "freeze"], capture_output=True, text=True).stdout


@dataclass(frozen=True)
class DataInput:
    """The data a training read, as MLflow shows it in the Dataset column."""
    name: str        # e.g. ctclab-synthetic, 11-785-s22-hw3p2
    digest: str      # the data hash (first 12 hex digits; the full hash is in the profile)
    source: str      # where the shards were read
    profile: dict    # split sizes, frames, layout, feature dim, full data hash


class RunLog:
    """The active MLflow run, as the few calls the pipeline makes."""

    def __init__(self, run):
        self._run = run
        self.run_id = run.info.run_id
        self._warned = False

    @property
    def uri(self) -> str:
        return mlflow.get_tracking_uri()

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        mlflow.log_metrics(metrics, step=step)

    def send(self, pending: list) -> Exception | None:
        """Log queued (metrics, step) pairs in order, removing each one sent. When the store cannot be
        reached: the error (and a line, once); the rest stay queued for the next call."""
        while pending:
            metrics, step = pending[0]
            try:
                mlflow.log_metrics(metrics, step=step)
            except UNREACHABLE as err:
                if not self._warned:
                    print(f"tracking: {mlflow.get_tracking_uri()} unreachable ({type(err).__name__}); training goes "
                          "on and keeps its metrics in the checkpoint until the store answers", file=sys.stderr)
                    self._warned = True
                return err
            pending.pop(0)
        return None

    def log_params(self, params: dict) -> None:
        mlflow.log_params(params)

    def set_tags(self, tags: dict) -> None:
        mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_text(self, text: str, artifact_path: str) -> None:
        mlflow.log_text(text, artifact_path)

    def log_artifact(self, path: str | Path, folder: str) -> None:
        mlflow.log_artifact(str(path), folder)

    def log_data(self, data: DataInput, context: str = "training") -> None:
        ds = mlflow.entities.Dataset(data.name, data.digest, "local", json.dumps({"uri": data.source}),
                                     profile=json.dumps(data.profile))
        tag = mlflow.entities.InputTag("mlflow.data.context", context)
        for attempt in range(3):
            try:
                mlflow.MlflowClient().log_inputs(self.run_id, datasets=[mlflow.entities.DatasetInput(ds, [tag])])
                return
            except mlflow.exceptions.MlflowException:
                # Two trainings of a study (-j 2) inserting the same dataset at once: the second
                # insert fails on MLflow's unique key; the row exists then, and the next try links it.
                if attempt == 2:
                    raise
                time.sleep(0.5)

    def log_model(self, model, metadata: dict, input_dim: int, classes: int) -> str:
        """The network as an MLflow model (pytorch flavour, with ctclab's code beside it so it loads
        anywhere with torch installed); returns its model id. Input: raw MFCC frames of equal-length
        utterances [batch, time, input_dim]; output: log-probabilities [batch, time', classes]."""
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec
        import torch

        # unnamed tensors: pyfunc turns a named input into a dict, which the pytorch flavour refuses,
        # so `mlflow.pyfunc` and `mlflow models serve` could not call the model
        signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, input_dim))]),
                                   outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, classes))]))
        # pickle: the other format (pt2) traces one fixed graph; MLflow warns about pickle on every save
        with _quiet("mlflow.pytorch"):
            info = mlflow.pytorch.log_model(model, name="model", signature=signature, metadata=metadata,
                                            serialization_format="pickle", code_paths=[str(Path(__file__).parent)],
                                            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                                                              f"numpy=={np.__version__}"])
        return info.model_id

    def end(self, status: str) -> None:
        """End the run now with this status (KILLED for an interrupted training)."""
        mlflow.end_run(status)

    def __enter__(self) -> "RunLog":
        self._run.__enter__()
        return self

    def __exit__(self, *exc):
        try:
            return self._run.__exit__(*exc)
        except UNREACHABLE:
            if exc[0] is None:
                raise
            return False  # the store is gone: the error that ended the run matters more than this one


def training_run(configured_uri: str, experiment: str, root: Path, resume_run_id: str | None,
                 params: dict, tags: dict, run_name: str, parent_run_id: str = "") -> RunLog:
    """A new training run with its params, provenance tags, `pip freeze` (and `git diff` of a dirty
    tree) — nested under a study's parent run, in the parent's experiment, when one is given — or,
    when resuming an interrupted training, the same run again, as it was. System metrics are on."""
    exp_id = experiment_id(configured_uri, experiment, root)
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no start/stop lines per run
    if resume_run_id:
        return RunLog(mlflow.start_run(run_id=resume_run_id, log_system_metrics=True))
    if parent_run_id:
        exp_id = mlflow.MlflowClient().get_run(parent_run_id).info.experiment_id
        # a tag, not start_run(parent_run_id=…), which wants the parent still active
        tags = {**tags, "mlflow.parentRunId": parent_run_id}
    run = RunLog(mlflow.start_run(experiment_id=exp_id, run_name=run_name, log_system_metrics=True))
    mlflow.log_params(params)
    run.set_tags(tags)
    run.log_text(pip_freeze(), "environment/pip-freeze.txt")
    if tags.get("git_dirty") == "true":
        run.log_text(_git(root, "diff", "HEAD") + "\n", "environment/git.diff")
    return run


def continue_run(run_id: str) -> RunLog:
    """Log into a finished run again (evaluate and submit log into the training's run, found by
    `checkpoint_run`, which also points MLflow at the store)."""
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
    connect(configured_uri, root)
    exp = mlflow.MlflowClient().get_experiment_by_name(experiment)
    if exp is None:
        return None
    found = mlflow.MlflowClient().search_runs(
        [exp.experiment_id], f"tags.ctclab_study_parent = '{study}' and tags.smoke = '{str(smoke).lower()}'",
        order_by=["attributes.start_time ASC"], max_results=1)
    return ParentRun(found[0].info.run_id, exp.experiment_id) if found else None


def create_parent(configured_uri: str, experiment: str, root: Path, study: str, smoke: bool, run_name: str,
                  question: str, study_yaml: str) -> ParentRun:
    exp_id = experiment_id(configured_uri, experiment, root)
    client = mlflow.MlflowClient()
    run = client.create_run(exp_id, run_name=run_name,
                            tags={"ctclab_study_parent": study, "study": study, "smoke": str(smoke).lower(),
                                  "question": question})
    client.log_text(run.info.run_id, study_yaml, "study.yaml")
    client.set_terminated(run.info.run_id)
    # Two machines sharing a server may both have found no parent and created one: every study run
    # settles on the earliest, and a later duplicate is deleted, so all seeds gather under one parent.
    earliest = find_parent(configured_uri, experiment, root, study, smoke)
    if earliest is not None and earliest.run_id != run.info.run_id:
        client.delete_run(run.info.run_id)
        return earliest
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




def logged_model_id(run_id: str) -> str | None:
    """The MLflow model a training run logged (its best checkpoint), if any."""
    return _model_id(mlflow.MlflowClient().get_run(run_id))


def _model_id(run) -> str | None:
    outputs = run.outputs.model_outputs if run.outputs else []
    return outputs[-1].model_id if outputs else None


def train_seconds(run_id: str) -> float:
    return sum(v for _, v in metric_history(run_id, EPOCH_SECONDS))


def is_study_child(run_id: str, parent_run_id: str, labels: dict) -> bool:
    """Whether a training run is the study child for these labels (study, variant, seed)."""
    tags = mlflow.MlflowClient().get_run(run_id).data.tags
    return tags.get("mlflow.parentRunId") == parent_run_id and all(tags.get(k) == v for k, v in labels.items())


def log_study_child(training_run_id: str, parent_run_id: str, labels: dict, extra_params: dict, metrics: dict,
                    texts: dict[str, str]) -> str:
    """A child run under the study's parent for a variant × seed whose training run belongs to
    another variant (a beam-width study trains once per seed, and DVC's run cache hands the
    trained model to every variant): the training's params, learning curves, provenance tags,
    dataset and model, plus this evaluation."""
    client = mlflow.MlflowClient()
    parent, training = client.get_run(parent_run_id), client.get_run(training_run_id)
    tags = {k: v for k, v in training.data.tags.items()
            if not k.startswith("mlflow.") or k.startswith("mlflow.source.git")}
    tags.update({"mlflow.parentRunId": parent_run_id, "training_run_id": training_run_id,
                 "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""), **labels})
    child = client.create_run(parent.info.experiment_id, run_name=f"{labels['variant']}-s{labels['seed']}", tags=tags)
    run_id = child.info.run_id
    params = {**training.data.params, **extra_params}
    client.log_batch(run_id, params=[mlflow.entities.Param(k, str(v)) for k, v in params.items()])
    history = []
    for key in CURVES:  # the learning curves, copied
        history += [mlflow.entities.Metric(key, m.value, m.timestamp, m.step)
                    for m in client.get_metric_history(training_run_id, key)]
    now = int(time.time() * 1000)
    final = {**metrics, TRAIN_SECONDS: train_seconds(training_run_id)}
    history += [mlflow.entities.Metric(k, float(v), now, 0) for k, v in final.items()]
    for start in range(0, len(history), 900):  # the REST API takes at most 1000 metrics a call
        client.log_batch(run_id, metrics=history[start:start + 900])
    model_id = _model_id(training)
    client.log_inputs(run_id, datasets=list(training.inputs.dataset_inputs) if training.inputs else None,
                      models=[mlflow.entities.LoggedModelInput(model_id)] if model_id else None)
    for path, text in texts.items():
        client.log_text(run_id, text, path)
    client.set_terminated(run_id)
    return run_id


def register(model_id: str, name: str, alias: str, description: str, tags: dict) -> str:
    """Register a logged model as a new version of `name`, point `alias` at it; return the version."""
    client = mlflow.MlflowClient()
    with _quiet("mlflow.store.model_registry.abstract_store"), _quiet("mlflow.tracking._model_registry.fluent"):
        version = mlflow.register_model(f"models:/{model_id}", name, tags={k: str(v) for k, v in tags.items()}).version
    client.update_model_version(name, version, description=description)
    client.set_registered_model_alias(name, alias, version)
    return str(version)


def load_model(configured_uri: str, root: Path, model_uri: str):
    """A logged or registered model (`models:/ctclab-conv_lstm@champion`, `runs:/<id>/model`, …)."""
    connect(configured_uri, root)
    try:
        return mlflow.pytorch.load_model(model_uri, map_location="cpu")
    except mlflow.exceptions.MlflowException as err:
        raise CtclabError(f"--model {model_uri}: {str(err).splitlines()[0]} (store {mlflow.get_tracking_uri()})") from None


def record(run_id: str) -> RunRecord:
    return _record(mlflow.MlflowClient().get_run(run_id))


def find_run(configured_uri: str, root: Path, ref: str) -> RunRecord:
    """A training run by id, or by DVC experiment name / run name (newest first); a study child that
    reused another variant's training stands for that training."""
    connect(configured_uri, root)
    client = mlflow.MlflowClient()
    run = None
    if re.fullmatch(r"[0-9a-f]{32}", ref):
        try:
            run = client.get_run(ref)
        except mlflow.exceptions.MlflowException:
            run = None
    for key in ("tags.dvc_exp_name", "attributes.run_name"):
        if run is None:
            found = mlflow.search_runs(search_all_experiments=True, filter_string=f"{key} = '{ref}'",
                                       order_by=["attributes.start_time DESC"], max_results=1, output_format="list")
            run = found[0] if found else None
    if run is None:
        raise CtclabError(f"{ref}: no MLflow run with that id, DVC experiment name or run name in {mlflow.get_tracking_uri()}")
    training = run.data.tags.get("training_run_id")
    return record(training) if training else _record(run)


def run_text(run_id: str, path: str) -> str:
    """A text artifact of a run, or "" when it has none."""
    try:
        return mlflow.artifacts.load_text(f"runs:/{run_id}/{path}")
    except Exception:  # MLflow raises several kinds for a missing artifact
        return ""


def checkpoint_run(configured_uri: str, root: Path, checkpoint: Path) -> str:
    """The training run that wrote this checkpoint (its `checkpoint_sha256` tag), searched in every
    experiment of the store; the newest wins (a deterministic rerun writes the same bytes). The run
    id lives in MLflow, not in DVC's outs, so the outs of two clean reruns are identical."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise CtclabError(f"{checkpoint}: no checkpoint; run the train stage first (dvc repro train)")
    digest = storage.sha256_file(checkpoint)
    connect(configured_uri, root)
    found = mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.checkpoint_sha256 = '{digest}'",
                               order_by=["attributes.start_time DESC"], max_results=1, output_format="list")
    if not found:
        raise CtclabError(f"{checkpoint}: no training run in {mlflow.get_tracking_uri()} wrote this checkpoint "
                          f"(sha256 {digest[:12]}); retrain it with `dvc repro -f train` to record it there")
    return found[0].info.run_id
