"""Shards of random features in ctclab.data's file format, with LibriSpeech-like lengths, for the
benchmarks (nothing to download, no corpus to generate).

Lengths: `train_clean_100_lengths` is ~N(1270, 370) frames clipped to [150, 2450] (train-clean-100's
mean ~12.7 s at 10 ms); `lognormal_lengths` has the same mean and a spread set by sigma. Labels:
about one per 8.5 frames (HW3P2's ratio), drawn from 1..40; features: 13 standard-normal dims.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ctclab import storage
from ctclab.data import Shard

FRAMES_PER_LABEL = 8.5


def train_clean_100_lengths(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(1270, 370, n), 150, 2450).astype(np.int64)


def lognormal_lengths(n: int, sigma: float, seed: int, mean: float = 1270) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(mean) - sigma ** 2 / 2, sigma, n), 150, 3300).astype(np.int64)


def write_shard(folder: Path, frames: np.ndarray, seed: int, dim: int = 13) -> Shard:
    """A shard with these utterance lengths; written once: a folder that holds one already is read.
    ids.json goes last, so a folder cut short by an interrupt is written again."""
    folder = Path(folder)
    if (folder / "ids.json").is_file():
        return Shard(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_labels = np.maximum(1, (frames / FRAMES_PER_LABEL * rng.uniform(0.85, 1.15, len(frames)))).astype(np.int64)
    features = np.lib.format.open_memmap(folder / "features.npy", "w+", np.float32, (int(frames.sum()), dim))
    for start in range(0, len(features), 1 << 22):  # in slices: train-clean-100's size is 1.9 GB
        features[start:start + (1 << 22)] = rng.standard_normal((len(features[start:start + (1 << 22)]), dim),
                                                                 dtype=np.float32)
    features.flush()
    del features
    np.save(folder / "frame_offsets.npy", np.concatenate([[0], np.cumsum(frames)]).astype(np.int64))
    np.save(folder / "labels.npy", rng.integers(1, 41, int(n_labels.sum())).astype(np.int16))
    np.save(folder / "label_offsets.npy", np.concatenate([[0], np.cumsum(n_labels)]).astype(np.int64))
    storage.write_text(folder / "ids.json", json.dumps([f"utt{i:05d}" for i in range(len(frames))]))
    return Shard(folder)
