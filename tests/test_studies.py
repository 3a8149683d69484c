"""Studies end to end through the real DVC queue and MLflow, on a tiny project copy."""
import hashlib
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import scipy.stats
import pytest
import requests
import yaml

from ctclab import gpu_lease, report, studies, study_table, submission, tracking
from ctclab.errors import CtclabError
from conftest import make_fall2022, make_spring2022
from project import REPO, AuthServer, MlflowServer, commit, committed_project, env, run, survivors

SMOKE = {"seeds": [0, 1], "params": {"data.synthetic.train": 12, "data.synthetic.dev": 4, "data.synthetic.test": 2,
                                     "train.epochs": 1, "model.conv_lstm.hidden": 8, "model.conv_lstm.embed_dim": 8}}


def study_project(tmp_path, study: dict) -> Path:
    return committed_project(tmp_path / "project", files={f"experiments/{study['name']}.yaml":
                                                           yaml.safe_dump(study, sort_keys=False)})


def study_cli(project, *args, check=True, tracking_uri=None, login: tuple[str, str] | None = None, extra_env=None):
    extra = {"MLFLOW_TRACKING_URI": tracking_uri} if tracking_uri else {}
    extra |= extra_env or {}
    if login:
        extra |= {"MLFLOW_TRACKING_USERNAME": login[0], "MLFLOW_TRACKING_PASSWORD": login[1]}
    return run(project, sys.executable, "-m", "ctclab", "study", *args, check=check, timeout=900, env=extra)


