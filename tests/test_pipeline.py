"""The whole DVC pipeline on a tiny embedded corpus, in a throwaway project copy."""
import contextlib
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import mlflow
import torch
import pytest
import yaml

from ctclab import submission, tracking
from ctclab.errors import signal_name
from project import REPO, commit, env, free_port, make_project, run, stage_command


ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def repro(tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("pipeline") / "project")
    shutil.copy(REPO / ".gitignore", project / ".gitignore")
    run(project, "git", "add", "-A")
    run(project, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "base")  # a commit verify finds
    # one torch thread, as a study's -j 2 trainings run: verify must re-execute on the same count
    first = run(project, sys.executable, "-m", "ctclab", "run", env=ONE_THREAD)
    return project, first


def test_make_run_goes_fetch_to_submit_and_prints_the_summary(repro):
    project, first = repro
    for stage in ("fetch", "preprocess", "train", "evaluate", "submit"):
        assert f"Running stage '{stage}'" in first.stdout
    summary = first.stdout.split("ctclab summary")[1]
    assert "16 train, 4 dev, 4 test utterances" in summary
    assert "dev Levenshtein greedy" in summary and "beam(4)" in summary and "PER" in summary
    assert "submission/submission.csv (4 rows)" in summary
    ev = json.loads((project / "metrics/eval.json").read_text())
    assert set(ev) == {"dev_lev_greedy", "dev_lev_beam", "dev_per_beam", "dev_per_greedy", "beam_width"}
    rows = list(csv.reader(open(project / "submission/submission.csv")))
    assert rows[0] == ["id", "predictions"] and [r[0] for r in rows[1:]] == ["0", "1", "2", "3"]
    # evaluate and submit logged into the training's run
    run_id = tracking.open_store(f"sqlite:///{project / 'mlflow.db'}", project).checkpoint_run(project / "models/best.pt")
    assert f"MLflow run {run_id}" in summary
    r = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}").get_run(run_id)
    assert "eval_dev_lev_beam" in r.data.metrics and "decode_beam_utterances_per_second" in r.data.metrics
    assert r.data.tags["decode.beam_width"] == "4"
    paths = {a.path for a in mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}").list_artifacts(run_id, "submission")}
    assert paths == {"submission/submission.csv"}


def stages_run(out: str) -> list[str]:
    return re.findall(r"^Running stage '([^']+)'", out, flags=re.M)


def stale(project) -> set[str]:
    """The stages `dvc status` lists (validate is always among them: it is always_changed)."""
    status = run(project, sys.executable, "-m", "dvc", "status").stdout
    return {line.strip().rstrip(":") for line in status.splitlines() if line and not line.startswith("\t")}


def test_second_repro_runs_only_the_params_check(repro):
    project, _ = repro
    out = run(project, sys.executable, "-m", "dvc", "repro").stdout
    assert stages_run(out) == ["validate"], out
    assert all(f"Stage '{s}' didn't change, skipping" in out for s in ("fetch", "preprocess", "train", "evaluate", "submit"))


@pytest.mark.parametrize("edit, line", [
    (("train", "sheduler", "cosine"), "params.yaml: unknown key train.sheduler; expected one of epochs"),
    (("train", "lr", -0.5), "params.yaml: train.lr = -0.5, expected greater than 0"),
    (("model", "arch", "lstmm"), "params.yaml: model.arch = 'lstmm', expected one of"),
])
def test_a_bad_params_yaml_stops_every_repro_before_any_stage_even_when_all_is_cached(repro, edit, line):
    project, _ = repro
    original = (project / "params.yaml").read_text()
    set_param(project, *edit)
    try:
        for cmd in (("dvc", "repro"), ("ctclab", "run"), ("dvc", "repro", "submit")):
            r = run(project, sys.executable, "-m", *cmd, check=False)
            assert r.returncode != 0 and stages_run(r.stdout) == ["validate"], (cmd, r.stdout, r.stderr)
            ours = [x for x in (r.stdout + r.stderr).splitlines() if x.startswith("ctclab: error:")]
            assert len(ours) == 1 and line in ours[0], (cmd, r.stdout, r.stderr)
            assert "Traceback" not in r.stdout + r.stderr
    finally:
        (project / "params.yaml").write_text(original)
    # nothing else was touched: fixed, the next repro checks the file again and has nothing else to do
    assert stages_run(run(project, sys.executable, "-m", "dvc", "repro").stdout) == ["validate"]


