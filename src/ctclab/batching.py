"""Batches from a shard: which utterances CTC can align, length-bucketed seeded batch order,
padding into tensors, and SpecAugment on them. Shared by training and inference (pure: arrays in,
tensors out)."""
from __future__ import annotations

import dataclasses
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


def bucket_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int, min_size: int = 1) -> list[np.ndarray]:
    """Similar lengths together (less padding), batch order shuffled; reproducible per (seed, epoch).
    A last bucket smaller than `min_size` (the DDP world size: every rank needs a share) joins the one before.
    Each epoch sorts the lengths plus a seeded jitter of up to 10 % of the median, so that batches
    mix differently every epoch; above 64 utterances per batch the jitter shrinks as 64/batch_size,
    since a larger batch already spans more of the lengths: padding on train-clean-100's lengths
    stays at 2-3 % for batches of 256-1024 (it would be 5-7 % with the full jitter)."""
    rng = np.random.default_rng([seed, epoch])
    width = 0.1 * min(1.0, 64 / batch_size) * max(1.0, float(np.median(lengths)))
    jitter = rng.uniform(0, width, len(lengths))
    order = np.argsort(lengths + jitter, kind="stable")
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if len(batches) > 1 and len(batches[-1]) < min_size:
        batches[-2:] = [np.concatenate(batches[-2:])]
    return [batches[i] for i in rng.permutation(len(batches))]


@dataclass
class Batch:
    features: torch.Tensor  # [B, T, D]
    lengths: torch.Tensor   # [B], always on the CPU (packing and CTC read them there)
    targets: torch.Tensor   # concatenated label indices
    target_lengths: torch.Tensor  # [B], always on the CPU
    labels: list[list[int]]

    def pin_memory(self) -> "Batch":
        """Called by the DataLoader's pin-memory thread on CUDA."""
        return Batch(self.features.pin_memory(), self.lengths, self.targets.pin_memory(), self.target_lengths,
                     self.labels)

    def to(self, device: torch.device) -> "Batch":
        """Features and targets to `device` (asynchronously from pinned memory); lengths stay."""
        if device.type == "cpu":
            return self
        return Batch(self.features.to(device, non_blocking=True), self.lengths,
                     self.targets.to(device, non_blocking=True), self.target_lengths, self.labels)


    def chunks(self, size: int) -> list["Batch"]:
        """Consecutive micro-batches of at most `size` utterances, padded as in the whole batch (the
        conv front end lets padding reach the frames next to it, so trimming it would change them)."""
        ends = torch.cumsum(self.target_lengths, 0).tolist()
        out = []
        for i in range(0, len(self.labels), size):
            j = min(i + size, len(self.labels))
            start, stop = (ends[i - 1] if i else 0), ends[j - 1]
            out.append(Batch(self.features[i:j], self.lengths[i:j],
                             self.targets[start:stop], self.target_lengths[i:j], self.labels[i:j]))
        return out


def spec_augment(batch: Batch, cfg, gen: torch.Generator) -> Batch:
    """SpecAugment (training only): zero random feature and time bands of each utterance, drawn
    from a seeded generator in batch order; `cfg` is train.specaugment. Features are copied first."""
    if cfg.time_masks == 0 and cfg.freq_masks == 0:
        return batch
    x = batch.features.clone()
    B, _, D = x.shape
    for b in range(B):
        for _ in range(cfg.freq_masks):
            w = int(torch.randint(0, cfg.freq_width + 1, (1,), generator=gen))
            f0 = int(torch.randint(0, max(1, D - w), (1,), generator=gen))
            x[b, :, f0:f0 + w] = 0
        for _ in range(cfg.time_masks):
            w = int(torch.randint(0, cfg.time_width + 1, (1,), generator=gen))
            t0 = int(torch.randint(0, max(1, int(batch.lengths[b]) - w), (1,), generator=gen))
            x[b, t0:t0 + w] = 0
    return dataclasses.replace(batch, features=x)


def collate_items(items: list[tuple[np.ndarray, np.ndarray]], feature_dim: int, pad_to: int = 0) -> Batch:
    """Pad (features [T, D], labels) pairs into one Batch of at least `pad_to` frames."""
    lengths = torch.tensor([len(x) for x, _ in items])
    feats = torch.zeros(len(items), max(pad_to, int(lengths.max()) if items else 0), feature_dim)
    for k, (x, _) in enumerate(items):
        feats[k, : len(x)] = torch.as_tensor(np.array(x))
    labels = [y.tolist() for _, y in items]
    targets = torch.from_numpy(np.concatenate([y for _, y in items])) if items else torch.zeros(0, dtype=torch.long)
    return Batch(feats, lengths, targets.long(), torch.tensor([len(y) for y in labels]), labels)


def collate(shard: Shard, indices) -> Batch:
    return collate_items([shard.item(int(i)) for i in indices], shard.feature_dim)


class ShardDataset(torch.utils.data.Dataset):
    """Utterance i of a shard; worker processes reopen the memory map instead of pickling it."""

    def __init__(self, shard: Shard):
        self.folder, self.feature_dim, self._shard = shard.folder, shard.feature_dim, shard

    def __len__(self) -> int:
        return len(self._shard)

    def __getitem__(self, key):
        """`key`: an utterance index, or (index, frames to pad its batch to) for a DDP share."""
        i, pad_to = key if isinstance(key, tuple) else (key, 0)
        return (*self._shard.item(int(i)), pad_to)

    def __getstate__(self):
        return {"folder": self.folder, "feature_dim": self.feature_dim}

    def __setstate__(self, state):
        self.folder, self.feature_dim, self._shard = state["folder"], state["feature_dim"], Shard(state["folder"])

    def collate(self, items) -> Batch:
        return collate_items([item[:2] for item in items], self.feature_dim, max((item[2] for item in items), default=0))


def loader(shard: Shard, batches: list[np.ndarray], workers: int, device: torch.device,
           pad_to: list[int] | None = None):
    """A DataLoader yielding the given batches in order: `workers` processes collate ahead of the
    training step (0 = in this process), pinned memory and prefetch on CUDA. Same batches, same
    order, same bytes whatever the worker count. `pad_to`: frames to pad each batch to (DDP shares).
    The workers draw nothing random; their seeds come from a generator of the loader's own, so
    iterating it leaves torch's RNG (dropout's) as it was."""
    dataset = ShardDataset(shard)
    keys = [b.tolist() for b in batches] if pad_to is None else \
        [[(int(i), pad) for i in b] for b, pad in zip(batches, pad_to)]
    return torch.utils.data.DataLoader(dataset, batch_sampler=keys,
                                       collate_fn=dataset.collate, num_workers=workers,
                                       pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None,
                                       generator=torch.Generator().manual_seed(0))