def all_runs(project, experiment, uri=None):
    mlflow.set_tracking_uri(uri or f"sqlite:///{project / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=[experiment], output_format="list")


def rest(server, method: str, endpoint: str, **kw) -> dict:
    """MLflow's REST API, as any client (another language, a dashboard) would read it."""
    r = requests.request(method, f"{server.uri}/api/2.0/mlflow/{endpoint}", timeout=30, **kw)
    r.raise_for_status()
    return r.json()


def test_smoke_study_from_two_clones_on_one_mlflow_server(tmp_path):
    """Team mode: two clones of one project (two machines) track into one `mlflow server` (SQL
    backend, proxied artifact store) and each runs its own seeds of a smoke study; either clone's
    report gathers every seed. Read back through the REST API."""
    study = {"name": "kaiming_smoke", "question": "Does Kaiming init help?",
             "variants": [{"name": "on", "baseline": True, "params": {"model.conv_lstm.kaiming": True}},
                          {"name": "off", "params": {"model.conv_lstm.kaiming": False}},
                          # fails in its fetch stage; must not stop the others
                          {"name": "broken", "params": {"data.source": "local", "data.path": "/nonexistent/hw3p2"}}],
             "seeds": [0, 1, 2], "smoke": SMOKE}
    origin = study_project(tmp_path, study)
    clones = [tmp_path / "machine_a", tmp_path / "machine_b"]
    two_gpus = {gpu_lease.SIMULATED_ENV: "2", gpu_lease.FOLDER_ENV: str(tmp_path / "leases")}  # pretend ones
    for clone in clones:
        run(tmp_path, "git", "clone", "-q", str(origin), str(clone))
    with MlflowServer(tmp_path / "server") as server:
        uri = server.uri
        for clone, seed in zip(clones, ("0", "1")):
            result = study_cli(clone, "run", "experiments/kaiming_smoke.yaml", "--smoke", "--seeds", seed, "-j", "2",
                               check=False, tracking_uri=uri, extra_env=two_gpus)
            assert result.returncode == 1 and "2 ran, 0 skipped (already complete), 1 failed" in result.stdout, result.stdout
            assert f"FAILED kaiming_smoke-broken-s{seed}-smoke: see its log with `dvc queue logs" in result.stdout
        out = result.stdout
        for clone in clones:
            assert not (clone / "mlflow.db").exists() and not (clone / "mlartifacts").exists()  # all on the server
        runs = all_runs(None, "ctclab/kaiming_smoke-smoke", uri)  # the study's own experiment
        assert all_runs(None, "ctclab", uri) == []  # plain `dvc repro` runs only
        client = mlflow.MlflowClient()
        experiment = client.get_experiment_by_name("ctclab/kaiming_smoke-smoke")
        assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
        assert f"MLflow UI: {uri}/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning&viewStateShareKey=ctclab" in out
        parents = [r for r in runs if r.data.tags.get("ctclab_study_parent") == "kaiming_smoke"]
        assert len(parents) == 1  # machine b found machine a's parent on the server
        kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
        assert sorted(k.info.run_name for k in kids) == ["off-s0", "off-s1", "on-s0", "on-s1"]  # broken never trained
        for k in kids:  # each child is its variant × seed's training run: params, curves, data, model
            assert k.info.run_name == f"{k.data.tags['variant']}-s{k.data.tags['seed']}"
            assert k.data.tags["dvc_exp_name"] == f"kaiming_smoke-{k.data.tags['variant']}-s{k.data.tags['seed']}-smoke"
            assert k.data.params["model.conv_lstm.kaiming"] == str(k.data.tags["variant"] == "on")
            assert k.data.params["decode.beam_width"] == str(yaml.safe_load((origin / "params.yaml").read_text())["decode"]["beam_width"])
            assert "eval_dev_lev_beam" in k.data.metrics and "train_seconds" in k.data.metrics
            assert [h.step for h in client.get_metric_history(k.info.run_id, "dev_lev_greedy")] == [1]
            assert k.inputs.dataset_inputs[0].dataset.name == "ctclab-synthetic" and k.outputs.model_outputs
            assert k.data.tags["gpu_lease"] in ("cuda:0 (simulated)", "cuda:1 (simulated)")
        # -j 2 on two GPUs: the trainings that ran at the same time (one machine's seed) had a GPU each
        overlapping = [(a, b) for a in kids for b in kids if a.data.tags["seed"] == b.data.tags["seed"]
                       and a.info.run_id < b.info.run_id and a.info.start_time < b.info.end_time
                       and b.info.start_time < a.info.end_time]
        assert overlapping and all(a.data.tags["gpu_lease"] != b.data.tags["gpu_lease"] for a, b in overlapping)

        # the same through the REST API: runs, child runs, and a checkpoint's bytes from the artifact store
        exp_id = rest(server, "GET", "experiments/get-by-name",
                      params={"experiment_name": "ctclab/kaiming_smoke-smoke"})["experiment"]["experiment_id"]
        found = rest(server, "POST", "runs/search", json={"experiment_ids": [exp_id], "max_results": 100,
                                                          "filter": f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'"})
        by_name = {r["info"]["run_name"]: r for r in found["runs"]}
        assert sorted(by_name) == ["off-s0", "off-s1", "on-s0", "on-s1"]
        child = by_name["on-s1"]  # trained on machine b
        tags = {t["key"]: t["value"] for t in child["data"]["tags"]}
        assert child["info"]["artifact_uri"].startswith("mlflow-artifacts:/")  # proxied by the server
        listed = rest(server, "GET", "artifacts/list", params={"run_id": child["info"]["run_id"], "path": "checkpoints"})
        assert {f["path"] for f in listed["files"]} == {"checkpoints/best.pt", "checkpoints/last.pt"}
        store_path = child["info"]["artifact_uri"].removeprefix("mlflow-artifacts:/")
        blob = requests.get(f"{uri}/api/2.0/mlflow-artifacts/artifacts/{store_path}/checkpoints/best.pt", timeout=30)
        assert hashlib.sha256(blob.content).hexdigest() == tags["checkpoint_sha256"]

        # either machine's report gathers every seed from the server
        study_cli(clones[0], "report", "experiments/kaiming_smoke.yaml", "--smoke", tracking_uri=uri)
        report = (clones[0] / "experiments/reports/kaiming_smoke-smoke.md").read_text()
        rows = [l for l in report.splitlines() if (l.startswith("| on ") or l.startswith("| off ")) and " ± " in l]
        assert len(rows) == 2 and all("| 2 |" in r and "| 2 × " in r for r in rows), report  # n = 2, run with -j 2
        per_seed = report.split("Per seed (`dev_lev_beam`, child run id):")[1]
        assert per_seed.count("| on | ") == 1 and per_seed.count("(`") == 4  # 2 variants × 2 seeds, each with its run
        assert "| broken |" in report and "no finished runs" in report
        # the verdict recomputed here from the runs (scipy's paired t-test; one comparison, so Holm is p)
        score = {(k.info.run_name.split("-")[0], k.info.run_name[-1]): k.data.metrics["eval_dev_lev_beam"] for k in kids}
        diffs = [score[("off", s)] - score[("on", s)] for s in ("0", "1")]
        p = float(diffs[0] == 0) if np.ptp(diffs) == 0 else scipy.stats.ttest_1samp(diffs, 0.0).pvalue  # no spread: certain
        expected = ("better" if np.mean(diffs) < 0 else "worse") if p < 0.05 else "no detectable difference with 2 seeds"
        assert f"| {expected}" in rows[1], (diffs, p, rows[1])  # a "no detectable" one goes on with its power
        assert (clones[0] / "experiments/reports/kaiming_smoke-smoke_curves.png").stat().st_size > 1000
        assert "p (Holm)" in report and "Holm-adjusted across the study's 1 comparison (in" in report  # broken has none
        # its runs table, with each run's contention, regenerates it byte for byte without the server
        table = study_table.read(clones[0] / "experiments/reports/kaiming_smoke-smoke.runs.csv")
        assert sorted((r.variant, r.seed) for r in table.runs) == [("off", 0), ("off", 1), ("on", 0), ("on", 1)]
        assert all(0 < r.train_cpu_share <= 1.05 and r.torch_threads and r.curve() for r in table.runs)
        (clones[0] / "experiments/reports/kaiming_smoke-smoke.md").unlink()
        study_cli(clones[0], "report", "experiments/kaiming_smoke.yaml", "--smoke", "--from-table",
                  tracking_uri="http://127.0.0.1:9")  # nothing listens there
        assert (clones[0] / "experiments/reports/kaiming_smoke-smoke.md").read_text() == report
        # a second run skips what is complete, whichever machine ran it
        again = study_cli(clones[0], "run", "experiments/kaiming_smoke.yaml", "--smoke", check=False,
                          tracking_uri=uri).stdout
        assert "4 skipped (already complete), 2 failed" in again, again

        # promote: the lowest-mean variant's best seed, registered with the verdict; then predict with it.
        # A smoke study's model takes the alias `smoke`, never `champion`.
        out = study_cli(clones[0], "promote", "experiments/kaiming_smoke.yaml", "--smoke", tracking_uri=uri).stdout
        score = {(k.data.tags["variant"], k.data.tags["seed"]): k.data.metrics["eval_dev_lev_beam"] for k in kids}
        best = min(("on", "off"), key=lambda v: score[(v, "0")] + score[(v, "1")])
        seed = min(("0", "1"), key=lambda s: score[(best, s)])
        version = client.get_model_version_by_alias("ctclab-conv_lstm", "smoke")
        assert (version.tags["variant"], version.tags["seed"]) == (best, seed), out
        assert version.tags["smoke"] == "true" and version.tags["metric"] == "dev_lev_beam"
        with pytest.raises(mlflow.exceptions.MlflowException):
            client.get_model_version_by_alias("ctclab-conv_lstm", "champion")
        winner = next(k for k in kids if (k.data.tags["variant"], k.data.tags["seed"]) == (best, seed))
        assert winner.outputs.model_outputs[0].model_id in version.source
        assert f"best variant {best}" in version.description and "verdict vs baseline:" in version.description
        assert "ctclab-conv_lstm version 1 (alias smoke; a new alias)" in out

        # the alias never moves to a model that scored worse on the same data, unless told to
        better = tracking.open_store(uri, clones[0]).register(
            winner.outputs.model_outputs[0].model_id, "ctclab-conv_lstm", "smoke", "a better one",
            {"metric": "dev_lev_beam", "dev_lev_beam": 0.5, "data_hash": version.tags["data_hash"], "study": "other"})
        kept = study_cli(clones[0], "promote", "experiments/kaiming_smoke.yaml", "--smoke", tracking_uri=uri, check=False)
        assert kept.returncode == 2 and kept.stderr.count("\n") == 1, kept.stderr
        assert (f"ctclab-conv_lstm@smoke is version {better}, dev_lev_beam 0.500 on the same data (study other); this "
                f"study's best scores {score[(best, seed)]:.3f}: the alias stays where it is") in kept.stderr
        assert client.get_model_version_by_alias("ctclab-conv_lstm", "smoke").version == better
        forced = study_cli(clones[0], "promote", "experiments/kaiming_smoke.yaml", "--smoke", "--force",
                           tracking_uri=uri).stdout
        assert f"it pointed at version {better}, dev_lev_beam 0.500 on the same data (--force)" in forced
        csv_text = run(clones[1], sys.executable, "-m", "ctclab", "predict", "--model", "models:/ctclab-conv_lstm@smoke",
                       "--mfcc", str(make_spring2022(tmp_path / "spring", dim=13)), "--beam", "2",
                       env={"MLFLOW_TRACKING_URI": uri}).stdout
        lines = csv_text.splitlines()
        assert lines[0] == "id,predictions" and [l.split(",")[0] for l in lines[1:]] == [str(i) for i in range(6)], csv_text
        champion = tracking.open_store(uri, clones[1]).load_model("models:/ctclab-conv_lstm@smoke")
        fall = submission.predict(champion, make_fall2022(tmp_path / "fall", dim=13), 2, 1).splitlines()
        assert fall[0] == "index,label" and len(fall) == 7  # the other layout, in its own format


def test_beam_width_study_trains_exactly_once(tmp_path):
    study = {"name": "beam_smoke", "question": "Does a wider beam help?",
             "variants": [{"name": "b1", "baseline": True, "params": {"decode.beam_width": 1}},
                          {"name": "b8", "params": {"decode.beam_width": 8}}],
             "seeds": [0], "smoke": {**SMOKE, "seeds": [0]}}
    project = study_project(tmp_path, study)
    # Ctrl-C while the runner waits: one line; the study's experiments leave DVC's queue, no process
    # of it survives, and the same command run again runs them
    # a terminal's Ctrl-C: SIGINT at its default even when the tests run in a background job (which ignores it)
    runner = subprocess.Popen([sys.executable, "-m", "ctclab", "study", "run", "experiments/beam_smoke.yaml", "--smoke",
                               "-j", "1"], cwd=project, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert "2 experiments queued" in runner.stdout.readline()
    runner.send_signal(signal.SIGINT)
    _, err = runner.communicate(timeout=300)
    assert runner.returncode == 130 and "Traceback" not in err and err.strip().splitlines()[-1] == (
        "ctclab: study beam_smoke: stopped by Ctrl-C (SIGINT); its unfinished experiments left DVC's queue and its "
        "workers stopped; finished runs are kept, and the same command runs the rest"), err
    assert survivors(project) == []
    out = study_cli(project, "run", "experiments/beam_smoke.yaml", "--smoke", "-j", "1").stdout
    assert "2 ran" in out and "0 failed" in out, out
    runs = all_runs(project, "ctclab/beam_smoke-smoke")
    kids = [r for r in runs if r.data.tags.get("study") == "beam_smoke" and "mlflow.parentRunId" in r.data.tags]
    trainings = [k for k in kids if "training_run_id" not in k.data.tags]
    assert len(kids) == 2 and len(trainings) == 1 and "train_loss" in trainings[0].data.metrics
    # the other variant reused the trained model (DVC's run cache): a child that points at that training
    [reuse] = [k for k in kids if "training_run_id" in k.data.tags]
    assert reuse.data.tags["training_run_id"] == trainings[0].info.run_id
    assert sorted(k.data.params["decode.beam_width"] for k in kids) == ["1", "8"]
    client = mlflow.MlflowClient()
    [linked] = client.get_run(reuse.info.run_id).inputs.model_inputs  # the model column shows the shared model
    assert linked.model_id == client.get_run(trainings[0].info.run_id).outputs.model_outputs[0].model_id

    # the same command again: nothing to do; after a committed param change, both run (and train) again
    assert "0 ran, 2 skipped" in study_cli(project, "run", "experiments/beam_smoke.yaml", "--smoke", "-j", "1").stdout
    params = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(params.replace("lr: 0.002", "lr: 0.003"))
    commit(project, "a higher lr")
    again = study_cli(project, "run", "experiments/beam_smoke.yaml", "--smoke", "-j", "1").stdout
    assert "study beam_smoke: b1 seed 0 runs again: params changed (train.lr 0.002 → 0.003)" in again, again
    assert "2 ran, 0 skipped" in again, again
    newest = all_runs(project, "ctclab/beam_smoke-smoke")
    assert len([r for r in newest if "training_run_id" not in r.data.tags and "mlflow.parentRunId" in r.data.tags]) == 2


def test_untracked_code_is_refused_and_a_dead_worker_is_replaced_once(tmp_path, monkeypatch, capsys):
    # its one experiment fails at once (fetch): the runner's waiting is what this test is about
    broken = {"data.source": "local", "data.path": "/nonexistent/hw3p2"}
    study = {"name": "s", "question": "q?", "variants": [{"name": "a", "baseline": True, "params": broken}],
             "seeds": [0], "smoke": {**SMOKE, "seeds": [0]}}
    project = study_project(tmp_path, study)
    (project / "src/ctclab/new_module.py").write_text("X = 1\n")
    (project / "notes.txt").write_text("not code: fine\n")
    r = study_cli(project, "run", "experiments/s.yaml", "--smoke", check=False)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "untracked src/ctclab/new_module.py would be left out of the queued experiments" in r.stderr
    assert "notes.txt" not in r.stderr
    assert "s-a-s0-smoke" not in run(project, sys.executable, "-m", "dvc", "queue", "status").stdout
    # an edit `dvc exp run -S` (or a hand) left in params.yaml would run in every experiment unrecorded
    (project / "src/ctclab/new_module.py").unlink()
    params = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(params.replace("beam_width: 4", "beam_width: 25"))
    r = study_cli(project, "run", "experiments/s.yaml", "--smoke", check=False)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "uncommitted changes to params.yaml would run in every experiment of the study" in r.stderr
    assert "(git checkout -- params.yaml)" in r.stderr
    (project / "params.yaml").write_text(params)

    # The first workers die before taking anything (as DVC's sometimes do): after WORKERLESS_SECONDS
    # with the experiment still queued, the runner starts workers once more, and then it runs.
    real_start, starts = studies.start_workers, []
    monkeypatch.setattr(studies, "start_workers", lambda root, jobs: starts.append(jobs) or (
        real_start(root, jobs) if len(starts) > 1 else None))
    monkeypatch.setattr(studies, "WORKERLESS_SECONDS", 1)
    monkeypatch.chdir(project)
    result = studies.run_study(studies.load(project / "experiments/s.yaml", project / "params.yaml"), project,
                               smoke=True, poll_seconds=0.5)
    out = capsys.readouterr().out
    assert "no DVC queue worker alive for 1 s with 1 experiments queued; starting workers again (once)" in out, out
    assert starts == [1, 1] and result["failed"] == ["s-a-s0-smoke"]  # ran (and failed at fetch), not lost


def test_a_busy_worker_that_misses_dvcs_question_still_counts_as_alive(tmp_path):
    """`dvc queue status` can say "0 active, 0 idle" for a worker too busy to answer its one-second
    celery question; the runner then looks for the worker's process (cmdline `… queue-worker …`,
    working directory the repository) before it gives up on the queue."""
    assert studies.queue_states(tmp_path, [])[1] is None  # not a DVC repository: DVC says nothing
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "queue-worker"], cwd=tmp_path)
    try:
        assert studies.worker_processes(tmp_path) and studies.queue_states(tmp_path, [])[1] is True
        assert not studies.worker_processes(tmp_path / "elsewhere")  # another repository's worker is not ours
    finally:
        worker.kill()
        worker.wait()
    assert not studies.worker_processes(tmp_path)


def write_study(tmp_path, **over):
    base = {"name": "s", "question": "q?", "variants": [{"name": "a", "baseline": True, "params": {}},
                                                         {"name": "b", "params": {"model.conv_lstm.kaiming": False}}],
            "seeds": [0]}
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({**base, **over}))
    return p


@pytest.mark.parametrize("over, message", [
    ({"variants": [{"name": "a", "params": {}}]}, "variants = '0 marked baseline: true', expected exactly one"),
    ({"variants": [{"name": "a", "baseline": True, "params": {"model.conv_lstm.kaiminng": True}}]}, "unknown param 'model.conv_lstm.kaiminng'"),
    ({"variants": [{"name": "a", "baseline": True, "params": {"train.epochs": "many"}}]}, "train.epochs = 'many', expected an integer"),
    ({"metric": "accuracy"}, "metric = 'accuracy'"),
    ({"seeds": []}, "seeds = [], expected at least 1 item"),
    ({"variant": []}, "unknown key variant; expected one of name, question"),
])
def test_bad_study_files_name_the_problem(tmp_path, over, message):
    with pytest.raises(CtclabError) as err:
        studies.load(write_study(tmp_path, **over), REPO / "params.yaml")
    assert message in str(err.value) and "s.yaml" in str(err.value)


def test_a_variant_that_trains_longer_still_smokes_in_one_epoch(tmp_path):
    longer = {"train.epochs": 30, "train.warmup_epochs": 3}
    path = write_study(tmp_path, variants=[{"name": "a", "baseline": True, "params": {}},
                                           {"name": "longer", "params": longer}],
                       smoke={"params": {"train.epochs": 1, "train.warmup_epochs": 0}})
    s = studies.load(path, REPO / "params.yaml")
    variant = s.variants[1]
    assert {k: s.overrides(variant, 0, smoke=False)[k] for k in longer} == longer
    assert {k: s.overrides(variant, 0, smoke=True)[k] for k in longer} == {"train.epochs": 1, "train.warmup_epochs": 0}


def test_shipped_studies_load_and_smoke_sizes_are_small():
    paths = sorted((REPO / "experiments").glob("*.yaml"))
    assert {p.stem for p in paths} >= {"dropout_placement", "kaiming", "beam_width", "architecture", "scheduler"}
    for path in paths:
        s = studies.load(path, REPO / "params.yaml")
        assert s.smoke.params["train.epochs"] == 1 and s.smoke.params["data.synthetic.train"] <= 32, path


def test_a_study_queues_seed_by_seed_so_a_stopped_one_leaves_only_the_seed_in_progress_incomplete():
    s = studies.load(REPO / "experiments/dropout_placement.yaml", REPO / "params.yaml")
    order = [(v.name, seed) for v, seed in s.runs((5, 6))]
    assert order[:5] == [(v.name, 5) for v in s.variants] and order[5:] == [(v.name, 6) for v in s.variants]


def test_paired_interval_and_verdicts():
    assert report.paired([0.5]) is None
    m, lo, hi = report.paired([-1.0, -1.2, -0.9, -1.1])
    # by hand: sd = sqrt(0.05 / 3) = 0.1290994, se = sd / 2, t(0.975, 3) = 3.1824463 → half width 0.2054260
    assert (m, lo, hi) == pytest.approx((-1.05, -1.2554260, -0.8445740), abs=1e-6)
    assert report.paired([0.3, 0.3, 0.3]) == (0.3, 0.3, 0.3)  # no spread: the interval is the point
    assert report.verdict(-1.05, 0.0015, 4) == "better"
    assert report.verdict(1.0, 0.01, 3) == "worse"
    assert report.verdict(-0.4, 0.086, 4) == "no detectable difference with 4 seeds"
    assert report.verdict(None, None, 1) == "no interval with n=1 seed"


def test_parallel_queue_workers_share_the_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(studies.os, "cpu_count", lambda: 8)
    assert studies.worker_env(1)["OMP_NUM_THREADS"] == "8"
    assert studies.worker_env(2)["OMP_NUM_THREADS"] == "4"
    assert studies.worker_env(16)["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert studies.worker_env(2)["OMP_NUM_THREADS"] == "3"


def test_a_server_with_accounts_refuses_in_one_line_before_any_training_and_lets_an_editor_run(tmp_path):
    """The README's team server (basic-auth): no login → the 401 line; a user who may only read the
    study's experiment → the 403 line naming it; an editor → the smoke study runs there. Nothing
    is queued before the refusals, and no password reaches MLflow."""
    study = {"name": "auth", "question": "q?", "variants": [{"name": "a", "baseline": True, "params": {}}],
             "seeds": [0], "smoke": {**SMOKE, "seeds": [0]}}
    project = study_project(tmp_path, study)
    with AuthServer(tmp_path / "server") as server:
        experiment = server.create_experiment("ctclab/auth-smoke")
        server.add_user("reader", "reader-password-123", experiment, "READ")
        server.add_user("editor", "editor-password-456", experiment, "EDIT")
        cmd = ("run", "experiments/auth.yaml", "--smoke")

        nobody = study_cli(project, *cmd, check=False, tracking_uri=server.uri)
        assert nobody.returncode == 2 and nobody.stderr.count("\n") == 1, nobody.stderr
        assert (f"tracking.uri {server.uri}: the server asks for a login (401: no login was given); set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD") in nobody.stderr

        reader = study_cli(project, *cmd, check=False, tracking_uri=server.uri, login=("reader", "reader-password-123"))
        assert reader.returncode == 2 and reader.stderr.count("\n") == 1, reader.stderr
        assert "user 'reader' may not" in reader.stderr and "in experiment 'ctclab/auth-smoke' (403" in reader.stderr
        assert "grant EDIT" in reader.stderr
        assert "auth-a-s0-smoke" not in run(project, sys.executable, "-m", "dvc", "queue", "status").stdout

        editor = study_cli(project, *cmd, tracking_uri=server.uri, login=("editor", "editor-password-456"))
        assert "1 ran" in editor.stdout and "0 failed" in editor.stdout, editor.stdout
        client = mlflow.MlflowClient(server.uri)
        with pytest.MonkeyPatch.context() as m:
            m.setenv("MLFLOW_TRACKING_USERNAME", "editor")
            m.setenv("MLFLOW_TRACKING_PASSWORD", "editor-password-456")
            runs = client.search_runs([experiment])
            children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
            assert len(children) == 1 and children[0].info.status == "FINISHED"
            assert "train_loss" in children[0].data.metrics
            for r in runs:
                recorded = " ".join([*r.data.params.values(), *r.data.tags.values()])
                assert "editor-password-456" not in recorded


def test_a_finished_run_stands_for_a_variant_only_with_the_same_params_and_code(tmp_path, capsys):
    """What decides reuse, on a real repository: the resolved params every stage depends on and the
    code at the run's (clean) commit; each difference is named."""
    study = {"name": "s", "question": "q?", "variants": [{"name": "a", "baseline": True, "params": {"train.lr": 0.003}}],
             "seeds": [0], "smoke": {**SMOKE, "seeds": [0]}}
    project = study_project(tmp_path, study)
    loaded = studies.load(project / "experiments/s.yaml", project / "params.yaml")
    identity = studies.Identity(loaded, project, smoke=True)
    variant, head = loaded.variants[0], run(project, "git", "rev-parse", "HEAD").stdout.strip()
    params = identity.params(variant, 0)
    assert params["train.lr"] == "0.003" and params["train.seed"] == "0" and params["data.synthetic.train"] == "12"
    assert "train.resume" not in params and "decode.workers" not in params and not any(k.startswith("study") for k in params)
    assert "decode.beam_width" in params and "model.conv_lstm.hidden" in params  # what evaluate and train depend on

    def recorded(params, commit=head, dirty=""):
        return tracking.RunRecord("r" * 32, "FINISHED", 0, {**params, "tracking.uri": "anything"}, {},
                                  {"mlflow.source.git.commit": commit, "git_dirty": str(bool(dirty)).lower(),
                                   "git_dirty_files": dirty})
    assert identity.why_not(recorded(params), variant, 0) is None
    assert identity.why_not(recorded(params, dirty="params.yaml"), variant, 0) is None  # a queued experiment's -S
    assert identity.why_not(recorded({**params, "train.lr": "0.002"}), variant, 0) == \
        "params changed (train.lr 0.002 → 0.003)"
    assert identity.why_not(recorded(params, dirty="params.yaml src/ctclab/train.py"), variant, 0) == \
        "its run was trained from uncommitted code"
    assert identity.why_not(recorded(params, commit="f" * 40), variant, 0).startswith("its commit ffffffffffff is not")
    (project / "README.md").write_text("not code\n")
    report = project / "src/ctclab/report.py"  # code no stage depends on: no result changes
    report.write_text(report.read_text() + "\n# a change\n")
    commit(project, "a report change")
    assert studies.Identity(loaded, project, smoke=True).why_not(recorded(params), variant, 0) is None
    metrics = project / "src/ctclab/metrics.py"
    metrics.write_text(metrics.read_text() + "\n# a change\n")
    commit(project, "a code change")
    fresh = studies.Identity(loaded, project, smoke=True)
    assert fresh.why_not(recorded(params), variant, 0) == f"code changed since its commit {head[:12]} (src/ctclab/metrics.py)"
    # `--seeds 1` adds a seed: seed 0's run is kept and counted, and the runner says it is stale
    seed1 = recorded({**params, "train.seed": "1"})
    studies._say_unchecked(loaded, {("a", "0"): recorded(params), ("a", "1"): seed1}, fresh, (1,), smoke=True)
    assert capsys.readouterr().out == (
        f"study s: the report also counts 1 earlier run of seed 0, kept as they ran although code changed since its "
        f"commit {head[:12]} (src/ctclab/metrics.py); `--seeds 0 --smoke` trains them again\n")
    now = run(project, "git", "rev-parse", "HEAD").stdout.strip()
    studies._say_unchecked(loaded, {("a", "0"): recorded(params, commit=now), ("a", "1"): seed1}, fresh, (1,), True)
    assert capsys.readouterr().out == ""  # seed 0's run is what would run now: nothing to say