def test_a_dvc_remote_gives_a_fresh_clone_everything_without_recomputing(repro, tmp_path):
    """Team mode: data, models and the run cache pushed to a DVC remote (a local folder here; S3 or
    MinIO the same way), a fresh clone pulls and `dvc repro` has nothing to do."""
    project, _ = repro
    remote, clone = tmp_path / "remote", tmp_path / "clone"
    run(project, sys.executable, "-m", "dvc", "remote", "add", "-d", "team", str(remote))
    commit(project, "dvc.lock and the team's remote")  # what a team commits after `dvc repro`
    pushed = run(project, sys.executable, "-m", "dvc", "push", "--run-cache")
    assert (remote / "runs").is_dir()  # the run cache: another clone's `dvc repro`/`dvc exp` can restore from it
    run(tmp_path, "git", "clone", "-q", str(project), str(clone))
    pulled = run(clone, sys.executable, "-m", "dvc", "pull", "--run-cache")
    again = run(clone, sys.executable, "-m", "dvc", "repro")
    print(pushed.stdout, pulled.stdout, again.stdout, sep="\n")  # the closing note quotes these
    assert stages_run(again.stdout) == ["validate"], again.stdout
    for out in ("models/best.pt", "data/processed/meta.json", "submission/submission.csv", "metrics/eval.json"):
        assert (clone / out).read_bytes() == (project / out).read_bytes(), out


def test_verify_reexecutes_the_run_and_says_match(repro):
    project, _ = repro
    run_id = tracking.open_store(f"sqlite:///{project / 'mlflow.db'}", project).checkpoint_run(project / "models/best.pt")
    out = run(project, sys.executable, "-m", "ctclab", "verify", run_id)
    assert out.stdout.splitlines() == ["same hardware: bit-identical expected", "packages as recorded",
                                       "MATCH (8 checks)"], out.stdout
    # the run trained on 1 thread; this machine would give verify more, unless it pins the recorded count
    assert f"verify: run {run_id} (commit " in out.stderr and "re-executing train → evaluate" in out.stderr
    assert "on 1 torch thread(s), as recorded" in out.stderr
    progress = [l for l in out.stderr.splitlines() if l.startswith("verify: ") and "…" in l or l.startswith("verify:   ")]
    assert progress[0] == "verify: train …" and "verify: evaluate …" in progress, out.stderr  # it says what runs
    assert sum(l.startswith("verify:   epoch ") for l in progress) == 2, out.stderr  # each epoch as it ends
    assert run(project, "git", "worktree", "list").stdout.count("\n") == 1  # the temporary worktree is gone
    # a commit this repository lacks: one line, exit 2, nothing re-executed
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    commit = client.get_run(run_id).data.tags["mlflow.source.git.commit"]
    client.set_tag(run_id, "mlflow.source.git.commit", "f" * 40)
    try:
        bad = run(project, sys.executable, "-m", "ctclab", "verify", run_id, check=False)
    finally:
        client.set_tag(run_id, "mlflow.source.git.commit", commit)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "commit ffffffffffff, which this repository" in bad.stderr


def test_a_clean_rerun_gives_identical_outs(repro, tmp_path):
    """Same params, data and code from a clean directory: every hash in dvc.lock is the same (the
    MLflow run id is not an out; evaluate finds the run by the checkpoint's bytes)."""
    project, _ = repro
    again = make_project(tmp_path / "again")
    run(again, sys.executable, "-m", "dvc", "repro", env=ONE_THREAD)  # the thread count the first one had
    first, second = (yaml.safe_load((p / "dvc.lock").read_text())["stages"] for p in (project, again))
    outs = {name: [(o["path"], o["md5"]) for o in stage.get("outs", [])] for name, stage in first.items()}
    assert outs == {name: [(o["path"], o["md5"]) for o in stage.get("outs", [])] for name, stage in second.items()}
    assert set(outs) == {"validate", "fetch", "preprocess", "train", "evaluate", "submit"} and outs["train"]


def set_param(project, section, key, value):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params[section][key] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_keys_that_cannot_change_outputs_leave_dvc_status_clean(repro):
    project, _ = repro
    original = (project / "params.yaml").read_text()
    set_param(project, "decode", "workers", 2)
    set_param(project, "tracking", "uri", f"sqlite:///{project / 'elsewhere.db'}")
    set_param(project, "train", "resume", "never")
    set_param(project, "train", "checkpoint_minutes", 1)
    set_param(project, "data", "synthetic", {**yaml.safe_load(original)["data"]["synthetic"], "workers": 2})
    try:
        assert stale(project) == {"validate"}
    finally:
        (project / "params.yaml").write_text(original)


