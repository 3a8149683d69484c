"""MLflow, and only here: a tracking store as an object (`open_store`), training runs,
evaluation logging, the model registry, and reading and copying runs for the studies
(ctclab.study_runs), reports and verify. Every other module calls these.

A `Store` holds its URI and its own MlflowClient; nothing here sets MLflow's global tracking URI
or starts a fluent run, so two stores (verify's and the project's) never see each other's state.
The default store is the sqlite file mlflow.db at the repository root, as an absolute URI, so
`dvc exp run --queue/--temp` executions (which run in a copy under .dvc/tmp/exps) log into the
same store; artifacts go to <repo>/mlartifacts. `tracking.uri` or MLFLOW_TRACKING_URI override
it (a remote `mlflow server` too).

What a run carries: params, per-epoch metrics, provenance tags (ctclab.provenance: the git commit
MLflow's UI shows, hardware, threads), `pip freeze` (and `git diff` when the tree was dirty),
system metrics (CPU, memory; GPU through pynvml), the data as a dataset input, and the best
checkpoint as an MLflow model (loadable by URI, registrable). Studies log into their own
experiment, `<experiment>/<study>`.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking.context.registry import resolve_tags

from . import provenance, storage
from .errors import CtclabError
from .mlflow_views import VIEW_TAG, address, pipeline_view
from .project import real_root
from .results import CPU_SHARE, EPOCH_SECONDS, TRAIN_CPU_SHARE, TRAIN_SECONDS

SERVER_TIMEOUT_S = 5  # a server that takes the connection and never answers: the one line comes within 10 s
# What a tracking server that went away raises (after MLflow's retries, which open_store() shortens).
UNREACHABLE = (mlflow.exceptions.MlflowException, OSError)
# Without it MLflow 3's UI guesses the experiment's kind and may open the GenAI (traces) view.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
LOCAL_UI = "http://127.0.0.1:5000"  # where `ctclab ui` serves a local store


def tracking_uri(configured: str, root: str | Path) -> str:
    """tracking.uri, else MLFLOW_TRACKING_URI (read now: nothing here ever sets it), else the
    repository's mlflow.db."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI", "") or f"sqlite:///{real_root(root) / 'mlflow.db'}"


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def open_store(configured_uri: str, root: str | Path) -> "Store":
    """The store tracking.uri names; a server that does not answer is one line within seconds
    (MLflow itself would retry for minutes), before any training starts."""
    uri = tracking_uri(configured_uri, root)
    if is_server(uri):
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
    elif uri.startswith("sqlite:///"):
        _check_sqlite(Path(uri.removeprefix("sqlite:///")))
    store = Store(uri, real_root(root))
    if is_server(uri):
        store.client.search_experiments(max_results=1)  # a server with accounts: a missing login is one line now
    return store


def _check_sqlite(path: Path) -> None:
    """A store file cut short or overwritten is one line here, not SQLAlchemy's traceback mid-run."""
    import sqlite3

    if not path.is_file():
        return  # MLflow creates it
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            verdict = db.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.Error as err:
        verdict = str(err)
    if verdict != "ok":
        raise CtclabError(f"{path}: not a readable MLflow store (sqlite: {verdict.splitlines()[0][:100]}); restore it "
                          f"from a backup, or move it aside (mv {path.name} {path.name}.broken) and a new one starts")


@dataclass(frozen=True)
class DataInput:
    """The data a training read, as MLflow shows it in the Dataset column."""
    name: str        # e.g. ctclab-synthetic, 11-785-s22-hw3p2
    digest: str      # the data hash (first 12 hex digits; the full hash is in the profile)
    source: str      # where the shards were read
    profile: dict    # split sizes, frames, layout, feature dim, full data hash


@dataclass(frozen=True)
class RunRecord:
    """What a report or verify needs of one finished run, read back from the store."""
    run_id: str
    status: str
    start_time: int
    params: dict
    metrics: dict
    tags: dict
    experiment_id: str = ""


def _record(run) -> RunRecord:
    return RunRecord(run.info.run_id, run.info.status, run.info.start_time, dict(run.data.params),
                     dict(run.data.metrics), dict(run.data.tags), run.info.experiment_id)


