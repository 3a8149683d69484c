"""Batches from a shard: which utterances CTC can align, length-bucketed seeded batch order, and
padding into tensors. Shared by training and inference (pure: arrays in, tensors out)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .data import Shard


def ctc_min_frames(labels: np.ndarray) -> int:
    """Fewest output frames CTC needs: one per label plus a blank between equal neighbours."""
    return int(len(labels) + np.sum(labels[1:] == labels[:-1])) if len(labels) else 0


def feasible(shard: Shard, output_lengths: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray:
    """Which utterances have enough output frames (after the model's downsampling) for their labels."""
    out = output_lengths(torch.as_tensor(shard.frames())).numpy()
    need = np.array([ctc_min_frames(shard.label(i)) for i in range(len(shard))])
    return out >= need


def bucket_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Similar lengths together (less padding), batch order shuffled; reproducible per (seed, epoch)."""
    rng = np.random.default_rng([seed, epoch])
    jitter = rng.uniform(0, 0.1 * max(1.0, float(np.median(lengths))), len(lengths))
    order = np.argsort(lengths + jitter, kind="stable")
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


@dataclass
class Batch:
    features: torch.Tensor  # [B, T, D]
    lengths: torch.Tensor   # [B]
    targets: torch.Tensor   # concatenated label indices
    target_lengths: torch.Tensor
    labels: list[list[int]]

    def to(self, device: torch.device) -> "Batch":
        pin = device.type == "cuda"
        move = (lambda t: t.pin_memory().to(device, non_blocking=True)) if pin else (lambda t: t.to(device))
        return Batch(move(self.features), move(self.lengths), move(self.targets), move(self.target_lengths), self.labels)


def collate(shard: Shard, indices) -> Batch:
    items = [shard.item(int(i)) for i in indices]
    lengths = torch.tensor([len(x) for x, _ in items])
    feats = torch.zeros(len(items), int(lengths.max()), shard.feature_dim)
    for k, (x, _) in enumerate(items):
        feats[k, : len(x)] = torch.as_tensor(np.array(x))
    labels = [y.tolist() for _, y in items]
    targets = torch.from_numpy(np.concatenate([y for _, y in items])) if items else torch.zeros(0, dtype=torch.long)
    return Batch(feats, lengths, targets.long(), torch.tensor([len(y) for y in labels]), labels)
