"""Tracking overhead benchmark: epoch time of a short training-like loop with MLflow tracking off,
into a sqlite store, and into a local `mlflow server` (that this script starts on 127.0.0.1 with a
free port and a sqlite backend, and always stops). Every configuration does identical work from the
same initial weights: per epoch, --steps Adam steps of the params.yaml model (A3 conv_lstm) on
length-bucketed batches of data/processed/train, then a dev evaluation (loss + greedy distance),
then, when tracking is on, the per-epoch metrics dict that ctclab's training logs, through
ctclab.tracking (training_run(...).log_metrics). Without data/processed, synthetic shards stand in.

Timed: each epoch, including its log_metrics call. Not timed: starting the run (training_run():
experiment lookup, params, tags, the `pip freeze` artifact) and ending it; that one-off cost is
printed separately. The configurations run in rounds (A B C, C B A, A B C, ...); each epoch's time
is the best over the rounds, as a shared machine only ever slows an epoch down, never speeds it up.
Stores, artifacts and the server live in a temp folder; nothing is logged into the project's store.

    .venv/bin/python bench/tracking.py                       # 3 epochs x 16 steps, best of 3 rounds
    .venv/bin/python bench/tracking.py --epochs 5 --steps 40
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
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch

from ctclab import models, tracking
from ctclab.batching import bucket_batches, collate
from ctclab.config import flatten, load_params
from ctclab.data import Shard
from ctclab.inference import device_name, evaluate_split
from ctclab.metrics import score

from loader import synthetic_shard  # bench/loader.py, next to this script

os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"  # only ever talk to this machine
os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"  # the "View run at" lines, at run end


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
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"mlflow server did not start:\n{(tmp / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def shards(tmp: Path) -> tuple[Shard, Shard, str, str]:
    data = Path("data/processed")
    if (data / "train/ids.json").is_file() and (data / "dev/ids.json").is_file():
        meta = data / "meta.json"
        data_hash = json.loads(meta.read_text())["data_hash"] if meta.is_file() else "unknown"
        return Shard(data / "train"), Shard(data / "dev"), data_hash, "data/processed"
    train = synthetic_shard(tmp / "train", 600, 0.3, seed=0, mean=300)
    dev = synthetic_shard(tmp / "dev", 60, 0.3, seed=1, mean=300)
    return train, dev, "synthetic", "synthetic shards (data/processed missing)"


def run_config(uri, params, train, dev, init_state, args, tmp: Path, data_hash: str) -> dict:
    """Train --epochs epochs from the initial weights; per-epoch seconds, log seconds, one-off seconds."""
    torch.manual_seed(0)
    model = models.build(params.model, train.feature_dim)
    model.load_state_dict(init_state)
    opt = torch.optim.Adam(model.parameters(), lr=params.train.lr)
    ctc, refs, bs = torch.nn.CTCLoss(blank=0), dev.references(), params.train.batch_size
    t0 = time.perf_counter()
    if uri:
        logged = {k: v for k, v in flatten(params).items() if k.split(".")[0] in ("data", "features", "model", "train", "tracking")}
        tags = {**tracking.provenance_tags(tmp, data_hash, "cpu", device_name(torch.device("cpu"))),
                "parameter_count": models.parameter_count(model)}
        run = tracking.training_run(uri, "bench-tracking", tmp, None, logged, tags)
    else:
        run = nullcontext()
    out = {"epochs": [], "log": [], "one_off": time.perf_counter() - t0}
    with run:
        for epoch in range(args.epochs):
            t0 = time.perf_counter()
            model.train()
            for indices in bucket_batches(train.frames(), bs, params.train.seed, epoch)[:args.steps]:
                batch = collate(train, indices)
                log_probs, out_lengths = model(batch.features, batch.lengths)
                loss = ctc(log_probs.transpose(0, 1), batch.targets, out_lengths, batch.target_lengths)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), params.train.grad_clip)
                opt.step()
            train_seconds = time.perf_counter() - t0
            dev_loss, hyps, _ = evaluate_split(model, dev, 2 * bs, torch.device("cpu"))
            s = score(hyps["greedy"], refs)
            metrics = {"train_loss": loss.item(), "dev_loss": dev_loss, "dev_lev_greedy": s.mean_distance,
                       "dev_per": s.per, "lr": opt.param_groups[0]["lr"], "epoch_seconds": time.perf_counter() - t0,
                       "utterances_per_second": args.steps * bs / train_seconds}
            t_log = time.perf_counter()
            if uri:
                run.log_metrics(metrics, step=epoch + 1)
            out["log"].append(time.perf_counter() - t_log)
            out["epochs"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
    out["one_off"] += time.perf_counter() - t0  # ending the run
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=16, help="training steps per epoch")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    params = load_params("params.yaml")

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        train, dev, data_hash, what = shards(tmp)
        init_state = models.build(params.model, train.feature_dim).state_dict()
        print(f"{params.model.arch} on {what}: {args.epochs} epochs x {args.steps} steps of batch "
              f"{params.train.batch_size} + dev eval ({len(dev)} utterances), best of {args.rounds} rounds, "
              f"{torch.get_num_threads()} CPU threads\n")
        results = {"off": [], "sqlite": [], "mlflow server": []}
        with mlflow_server(tmp) as server_url:
            uris = {"off": "", "sqlite": f"sqlite:///{tmp}/mlflow.db", "mlflow server": server_url}
            run_config("", params, train, dev, init_state, argparse.Namespace(epochs=1, steps=2), tmp, data_hash)  # warm-up
            for r in range(args.rounds):
                for name in (list(uris) if r % 2 == 0 else list(uris)[::-1]):
                    results[name].append(run_config(uris[name], params, train, dev, init_state, args, tmp, data_hash))

    def per_epoch(name, key):  # best over rounds for each epoch, averaged over the epochs
        return float(np.mean(np.min([res[key] for res in results[name]], axis=0)))

    off = per_epoch("off", "epochs")
    print(f"{'tracking':<15}{'s/epoch':>9}{'log ms/epoch':>14}{'off/on':>8}{'run start+end s':>17}")
    ratios = {}
    for name in results:
        ratios[name] = off / per_epoch(name, "epochs")
        one_off = min(res["one_off"] for res in results[name]) if name != "off" else 0.0
        print(f"{name:<15}{per_epoch(name, 'epochs'):>9.3f}{1000 * per_epoch(name, 'log'):>14.1f}"
              f"{ratios[name]:>8.3f}{one_off:>17.2f}")
    print(f"\ntracking: {min(ratios['sqlite'], ratios['mlflow server']):.2f}x (goal >= 0.98x)")


if __name__ == "__main__":
    main()
