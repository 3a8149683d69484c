"""Training on several processes: PyTorch DDP, launched by torchrun's launcher.

    train.distributed: {nproc: 2, nnodes: 1, rdzv_endpoint: ""}   # then: dvc repro

With `nproc > 1` or `nnodes > 1` the train stage re-runs its own script under
`torch.distributed.run` (what the `torchrun` command calls), so `dvc repro` stays the entry point;
each worker joins one process group (NCCL on CUDA, gloo on the CPU). Every bucketed batch is split
into one contiguous share per rank, all padded to the whole batch's longest utterance, and
BatchNorm statistics span the whole batch (torch's SyncBatchNorm on CUDA; on the CPU, where
SyncBatchNorm does not run, `CrossRankBatchNorm1d`), so N ranks compute what one process computes
for the same global batch (train.batch_size), up to float summation order. Only rank 0 talks to
MLflow and writes files. A failed worker ends the group; the launcher prints one line naming the
rank that failed first.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from . import threads
from .config import DistributedConfig
from .errors import CtclabError

# Set by `launch` for its workers: the launcher, not each worker, reports a worker's CtclabError.
LAUNCHED_ENV = "CTCLAB_DDP_LAUNCHED"


def wanted(cfg: DistributedConfig) -> bool:
    return cfg.nproc > 1 or cfg.nnodes > 1


def is_worker() -> bool:
    """True inside a process that torchrun started (it sets WORLD_SIZE, RANK, LOCAL_RANK)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def torchrun_args(cfg: DistributedConfig, script: str, script_args: list[str]) -> list[str]:
    """torchrun's arguments: on one node a standalone rendezvous on a free local port; on several,
    a static rendezvous at `rdzv_endpoint` (node 0's host:port) with this node's rank taken from
    PET_NODE_RANK (torchrun's own variable; 0 on the node that runs `dvc repro`)."""
    args = [f"--nproc-per-node={cfg.nproc}", f"--nnodes={cfg.nnodes}", "--max-restarts=0"]
    args += ["--standalone"] if cfg.nnodes == 1 else [f"--rdzv-endpoint={cfg.rdzv_endpoint}"]
    return [*args, script, *script_args]


def launch(cfg: DistributedConfig, script: str, script_args: list[str] | None = None) -> None:
    """Run `script` on cfg.nproc processes of this node through torchrun's launcher; returns when
    all succeeded. A failure raises one CtclabError naming the first failed rank and its message.
    On CUDA the caller has leased cfg.nproc GPUs first (ctclab.gpu_lease, which refuses more
    processes than GPUs in one line), and the workers see only those."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # torchrun's own warnings and failure tables would bury the one line that matters (its loggers
    # take their level from LOGLEVEL when created, so each one is set)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ[LAUNCHED_ENV] = "1"
    # torchrun would set 1 thread per worker; a CPU run gets its share of the free cores instead
    threads.share_among(cfg.nproc)
    try:
        run(parse_args(torchrun_args(cfg, script, script_args or [])))
    except ChildFailedError as err:
        rank, failure = first_failure(err.failures)
        world = cfg.nproc * cfg.nnodes
        raise CtclabError(f"train: rank {rank} of {world} failed ({failure_text(failure)}); "
                          "torchrun stopped the other ranks", exit_code=_exit_code(failure.exitcode)) from None
    except SignalException as err:
        raise CtclabError(f"train: stopped by {err.sigval.name}; the ranks stop together at their next sync "
                          "point and write a resume checkpoint (torchrun allows them 30 s), which the next "
                          "`dvc repro` continues from", exit_code=128 + int(err.sigval)) from None


def _message(failure) -> str:
    """A torchrun ProcessFailure's message: `<exception type>: <text>` from the worker's error file,
    or torchrun's own words (e.g. for a signal)."""
    message = failure.message
    return message.get("message", "") if isinstance(message, dict) else message


def failure_text(failure) -> str:
    """The worker's own one line, else how it ended."""
    return _message(failure).removeprefix("CtclabError: ") or f"exit code {failure.exitcode}"


def first_failure(failures: dict) -> tuple[int, object]:
    """The failure to report: not a rank that only lost its peer (PeerLost) or that torchrun itself
    stopped (SIGTERM, e.g. while it was already exiting over its lost peer); a worker's own error
    (CtclabError) before any other end (a signal, a crash); then the earliest, then the lowest rank."""
    def key(item):
        rank, failure = item
        message = _message(failure)
        # torchrun's SIGTERM ends a worker by the signal, or, outside training (ctclab.errors
        # turns SIGTERM into one line), with the shell's 143
        secondary = message.startswith("PeerLost") or failure.exitcode in (-signal.SIGTERM, 128 + signal.SIGTERM)
        return secondary, not message.startswith("CtclabError"), failure.timestamp, rank

    return min(failures.items(), key=key)


def _exit_code(code: int) -> int:
    return 128 - code if code < 0 else (code or 1)