def test_ctclab_run_passes_flags_to_dvc_repro(repro):
    project, _ = repro
    out = run(project, sys.executable, "-m", "ctclab", "run", "-f", "-s", "evaluate").stdout
    assert "Running stage 'evaluate'" in out and "Running stage 'train'" not in out
    summary = out.split("ctclab summary")[1]
    assert "stage      evaluate" in summary
    # files this run did not make or confirm are marked, not passed off as its results
    lines = {line.split()[0]: line for line in summary.splitlines() if line.strip()}
    assert lines["train"].endswith("[not from this run: its stage did not run]")
    assert lines["submission"].endswith("[not from this run: its stage did not run]")
    assert "not from this run" not in lines["evaluate"]


def test_changing_only_beam_width_reruns_evaluate_and_submit_but_not_train(repro):
    project, _ = repro
    set_param(project, "decode", "beam_width", 2)
    assert stale(project) == {"validate", "evaluate", "submit"}
    out = run(project, sys.executable, "-m", "dvc", "repro").stdout
    assert "Stage 'train' didn't change, skipping" in out
    assert "Running stage 'evaluate'" in out and "Running stage 'submit'" in out
    assert json.loads((project / "metrics/eval.json").read_text())["beam_width"] == 2


def test_predict_with_the_logged_model_reproduces_the_submission(repro):
    project, _ = repro
    run_id = tracking.open_store(f"sqlite:///{project / 'mlflow.db'}", project).checkpoint_run(project / "models/best.pt")
    [logged] = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}").get_run(run_id).outputs.model_outputs
    out = run(project, sys.executable, "-m", "ctclab", "predict", "--model", f"models:/{logged.model_id}", "--mfcc",
              "data/raw").stdout
    assert out == (project / "submission/submission.csv").read_text()
    by_run = tracking.open_store(f"sqlite:///{project / 'mlflow.db'}", project).load_model(f"runs:/{run_id}/model")
    beam = yaml.safe_load((project / "params.yaml").read_text())["decode"]["beam_width"]
    assert submission.predict(by_run, project / "data/raw", beam, 1) == out  # the same model through its run
    bad = run(project, sys.executable, "-m", "ctclab", "predict", "--model", "models:/nope@champion", "--mfcc",
              "data/raw", check=False)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "--model models:/nope@champion" in bad.stderr


