"""Loader benchmark: training throughput (real frames/s through ctclab's own `Trainer.step` —
forward, CTC loss, backward, grad clip, optimizer and scheduler step of the params.yaml model and
train section, A3 conv_lstm by default) with length-bucketed
batches (ctclab.batching.bucket_batches) vs naive shuffled batches (a seeded permutation cut into
batches of the same size, each padded to its longest utterance: the original homework's loader).
Both pass over the same utterances once, each with its own copy of the same initial weights, on
the CPU, their steps alternated (so a slow spell of a shared machine hits both); collate is inside
the timing. Also prints the padding fraction (padded frames / frames in the padded tensors).

The data is a synthetic shard (bench/synthetic.py: random 13-dim features, random labels 1..40,
about frames/8.5 of them) written to a temp folder, with lengths drawn from a lognormal of mean ~1,270 frames (the
mean of LibriSpeech train-clean-100) clipped to [150, 3300]; --sigma sets the spread (real
train-clean-100 is narrower than the default: sigma ~0.3), and the gain grows with it.

    .venv/bin/python bench/loader.py                          # 300 utterances, batch 16, sigma 0.5
    .venv/bin/python bench/loader.py --sigma 0.3 --hidden 64  # narrower spread, smaller model
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ctclab import models
from ctclab.batching import bucket_batches, collate
from ctclab.config import load_params, with_overrides
from ctclab.data import Shard
from ctclab.trainer import Trainer

from goal import add_goal, finish  # bench/goal.py, next to this script
from synthetic import lognormal_lengths, write_shard


def naive_batches(n: int, batch_size: int, seed: int) -> list[np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


class Timed:
    """One loader's ctclab Trainer (from the shared initial weights), stepped batch by batch, with
    collate inside the timing."""

    def __init__(self, params, input_dim: int, init_state: dict, steps_per_epoch: int):
        model = models.build(params.model, input_dim)
        model.load_state_dict(init_state)
        model.train()
        self.trainer = Trainer(model, params.train, torch.device("cpu"), steps_per_epoch)
        self.seconds, self.padded = 0.0, 0

    def step(self, shard: Shard, indices) -> None:
        t0 = time.perf_counter()
        batch = collate(shard, indices)
        self.trainer.step(batch)
        self.seconds += time.perf_counter() - t0
        self.padded += batch.features.shape[0] * batch.features.shape[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--utterances", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=None, help="model.<arch>.hidden (default: params.yaml's)")
    ap.add_argument("--sigma", type=float, default=0.5, help="lognormal spread of the utterance lengths")
    add_goal(ap, 2.0)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    params = load_params("params.yaml")
    if args.hidden:
        params = with_overrides(params, {f"model.{params.model.arch}.hidden": args.hidden})

    with tempfile.TemporaryDirectory() as tmp:
        shard = write_shard(Path(tmp), lognormal_lengths(args.utterances, args.sigma, seed=0), seed=0)
        frames = shard.frames()
        init_state = models.build(params.model, shard.feature_dim).state_dict()
        loaders = {"naive shuffled": naive_batches(len(shard), args.batch_size, seed=0),
                   "bucketed": bucket_batches(frames, args.batch_size, seed=0, epoch=0)}
        trainers = {name: Timed(params, shard.feature_dim, init_state, len(b)) for name, b in loaders.items()}
        print(f"{params.model.arch} (hidden {params.model.active.hidden}, "
              f"{models.parameter_count(trainers['bucketed'].trainer.model):,} parameters), {len(shard)} synthetic utterances, "
              f"frames mean {frames.mean():.0f} / min {frames.min()} / max {frames.max()}, batch {args.batch_size}, "
              f"{torch.get_num_threads()} CPU threads\n")
        Timed(params, shard.feature_dim, init_state, 1).step(shard, np.argsort(frames)[-args.batch_size:])  # warm-up
        torch.manual_seed(0)
        # Alternate the two loaders' steps, so a slow spell of the machine hits both alike, and swap
        # which goes first every step (going first is a few % slower).
        for step in range(max(len(b) for b in loaders.values())):
            for name in list(loaders)[::1 if step % 2 == 0 else -1]:
                if step < len(loaders[name]):
                    trainers[name].step(shard, loaders[name][step])

    print(f"{'loader':<16}{'batches':>9}{'padding %':>11}{'seconds':>10}{'frames/s':>11}")
    speed = {}
    for name, t in trainers.items():
        speed[name] = frames.sum() / t.seconds
        print(f"{name:<16}{len(loaders[name]):>9}{1 - frames.sum() / t.padded:>11.1%}{t.seconds:>10.1f}{speed[name]:>11.0f}")
    ratio = speed["bucketed"] / speed["naive shuffled"]
    print()
    finish("loader", ratio, args.goal)


if __name__ == "__main__":
    main()