class ReadOnly(CtclabError):
    """A server with accounts refused a write (403): the user may only read there."""


class AccessChecked:
    """An MlflowClient whose calls a server with accounts (`mlflow server --app-name basic-auth`)
    refuses end in one line: 401 names the login variables, 403 the user, the experiment and the
    permission to ask for. Everything else passes through unchanged."""

    def __init__(self, client: mlflow.MlflowClient, uri: str):
        self._client, self._uri = client, uri

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args, **kwargs):
            try:
                return attr(*args, **kwargs)
            except mlflow.exceptions.MlflowException as err:
                status = err.get_http_status_code()
                if status not in (401, 403):
                    raise
                raise (self._login(err) if status == 401 else self._permission(name, args)) from None
        return call

    def _login(self, err) -> CtclabError:
        user = os.environ.get("MLFLOW_TRACKING_USERNAME")
        who = (f"user {user!r} was not accepted (wrong password, or no such account)" if user else
               "no login was given")
        return CtclabError(f"tracking.uri {self._uri}: the server asks for a login (401: {who}); set "
                           "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to your account on it (README: team server)")

    def _permission(self, action: str, args: tuple) -> ReadOnly:
        user = os.environ.get("MLFLOW_TRACKING_USERNAME", "?")
        where = self._experiment_of(args[0] if args else None)
        return ReadOnly(f"tracking.uri {self._uri}: user {user!r} may not {action.replace('_', ' ')} in {where} "
                           "(403 Permission denied: reading is allowed, writing needs EDIT); ask an admin or the "
                           "experiment's owner to grant EDIT on it (README: team server)")

    def _experiment_of(self, ref) -> str:
        """The experiment a refused call was about (its first argument: a run or experiment id)."""
        try:
            if isinstance(ref, str) and re.fullmatch(r"[0-9a-f]{32}", ref):
                ref = self._client.get_run(ref).info.experiment_id
            if isinstance(ref, str) and ref.isdigit():
                return f"experiment {self._client.get_experiment(ref).name!r}"
        except mlflow.exceptions.MlflowException:
            pass
        return "this store"


def _now_ms() -> int:
    return int(time.time() * 1000)


