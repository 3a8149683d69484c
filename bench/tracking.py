"""Tracking overhead benchmark: epoch time of a short training with MLflow tracking off vs on,
into a sqlite store and into a local `mlflow server` (started by this script on 127.0.0.1, a free
port, sqlite backend; always stopped). An epoch is --steps `Trainer.step`s (ctclab's own training
step) of the params.yaml model (A3 conv_lstm) and train section on length-bucketed batches of
data/processed/train plus a dev evaluation (loss + greedy distance), then, when tracking is on, the per-epoch metrics dict that ctclab's training
logs, through ctclab.tracking (training_run(...).log_metrics). Synthetic shards stand in when
data/processed is missing.

Side by side: for each store, one training run is opened, and two models from the same initial
weights train on the same batches, their steps (and dev evals) alternated, so a slow spell of a
shared machine hits both; only the "on" one logs, at each epoch's end. Which of the two goes first
swaps every epoch (going first costs a few %), so --epochs should be even. off/on = total off
seconds / total on seconds. Timed: each epoch, its log_metrics call
included. Not timed: starting the run (training_run(): experiment lookup, params, tags, the
`pip freeze` artifact) and ending it; that one-off cost is printed separately. Stores, artifacts
and the server live in a temp folder; nothing goes into the project's mlflow.db.

    .venv/bin/python bench/tracking.py                     # 6 epochs of 16 steps, per store
    .venv/bin/python bench/tracking.py --epochs 10 --steps 40
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

from ctclab import models, provenance, tracking
from ctclab.batching import bucket_batches, collate
from ctclab.config import flatten, load_params
from ctclab.data import Shard
from ctclab.inference import device_name, evaluate_split
from ctclab.metrics import score
from ctclab.results import EPOCH_DECODER, EpochClock, EpochRow
from ctclab.trainer import Trainer

from synthetic import lognormal_lengths, write_shard  # bench/synthetic.py, next to this script

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


def compare(uri: str, params, train, dev, init_state, args, tmp: Path, data_hash: str) -> dict:
    """--epochs epochs with tracking off and on, inside one training run in store `uri`, the two
    models' steps alternated; seconds per epoch, per log call, and run start + end."""
    off, on = (Bench(params, train, dev, init_state, args.steps) for _ in range(2))
    logged = {k: v for k, v in flatten(params).items() if k.split(".")[0] in ("data", "features", "model", "train", "tracking")}
    tags = {**provenance.tags(tmp, data_hash, "cpu", device_name(torch.device("cpu"))),
            "parameter_count": models.parameter_count(on.trainer.model)}
    times = {"off": [], "on": [], "log": []}
    t0 = time.perf_counter()
    run = tracking.open_store(uri, tmp).training_run("bench-tracking", None, logged, tags, "bench")
    one_off = time.perf_counter() - t0
    with run:
        for epoch in range(args.epochs):
            pair = {"off": off.epoch(epoch), "on": on.epoch(epoch)}  # going first is a bit slower: swap each epoch
            seconds, metrics = interleaved(pair if epoch % 2 == 0 else dict(reversed(pair.items())))
            t0 = time.perf_counter()
            run.log_metrics(metrics["on"], step=epoch + 1)
            times["log"].append(time.perf_counter() - t0)
            times["off"].append(seconds["off"])
            times["on"].append(seconds["on"] + times["log"][-1])
        t0 = time.perf_counter()
    return {**times, "one_off": one_off + time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--steps", type=int, default=16, help="training steps per epoch")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    params = load_params("params.yaml")

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        train, dev, data_hash, what = shards(tmp)
        init_state = models.build(params.model, train.feature_dim).state_dict()
        print(f"{params.model.arch} on {what}: epochs of {args.steps} steps of batch {params.train.batch_size} "
              f"+ dev eval ({len(dev)} utterances), {torch.get_num_threads()} CPU threads\n")
        interleaved({"warm-up": Bench(params, train, dev, init_state, steps=2).epoch(0)})
        with mlflow_server(tmp) as server_url:
            results = {store: compare(uri, params, train, dev, init_state, args, tmp, data_hash)
                       for store, uri in (("sqlite", f"sqlite:///{tmp}/mlflow.db"), ("mlflow server", server_url))}

    print(f"{'store':<15}{'epochs':>8}{'off s/epoch':>13}{'on s/epoch':>12}{'log ms/epoch':>14}{'off/on':>8}"
          f"{'run start+end s':>17}")
    ratios = {}
    for store, r in results.items():
        ratios[store] = sum(r["off"]) / sum(r["on"])
        print(f"{store:<15}{args.epochs:>8}{np.mean(r['off']):>13.3f}{np.mean(r['on']):>12.3f}"
              f"{1000 * np.mean(r['log']):>14.1f}{ratios[store]:>8.3f}{r['one_off']:>17.2f}")
    print(f"\ntracking: {min(ratios.values()):.2f}x (goal >= 0.98x)")
    sys.exit(0 if min(ratios.values()) >= 0.98 else 1)  # a regression fails the run


if __name__ == "__main__":
    main()
