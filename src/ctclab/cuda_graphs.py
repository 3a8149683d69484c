"""train.cuda_graphs: on CUDA, the model's forward and backward replayed as CUDA graphs, one per
batch shape (PyTorch's own `torch.cuda.make_graphed_callables`).

Why: the A3 step on the H200 is launch-bound (bench/RESULTS.md, 2026-11-27: 104 ms of GPU work in a
187 ms step at batch 64; the BiLSTM launches thousands of small kernels per step). A graph replays
a captured pass's kernels with one launch each way.

- Fixed shapes: a graph replays one shape, so the trainer pads each batch to a multiple of
  GRAPH_FRAMES frames (`padded_length`): an epoch's length-bucketed batches then fall into a few
  dozen shapes [B, T]. Before an epoch's DataLoader starts, the trainer captures every shape of the
  epoch not captured yet (`capture`, from zero features; make_graphed_callables runs three warm-up
  passes first): a capture must have the GPU to itself (the loader's pin-memory thread makes CUDA
  calls), and no step pays for it. A shape too big to capture, a micro-batch after an out-of-memory
  and evaluation run the model eagerly.
- Exact where it counts: the BiLSTM runs unpacked on the device (`BiLSTM.forward_unpacked`, each
  direction reads only its own frames; packing would read the lengths on the host, which a graph
  cannot), and CTC runs outside the graph on the exact output lengths, so padding reaches no score.
  BatchNorm's batch statistics see the padded frames, as they see a batch's padding without graphs
  (more of it here: at most GRAPH_FRAMES - 1 frames per batch).
- Dropout stays random: PyTorch's graph-safe RNG gives every replay new masks.
- The capture's passes would move BatchNorm's running statistics: they are put back.
- Gradients: a graph's backward hands autograd its own static gradient buffers, which become the
  parameters' `.grad` (with `zero_grad(set_to_none=True)`, as the trainer does: zeroing in place
  would add each replay's gradients to themselves). So one graph replays once per optimizer step,
  and the trainer's micro-batches run eagerly.
- One memory pool for all graphs: a graph may use another's scratch memory, which is safe because
  nothing a graph leaves behind (outputs, gradients) is read after another graph replays: each step
  replays one graph's forward and backward, then clips and steps the optimizer.

Not with DDP or train.compile (params.yaml refuses both). Evaluation runs the model itself.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from . import models
from .errors import CtclabError

GRAPH_FRAMES = 64  # every batch is padded to a multiple of this many frames (a stride-4 model: 16 steps)


def padded_length(frames: int) -> int:
    """The frames a batch whose longest utterance has `frames` is padded to under graphs."""
    return -(-frames // GRAPH_FRAMES) * GRAPH_FRAMES


class _LogProbs(nn.Module):
    """What one graph holds: the model's log-probabilities for features and lengths on the device
    (a module of its own per shape: make_graphed_callables replaces the forward of what it gets)."""

    def __init__(self, model: models.CTCModel):
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.model(features, lengths)[0]


class GraphedModel:
    """Called like the model in a training step: (features on the device, lengths on the CPU) →
    (log-probs, output lengths on the CPU); a shape without a graph is captured first."""

    def __init__(self, model: models.CTCModel, dtype: torch.dtype | None):
        self.model, self.dtype = model, dtype
        self.graphs: dict[tuple[int, int], nn.Module] = {}
        self.too_big: set[tuple[int, int]] = set()  # out of memory while capturing: these run eagerly
        self.pool = torch.cuda.graph_pool_handle()
        models.recurrence_unpacked(model, True)

    def train(self, mode: bool = True) -> GraphedModel:
        self.model.train(mode)
        return self

    def capture(self, shapes: Iterable[tuple[int, int]], feature_dim: int) -> int:
        """A graph for every shape [B, T] not captured yet, from zero features; how many were new."""
        device = next(self.model.parameters()).device
        new = sorted(set(shapes) - set(self.graphs) - self.too_big)
        for batch, frames in new:
            self._capture((batch, frames), torch.zeros(batch, frames, feature_dim, device=device),
                          torch.full((batch,), frames, device=device))
        return len(new)

    def __call__(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (features.shape[0], features.shape[1])
        if self.model.training and shape not in self.graphs and shape not in self.too_big:
            self._capture(shape, features.clone(), lengths.to(features.device))
        if not self.model.training or shape not in self.graphs:
            return self.model(features, lengths)
        return self.graphs[shape](features, lengths.to(features.device)), self.model.output_lengths(lengths)

    def _capture(self, shape: tuple[int, int], features: torch.Tensor, lengths: torch.Tensor) -> None:
        kept = [b.detach().clone() for b in self.model.buffers()]
        try:
            # autocast's weight cache would outlive the capture (make_graphed_callables refuses it)
            with torch.autocast("cuda", dtype=self.dtype, enabled=self.dtype is not None, cache_enabled=False):
                self.graphs[shape] = torch.cuda.make_graphed_callables(_LogProbs(self.model), (features, lengths),
                                                                       pool=self.pool)
        except torch.OutOfMemoryError:
            self.too_big.add(shape)
            torch.cuda.empty_cache()
        except RuntimeError as err:  # an operation a graph cannot hold (a host sync, a CPU tensor…)
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CtclabError(f"train.cuda_graphs: model.arch {self.model.arch!r} could not be captured as a CUDA "
                              f"graph for a batch of {shape[0]} × {shape[1]} frames ({first}); set "
                              "train.cuda_graphs: false") from None
        finally:
            with torch.no_grad():
                for buffer, before in zip(self.model.buffers(), kept):
                    buffer.copy_(before)
