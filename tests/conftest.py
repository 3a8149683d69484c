"""Shared fixtures: a tiny embedded corpus (generated once per session) and HW3P2 layout replicas."""
from __future__ import annotations

import os

# Before anything imports torch: each test worker (pytest-xdist) takes its share of the cores, as a
# study's `-j N` gives each experiment, and so does every stage a test starts. Torch's default (every
# core in every worker) would make the workers' threads spin-wait on each other, several times
# slower (bench/contention.py); and a stage choosing its threads from the free cores
# (ctclab.threads) could train two runs a test compares on different counts.
os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0))
                                                 // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))))

import csv
import zipfile
from pathlib import Path

import numpy as np
import pytest

from ctclab import corpus
from ctclab.labels import PHONEMES

TINY = {"train": 16, "dev": 4, "test": 4}


@pytest.fixture(autouse=True)
def no_mlflow_uri_between_tests(monkeypatch):
    """ctclab reads MLFLOW_TRACKING_URI when it opens a store; a test that points MLflow's own
    client somewhere (mlflow.set_tracking_uri exports the variable) must not point the next
    test's stores there too."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus") / "raw"
    corpus.generate(out, seed=7, sizes=TINY, min_words=2, max_words=4, workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def processed(tiny_corpus, tmp_path_factory) -> Path:
    """The tiny corpus preprocessed with the repository's features params."""
    from ctclab.config import load_params
    from ctclab.data import preprocess

    out = tmp_path_factory.mktemp("processed")
    preprocess(tiny_corpus, out, load_params().features)
    return out


def _utterance(rng, dim: int) -> tuple[np.ndarray, list[str]]:
    n_labels = int(rng.integers(3, 9))
    frames = rng.standard_normal((n_labels * 6, dim)).astype(np.float32) * 5 + 3
    labels = ["SIL"] + [str(p) for p in rng.choice(PHONEMES[2:], n_labels - 2)] + ["SIL"]
    return frames, labels


def make_spring2022(root: Path, dim: int = 13, n: int = 6, seed: int = 0) -> Path:
    """Replica of the Spring 2022 archive: hw3p2_student_data/hw3p2_student_data/{train,dev,test},
    transcripts wrapped in <sos>/<eos>, test/test_order.csv in a non-sorted order."""
    rng = np.random.default_rng(seed)
    base = root / "hw3p2_student_data" / "hw3p2_student_data"
    for split in ("train", "dev", "test"):
        (base / split / "mfcc").mkdir(parents=True)
        if split != "test":
            (base / split / "transcript").mkdir()
        for i in range(n):
            x, labels = _utterance(rng, dim)
            np.save(base / split / "mfcc" / f"{split}_{i:04d}.npy", x)
            if split != "test":
                np.save(base / split / "transcript" / f"{split}_{i:04d}.npy", np.array(["<sos>", *labels, "<eos>"]))
    order = [f"test_{i:04d}.npy" for i in rng.permutation(n)]
    with open(base / "test" / "test_order.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file"])
        w.writerows([o] for o in order)
    return root


def make_fall2022(root: Path, dim: int = 28, n: int = 6, seed: int = 1, raw_subdir: bool = True) -> Path:
    """Replica of Fall 2022: train-clean-100/dev-clean/test-clean, [SOS]/[EOS] and [SIL],
    transcripts under transcript/raw/."""
    rng = np.random.default_rng(seed)
    base = root / "11-785-f22-hw3p2"
    for part in ("train-clean-100", "dev-clean", "test-clean"):
        (base / part / "mfcc").mkdir(parents=True)
        tdir = base / part / "transcript" / ("raw" if raw_subdir else "")
        if part != "test-clean":
            tdir.mkdir(parents=True)
        for i in range(n):
            x, labels = _utterance(rng, dim)
            name = f"{1000 + 7 * (n - i)}-{i}.npy"
            np.save(base / part / "mfcc" / name, x)
            if part != "test-clean":
                labels = ["[SIL]" if s == "SIL" else s for s in labels]
                np.save(tdir / name, np.array(["[SOS]", *labels, "[EOS]"]))
    return root


def zip_folder(folder: Path, zip_path: Path) -> Path:
    with zipfile.ZipFile(zip_path, "w") as z:
        for p in sorted(folder.rglob("*")):
            z.write(p, p.relative_to(folder))
    return zip_path


def pytest_sessionfinish(session, exitstatus):
    """Nothing a test started outlives the session: an `mlflow server` left running (with its job
    consumers, ~2 GB) steals a 2-core machine's CPU from whatever runs next. Survivors are named,
    killed, and fail the session."""
    import psutil

    survivors = [p for p in psutil.Process().children(recursive=True) if _not_ours_to_keep(p)]
    if not survivors:
        return
    names = []
    for p in survivors:
        try:
            names.append(f"{p.pid} {' '.join(p.cmdline()[:4])}")
            p.kill()
        except psutil.NoSuchProcess:
            pass
    if names:
        print("\nprocesses a test left running (killed now):\n  " + "\n  ".join(names))
        session.exitstatus = 1


def _not_ours_to_keep(p) -> bool:
    """multiprocessing's resource tracker and the forkserver ctclab's worker pools fork from
    (ctclab.errors.worker_context) live as long as this interpreter by design, and end with it."""
    import psutil

    try:
        command = " ".join(p.cmdline())
    except psutil.NoSuchProcess:
        return False
    return not any(f"multiprocessing.{keeper}" in command for keeper in ("resource_tracker", "forkserver"))
