"""How many CPU threads torch takes: decided once per stage, before torch starts, from the CPUs
that other processes leave free.

torch's CPU kernels run on OpenMP threads, one per CPU, that wait for each other at the end of
every parallel operation (thousands per batch: the BiLSTM's per-time-step matrix products). When
another busy process shares a CPU, the thread on it falls behind and the others spin until it
catches up. Measured on the 2-vCPU Xeon (bench/contention.py, bench/logs/contention-*2vcpu-xeon*.log):
the default training's epoch takes 9–12 s on 2 threads alone but 30–40 s on 2 threads beside one
CPU-bound process, and 14–16 s on 1 thread beside it; OpenMP's passive waiting (GOMP_SPINCOUNT=0)
keeps 2 threads but took 14.6 s alone (11 s active) and 17.6 s beside it. So a stage started while
other processes keep k CPUs busy takes the CPUs left (at least one); on a quiet machine it leaves
torch's default (every CPU), so the default numbers are what they always were.

The thread count changes CPU float sums (the same training on 1 and 2 threads differs in the last
bits), which is why the count is decided before the stage starts, never in the middle of a training,
recorded with its reason on the MLflow run (tags torch_threads, torch_threads_reason), and replayed by
`ctclab verify`. A count the caller chose (OMP_NUM_THREADS: a study's `-j`, verify, the tests, you)
is kept as it is: a study's runs all train on the same count, so they stay comparable.
"""
from __future__ import annotations

import os
import sys
import time

REASON_ENV = "CTCLAB_THREADS_REASON"  # why OMP_NUM_THREADS has its value, for the run's tags


def cpus() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def busy_cpus(sample_seconds: float) -> float:
    """How many CPUs other processes kept busy over the next `sample_seconds` (this one sleeps)."""
    import psutil

    before = psutil.cpu_times()
    time.sleep(sample_seconds)
    after = psutil.cpu_times()
    idle = (after.idle - before.idle) + (getattr(after, "iowait", 0.0) - getattr(before, "iowait", 0.0))
    total = sum(after) - sum(before)
    return 0.0 if total <= 0 else psutil.cpu_count() * (1 - idle / total)


def free_threads(n_cpus: int, busy: float) -> int:
    """Threads for a stage on `n_cpus` CPUs of which others keep `busy` busy: the CPUs left, at least 1."""
    return max(1, min(n_cpus, round(n_cpus - busy)))


def settle(sample_seconds: float = 0.5) -> str:
    """Before torch is imported: unless the caller set OMP_NUM_THREADS, set it to the free CPUs when
    others keep some busy (one line on stderr says so). Returns the reason, also left in REASON_ENV."""
    if REASON_ENV in os.environ:  # decided by the process that started this one (torchrun's launcher)
        return os.environ[REASON_ENV]
    if "OMP_NUM_THREADS" in os.environ:
        reason = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} set by the caller"
    else:
        n, busy = cpus(), busy_cpus(sample_seconds)
        threads = free_threads(n, busy)
        reason = f"free CPUs: {threads} of {n} (other processes kept {busy:.1f} busy)"
        if threads < n:
            os.environ["OMP_NUM_THREADS"] = str(threads)
            print(f"ctclab: other processes keep {busy:.1f} of {n} CPUs busy: torch runs on {threads} thread"
                  f"{'s' if threads > 1 else ''}, not {n}, which keeps it from waiting on them (results are "
                  "bit-comparable with runs on as many threads; set OMP_NUM_THREADS to choose)", file=sys.stderr)
    os.environ[REASON_ENV] = reason
    return reason


def share_among(processes: int) -> None:
    """Before starting `processes` workers on this machine (torchrun's ranks, which settle nothing
    themselves): each gets its share of this process's threads, unless the caller chose the count."""
    reason = settle()
    if reason.startswith("OMP_NUM_THREADS="):
        return
    total = int(os.environ.get("OMP_NUM_THREADS", cpus()))
    os.environ["OMP_NUM_THREADS"] = str(max(1, total // processes))
    os.environ[REASON_ENV] = f"{reason}, shared by {processes} processes"