class Store:
    """One MLflow tracking store: its URI, the repository it belongs to, and its own client."""

    def __init__(self, uri: str, root: Path):
        self.uri, self.root = uri, Path(root)
        # the registry lives in the same store
        self.client = AccessChecked(mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri), uri)

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"

    # --- experiments and runs ------------------------------------------------------------------
    def experiment_id(self, experiment: str) -> str:
        """The experiment's id, creating it (artifacts beside a local sqlite store) if needed; it
        opens in the UI as model training, on ctclab's view of its runs (mlflow_views)."""
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            location = (self.root / "mlartifacts").as_uri() if self.uri.startswith("sqlite:///") else None
            try:
                return self.client.create_experiment(experiment, artifact_location=location,
                                                     tags={**EXPERIMENT_KIND, VIEW_TAG: pipeline_view()})
            except Exception:  # created meanwhile by a parallel queue worker
                return self.client.get_experiment_by_name(experiment).experiment_id
        # made before ctclab tagged its kind or its view
        for key, value in {**EXPERIMENT_KIND, VIEW_TAG: pipeline_view()}.items():
            if key not in exp.tags:
                self.client.set_experiment_tag(exp.experiment_id, key, value)
        return exp.experiment_id

    def show_view(self, experiment_id: str, view: str) -> None:
        """Make `view` (mlflow_views) what the experiment's address opens on. A user of a server
        who may only read the experiment keeps the view it has."""
        if self.client.get_experiment(experiment_id).tags.get(VIEW_TAG) != view:
            with contextlib.suppress(ReadOnly):
                self.client.set_experiment_tag(experiment_id, VIEW_TAG, view)

    def ui_addresses(self, experiment_id: str) -> tuple[str, str]:
        """Where the experiment opens in the MLflow UI — its runs table and their charts — on the
        server itself, or where `ctclab ui` serves a local store (`ui_where` says which)."""
        shared = VIEW_TAG in self.client.get_experiment(experiment_id).tags
        base = self.uri if is_server(self.uri) else LOCAL_UI
        return address(base, experiment_id, shared), address(base, experiment_id, shared, charts=True)

    def ui_where(self) -> str:
        return "" if is_server(self.uri) else " (after `ctclab ui`)"

    def training_run(self, experiment: str, resume_run_id: str | None, params: dict, tags: dict, run_name: str,
                     parent_run_id: str = "") -> "RunLog":
        """A new training run with its params, provenance tags, `pip freeze` (and `git diff` of a
        dirty tree) — nested under a study's parent run, in the parent's experiment, when one is
        given — or, when resuming an interrupted training, the same run again, as it was. System
        metrics are recorded while it is open (`with`)."""
        exp_id = self.experiment_id(experiment)
        if resume_run_id:
            return RunLog(self, resume_run_id, resumed=True)
        if parent_run_id:
            exp_id = self.client.get_run(parent_run_id).info.experiment_id
            tags = {**tags, "mlflow.parentRunId": parent_run_id}
        run = RunLog(self, self.client.create_run(exp_id, run_name=run_name).info.run_id)
        run.log_params(params)
        # with the tags MLflow's own runs carry (user, source script and type), as the UI's columns expect
        run.set_tags(resolve_tags(tags))
        run.log_text(provenance.pip_freeze(), "environment/pip-freeze.txt")
        if tags.get("git_dirty") == "true":
            run.log_text(provenance.git_diff(self.root), "environment/git.diff")
        return run

    def continue_run(self, run_id: str) -> "RunLog":
        """Log into a finished run again (evaluate and submit log into the training's run)."""
        return RunLog(self, run_id, resumed=True, system_metrics=False)

    def create_run(self, experiment_id: str, run_name: str, tags: dict) -> "RunLog":
        """A run logged into directly (no system metrics); `end` it."""
        return RunLog(self, self.client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id,
                      system_metrics=False)

    def viewed_experiments(self) -> list[tuple[str, str]]:
        """(name, id) of every experiment ctclab made a view of, by name."""
        found = self.client.search_experiments(filter_string=f"tags.`{VIEW_TAG}` != ''")
        return sorted((e.name, e.experiment_id) for e in found)

    def find_experiment(self, experiment: str) -> str | None:
        exp = self.client.get_experiment_by_name(experiment)
        return exp.experiment_id if exp is not None else None

    def search(self, experiment_id: str, filter_string: str, oldest_first: bool = False,
               max_results: int = 5000) -> list[RunRecord]:
        runs = self.client.search_runs([experiment_id], filter_string, max_results=max_results,
                                       order_by=["attributes.start_time ASC"] if oldest_first else None)
        return [_record(r) for r in runs]

    def record(self, run_id: str) -> RunRecord:
        return _record(self.client.get_run(run_id))

    def log_artifacts(self, run_id: str, paths: list[Path], folder: str) -> None:
        for path in paths:
            self.client.log_artifact(run_id, str(path), folder)

    def delete_run(self, run_id: str) -> None:
        self.client.delete_run(run_id)

    def copy_history(self, from_run_id: str, to_run_id: str, keys) -> None:
        """These metrics' whole histories (steps and timestamps) from one run into another."""
        history = [Metric(key, m.value, m.timestamp, m.step)
                   for key in keys for m in self.client.get_metric_history(from_run_id, key)]
        self.client.log_batch(to_run_id, metrics=history)

    def copy_inputs(self, from_run_id: str, to_run_id: str) -> None:
        """The datasets a run read and the model it logged, as inputs of another run."""
        source = self.client.get_run(from_run_id)
        model_id = _model_id(source)
        self.client.log_inputs(to_run_id, datasets=list(source.inputs.dataset_inputs) if source.inputs else None,
                               models=[mlflow.entities.LoggedModelInput(model_id)] if model_id else None)

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in self.client.get_metric_history(run_id, key)]

    def train_timing(self, run_id: str) -> dict[str, float]:
        """A training's seconds over all its epochs and its CPU share over them, each epoch weighted
        by its seconds (nan for runs from before the share was recorded)."""
        epochs = self.metric_history(run_id, EPOCH_SECONDS)
        seconds, shares = dict(epochs), self.metric_history(run_id, CPU_SHARE)
        total = sum(seconds.get(step, 0.0) for step, _ in shares)
        return {TRAIN_SECONDS: sum(v for _, v in epochs),
                TRAIN_CPU_SHARE: sum(seconds.get(step, 0.0) * share for step, share in shares) / total
                if total else float("nan")}

    def run_text(self, run_id: str, path: str) -> str:
        """A text artifact of a run, or "" when it has none."""
        with tempfile.TemporaryDirectory() as tmp:
            try:
                return Path(self.client.download_artifacts(run_id, path, tmp)).read_text()
            except Exception:  # MLflow raises several kinds for a missing artifact
                return ""

    def _search_everywhere(self, filter_string: str) -> list:
        """Runs matching `filter_string` in every active experiment, newest first (at most one)."""
        ids = [e.experiment_id for e in self.client.search_experiments()]
        return self.client.search_runs(ids, filter_string, order_by=["attributes.start_time DESC"],
                                       max_results=1) if ids else []

    def find_run(self, ref: str) -> RunRecord:
        """A training run by id, or by DVC experiment name / run name (newest first); a study child
        that reused another variant's training stands for that training."""
        run = None
        if re.fullmatch(r"[0-9a-f]{32}", ref):
            try:
                run = self.client.get_run(ref)
            except mlflow.exceptions.MlflowException:
                run = None
        for key in ("tags.dvc_exp_name", "attributes.run_name"):
            if run is None:
                found = self._search_everywhere(f"{key} = '{ref}'")
                run = found[0] if found else None
        if run is None:
            raise CtclabError(f"{ref}: no MLflow run with that id, DVC experiment name or run name in {self.uri}")
        training = run.data.tags.get("training_run_id")
        return self.record(training) if training else _record(run)

    def checkpoint_run(self, checkpoint: Path) -> str:
        """The training run that wrote this checkpoint (its `checkpoint_sha256` tag), searched in every
        experiment of the store; the newest wins (a deterministic rerun writes the same bytes). The run
        id lives in MLflow, not in DVC's outs, so the outs of two clean reruns are identical."""
        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise CtclabError(f"{checkpoint}: no checkpoint; run the train stage first (dvc repro train)")
        digest = storage.sha256_file(checkpoint)
        found = self._search_everywhere(f"tags.checkpoint_sha256 = '{digest}'")
        if not found:
            raise CtclabError(f"{checkpoint}: no training run in {self.uri} wrote this checkpoint "
                              f"(sha256 {digest[:12]}); retrain it with `dvc repro -f train` to record it there")
        return found[0].info.run_id

    # --- models ------------------------------------------------------------------------------------
    def logged_model_id(self, run_id: str) -> str | None:
        """The MLflow model a training run logged (its best checkpoint), if any."""
        return _model_id(self.client.get_run(run_id))

    def register(self, model_id: str, name: str, alias: str, description: str, tags: dict) -> str:
        """Register a logged model as a new version of `name`, point `alias` at it; return the version."""
        with contextlib.suppress(mlflow.exceptions.MlflowException):  # it exists already
            with _quiet("mlflow.store.model_registry.abstract_store"):
                self.client.create_registered_model(name)
        model = self.client.get_logged_model(model_id)
        # the source as the model's files, not models:/<id>: MLflow's registry would look that up
        # through its global tracking URI (a TODO in its sqlalchemy store)
        version = self.client.create_model_version(name, model.artifact_location, run_id=model.source_run_id,
                                                   tags={k: str(v) for k, v in tags.items()},
                                                   description=description, model_id=model_id).version
        self.client.set_registered_model_alias(name, alias, version)
        return str(version)

    def alias_version(self, name: str, alias: str) -> tuple[str, dict] | None:
        """The version `name@alias` points at, with its tags; None when there is no such alias."""
        try:
            version = self.client.get_model_version_by_alias(name, alias)
        except mlflow.exceptions.MlflowException:
            return None
        return str(version.version), dict(version.tags)

    def load_model(self, model_uri: str):
        """A logged or registered model (`models:/ctclab-conv_lstm@champion`, `models:/<model id>`,
        `runs:/<id>/model`, or a folder)."""
        from mlflow.models import Model

        from . import logged_model

        with tempfile.TemporaryDirectory() as tmp:
            try:
                local = mlflow.artifacts.download_artifacts(self._model_location(model_uri), dst_path=tmp,
                                                            tracking_uri=self.uri)
                flavor = Model.load(local).flavors.get("python_function", {})
                if flavor.get("loader_module") == "ctclab.logged_model":  # read as data: no code from the model runs
                    return logged_model.load(Path(local) / flavor["data"])
                # logged before ctclab stopped pickling (mlflow.pytorch): MLflow unpickles it, unless
                # MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false, which makes it refuse (README)
                return mlflow.pytorch.load_model(local, map_location="cpu")
            except mlflow.exceptions.MlflowException as err:
                raise CtclabError(f"--model {model_uri}: {str(err).splitlines()[0]} (store {self.uri})") from None
            except CtclabError as err:  # its weights file, under a temporary folder: name the model instead
                raise CtclabError(f"--model {model_uri}: {str(err).replace(tmp + '/', '')}") from None

    def _model_location(self, model_uri: str) -> str:
        """Where a model's files are, found through this store's client: MLflow resolves `models:/`
        (and a run's model) through its global registry URI, which ctclab never sets."""
        from mlflow.store.artifact.utils.models import get_model_name_and_version

        if model_uri.startswith("runs:/"):
            run_id, _, name = model_uri.removeprefix("runs:/").strip("/").partition("/")
            run = self.client.get_run(run_id)
            found = [m for m in self.client.search_logged_models([run.info.experiment_id], f"name = '{name}'")
                     if m.source_run_id == run_id]
            if not found:
                return model_uri  # the run's own artifacts (MLflow 2 logged models there)
            model_uri = f"models:/{found[-1].model_id}"
        if not model_uri.startswith("models:/"):
            return model_uri
        found = get_model_name_and_version(self.client, model_uri)
        if len(found) == 1:
            return self.client.get_logged_model(found[0]).artifact_location
        return self.client.get_model_version_download_uri(*found)


