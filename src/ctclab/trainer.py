"""The training step and the training epoch, on CUDA or the CPU, alone or as one DDP rank.

    trainer = Trainer(model, params.train, device, steps_per_epoch)
    loss_sum = trainer.step(batch)                          # one optimizer step on one batch
    mean_loss, seen = trainer.epoch(shard, batches, desc)   # one pass, in the given batch order

A Trainer owns the model (and its DDP wrapper), the optimizer, the lr scheduler, the grad scaler
and the augmentation generator; nothing else changes them. What surrounds an epoch (data, dev
scoring, checkpoints, tracking) is ctclab.train's. bench/ times these two methods, so every
benchmark figure describes the code a `dvc repro` runs.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Protocol

import numpy as np
import torch
from torch import nn

from . import checkpoint, cuda_graphs, distributed, models
from .batching import Batch, loader, spec_augment
from .config import TrainConfig
from .data import Shard
from .errors import CtclabError
from .inference import amp_dtype

# On CUDA, reading a value back waits for the GPU: loss and finiteness are read every this many steps.
SYNC_EVERY = 25


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    optimizer = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.optimizer]
    return optimizer(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(opt, cfg: TrainConfig, steps_per_epoch: int):
    """The lr schedule: cosine and warmup step once a batch, plateau once an epoch on the dev score."""
    sched = torch.optim.lr_scheduler
    if cfg.scheduler == "plateau":
        return sched.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=1)
    warmup = cfg.warmup_epochs * steps_per_epoch
    after = sched.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch - warmup) \
        if cfg.scheduler == "cosine" else None
    if not warmup:
        return after
    ramp = sched.LinearLR(opt, start_factor=1 / warmup, total_iters=warmup)  # lr/warmup … lr
    if after is None:
        return ramp  # LinearLR holds the full lr once its ramp is done
    return sched.SequentialLR(opt, [ramp, after], milestones=[warmup])


class Interruptions(Protocol):
    """What an epoch asks between batches (ctclab.train's mid-epoch resume checkpoints)."""

    def wishes(self, step: int) -> tuple[bool, bool]:
        """(stop, save) as this rank sees them after batch `step`."""

    def save(self, step: int, totals: tuple[float, int], stopping: bool) -> None:
        """Write a resume checkpoint after batch `step`; raise to stop when `stopping`."""


class SyncPoint:
    """Where the ranks of an epoch meet: after every step on the CPU, every SYNC_EVERY steps on
    CUDA, after the last, and at once when a process alone wants to stop or save. There the
    summed loss, the utterances seen and the stop/save wishes are added up over the ranks, so
    every rank reads the same totals and makes the same decision."""

    def __init__(self, group: distributed.Group, device: torch.device, n_batches: int):
        self.group, self.n_batches = group, n_batches
        self.every = 1 if device.type == "cpu" else SYNC_EVERY

    def due(self, step: int, wishes: tuple[bool, bool]) -> bool:
        return step % self.every == 0 or step == self.n_batches or (self.group.world == 1 and any(wishes))

    def meet(self, loss_sum: torch.Tensor, seen: int, wishes: tuple[bool, bool]) -> tuple[tuple[float, int], bool, bool]:
        """((loss sum, utterances) over all ranks, anyone wants to stop, anyone wants to save)."""
        summed = self.group.sum(torch.stack([loss_sum, *loss_sum.new_tensor([seen, *wishes])])).tolist()
        return (summed[0], int(summed[1])), summed[2] > 0, summed[3] > 0


class Trainer:
    """One model's training: `step` a batch, `epoch` a list of batches."""

    def __init__(self, model: models.CTCModel, cfg: TrainConfig, device: torch.device, steps_per_epoch: int,
                 group: distributed.Group = distributed.SINGLE):
        self.model, self.cfg, self.device, self.group = model, cfg, device, group
        models.recurrence_under_autocast(model, cfg.lstm_autocast)
        self.dtype = amp_dtype(device, cfg.amp)
        # what the steps call: the model, its DDP wrapper, or its CUDA graphs (train.cuda_graphs)
        self.graphed = cfg.cuda_graphs and device.type == "cuda"
        self.net = cuda_graphs.GraphedModel(model, self.dtype) if self.graphed else group.wrap(model, device)
        self.optimizer = make_optimizer(model, cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg, steps_per_epoch)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype == torch.float16)
        self.ctc = nn.CTCLoss(blank=0, reduction="mean", zero_infinity=False)
        self.aug_gen = torch.Generator().manual_seed(cfg.seed)
        if group.rank:  # dropout and augmentation draw differently on each rank's share
            torch.manual_seed(cfg.seed + 7919 * group.rank)
            self.aug_gen.manual_seed(cfg.seed + 7919 * group.rank)

    def step(self, batch: Batch, per_rank: float | None = None) -> torch.Tensor:
        """SpecAugment, forward, CTC loss, backward, grad clip, optimizer and per-batch scheduler
        step on one batch (on the CPU, moved to the device here); the batch's summed loss, float64,
        left on the device. `per_rank`: the global batch's utterances per rank under DDP."""
        batch = spec_augment(batch, self.cfg.specaugment, self.aug_gen).to(self.device)
        self.optimizer.zero_grad(set_to_none=True)  # to None, not zero: CUDA graphs' .grad are their buffers
        loss_sum = self.gradients(batch, per_rank or len(batch.labels))
        self.scaler.unscale_(self.optimizer)
        nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scheduler is not None and self.cfg.scheduler != "plateau":
            self.scheduler.step()
        return loss_sum

    def gradients(self, batch: Batch, per_rank: float) -> torch.Tensor:
        """Gradients of the global batch's mean loss (DDP averages the ranks' gradients, hence
        `per_rank`); returns this batch's summed loss. Out of memory, with train.oom: split, the
        batch goes through again as micro-batches of half the size (and half again…), each loss
        weighted by its share, so the accumulated gradient is the whole batch's (BatchNorm sees
        smaller batches). Under DDP an out-of-memory stops the group instead: each micro-batch's
        backward would be a collective."""
        size = n = len(batch.labels)
        while True:
            # micro-batches run eagerly (self.model): under CUDA graphs each replay would overwrite the
            # gradient buffers the one before left in .grad, instead of adding to them
            net = self.net if size == n else self.model
            try:
                return sum(self._backward(net, part, len(part.labels) / per_rank).double() * len(part.labels)
                           for part in batch.chunks(size))
            except torch.OutOfMemoryError:
                self.optimizer.zero_grad(set_to_none=True)
                if batch.features.is_cuda:
                    torch.cuda.empty_cache()
                size = self._halve_after_oom(batch, size, n)

    def _backward(self, net, batch: Batch, weight: float) -> torch.Tensor:
        """Forward (through `net`), CTC loss and backward of `weight` × the loss (gradients
        accumulate); the loss."""
        with torch.autocast(batch.features.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            log_probs, out_lengths = net(batch.features, batch.lengths)
        # CTC in float32 whatever autocast chose: log_probs leave the model as float32
        loss = self.ctc(log_probs.transpose(0, 1), batch.targets, out_lengths, batch.target_lengths)
        self.scaler.scale(loss * weight).backward()
        return loss.detach()

    def _halve_after_oom(self, batch: Batch, size: int, n: int) -> int:
        """The next micro-batch size after an out-of-memory at `size`, or the one line that stops."""
        ddp = self.group.joined
        where = (f"out of memory on a batch of {n} utterances (longest {int(batch.lengths.max())} frames, "
                 f"{models.parameter_count(self.model):,} parameters)")
        if self.cfg.oom == "fail" or size == 1 or ddp:
            how = " even one at a time" if size == 1 else " (under train.distributed a rank cannot split alone)" if ddp else ""
            raise CtclabError(f"train: {where}{how}; lower train.batch_size or model size"
                              f"{'' if ddp else ' (or set train.oom: split)'}") from None
        size = (size + 1) // 2
        print(f"train: {where}; retrying as micro-batches of ≤ {size} with accumulated gradients "
              "(same effective batch)", file=sys.stderr)
        return size

    def epoch(self, shard: Shard, batches: list[np.ndarray], desc: str = "epoch", start: int = 0,
              done: tuple[float, int] = (0.0, 0), interruptions: Interruptions | None = None,
              progress: bool = False) -> tuple[float, int]:
        """One pass over the global `batches` from batch `start` on (a resumed epoch: `done` = loss
        sum and utterances of the batches before, counted once, on rank 0); each rank trains on its
        share. Returns (mean train loss per utterance, utterances seen) over all ranks. The summed
        loss stays on the device until a sync point; there `interruptions` may save and stop."""
        from tqdm import tqdm

        self.net.train()
        if start == 0:
            # The epoch's one draw from torch's RNG, which the DataLoader made for its workers' seeds
            # before it had a generator of its own; dropout masks, and every recorded result, follow it.
            # (A resumed epoch's saved RNG state comes after it.)
            torch.empty((), dtype=torch.int64).random_()
        self.prepare(shard, batches[start:])
        sync, t0 = SyncPoint(self.group, self.device, len(batches)), time.perf_counter()
        seen, totals = done[1], done
        loss_sum = torch.tensor(done[0], dtype=torch.float64, device=self.device)
        bar = tqdm(self._loader(shard, batches[start:]), total=len(batches), initial=start, desc=desc, unit="batch",
                   disable=not (progress and self.group.main), file=sys.stderr, leave=False,
                   mininterval=1 if sys.stderr.isatty() else 30)
        for step, batch in enumerate(bar, start + 1):
            loss_sum += self.step(batch, len(batches[step - 1]) / self.group.world)
            seen += len(batch.labels)
            wishes = interruptions.wishes(step) if interruptions is not None else (False, False)
            if not sync.due(step, wishes):
                continue
            totals, stopping, saving = sync.meet(loss_sum, seen, wishes)
            if not math.isfinite(totals[0]):
                raise non_finite(desc, shard, batches, max(start + 1, step - sync.every + 1), step)
            # refresh=False: in a log (not a terminal) the bar then writes at most every mininterval
            bar.set_postfix(loss=f"{totals[0] / totals[1]:.3f}",
                            utt_s=f"{totals[1] / (time.perf_counter() - t0):.0f}", refresh=False)
            if stopping or saving:
                interruptions.save(step, totals, stopping)
        if start >= len(batches):  # resumed after the epoch's last batch: the ranks' totals still add up
            totals, _, _ = sync.meet(loss_sum, seen, (False, False))
        return totals[0] / totals[1], totals[1]

    def prepare(self, shard: Shard, batches: list[np.ndarray]) -> int:
        """Under train.cuda_graphs, capture a graph for every shape of `batches` not captured yet
        (epoch does it before its DataLoader starts); how many were new."""
        if not self.graphed:
            return 0
        return self.net.capture(zip(map(len, batches), self._padded_to(shard, batches)), shard.feature_dim)

    def _padded_to(self, shard: Shard, batches: list[np.ndarray]) -> list[int] | None:
        """The frames each batch is padded to: under DDP its longest utterance's, so that every
        rank's share computes what one process would; under CUDA graphs the next multiple of
        cuda_graphs.GRAPH_FRAMES, so that few shapes need a graph; None: as collated."""
        if not self.graphed and self.group.world == 1:
            return None
        frames = shard.frames()
        longest = [int(frames[b].max()) for b in batches]
        return [cuda_graphs.padded_length(n) for n in longest] if self.graphed else longest

    def _loader(self, shard: Shard, batches: list[np.ndarray]):
        """This rank's share of each batch, padded as _padded_to says."""
        return loader(shard, [self.group.share(b) for b in batches], self.cfg.loader_workers, self.device,
                      self._padded_to(shard, batches))

    def state(self, progress: checkpoint.Progress) -> dict:
        """The training's state; under DDP with every rank's RNG states (a collective: all ranks call it)."""
        rngs = self.group.gather(checkpoint.rng_states(self.aug_gen, self.device))
        return checkpoint.state(self.model, self.optimizer, self.scheduler, self.scaler, rngs, progress)

    def restore(self, saved: dict) -> checkpoint.Progress:
        """Continue from a saved state (this rank's RNG states)."""
        return checkpoint.restore(saved, self.model, self.optimizer, self.scheduler, self.scaler, self.aug_gen,
                                  self.device, self.group.rank)


def non_finite(desc: str, shard: Shard, batches, first: int, last: int) -> CtclabError:
    """The one line for a non-finite loss summed over batches `first`..`last` (1-based)."""
    ids = [shard.ids[i] for b in batches[first - 1:last] for i in b]
    return CtclabError(f"{desc}: non-finite CTC loss in batch{'es' if last > first else ''} "
                       f"{first}{f'–{last}' if last > first else ''} of {len(batches)} (utterances "
                       f"{', '.join(ids[:6])}{' …' if len(ids) > 6 else ''}); the checkpoints of the epochs "
                       "before are kept; lower train.lr or check those utterances")