@contextmanager
def worker_errors():
    """In a torchrun worker: a failure goes to torchrun's error file, where the launcher reads the
    rank's message. A CtclabError then ends the worker quietly when `launch` prints it (else it
    goes on to the usual one line, prefixed with the rank); anything else keeps its traceback."""
    if not is_worker():
        yield
        return
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

    try:
        yield
    except CtclabError as err:
        ErrorHandler().record_exception(CtclabError(str(err)))  # subclasses too: "CtclabError: <line>"
        if os.environ.get(LAUNCHED_ENV) == "1":
            sys.exit(err.exit_code)
        raise CtclabError(f"rank {os.environ.get('RANK')}: {err}", err.exit_code) from None
    except Exception as err:
        if not _peer_lost(err):
            ErrorHandler().record_exception(err)
            raise
        # another rank died mid-collective: that rank's failure is the one to report
        first_line = (str(err).splitlines() or [""])[0][:200]
        ErrorHandler().record_exception(PeerLost(f"{type(err).__name__}: {first_line}"))
        if os.environ.get(LAUNCHED_ENV) == "1":
            sys.exit(1)
        raise CtclabError(f"rank {os.environ.get('RANK')}: a collective failed, another rank has probably "
                          f"failed first ({first_line})") from None


class PeerLost(Exception):
    """Recorded by a rank whose collective broke because another rank ended."""


def _peer_lost(err: Exception) -> bool:
    if isinstance(err, torch.distributed.DistError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(s in text for s in ("gloo", "Connection closed by peer",
                                                                      "Connection reset by peer", "NCCL"))


@dataclass
class Group:
    """This process's place among the training processes (rank 0 of 1 without DDP). `joined`: in a
    process group, so sums, broadcasts and gradients go through its collectives (NCCL or gloo), also
    when torchrun started a single process (how bench/gpu_check.sh runs the NCCL path on one GPU)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    joined: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def backend(self) -> str:
        """The process group's backend (nccl, gloo), or none without DDP (a run tag)."""
        return torch.distributed.get_backend() if self.joined else "none"

    def share(self, batch: np.ndarray) -> np.ndarray:
        """This rank's contiguous part of a global batch (the sizes differ by at most one)."""
        return batch if self.world == 1 else np.array_split(batch, self.world)[self.rank]

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over the ranks (a copy; `values` as is with one process)."""
        if not self.joined:
            return values
        out = values.clone()
        torch.distributed.all_reduce(out)
        return out

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if not self.joined:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.joined:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The module the training steps call: `model` itself, or under DDP with its BatchNorm layers
        made cross-rank (the checkpointed state dict keeps plain BatchNorm's keys)."""
        if not self.joined:
            return model
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            _cross_rank_batchnorm(model)
        # device_ids=None: with them DDP would copy every tensor argument to the GPU, the lengths too,
        # which stay on the CPU for packing and CTC. Buffers need no broadcast: cross-rank BatchNorm
        # keeps the running statistics equal everywhere.
        with warnings.catch_warnings():  # torch 2.13 renames it (forward_sync_buffers); 2.11 knows only this
            warnings.filterwarnings("ignore", "`broadcast_buffers` is deprecated", FutureWarning)
            return nn.parallel.DistributedDataParallel(model, device_ids=None, broadcast_buffers=False)

    def close(self) -> None:
        if self.joined and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


SINGLE = Group()


def join(device: torch.device) -> tuple[Group, torch.device]:
    """Join torchrun's process group when this process is one of its workers (else SINGLE), and the
    device to train on: on CUDA each worker takes the GPU of its local rank."""
    if not is_worker():
        return SINGLE, device
    group = Group(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]), joined=True)
    if device.type == "cuda":
        torch.cuda.set_device(group.local_rank)
        device = torch.device("cuda", group.local_rank)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return group, device


class CrossRankBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are those of the whole global batch, summed over the
    ranks with differentiable all-reduces (two passes: mean, then variance). For gloo on the CPU
    only: torch's SyncBatchNorm refuses CPU tensors."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        (dims, shape), channels = ([0, 2], (1, -1, 1)) if x.dim() == 3 else ([0], (1, -1)), x.shape[1]
        # the shares may differ in size by one utterance: the count is summed too
        sums = all_reduce(torch.cat([x.sum(dims), x.new_tensor([x.numel() // channels])]))
        mean, count = sums[:channels] / sums[channels], sums[channels].item()
        centred = x - mean.view(shape)
        var = all_reduce((centred * centred).sum(dims)) / count
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * count / max(1, count - 1), self.momentum)
        return centred / torch.sqrt(var.view(shape) + self.eps) * self.weight.view(shape) + self.bias.view(shape)


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    """A differentiable sum over the ranks (its backward sums the gradients likewise)."""
    from torch.distributed.nn.functional import all_reduce as differentiable_all_reduce

    with warnings.catch_warnings():  # it warns that it is deprecated for the functional collectives,
        warnings.simplefilter("ignore", FutureWarning)  # which have no backward for all_reduce
        return differentiable_all_reduce(t)


def _cross_rank_batchnorm(model: nn.Module) -> None:
    """Only the forward changes: the same parameter objects stay (the optimizer may hold them)."""
    for module in model.modules():
        if type(module) is nn.BatchNorm1d:
            module.__class__ = CrossRankBatchNorm1d

