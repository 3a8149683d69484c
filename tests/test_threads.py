"""The stages' thread policy (ctclab.threads): torch takes the CPUs other processes leave free,
unless the caller chose a count; torchrun's workers share it."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ctclab import threads

SETTLE = "from ctclab import threads; import os; threads.settle(); print(os.environ.get('OMP_NUM_THREADS', '-'))"


def settle_in_a_fresh_process(extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", threads.REASON_ENV)}
    return subprocess.run([sys.executable, "-c", SETTLE], env={**env, **(extra or {})}, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("cpus, busy, expected", [(2, 0.0, 2), (2, 0.4, 2), (2, 0.6, 1), (2, 1.0, 1), (2, 2.0, 1),
                                                  (16, 3.2, 13), (1, 0.9, 1)])
def test_threads_are_the_cpus_left_free_and_at_least_one(cpus, busy, expected):
    assert threads.free_threads(cpus, busy) == expected


@pytest.mark.skipif(threads.cpus() < 2, reason="one CPU: the policy has nothing to choose")
def test_beside_busy_processes_a_stage_takes_one_thread_and_says_why():
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(threads.cpus() - 1)]
    try:
        r = settle_in_a_fresh_process()
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    assert r.stdout.strip() == "1", r.stderr
    assert f"torch runs on 1 thread, not {threads.cpus()}" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_a_count_the_caller_chose_is_kept_and_workers_share_the_launchers(monkeypatch):
    r = settle_in_a_fresh_process({"OMP_NUM_THREADS": "3"})
    assert (r.stdout.strip(), r.stderr) == ("3", "")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv(threads.REASON_ENV, f"free CPUs: 4 of {threads.cpus()} (other processes kept 0.0 busy)")
    monkeypatch.setenv("OMP_NUM_THREADS", "4")  # as settle() leaves it when it chose 4
    threads.share_among(2)  # torchrun's launcher, before starting 2 workers
    assert os.environ["OMP_NUM_THREADS"] == "2" and os.environ[threads.REASON_ENV].endswith("shared by 2 processes")
    monkeypatch.setenv(threads.REASON_ENV, "OMP_NUM_THREADS=3 set by the caller")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    threads.share_among(2)
    assert os.environ["OMP_NUM_THREADS"] == "3"  # the caller's count, for each worker
