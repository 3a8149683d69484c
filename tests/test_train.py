"""Training: each architecture end to end, MLflow records, determinism, kill-and-resume."""
import json
import signal
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from ctclab import tracking
from ctclab.batching import bucket_batches
from ctclab.checkpoint import RESUME_DIR
from ctclab.errors import CtclabError
from ctclab.inference import load_checkpoint, load_model
from ctclab.models import architectures
from project import interrupt_training, merge, project_with_data, run_train, stage_command


@pytest.mark.parametrize("arch", sorted(architectures()))
def test_each_architecture_trains_an_epoch_and_is_tracked(tmp_path, processed, arch, monkeypatch):
    project = project_with_data(tmp_path, processed, {"model": {"arch": arch}, "train": {"epochs": 1}})
    result = run_train(project)
    assert (project / "models/best.pt").is_file() and (project / "models/last.pt").is_file()
    metrics = json.loads((project / "metrics/train.json").read_text())
    assert metrics["epochs"] == 1 and metrics["dev_per"] >= 0 and metrics["parameters"] > 0
    ckpt = load_checkpoint(project / "models/last.pt")
    assert ckpt["model_spec"]["arch"] == arch and ckpt["model_spec"]["schema_version"] == 2 and ckpt["epoch"] == 1
    assert {"optimizer", "scheduler", "scaler", "rng", "best", "history"} <= set(ckpt)

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["ctclab"], output_format="list")
    assert [r.info.run_id for r in runs] == [result["mlflow_run_id"]]
    run = runs[0]
    assert run.data.params["model.arch"] == arch and run.data.params["train.batch_size"] == "4"
    # the params of the architecture that ran, as params.yaml names them; no other architecture's
    section = {f"model.{arch}.{k}" for k in ckpt["model_spec"]["config"] if k != "dropout"}
    assert "data.synthetic.seed" in run.data.params and section <= set(run.data.params)
    assert not any(k.startswith("model.") and k != "model.arch" and not k.startswith(f"model.{arch}.")
                   for k in run.data.params)
    for m in ("train_loss", "dev_loss", "dev_lev_greedy", "lr", "epoch_seconds", "utterances_per_second",
              "cpu_share", "host_load_1m", "train_cpu_share"):
        assert m in run.data.metrics
    assert 0 < run.data.metrics["train_cpu_share"] <= 1.05  # process CPU ÷ (wall × threads)
    tags = run.data.tags
    assert tags["device"] == "cpu" and tags["torch_version"] == torch.__version__
    assert tags["data_hash"] == json.loads((project / "data/processed/meta.json").read_text())["data_hash"]
    assert {"mlflow.source.git.commit", "git_dirty", "cudnn_version", "cuda_version", "host"} <= set(tags)
    assert tags["ctclab_schema"] == "2"
    hidden = run.data.params.get(f"model.{arch}.hidden")
    assert run.info.run_name == (f"{arch}-h{hidden}-s0" if hidden else f"{arch}-s0")
    meta = json.loads((project / "data/processed/meta.json").read_text())
    [data] = run.inputs.dataset_inputs  # the Dataset column: which data this run saw
    assert data.dataset.name == "ctclab-synthetic" and data.dataset.digest == meta["data_hash"][:12]
    assert json.loads(data.dataset.profile)["utterances"] == meta["utterances"]
    assert {t.key: t.value for t in data.tags} == {"mlflow.data.context": "training"}
    # the best checkpoint as an MLflow model: loads by URI, raw MFCC in, the checkpoint's log-probs out
    [logged] = run.outputs.model_outputs
    recognizer = tracking.open_store(f"sqlite:///{project / 'mlflow.db'}", project).load_model(f"models:/{logged.model_id}")
    best = load_model(project / "models/best.pt")
    x = torch.randn(2, 40, 13)
    normalised = (x - x.mean(1, keepdim=True)) / (x.std(1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(recognizer(x), best(normalised, torch.tensor([40, 40]))[0], rtol=0, atol=0)
    # as `mlflow models serve` calls it, with pickled models refused: nothing in the model is unpickled
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    served = mlflow.pyfunc.load_model(f"models:/{logged.model_id}")
    torch.testing.assert_close(torch.from_numpy(served.predict(x.numpy())), recognizer(x))  # float32 rounding
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{logged.model_id}", dst_path=str(tmp_path / "model")))
    files = {str(f.relative_to(local)) for f in local.rglob("*") if f.is_file() and not f.match("code/*")}
    assert "data/recognizer.pt" in files and not {f for f in files if f.endswith((".pkl", ".pth"))}, files
    info = mlflow.models.get_model_info(f"models:/{logged.model_id}")
    assert info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, -1, 13)
    assert info.metadata["features"] == {"normalize": "utterance"}
    client = mlflow.MlflowClient()
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert artifacts == {"checkpoints/best.pt", "checkpoints/last.pt"}
    assert client.list_artifacts(run.info.run_id, "environment")[0].path == "environment/pip-freeze.txt"
    assert (project / "mlartifacts").is_dir()  # artifacts land beside the store, not in the cwd
    history = client.get_metric_history(run.info.run_id, "dev_lev_greedy")
    assert [h.step for h in history] == [1]


def test_bucketed_batches_are_reproducible_and_cover_everything():
    lengths = np.random.default_rng(0).integers(50, 500, 103)
    a, b = bucket_batches(lengths, 8, seed=1, epoch=3), bucket_batches(lengths, 8, seed=1, epoch=3)
    assert all((x == y).all() for x, y in zip(a, b))
    assert sorted(np.concatenate(a).tolist()) == list(range(103))
    assert not all((x == y).all() for x, y in zip(a, bucket_batches(lengths, 8, seed=1, epoch=4)))
    spread = np.mean([np.ptp(lengths[x]) for x in a])
    assert spread < 0.25 * np.ptp(lengths)  # similar lengths share a batch


@pytest.mark.parametrize("scheduler", ["cosine", "none"])
def test_warmup_ramps_the_lr_to_its_value_then_hands_over_to_the_scheduler(scheduler):
    from ctclab.config import load_params, with_overrides
    from ctclab.trainer import make_scheduler

    cfg = with_overrides(load_params(), {"train.epochs": 4, "train.warmup_epochs": 2, "train.scheduler": scheduler,
                                         "train.lr": 1e-3}).train
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched, lrs = make_scheduler(opt, cfg, steps_per_epoch=5), []
    for _ in range(20):  # 4 epochs of 5 batches, stepped once a batch as Trainer.step does
        lrs.append(opt.param_groups[0]["lr"])
        opt.step(), sched.step()
    ramp, rest = np.array(lrs[:11]), np.array(lrs[10:])
    np.testing.assert_allclose(ramp, 1e-3 * np.linspace(0.1, 1, 11))  # lr/10 … lr, straight, over 10 batches
    if scheduler == "none":
        np.testing.assert_allclose(rest, 1e-3)
    else:  # cosine over the 10 batches left, from the full lr
        np.testing.assert_allclose(rest, 1e-3 * (1 + np.cos(np.pi * np.arange(10) / 10)) / 2)


def state(project):
    return load_checkpoint(project / "models/last.pt")["model"]


def test_rerun_is_bit_identical_on_cpu(tmp_path, processed):
    over = {"train": {"epochs": 2, "specaugment": {"time_masks": 2, "freq_masks": 1}}}
    a = project_with_data(tmp_path / "a", processed, over)
    b = project_with_data(tmp_path / "b", processed, over)
    run_train(a), run_train(b)
    assert (a / "metrics/train.json").read_bytes() == (b / "metrics/train.json").read_bytes()
    assert (a / "metrics/train_history.csv").read_bytes() == (b / "metrics/train_history.csv").read_bytes()
    sa, sb = state(a), state(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# warmup 1: the stop falls inside the lr ramp, and the resumed run crosses into cosine
STOPPED = {"train": {"epochs": 3, "batch_size": 2, "warmup_epochs": 1, "specaugment": {"time_masks": 1}},
           "model": {"conv_lstm": {"hidden": 32}}}


@pytest.fixture(scope="module")
def uninterrupted(processed, tmp_path_factory):
    reference = project_with_data(tmp_path_factory.mktemp("uninterrupted"), processed, STOPPED)
    run_train(reference)
    return reference


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_training_stopped_mid_epoch_resumes_to_the_same_weights_in_the_same_run(tmp_path, processed, uninterrupted, sig):
    # checkpoint_minutes tiny: a resume checkpoint after every batch (it cannot change the result)
    over, reference = STOPPED, uninterrupted
    project = project_with_data(tmp_path / "stopped", processed, merge(over, {"train": {"checkpoint_minutes": 1e-6}}))
    code, err, where = interrupt_training(project, sig)
    assert where["batch"] > 0 and not (project / "metrics/train.json").exists()
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    if sig == signal.SIGINT:  # a clean stop: one line, the shell's exit code, the run marked KILLED
        assert code == 130, err
        last = err.strip().splitlines()[-1]
        assert last.startswith("ctclab: train: stopped by Ctrl-C (SIGINT) in epoch ") and "next `dvc repro` continues" in last
        assert "Traceback" not in err
        [killed] = mlflow.search_runs(experiment_names=["ctclab"], output_format="list")
        assert killed.info.status == "KILLED"

    result = run_train(project)
    sr, sk = state(reference), state(project)
    assert all(torch.equal(sr[k], sk[k]) for k in sr)
    assert (reference / "metrics/train.json").read_bytes() == (project / "metrics/train.json").read_bytes()
    # the partial epoch's loss was restored, not restarted: every epoch's train loss, in the CSV and in MLflow
    assert (reference / "metrics/train_history.csv").read_bytes() == (project / "metrics/train_history.csv").read_bytes()
    assert logged_train_loss(project) == logged_train_loss(reference)
    assert not list((project / RESUME_DIR).glob("*.pt"))  # cleaned up once finished
    runs = mlflow.search_runs(experiment_names=["ctclab"], output_format="list")
    assert len(runs) == 1 and runs[0].info.run_id == result["mlflow_run_id"] and runs[0].info.status == "FINISHED"
    steps = [h.step for h in mlflow.MlflowClient().get_metric_history(runs[0].info.run_id, "dev_lev_greedy")]
    assert steps == [1, 2, 3]  # each epoch logged exactly once


def logged_train_loss(project) -> list[tuple[int, float]]:
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("ctclab").experiment_id])
    return [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train_loss")]


def test_changed_params_do_not_resume_a_stale_checkpoint(tmp_path, processed):
    project = project_with_data(tmp_path, processed, {"train": {"epochs": 1}})
    (project / RESUME_DIR).mkdir(parents=True)
    (project / RESUME_DIR / "0000000000000000.pt").write_bytes(b"stale")  # another fingerprint
    run_train(project)
    assert (project / RESUME_DIR / "0000000000000000.pt").exists()


def test_resume_never_ignores_an_interrupted_run_and_auto_takes_it_up(tmp_path, processed, monkeypatch):
    from ctclab import checkpoint

    project = project_with_data(tmp_path, processed, {"train": {"epochs": 1}})
    monkeypatch.setattr(checkpoint, "clear", lambda path: None)  # leave the resume slot as a kill would
    first = run_train(project)["mlflow_run_id"]
    assert len(list((project / RESUME_DIR).glob("*.pt"))) == 1

    params = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(params.replace("resume: auto", "resume: never"))
    fresh = run_train(project)["mlflow_run_id"]
    (project / "params.yaml").write_text(params)
    resumed = run_train(project)["mlflow_run_id"]
    # never: a new run from scratch (which leaves its own slot behind); auto: takes that slot's run up
    assert fresh != first and resumed == fresh
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    assert len(mlflow.search_runs(experiment_names=["ctclab"], output_format="list")) == 2


def test_progress_in_a_log_is_not_a_line_per_batch(tmp_path, processed):
    """Piped (not a terminal), the bar refreshes at most every 30 s: a couple of lines per epoch."""
    from project import stage

    project = project_with_data(tmp_path, processed, {"train": {"epochs": 1, "batch_size": 1}})
    err = stage(project, "train").stderr
    bars = [piece for piece in err.replace("\r", "\n").splitlines() if "batch" in piece and "epoch " in piece]
    assert 1 <= len(bars) <= 3, err  # 16 batches in the epoch


def test_a_non_finite_loss_stops_in_one_line_naming_epoch_batches_and_utterances(tmp_path, processed):
    from project import stage

    project = project_with_data(tmp_path, processed, {"train": {"epochs": 3, "lr": 1e8, "grad_clip": 1e12}})
    r = stage(project, "train", check=False)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert last.startswith("ctclab: error: epoch ") and ": non-finite CTC loss in batch" in last and "(utterances " in last
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    [failed] = mlflow.search_runs(experiment_names=["ctclab"], output_format="list")
    assert failed.info.status == "FAILED"


def test_an_mlflow_server_that_does_not_answer_is_one_line_before_training(tmp_path, processed):
    import time

    from project import free_port, stage

    port = free_port()  # a port nobody listens on
    project = project_with_data(tmp_path, processed, {"tracking": {"uri": f"http://127.0.0.1:{port}"}})
    t0 = time.monotonic()
    r = stage(project, "train", check=False)
    assert time.monotonic() - t0 < 30  # the stage process, imports included; the 10 s check itself: tests/test_tracking.py
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"tracking.uri http://127.0.0.1:{port}: no MLflow server answers there (ConnectionError)" in r.stderr
    assert not (project / "models/last.pt").exists()  # nothing trained


def test_micro_batches_accumulate_the_whole_batch_gradient(processed):
    from ctclab import models
    from ctclab.batching import collate
    from ctclab.data import Shard
    from ctclab.trainer import Trainer
    from project import config, model_config

    torch.manual_seed(0)
    model = models.build(model_config(hidden=16, embed_dim=16), 13).eval()  # eval: no dropout, BatchNorm fixed
    batch = collate(Shard(processed / "train"), [0, 3, 5, 7, 9])
    trainer = Trainer(model, config("train", oom="split", device="cpu"), torch.device("cpu"), steps_per_epoch=1)
    whole = trainer.gradients(batch, per_rank=5)
    grads = [p.grad.clone() for p in model.parameters()]

    calls = []
    real_forward = models.FrontBodyHead.forward

    def small_memory(self, x, lengths):  # a device that holds at most 2 utterances
        calls.append(len(x))
        if len(x) > 2:
            raise torch.OutOfMemoryError("injected")
        return real_forward(self, x, lengths)

    trainer.optimizer.zero_grad()
    models.FrontBodyHead.forward = small_memory
    try:
        split = trainer.gradients(batch, per_rank=5)
    finally:
        models.FrontBodyHead.forward = real_forward
    assert calls == [5, 3, 2, 2, 1]  # 5 fails, 3 fails, then micro-batches of ≤ 2
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-6)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def test_out_of_memory_splits_or_stops_in_one_line(tmp_path, processed, monkeypatch, capsys):
    from ctclab import models

    real_forward = models.FrontBodyHead.forward

    def small_memory(self, x, lengths):
        if self.training and len(x) > 2:
            raise torch.OutOfMemoryError("injected")
        return real_forward(self, x, lengths)

    monkeypatch.setattr(models.FrontBodyHead, "forward", small_memory)
    project = project_with_data(tmp_path / "split", processed, {"train": {"epochs": 1, "batch_size": 4}})
    assert run_train(project)["epochs"] == 1
    err = capsys.readouterr().err
    assert "train: out of memory on a batch of 4 utterances (longest " in err
    assert "retrying as micro-batches of ≤ 2 with accumulated gradients (same effective batch)" in err

    stop = project_with_data(tmp_path / "fail", processed, {"train": {"epochs": 1, "batch_size": 4, "oom": "fail"}})
    with pytest.raises(CtclabError) as e:
        run_train(stop)
    assert str(e.value).startswith("train: out of memory on a batch of 4 utterances (longest ")
    assert "parameters); lower train.batch_size" in str(e.value) and "\n" not in str(e.value)


