"""What a fresh browser shows from the addresses ctclab prints: MLflow's own UI, served by `ctclab
ui` and rendered by headless Chromium (a new profile each time), on a study's runs made through
ctclab's tracking as a study makes them."""
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

from ctclab import mlflow_views, studies, study_runs, tracking
from ctclab.studies import Study
from project import ctrl_c, env, free_port, make_project

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
STUDY = Study(name="kaiming", question="Does it?", metric="dev_lev_beam", seeds=[0, 1],
              variants=[{"name": "kaiming_on", "baseline": True}, {"name": "kaiming_off"}])
EPOCHS = 3


def study_runs_in(project) -> tuple[study_runs.ParentRun, dict[str, str]]:
    """The study's parent (as `ctclab study run` finds or makes it, view included) and a child per
    variant × seed with the tags, curves and scores a training and its evaluation log."""
    parent = studies.parent_run(STUDY, False, project)
    names = {}
    for offset, variant in enumerate(v.name for v in STUDY.variants):
        for seed in STUDY.seeds:
            name = f"{variant}-s{seed}"
            child = parent.store.create_run(parent.experiment_id, name, {
                study_runs.PARENT_LINK: parent.run_id, "study": STUDY.name, "variant": variant, "seed": str(seed),
                "mlflow.source.git.commit": "0123456789abcdef" * 2})
            for epoch in range(1, EPOCHS + 1):
                child.log_metrics({"dev_lev_greedy": 20 / epoch + offset, "train_loss": 3 / epoch,
                                   "dev_loss": 60 / epoch}, step=epoch)
            child.log_metrics({"eval_dev_lev_beam": 6.5 + offset + seed / 10, "train_seconds": 100.0 + seed})
            child.end("FINISHED")
            names[child.run_id] = name
    return parent, names


def test_a_study_view_selects_exactly_its_runs_and_names_what_they_carry(tmp_path):
    project = make_project(tmp_path / "p", git=False)
    parent, names = study_runs_in(project)
    experiment = parent.store.client.get_experiment(parent.experiment_id)
    view = json.loads(experiment.tags[mlflow_views.VIEW_TAG])
    # MLflow's search (the UI sends the same filter) finds the children, not the parent
    assert {r.run_id for r in parent.store.search(parent.experiment_id, view["searchFilter"])} == set(names)
    children = [parent.store.record(run_id) for run_id in names]
    for column in view["selectedColumns"]:  # each column is one every child has, or MLflow's Version
        kind, key = column.split(".", 1)
        assert kind in ("metrics", "tags") or column == "attributes.`Version`", column
        assert kind == "attributes" or all(key.strip("`") in getattr(c, kind) for c in children), column
    assert "metrics.`eval_dev_lev_beam`" in view["selectedColumns"]
    assert view["groupsExpanded"] == {"tag.variant.kaiming_on": True, "tag.variant.kaiming_off": True}
    assert all(c["metricKey"] in children[0].metrics for c in view["compareRunCharts"])
    # the address every ctclab command prints opens on this view, and a second look changes nothing
    runs, curves = parent.ui_addresses()
    assert "viewStateShareKey=ctclab" in runs and "compareRunsMode=CHART" not in runs
    assert curves == runs + "&compareRunsMode=CHART"
    assert studies.parent_run(STUDY, False, project, create=False).run_id == parent.run_id
    assert parent.store.client.get_experiment(parent.experiment_id).tags[mlflow_views.VIEW_TAG] == json.dumps(
        view, sort_keys=True, separators=(",", ":"))


def test_the_pipeline_experiment_opens_on_its_trainings(tmp_path):
    store = tracking.Store(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path)
    exp_id = store.experiment_id("ctclab")
    view = json.loads(store.client.get_experiment(exp_id).tags[mlflow_views.VIEW_TAG])
    assert "metrics.`best_dev_lev_greedy`" in view["selectedColumns"] and "attributes.`Version`" in view["selectedColumns"]
    assert [c["metricKey"] for c in view["compareRunCharts"]][:3] == ["dev_lev_greedy", "train_loss", "dev_loss"]
    assert store.ui_addresses(exp_id)[0] == (f"http://127.0.0.1:5000/#/experiments/{exp_id}/runs?"
                                        "workflowType=machine_learning&viewStateShareKey=ctclab")


def rendered(url: str) -> str:
    """The page's DOM once MLflow's UI has fetched and drawn everything, in a browser profile of its own."""
    with tempfile.TemporaryDirectory() as profile:
        r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                            "--window-size=1920,1080", "--virtual-time-budget=60000", "--dump-dom", url],
                           capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium to render the UI (Debian: apt install chromium)")
def test_a_fresh_browser_shows_the_study_runs_and_curves_from_the_printed_address(tmp_path):
    project = make_project(tmp_path / "p", git=False)
    parent, names = study_runs_in(project)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ctclab", "ui", "--port", str(port)], cwd=project, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        printed = [proc.stdout.readline() for _ in range(3)]  # the server, then each experiment with a view
        line = next(x for x in printed if x.strip().startswith("ctclab/kaiming:"))
        table, charts = line.split()[1], line.split()[3]
        assert (table, charts) == tuple(a.replace(":5000/", f":{port}/") for a in parent.ui_addresses())
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        page = rendered(table)
        for text in (*names.values(), "eval_dev_lev_beam", ">variant<", ">seed<", ">Version<", ">012345<"):
            assert text in page, text
        assert parent.run_id not in page or "Additional runs" in page  # the parent stays folded away
        page = rendered(charts)
        for text in ("study kaiming", "dev_lev_greedy", "train_loss", "dev_loss", "kaiming_on", "kaiming_off"):
            assert text in page, text
        assert page.count("class=\"scatterlayer") >= 3  # the curves are drawn (Plotly's line traces)
    finally:
        assert ctrl_c(proc) == []
