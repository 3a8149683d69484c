"""Where a run came from: the git commit (and whether the tree was dirty), the packages, the
machine (CPU model, threads, device) and the versions that decide its numbers. Plain values, no
tracking: ctclab.tracking logs them as run tags and artifacts."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

from . import gpu_lease, threads
from .results import RUN_SCHEMA


def git(root: Path, *args: str) -> str:
    """git's output in `root`, or "" where git is missing or fails (not a repository)."""
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def git_diff(root: Path) -> str:
    return git(root, "diff", "HEAD") + "\n"


def tags(root: Path, data_hash: str, device: str, device_name: str) -> dict[str, str]:
    """A training run's provenance tags."""
    import torch

    dirty = git(root, "status", "--porcelain", "--untracked-files=no")
    found = {
        # MLflow's own keys: the UI shows the commit in its Version column
        "mlflow.source.git.commit": git(root, "rev-parse", "HEAD") or "unknown",
        "mlflow.source.git.branch": git(root, "rev-parse", "--abbrev-ref", "HEAD") or "unknown",
        "git_dirty": str(bool(dirty)).lower(),
        # which: a queued DVC experiment's own edit is params.yaml (its -S values; the run's params say them)
        "git_dirty_files": " ".join(git(root, "diff", "--name-only", "HEAD").split())[:4000],
        "data_hash": data_hash,
        "torch_version": torch.__version__,
        "cuda_version": str(torch.version.cuda),
        "cudnn_version": str(torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None),
        "device": device,
        "device_name": device_name,
        "cpu_count": str(os.cpu_count()),
        "cpu_model": cpu_model(),
        "torch_threads": str(torch.get_num_threads()),
        # why that many: chosen from the CPUs other processes left free, or set by the caller (ctclab.threads)
        "torch_threads_reason": os.environ.get(threads.REASON_ENV, "torch's default"),
        # trainings run side by side with this one (a study's -j): timings compare only at equal values
        "parallel_jobs": os.environ.get("CTCLAB_PARALLEL_JOBS", "1"),
        "host": platform.node(),
        # which names the run's params and metrics have (ctclab.results; untagged runs are schema 1)
        "ctclab_schema": str(RUN_SCHEMA),
    }
    if os.environ.get(gpu_lease.TAG_ENV):  # which GPU(s) the training leased (ctclab.gpu_lease)
        found["gpu_lease"] = os.environ[gpu_lease.TAG_ENV]
    if os.environ.get("DVC_EXP_NAME"):
        found["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    return found


def cpu_model() -> str:
    """The CPU's model name: CPU floats (and so bit-identity) depend on it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pip_freeze() -> str:
    return subprocess.run([sys.executable, "-m", "pip", "freeze"], capture_output=True, text=True).stdout