def test_a_tracking_server_lost_mid_training_loses_nothing(tmp_path, processed):
    """A real `mlflow server`, stopped after the first epoch: training goes on, stops at the end in
    one line with everything kept; with the server back, a rerun logs every epoch exactly once."""
    import subprocess
    import sys
    import time

    from project import MlflowServer, env, stage

    server = MlflowServer(tmp_path)
    uri = server.uri
    project = project_with_data(tmp_path / "p", processed, {"train": {"epochs": 3}, "tracking": {"uri": uri}})
    fast_failing = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}  # the user's setting is kept; no waiting in a test
    server.start()
    try:
        train = subprocess.Popen(stage_command(project, "train"), cwd=project, env=env(fast_failing),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        while not list((project / RESUME_DIR).glob("*.json")) and train.poll() is None:
            time.sleep(0.02)
    finally:
        server.stop()
    _, err = train.communicate(timeout=600)
    assert train.returncode == 2, err
    assert f"tracking: {uri} unreachable" in err and err.count(f"tracking: {uri} unreachable") == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("ctclab: error: train: finished all 3 epochs, but the tracking store") and "run `dvc repro` again" in last
    assert (project / "models/best.pt").is_file() and list((project / RESUME_DIR).glob("*.pt"))

    with server:
        stage(project, "train", env=fast_failing)
        client = mlflow.MlflowClient(uri)
        [run] = client.search_runs([client.get_experiment_by_name("ctclab").experiment_id])
        assert run.info.status == "FINISHED" and "checkpoint_sha256" in run.data.tags
        assert [m.step for m in client.get_metric_history(run.info.run_id, "dev_lev_greedy")] == [1, 2, 3]