def _model_id(run) -> str | None:
    outputs = run.outputs.model_outputs if run.outputs else []
    return outputs[-1].model_id if outputs else None


class RunLog:
    """One run of a store, as the few calls the pipeline makes. `with` it: while open it records
    system metrics (a training), and it ends FINISHED, or FAILED on an error (`end` ends it sooner)."""

    def __init__(self, store: Store, run_id: str, resumed: bool = False, system_metrics: bool = True):
        self.store, self.run_id, self._resumed = store, run_id, resumed
        self._system_metrics, self._monitor, self._ended, self._warned = system_metrics, None, False, False

    @property
    def uri(self) -> str:
        return self.store.uri

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        now = _now_ms()
        self.store.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step or 0) for k, v in metrics.items()])

    def send(self, pending: list) -> Exception | None:
        """Log queued (metrics, step) pairs in order, removing each one sent. When the store cannot be
        reached: the error (and a line, once); the rest stay queued for the next call."""
        while pending:
            metrics, step = pending[0]
            try:
                self.log_metrics(metrics, step=step)
            except UNREACHABLE as err:
                if not self._warned:
                    print(f"tracking: {self.uri} unreachable ({type(err).__name__}); training goes on and keeps its "
                          "metrics in the checkpoint until the store answers", file=sys.stderr)
                    self._warned = True
                return err
            pending.pop(0)
        return None

    def log_params(self, params: dict) -> None:
        self.store.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in params.items()])

    def set_tags(self, tags: dict) -> None:
        self.store.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_text(self, text: str, artifact_path: str) -> None:
        self.store.client.log_text(self.run_id, text, artifact_path)

    def log_artifact(self, path: str | Path, folder: str) -> None:
        self.store.client.log_artifact(self.run_id, str(path), folder)

    def log_data(self, data: DataInput, context: str = "training") -> None:
        ds = mlflow.entities.Dataset(data.name, data.digest, "local", json.dumps({"uri": data.source}),
                                     profile=json.dumps(data.profile))
        tag = mlflow.entities.InputTag("mlflow.data.context", context)
        for attempt in range(3):
            try:
                self.store.client.log_inputs(self.run_id, datasets=[mlflow.entities.DatasetInput(ds, [tag])])
                return
            except mlflow.exceptions.MlflowException:
                # Two trainings of a study (-j 2) inserting the same dataset at once: the second
                # insert fails on MLflow's unique key; the row exists then, and the next try links it.
                if attempt == 2:
                    raise
                time.sleep(0.5)

    def log_model(self, model, metadata: dict, input_dim: int, classes: int) -> str:
        """The network as an MLflow model of this run, without pickle (ctclab.logged_model: weights in
        a weights-only torch file, a pyfunc loader module, ctclab's code beside it so it loads anywhere
        with torch installed); returns its model id. Input: raw MFCC frames of equal-length utterances
        [batch, time, input_dim]; output: log-probabilities [batch, time', classes]. Through this
        store's client: a LoggedModel, its files (mlflow.pyfunc.save_model), the run's output link, READY."""
        from . import logged_model
        from mlflow.models import Model, ModelSignature
        from mlflow.types import Schema, TensorSpec
        import torch

        client, run = self.store.client, self.store.client.get_run(self.run_id)
        # unnamed tensors: pyfunc would hand a named input over as a dict
        signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, input_dim))]),
                                   outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, classes))]))
        source = {k: v for k, v in run.data.tags.items() if k.startswith("mlflow.source.") or k == "mlflow.user"}
        logged = client.create_logged_model(run.info.experiment_id, name="model", source_run_id=self.run_id,
                                            params=dict(run.data.params), tags=source)
        client.log_outputs(self.run_id, [mlflow.entities.LoggedModelOutput(logged.model_id, step=0)])
        card = Model(artifact_path=logged.artifact_location, model_uuid=logged.model_id, run_id=self.run_id,
                     metadata=metadata, model_id=logged.model_id)
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*An input example was not provided")  # the signature says it all
            # not mlflow.pytorch: it pickles the module, and its pt2 format fixes an LSTM's input length
            logged_model.save(model, f"{tmp}/{logged_model.WEIGHTS}")
            mlflow.pyfunc.save_model(f"{tmp}/model", loader_module="ctclab.logged_model", data_path=f"{tmp}/{logged_model.WEIGHTS}",
                                     mlflow_model=card, signature=signature, code_paths=[str(Path(__file__).parent)],
                                     pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                                                       f"numpy=={np.__version__}"])
            client.log_model_artifacts(logged.model_id, f"{tmp}/model")
        client.finalize_logged_model(logged.model_id, "READY")
        return logged.model_id

    def end(self, status: str) -> None:
        """End the run now with this status (KILLED for an interrupted training)."""
        self._stop_monitor()
        self.store.client.set_terminated(self.run_id, status)
        self._ended = True

    def _stop_monitor(self) -> None:
        if self._monitor is not None:
            monitor, self._monitor = self._monitor, None
            with contextlib.suppress(*UNREACHABLE):
                monitor.finish()

    def __enter__(self) -> "RunLog":
        if self._resumed:
            self.store.client.update_run(self.run_id, status="RUNNING")
        if self._system_metrics:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no start/stop lines per run
            self._monitor = SystemMetricsMonitor(self.run_id, resume_logging=self._resumed, tracking_uri=self.uri)
            self._monitor.start()
        return self

    def __exit__(self, exc_type, *exc):
        if self._ended:
            return False
        try:
            self.end("FINISHED" if exc_type is None else "FAILED")
        except UNREACHABLE:
            if exc_type is None:
                raise
        return False  # the store is gone: the error that ended the run matters more than this one


@contextlib.contextmanager
def _quiet(logger: str):
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)
