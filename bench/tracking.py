"""Tracking overhead benchmark: a short training with MLflow tracking off vs on, into a sqlite store
and into a local `mlflow server` (started by this script on 127.0.0.1, a free port, sqlite backend,
artifacts proxied through it; always stopped). An epoch is --steps `Trainer.step`s (ctclab's own
training step) of the params.yaml model (A3 conv_lstm) and train section on length-bucketed batches
of data/processed/train plus a dev evaluation (loss + greedy distance). Synthetic shards stand in
when data/processed is missing.

"On" pays everything ctclab's tracking costs a training: opening its run (experiment lookup,
params, tags, the `pip freeze` artifact), the per-epoch metrics (ctclab's TIMING included) through
ctclab.tracking at each epoch's end, and at the end what ctclab.train.write_outputs sends — both
checkpoints (the full training state) as artifacts and the model as an MLflow logged model — and
closing the run. Short epochs make that the worst case: with a default training's ~15 s epochs
the share is smaller still.

Side by side: per store, two models from the same initial weights train on the same batches, their
steps (and dev evals) alternated, so a slow spell of a shared machine hits both; only the "on" one
is tracked. Which of the two goes first swaps every epoch (going first costs a few %), so --epochs
should be even. off/on = the off training's seconds / the on training's seconds with every tracking
call in them; the last line gives the worse store's. `--slower 10` makes each tracking call take
10× as long (it sleeps the difference): the goal is set so that such a logger misses it. The
stores, artifacts and the server live in a temp folder; nothing goes into the project's mlflow.db.

    .venv/bin/python bench/tracking.py                     # 6 epochs of 16 steps, per store
    .venv/bin/python bench/tracking.py --slower 10         # a 10x slower logger: exits 1
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np
import psutil
import torch

from ctclab import checkpoint, models, provenance, tracking
from ctclab.batching import bucket_batches, collate
from ctclab.config import flatten, load_params
from ctclab.data import Shard
from ctclab.inference import device_name, evaluate_split
from ctclab.metrics import score
from ctclab.results import EPOCH_DECODER, EpochClock, EpochRow
from ctclab.trainer import Trainer

from goal import add_goal, finish  # bench/goal.py, next to this script
from synthetic import lognormal_lengths, write_shard

# off/on over a whole training; calibrated in bench/logs/tracking-*.log (README: Benchmarks)
GOAL = 0.75

os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"  # only ever talk to this machine
os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"  # the "View run at" lines, at run end


def server_cpu(pid: int, seconds: float) -> float:
    """CPU seconds the process tree under `pid` uses in the next `seconds`."""
    def total():
        cpu = 0.0
        for p in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
            with suppress(psutil.Error):  # a child that just exited
                cpu += sum(p.cpu_times()[:2])
        return cpu
    before = total()
    time.sleep(seconds)
    return total() - before


@contextmanager
def mlflow_server(tmp: Path):
    """A local `mlflow server` on a free port, stopped (its whole process group) on exit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{tmp}/server.db", "--default-artifact-root",
                             str(tmp / "art")], cwd=tmp, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"mlflow server did not start:\n{(tmp / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)
        # /health answers before the server's huey job consumers have finished starting (several CPU
        # seconds each); wait until the whole process tree is idle before timing anything.
        while time.time() < deadline and server_cpu(proc.pid, 1.0) > 0.05:
            pass
        yield url
    finally:
        import psutil

        # every descendant, also one that left the group (MLflow starts job subprocesses in new sessions)
        family = psutil.Process(proc.pid).children(recursive=True)
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(15)
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group is still there
        proc.wait()
        for survivor in psutil.wait_procs(family, timeout=15)[1]:
            with suppress(psutil.Error):
                survivor.kill()
        log.close()


