"""What the MLflow UI shows on first open (pure: builds the view, tracking writes it).

MLflow's UI keeps a runs page's columns, grouping and charts in the browser, so a fresh browser
sees one collapsed row and no metric columns. Its "share view" reads the same state from an
experiment tag instead, `mlflow.sharedViewState.<key>`, when the address carries
`viewStateShareKey=<key>` (and no search params of its own, which would win). ctclab writes one
such view per experiment under the key `ctclab` — a study's: its variant × seed runs grouped by
variant, the study metric, variant, seed and Version columns, and the learning curves, one line
per variant; the pipeline experiment's: its trainings with their scores and curves — so every
address ctclab prints opens on the runs and their curves in any browser, with no clicks.

The state's field names are those of MLflow 3.17's UI (`ExperimentPageUIState`,
`RunsChartsLineCardConfig`); tests/test_mlflow_views.py renders them in a headless Chromium.
"""
from __future__ import annotations

import json
from urllib.parse import urlencode

from .results import BEST, CURVES, DEV, EVAL, SELECT_BY, SUBMIT_DECODER, TEST, TRAIN_SECONDS, lev

VIEW_KEY = "ctclab"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
SECTION = "ctclab"  # the charts' section: ours, first, apart from the charts MLflow adds for the rest
# The learning curves charted by epoch, first the one that picks the best checkpoint.
CHARTED_CURVES = (SELECT_BY, "train_loss", "dev_loss")
assert set(CHARTED_CURVES) <= set(CURVES)
# MLflow's own columns: Version is the commit (mlflow.source.git.commit).
VERSION, MODELS = "Version", "Models"


def address(base: str, experiment_id: str, shared_view: bool, charts: bool = False) -> str:
    """The experiment's runs page under `base` (the UI's root URL): its table, or with `charts`
    the chart view; with `shared_view`, as ctclab's view of it shows it."""
    query = {"workflowType": "machine_learning"}  # MLflow 3.17 opens GenAI pages unless told
    if shared_view:
        query["viewStateShareKey"] = VIEW_KEY
    if charts:
        query["compareRunsMode"] = "CHART"
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{urlencode(query)}"


def study_view(study: str, parent_run_id: str, variants: list[str], metric: str) -> str:
    """A study's experiment: its children (variant × seed) grouped by variant, each group open;
    `metric` (an eval.json key) beside variant, seed and Version; charts of `metric` and the
    training's curves, averaged per variant."""
    score = EVAL + metric
    return _dump({
        "searchFilter": f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
        "orderByKey": "attributes.start_time", "orderByAsc": True,
        "selectedColumns": [_column("metrics", score), _column("tags", "variant"), _column("tags", "seed"),
                            _column("attributes", VERSION)],
        "groupBy": {"aggregateFunction": "average", "groupByKeys": [{"mode": "tag", "groupByData": "variant"}]},
        "groupsExpanded": {f"tag.variant.{v}": True for v in variants},
        "runsHiddenMode": "SHOW_ALL",  # a study has more runs than the UI's default of charting 10
        "compareRunSections": [_section(f"study {study}")],
        "compareRunCharts": [_bar(score), *map(_line, CHARTED_CURVES), _bar(TRAIN_SECONDS)],
    })


def pipeline_view() -> str:
    """The pipeline's experiment (`dvc repro`, `dvc exp run`): newest training first with its
    model, Version and dev and test scores (MLflow puts its own columns first; Dataset, the widest,
    would push the scores out of sight); charts of its curves and scores."""
    dev_beam, test_beam = EVAL + lev(DEV, SUBMIT_DECODER), lev(TEST, SUBMIT_DECODER)
    return _dump({
        "selectedColumns": [_column("attributes", MODELS), _column("attributes", VERSION), _column("metrics", BEST),
                            _column("metrics", dev_beam), _column("metrics", test_beam)],
        "compareRunSections": [_section("training")],
        "compareRunCharts": [*map(_line, CHARTED_CURVES), _bar(dev_beam), _bar(TRAIN_SECONDS)],
    })


def _dump(state: dict) -> str:
    return json.dumps(state, sort_keys=True, separators=(",", ":"))


def _column(kind: str, key: str) -> str:
    return f"{kind}.`{key}`"


def _section(name: str) -> dict:
    return {"uuid": SECTION, "name": name, "display": True, "isReordered": False, "deleted": False,
            "isGenerated": False}


def _card(kind: str, metric: str) -> dict:
    return {"uuid": f"{SECTION}-{metric}", "type": kind, "metricKey": metric, "metricSectionId": SECTION,
            "runsCountToCompare": 10, "deleted": False, "isGenerated": False}


def _bar(metric: str) -> dict:
    return _card("BAR", metric)


def _line(metric: str) -> dict:
    """A curve against the epoch (MLflow's step), unsmoothed."""
    return {**_card("LINE", metric), "xAxisKey": "step", "selectedXAxisMetricKey": "", "xAxisScaleType": "linear",
            "scaleType": "linear", "lineSmoothness": 0, "range": {}, "yAxisKey": "metric", "yAxisExpressions": [],
            "ignoreOutliers": False, "useGlobalXaxisKey": True, "useGlobalLineSmoothing": True}