def test_mlflow_models_serve_answers_with_the_logged_model_and_no_pickle(repro):
    """`mlflow models serve` as the README shows it, pickled models refused: the same log-probs as in-process."""
    import requests

    project, _ = repro
    uri = f"sqlite:///{project / 'mlflow.db'}"
    run_id = tracking.open_store(uri, project).checkpoint_run(project / "models/best.pt")
    [logged] = mlflow.MlflowClient(uri).get_run(run_id).outputs.model_outputs
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{logged.model_id}",
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"], cwd=project,
                              env=env({"MLFLOW_TRACKING_URI": uri, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while server.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=5).ok:
                    break
            time.sleep(0.2)
        assert server.poll() is None, server.stderr.read()[-3000:]
        x = torch.randn(2, 30, 13)
        answer = requests.post(f"http://127.0.0.1:{port}/invocations", json={"inputs": x.tolist()}, timeout=60)
        assert answer.ok, answer.text
        local = tracking.open_store(uri, project).load_model(f"models:/{logged.model_id}")
        torch.testing.assert_close(torch.tensor(answer.json()["predictions"]), local(x))
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.communicate(timeout=60)


def test_a_stage_run_by_another_python_says_so_in_one_line(tmp_path):
    project = make_project(tmp_path / "p", git=False)
    other = sys._base_executable  # the Python the venv was made from: no ctclab there
    r = run(project, other, *stage_command(project, "train")[1:], check=False)
    assert r.returncode == 1 and r.stdout == "", r.stderr
    [line] = r.stderr.strip().splitlines()
    assert line.startswith(f"train.py: ctclab is not importable by {other}; ") and "/.venv/bin/activate" in line


USER_ARCH = '''"""A user's own architecture, as a user would add it: this file and nothing else."""
import torch
from torch import nn

from ctclab.config import ArchConfig
from ctclab.models import CTCModel, register


class FrameMLPConfig(ArchConfig):
    hidden: int = 24


@register("frame_mlp", FrameMLPConfig)
class FrameMLP(CTCModel):
    """Each frame on its own: Linear → GELU → Linear (no context, no downsampling)."""

    def __init__(self, cfg: FrameMLPConfig, input_dim: int, num_classes: int):
        super().__init__(cfg, input_dim, num_classes)
        self.net = nn.Sequential(nn.Linear(input_dim, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, num_classes))

    def output_lengths(self, lengths):
        return lengths

    def forward(self, x, lengths):
        return torch.log_softmax(self.net(x).float(), dim=-1), lengths
'''


def test_a_new_architecture_is_one_file_and_runs_through_dvc(repro, tmp_path):
    """Drop a module into src/ctclab/archs, `dvc exp run -S model.arch=<its name>`: DVC sees the
    folder change, trains and evaluates it; MLflow and the checkpoint record its own knobs."""
    project = tmp_path / "own"
    shutil.copytree(repro[0], project, symlinks=True)
    (project / "src/ctclab/archs/frame_mlp.py").write_text(USER_ARCH)
    # no PYTHONPATH: each stage imports the ctclab beside its script (pipeline/_environment.py), not the
    # one the venv installed (the repository's), as a queued experiment runs its own commit's code
    out = run(project, sys.executable, "-m", "dvc", "exp", "run", "-S", "model.arch=frame_mlp").stdout
    assert "Running stage 'train'" in out and "Running stage 'evaluate'" in out
    assert "Running stage 'fetch'" not in out and "Running stage 'preprocess'" not in out
    ckpt = torch.load(project / "models/best.pt", weights_only=True)
    assert ckpt["model_spec"]["arch"] == "frame_mlp" and ckpt["model_spec"]["config"] == {"hidden": 24}
    run_id = tracking.open_store(f"sqlite:///{project / 'mlflow.db'}", project).checkpoint_run(project / "models/best.pt")
    r = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}").get_run(run_id)
    assert r.data.params["model.arch"] == "frame_mlp" and r.data.params["model.frame_mlp.hidden"] == "24"
    assert "eval_dev_lev_beam" in r.data.metrics and "dev_lev_beam" in json.loads((project / "metrics/eval.json").read_text())
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]["train"]
    assert "src/ctclab/archs" in {d["path"] for d in lock["deps"]}
    assert lock["params"]["params.yaml"]["model"]["arch"] == "frame_mlp"


USER_DECODER = '''"""A user's own decoder, as a user would add it: this file and nothing else."""
from contextlib import nullcontext

from ctclab.decode import greedy, register_decoder


def best_path_twice(log_probs, lengths):
    return greedy(log_probs, lengths)


@register_decoder("best_path")
def open_best_path(cfg):
    return nullcontext(best_path_twice)
'''


def test_a_new_decoder_is_one_file_and_evaluate_scores_it(repro, tmp_path):
    """Drop a module into src/ctclab/decoders, `dvc repro`: evaluate (and only evaluate) runs again
    and the decoder's scores are in metrics/eval.json and the training's MLflow run."""
    project = tmp_path / "own"
    shutil.copytree(repro[0], project, symlinks=True)
    run(project, sys.executable, "-m", "dvc", "repro")  # whatever earlier tests left changed
    (project / "src/ctclab/decoders/best_path.py").write_text(USER_DECODER)
    out = run(project, sys.executable, "-m", "dvc", "repro").stdout
    assert "Running stage 'evaluate'" in out and "Running stage 'train'" not in out and "Running stage 'submit'" not in out
    ev = json.loads((project / "metrics/eval.json").read_text())
    assert ev["dev_lev_best_path"] == ev["dev_lev_greedy"] and ev["dev_per_best_path"] == ev["dev_per_greedy"]
    run_id = tracking.open_store(f"sqlite:///{project / 'mlflow.db'}", project).checkpoint_run(project / "models/best.pt")
    metrics = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}").get_run(run_id).data.metrics
    assert metrics["eval_dev_lev_best_path"] == ev["dev_lev_greedy"]
    assert "decode_best_path_utterances_per_second" in metrics


