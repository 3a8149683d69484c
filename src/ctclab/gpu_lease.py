"""Which GPU a stage uses when several trainings share a machine: each takes a lease at its start.

`ctclab study run -j N` runs N experiments at once, and each would otherwise train on `cuda:0`
while the machine's other GPUs idle. So the train and evaluate stages lease a GPU before they touch
CUDA (a `train.distributed` run leases its `nproc` GPUs, which its torchrun workers then see as
cuda:0…nproc-1): the one with the fewest holders, lowest index first. With at least as many GPUs
as trainings, no two share one; with more trainings than GPUs they share evenly rather than wait.

A lease is an exclusive `flock` on a file under one folder per machine and user
(`CTCLAB_GPU_LEASES` to choose another): the kernel releases it when the process ends however it
ends (finished, failed, killed by the queue), so a lease cannot leak. The run records it as the tag
`gpu_lease`. `CTCLAB_SIMULATED_GPUS=N` leases among N pretend GPUs on a CPU-only machine (the device
stays the CPU): how the leases are tested without GPUs.
"""
from __future__ import annotations

import fcntl
import itertools
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import CtclabError

FOLDER_ENV = "CTCLAB_GPU_LEASES"
SIMULATED_ENV = "CTCLAB_SIMULATED_GPUS"
TAG_ENV = "CTCLAB_GPU_LEASE"  # the lease as the run's tag records it; inherited by torchrun's workers

_held: list["Lease"] = []  # a lease lives as long as the process: its open files hold the locks


@dataclass
class Lease:
    positions: list[int]  # the GPUs as this process numbers them (cuda:<position>)
    names: list[str]  # the same GPUs as CUDA_VISIBLE_DEVICES names them (index or UUID)
    sharing: int  # other holders of the most shared of them when taken (0: each GPU to itself)
    simulated: bool = False
    files: list = field(default_factory=list, repr=False)

    def tag(self) -> str:
        return ",".join(f"cuda:{n}" for n in self.names) + (" (simulated)" if self.simulated else "")


def folder() -> Path:
    return Path(os.environ.get(FOLDER_ENV) or Path(tempfile.gettempdir()) / f"ctclab-gpu-leases-{os.getuid()}")


def visible_gpus(count: int) -> list[str]:
    """This process's GPUs by the names that identify them machine-wide: CUDA_VISIBLE_DEVICES's
    entries when it is set (indices or UUIDs), else 0…count-1."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return visible[:count] if visible else [str(i) for i in range(count)]


def take(n: int, names: list[str], where: Path, prefix: str = "gpu") -> Lease:
    """`n` distinct GPUs of `names`: slot 0 of each GPU first (free GPUs, lowest index first), then
    slot 1 (GPUs with one holder)…; never blocks. Held until the process ends. The lock files are
    `<prefix>-<name>.<slot>` under `where`."""
    if n > len(names):
        raise CtclabError(f"params.yaml: train.distributed.nproc = {n}, but this machine has {len(names)} GPU(s); "
                          "expected at most that many processes")
    where.mkdir(parents=True, exist_ok=True)
    chosen: dict[int, int] = {}  # position → slot
    files = []
    for slot in itertools.count():
        for position, name in enumerate(names):
            if position in chosen:
                continue
            handle = open(where / f"{prefix}-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.{slot}", "a")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            chosen[position] = slot
            files.append(handle)
            if len(chosen) == n:
                positions = sorted(chosen)
                return Lease(positions, [names[p] for p in positions], max(chosen.values()), files=files)


def lease_for_stage(device_type: str, processes: int = 1) -> Lease | None:
    """At a stage's start, before CUDA is used: lease `processes` GPUs when the stage runs on CUDA
    (or among simulated ones), make the first this process's current device, and give `processes`
    > 1 (torchrun's workers, started by this process) exactly the leased ones. None on the CPU."""
    simulated = int(os.environ.get(SIMULATED_ENV) or 0)
    if os.environ.get(TAG_ENV) or (device_type != "cuda" and not simulated):
        return None  # the CPU, or a torchrun worker of a launcher that holds the lease
    if simulated:
        lease = take(processes, [str(i) for i in range(simulated)], folder(), prefix="simulated-gpu")
        lease.simulated = True
    else:
        lease = take(processes, visible_gpus(torch.cuda.device_count()), folder())
    _held.append(lease)
    os.environ[TAG_ENV] = lease.tag()
    if lease.sharing:
        print(f"ctclab: every GPU has a training already; {lease.tag()} now has {lease.sharing + 1}",
              file=sys.stderr)
    if not simulated:
        if processes > 1:
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(lease.names)
        else:
            torch.cuda.set_device(lease.positions[0])
    return lease