def shards(tmp: Path) -> tuple[Shard, Shard, str, str]:
    data = Path("data/processed")
    if (data / "train/ids.json").is_file() and (data / "dev/ids.json").is_file():
        meta = data / "meta.json"
        data_hash = json.loads(meta.read_text())["data_hash"] if meta.is_file() else "unknown"
        return Shard(data / "train"), Shard(data / "dev"), data_hash, "data/processed"
    train = write_shard(tmp / "train", lognormal_lengths(600, 0.3, seed=0, mean=300), seed=0)
    dev = write_shard(tmp / "dev", lognormal_lengths(60, 0.3, seed=1, mean=300), seed=1)
    return train, dev, "synthetic", "synthetic shards (data/processed missing)"


class Bench:
    """A model from the shared initial weights in ctclab's own Trainer; one epoch = --steps
    `Trainer.step`s + a dev eval."""

    def __init__(self, params, train: Shard, dev: Shard, init_state: dict, steps: int):
        self.params, self.train, self.dev, self.steps = params, train, dev, steps
        model = models.build(params.model, train.feature_dim)
        model.load_state_dict(init_state)
        self.trainer, self.refs = Trainer(model, params.train, torch.device("cpu"), steps), dev.references()

    def epoch(self, epoch: int):
        """Yields after each step and after the dev eval; returns the metrics dict ctclab's training
        logs per epoch (its seconds are wall time, the other model's steps included)."""
        t0, bs, model = time.perf_counter(), self.params.train.batch_size, self.trainer.model
        clock = EpochClock(torch.get_num_threads())
        model.train()
        loss_sum, seen = 0.0, 0
        for indices in bucket_batches(self.train.frames(), bs, self.params.train.seed, epoch)[:self.steps]:
            loss_sum, seen = loss_sum + self.trainer.step(collate(self.train, indices)).item(), seen + len(indices)
            yield
        train_seconds = time.perf_counter() - t0
        dev_loss, hyps, _ = evaluate_split(model, self.dev, 2 * bs, torch.device("cpu"))
        s = score(hyps[EPOCH_DECODER], self.refs)
        yield
        row = EpochRow(epoch + 1, loss_sum / seen, dev_loss, s.mean_distance, s.per,
                       self.trainer.optimizer.param_groups[0]["lr"])
        return {**row.values(), **clock.timing(seen, train_seconds)}


def interleaved(epochs: dict) -> tuple[dict, dict]:
    """Run the epochs' steps in turn; each one's seconds and metrics."""
    seconds, metrics = dict.fromkeys(epochs, 0.0), {}
    while len(metrics) < len(epochs):
        for name, steps in epochs.items():
            if name not in metrics:
                t0 = time.perf_counter()
                try:
                    next(steps)
                except StopIteration as done:
                    metrics[name] = done.value
                seconds[name] += time.perf_counter() - t0
    return seconds, metrics


class Tracked:
    """Times ctclab's tracking calls; `slower` > 1 makes each take that many times as long (it
    sleeps the extra), to show which goal a slower logger would miss."""

    def __init__(self, slower: float):
        self.slower, self.seconds = slower, {"start": 0.0, "log": [], "end": 0.0}

    @contextmanager
    def timing(self, what: str):
        t0 = time.perf_counter()
        yield
        took = time.perf_counter() - t0
        time.sleep((self.slower - 1) * took)
        took *= self.slower
        if what == "log":
            self.seconds["log"].append(took)
        else:
            self.seconds[what] += took


def upload_at_end(run: tracking.RunLog, bench: Bench, tmp: Path) -> None:
    """What ctclab's training sends when it ends (ctclab.train.write_outputs): the best and last
    checkpoints (full training state) as artifacts, and the model as an MLflow logged model."""
    model = bench.trainer.model
    for name in ("best.pt", "last.pt"):
        run.log_artifact(tmp / name, "checkpoints")
    run.log_model(models.Recognizer(model, "utterance", None), {"features": {"normalize": "utterance"}},
                  model.input_dim, model.num_classes)