def interrupt_when(project, cmd: list[str], ready, sig: int) -> tuple[int, str, list[str]]:
    """Start `cmd` in a session of its own, and once `ready(process)` holds send `sig` to its whole
    process group, as a terminal's Ctrl-C does (SIGINT), or to the process alone (SIGTERM, as
    `kill` or a scheduler does). Returns (exit code, stderr, processes of it still alive)."""
    import psutil

    # SIGINT at its default, as under a terminal, also when the tests run as a background job (which ignores it)
    proc = subprocess.Popen(cmd, cwd=project, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    me = psutil.Process(proc.pid)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline and not ready(me):
        time.sleep(0.01)
    assert proc.poll() is None, f"{cmd} ended before it could be interrupted:\n{proc.stderr.read()[-2000:]}"
    family = [me, *me.children(recursive=True)]
    os.killpg(proc.pid, sig) if sig == signal.SIGINT else proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    _, alive = psutil.wait_procs(family, timeout=30)
    return proc.returncode, err, [str(p.pid) for p in alive]


def workers_busy(n: int):
    """At least n worker processes started: those the forkserver (a child, beside multiprocessing's
    resource tracker) forked."""
    import psutil

    def ready(p) -> bool:
        try:
            return len([c for c in p.children(recursive=True) if c.ppid() != p.pid]) >= n
        except psutil.Error:  # a process that ended meanwhile
            return False
    return ready


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_fetch_interrupted_with_corpus_workers_leaves_nothing(repro, sig):
    project, _ = repro
    out = project / "data" / f"raw-interrupted-{sig.name}"
    cmd = [*stage_command(project, "fetch")[:2], "--out", str(out)]
    partial = out.with_name(out.name + ".partial")
    code, err, alive = interrupt_when(project, cmd, lambda p: workers_busy(1)(p) and any(partial.rglob("*.npy")), sig)
    assert code == 128 + sig and alive == [], (code, err, alive)
    assert err.strip().splitlines()[-1] == (f"ctclab: fetch: stopped by {signal_name(sig)}; outputs not finished were "
                                            "removed, finished ones kept") and "Traceback" not in err, err
    assert not out.exists() and not partial.exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_evaluate_interrupted_with_decode_workers_leaves_nothing(repro, sig):
    project, _ = repro
    original = (project / "params.yaml").read_text()
    set_param(project, "decode", "workers", 2)
    metrics = project / "metrics" / f"interrupted-{sig.name}"
    try:
        cmd = [*stage_command(project, "evaluate")[:2], "--data", "data/processed", "--models", "models",
               "--metrics", str(metrics)]
        code, err, alive = interrupt_when(project, cmd, workers_busy(2), sig)
    finally:
        (project / "params.yaml").write_text(original)
    assert code == 128 + sig and alive == [], (code, err, alive)
    assert err.strip().splitlines()[-1] == (f"ctclab: evaluate: stopped by {signal_name(sig)}; outputs not finished "
                                            "were removed, finished ones kept") and "Traceback" not in err, err
    assert not (metrics / "eval.json").exists()


def test_preprocess_interrupted_removes_its_half_written_out(repro, tmp_path, monkeypatch):
    from ctclab import data
    from ctclab.config import load_params

    project, _ = repro
    written = []

    def stop_after_first_split(out, *args):
        if written:
            raise KeyboardInterrupt
        written.append(real(out, *args))
    real = data._write_shard
    monkeypatch.setattr(data, "_write_shard", stop_after_first_split)
    with pytest.raises(KeyboardInterrupt):
        data.preprocess(project / "data/raw", tmp_path / "processed", load_params(project / "params.yaml").features)
    assert written and not (tmp_path / "processed").exists()


def test_verify_interrupted_mid_training_removes_its_worktree_and_leaves_no_process(repro):
    import psutil

    project, _ = repro
    run_id = tracking.open_store(f"sqlite:///{project / 'mlflow.db'}", project).checkpoint_run(project / "models/best.pt")

    def training(p) -> bool:
        try:
            return any("pipeline/train.py" in " ".join(c.cmdline()) for c in p.children(recursive=True))
        except psutil.Error:
            return False
    code, err, alive = interrupt_when(project, [sys.executable, "-m", "ctclab", "verify", run_id], training, signal.SIGINT)
    assert code == 130 and alive == [], (code, err, alive)
    assert err.strip().splitlines()[-1] == ("ctclab: verify: stopped by Ctrl-C (SIGINT); outputs not finished were "
                                            "removed, finished ones kept") and "Traceback" not in err, err
    assert run(project, "git", "worktree", "list").stdout.count("\n") == 1
