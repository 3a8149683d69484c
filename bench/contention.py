"""A CPU training beside another busy process: the default training's epoch time alone and beside
one CPU-bound process (`while True: pass`), under ctclab's thread policy (ctclab.threads: a stage
takes the CPUs other processes leave free) and under today's fixed count (every CPU), side by side
in one run.

    python bench/contention.py                         # the default corpus (data/processed), 2 epochs each
    python bench/contention.py --synthetic 48 --epochs 1   # random features instead (no corpus needed)

Each measurement is a fresh process (OpenMP reads its settings when torch starts) that trains
params.yaml's configuration from seed 0 with ctclab's Trainer for --epochs epochs, settling its
threads exactly as a pipeline stage does; the busy process starts a second before it, so the
policy can see it. Each round measures today alone, the policy alone and the policy beside the
busy process, in alternating order (`today`: torch's default thread count, every CPU, which each
stage took before the policy); the first also today beside the busy process, for reference.

The last line is `contention: <policy beside / policy alone>x (goal <= 1.5x; …)`, exit 1 above
the goal, or when the policy alone is over 5 % slower than today alone, or trains on another
thread count or to other losses than today alone (the default numbers must not change).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from goal import add_goal, finish  # bench/goal.py, next to this script

REPO = Path(__file__).resolve().parents[1]
GOAL = 1.5
ALONE_SLACK = 1.05  # the policy alone may be at most this much slower than today alone


def child(data: Path, epochs: int) -> None:
    """One measurement: settle threads as a stage does, then train; prints one JSON line."""
    from ctclab import threads

    reason = threads.settle()
    import torch

    from ctclab import models
    from ctclab.config import load_params
    from ctclab.data import Shard
    from ctclab.train import TrainData, seed_everything, trainable
    from ctclab.trainer import Trainer

    params = load_params(REPO / "params.yaml")
    cpu = torch.device("cpu")
    seed_everything(params.train.seed, cpu)
    train_set, dev_set = Shard(data / "train"), Shard(data / "dev")
    model = models.build(params.model, train_set.feature_dim)
    train_idx, _ = trainable(train_set, dev_set, model, data)
    batches = TrainData(train_set, dev_set, [], train_idx).batches
    trainer = Trainer(model, params.train, cpu, len(batches(params.train, 0, 1)))
    seconds, losses = [], []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        loss, _ = trainer.epoch(train_set, batches(params.train, epoch, 1))
        seconds.append(time.perf_counter() - t0)
        losses.append(loss.hex())  # every bit: the default numbers must not change
    print(json.dumps({"threads": torch.get_num_threads(), "reason": reason, "seconds": seconds, "losses": losses}))


def measure(data: Path, epochs: int, policy: bool, busy: bool) -> dict:
    """One fresh training process, under the policy or today's fixed count, alone or beside a busy process."""
    from ctclab import threads

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", threads.REASON_ENV)}
    if not policy:  # decided beforehand, as no stage did before the policy: torch's default, every CPU
        env[threads.REASON_ENV] = "today: torch's default"
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        if hog:
            time.sleep(1)  # running before the training starts, as a busy machine would be
        r = subprocess.run([sys.executable, __file__, "--child", "--data", str(data), "--epochs", str(epochs)],
                           env=env, capture_output=True, text=True)
    finally:
        if hog:
            hog.kill()
            hog.wait()
    if r.returncode:
        sys.exit(f"contention: a training failed ({r.returncode}): {r.stderr.strip().splitlines()[-1:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def synthetic_data(folder: Path, utterances: int) -> Path:
    """Random features with the default corpus's lengths (~210 frames), train and a quarter as many dev."""
    from synthetic import lognormal_lengths, write_shard

    for split, n, seed in (("train", utterances, 0), ("dev", max(2, utterances // 4), 1)):
        write_shard(folder / split, lognormal_lengths(n, 0.3, seed, mean=211), seed)
    return folder


def arguments() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=REPO / "data" / "processed",
                    help="a preprocessed dataset folder (default: the default corpus, `dvc repro preprocess`)")
    ap.add_argument("--synthetic", type=int, metavar="N", help="train on N random utterances instead of --data")
    ap.add_argument("--shards", type=Path, default=Path("/tmp/ctclab-bench-shards"), help="where --synthetic writes")
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs per measurement")
    ap.add_argument("--rounds", type=int, default=2,
                    help="measurements of each case, in alternating order (their epochs are averaged)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    add_goal(ap, GOAL, at_most=True)
    return ap.parse_args()


def main() -> None:
    args = arguments()
    if args.child:
        return child(args.data, args.epochs)
    data = synthetic_data(args.shards / f"contention-{args.synthetic}", args.synthetic) if args.synthetic else args.data
    if not (data / "train" / "ids.json").is_file():
        sys.exit(f"contention: {data / 'train'}: no preprocessed shard; run `dvc repro preprocess` first "
                 "(or pass --synthetic N)")
    runs = {}
    for round_ in range(args.rounds):
        # today beside the busy process is the slow one (3-4x) and only a reference: measured once
        cases = ((False, False), (True, False), (True, True)) + (((False, True),) if round_ == 0 else ())
        for policy, busy in cases if round_ % 2 == 0 else reversed(cases):
            name = f"{'policy' if policy else 'today'} {'beside a busy process' if busy else 'alone'}"
            r = measure(data, args.epochs, policy, busy)
            print(f"{name:>30}: {np.mean(r['seconds']):6.2f} s/epoch on {r['threads']} thread(s) "
                  f"({r['reason']}); epochs {', '.join(f'{s:.2f}' for s in r['seconds'])}", flush=True)
            if (policy, busy) in runs:
                if r["losses"] != runs[policy, busy]["losses"]:
                    sys.exit(f"contention: {name} trained to other losses in round {round_ + 1}")
                r["seconds"] = runs[policy, busy]["seconds"] + r["seconds"]
            runs[policy, busy] = r
    alone, beside, today = (np.mean(runs[k]["seconds"]) for k in ((True, False), (True, True), (False, False)))
    same = runs[True, False]["losses"] == runs[False, False]["losses"] \
        and runs[True, False]["threads"] == runs[False, False]["threads"]
    print(f"policy alone vs today alone: {alone / today:.3f}x the time (at most {ALONE_SLACK}x), "
          f"{'the same' if same else 'DIFFERENT'} thread count and losses")
    today_beside = runs[False, True]
    finish("contention", beside / alone, args.goal,
           f"{alone:.1f} s/epoch alone, {beside:.1f} s beside one busy process on {runs[True, True]['threads']} "
           f"thread(s); today's fixed {today_beside['threads']} threads: {np.mean(today_beside['seconds']):.1f} s "
           f"beside it, {np.mean(today_beside['seconds']) / today:.2f}x", checks_passed=same and alone <= ALONE_SLACK * today,
           at_most=True)


if __name__ == "__main__":
    main()