def compare(uri: str, params, train, dev, init_state, args, tmp: Path, data_hash: str) -> dict:
    """--epochs epochs with tracking off and on, the two models' steps alternated; "on" also pays
    everything ctclab's tracking costs a training: starting its run, the per-epoch log calls, and
    at the end the checkpoint and logged-model uploads. Seconds of each."""
    off, on = (Bench(params, train, dev, init_state, args.steps) for _ in range(2))
    logged = {k: v for k, v in flatten(params).items() if k.split(".")[0] in ("data", "features", "model", "train", "tracking")}
    tags = {**provenance.tags(tmp, data_hash, "cpu", device_name(torch.device("cpu"))),
            "parameter_count": models.parameter_count(on.trainer.model)}
    epochs, tracked = {"off": [], "on": []}, Tracked(args.slower)
    store = tracking.open_store(uri, tmp)
    store.experiment_id("bench-tracking")  # the store and its tables exist before a training (made once per store)
    with tracked.timing("start"):
        run = store.training_run("bench-tracking", None, logged, tags, "bench")
    with run:
        for epoch in range(args.epochs):
            pair = {"off": off.epoch(epoch), "on": on.epoch(epoch)}  # going first is a bit slower: swap each epoch
            seconds, metrics = interleaved(pair if epoch % 2 == 0 else dict(reversed(pair.items())))
            with tracked.timing("log"):
                run.log_metrics(metrics["on"], step=epoch + 1)
            for name in epochs:
                epochs[name].append(seconds[name])
        # the checkpoints are written with tracking off too: not timed
        checkpoint.write_epoch(on.trainer.state(checkpoint.Progress()), tmp, tmp / "resume.pt", True, run.run_id)
        with tracked.timing("end"):
            upload_at_end(run, on, tmp)
            run.end("FINISHED")
    return {**epochs, **tracked.seconds}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--steps", type=int, default=16, help="training steps per epoch")
    ap.add_argument("--slower", type=float, default=1.0,
                    help="make every tracking call this many times slower (a slower logger, to check the goal)")
    add_goal(ap, GOAL)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    params = load_params("params.yaml")

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        train, dev, data_hash, what = shards(tmp)
        init_state = models.build(params.model, train.feature_dim).state_dict()
        print(f"{params.model.arch} on {what}: epochs of {args.steps} steps of batch {params.train.batch_size} "
              f"+ dev eval ({len(dev)} utterances), {torch.get_num_threads()} CPU threads"
              f"{f'; every tracking call made {args.slower:g}x slower' if args.slower != 1 else ''}\n")
        interleaved({"warm-up": Bench(params, train, dev, init_state, steps=2).epoch(0)})
        with mlflow_server(tmp) as server_url:
            results = {store: compare(uri, params, train, dev, init_state, args, tmp, data_hash)
                       for store, uri in (("sqlite", f"sqlite:///{tmp}/mlflow.db"), ("mlflow server", server_url))}

    print(f"{'store':<15}{'epochs':>7}{'off s/epoch':>12}{'on s/epoch':>11}{'log ms/epoch':>13}{'run start s':>12}"
          f"{'uploads+end s':>14}{'off/on':>8}")
    ratios = {}
    for store, r in results.items():
        on = sum(r["on"]) + sum(r["log"]) + r["start"] + r["end"]
        ratios[store] = sum(r["off"]) / on
        print(f"{store:<15}{args.epochs:>7}{np.mean(r['off']):>12.3f}{np.mean(r['on']):>11.3f}"
              f"{1000 * np.mean(r['log']):>13.1f}{r['start']:>12.2f}{r['end']:>14.2f}{ratios[store]:>8.3f}")
    print()
    worst = min(ratios, key=ratios.get)
    finish("tracking", ratios[worst], args.goal, f"{worst}, a whole {args.epochs}-epoch training with vs without")


if __name__ == "__main__":
    main()
