"""A study in MLflow: one parent run per study (and smoke flag), one child run per variant × seed.

A variant's own training is its child (train tags it with the parent). When DVC's run cache hands a
variant the model another variant trained (a beam-width study trains once per seed), evaluate
logs a child of its own instead: the training's params, curves, provenance, dataset and model,
plus this evaluation. Imported by evaluate, the study runner and the reports; every MLflow call
goes through the tracking Store it is given.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .results import CURVES
from .tracking import RunRecord, Store

PARENT_TAG = "ctclab_study_parent"
PARENT_LINK = "mlflow.parentRunId"  # MLflow's own: the UI nests the children under the parent


@dataclass(frozen=True)
class ParentRun:
    """A study's parent run, in the store that holds it."""
    run_id: str
    experiment_id: str
    store: Store = field(compare=False, repr=False)

    def children(self) -> list[RunRecord]:
        return self.store.search(self.experiment_id, f"tags.{PARENT_LINK} = '{self.run_id}'")

    def log_artifacts(self, paths: list[Path], folder: str) -> None:
        self.store.log_artifacts(self.run_id, paths, folder)

    def ui_addresses(self) -> tuple[str, str]:
        """Its experiment's runs table and charts in the MLflow UI."""
        return self.store.ui_addresses(self.experiment_id)

    def ui_where(self) -> str:
        return self.store.ui_where()

    def note_start(self, seeds: tuple[int, ...]) -> None:
        """Record the seeds a `study run` asked for; being a write, it also tells a user of a server
        with accounts who may only read the experiment so, in one line, before anything is queued."""
        self.store.client.set_tag(self.run_id, "last_run_seeds", " ".join(map(str, seeds)))


def find_parent(store: Store, experiment: str, study: str, smoke: bool) -> ParentRun | None:
    """The study's parent run in `experiment` (the earliest, should two have been made)."""
    exp_id = store.find_experiment(experiment)
    if exp_id is None:
        return None
    found = store.search(exp_id, f"tags.{PARENT_TAG} = '{study}' and tags.smoke = '{str(smoke).lower()}'",
                         oldest_first=True, max_results=1)
    return ParentRun(found[0].run_id, exp_id, store) if found else None


def create_parent(store: Store, experiment: str, study: str, smoke: bool, run_name: str, question: str,
                  study_yaml: str) -> ParentRun:
    exp_id = store.experiment_id(experiment)
    run = store.create_run(exp_id, run_name, {PARENT_TAG: study, "study": study, "smoke": str(smoke).lower(),
                                              "question": question})
    run.log_text(study_yaml, "study.yaml")
    run.end("FINISHED")
    # Two machines sharing a server may both have found no parent and created one: every study run
    # settles on the earliest, and a later duplicate is deleted, so all seeds gather under one parent.
    earliest = find_parent(store, experiment, study, smoke)
    if earliest is not None and earliest.run_id != run.run_id:
        store.delete_run(run.run_id)
        return earliest
    return ParentRun(run.run_id, exp_id, store)


def is_child(store: Store, run_id: str, parent_run_id: str, labels: dict) -> bool:
    """Whether a training run is the study child for these labels (study, variant, seed)."""
    tags = store.record(run_id).tags
    return tags.get(PARENT_LINK) == parent_run_id and all(tags.get(k) == v for k, v in labels.items())


def log_child(store: Store, training_run_id: str, parent_run_id: str, labels: dict, extra_params: dict,
              metrics: dict, texts: dict[str, str]) -> str:
    """A child run under the study's parent for a variant × seed whose training run belongs to
    another variant: the training's params, learning curves, provenance tags, dataset and model,
    plus this evaluation (`metrics`, `texts`). Returns its run id."""
    training = store.record(training_run_id)
    tags = {k: v for k, v in training.tags.items() if not k.startswith("mlflow.") or k.startswith("mlflow.source.git")}
    tags.update({PARENT_LINK: parent_run_id, "training_run_id": training_run_id,
                 "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""), **labels})
    child = store.create_run(store.record(parent_run_id).experiment_id, f"{labels['variant']}-s{labels['seed']}", tags)
    child.log_params({**training.params, **extra_params})
    store.copy_history(training_run_id, child.run_id, CURVES)
    child.log_metrics({**metrics, **store.train_timing(training_run_id)}, step=0)
    store.copy_inputs(training_run_id, child.run_id)
    for path, text in texts.items():
        child.log_text(text, path)
    child.end("FINISHED")
    return child.run_id
