"""GPU leases (ctclab.gpu_lease), on pretend GPUs: parallel stages never share a GPU while one is
free, a lease ends with its process however that ends, and a DDP run leases its nproc GPUs."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from ctclab import gpu_lease
from ctclab.errors import CtclabError

HOLD = """
import sys
from ctclab import gpu_lease
lease = gpu_lease.lease_for_stage("cpu", int(sys.argv[1]))
print(lease.tag(), lease.sharing, flush=True)
sys.stdin.read()  # held until the test closes stdin (or kills this process)
"""


class Holder:
    """A separate process that takes a lease among `gpus` simulated GPUs and holds it."""

    def __init__(self, folder, gpus: int, processes: int = 1):
        env = {**os.environ, gpu_lease.SIMULATED_ENV: str(gpus), gpu_lease.FOLDER_ENV: str(folder)}
        env.pop(gpu_lease.TAG_ENV, None)
        self.proc = subprocess.Popen([sys.executable, "-c", HOLD, str(processes)], env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        line = self.proc.stdout.readline()
        assert line, self.proc.stderr.read()
        self.tag, sharing = line.rsplit(" ", 1)
        self.gpus = set(self.tag.removesuffix(" (simulated)").split(","))
        self.sharing = int(sharing)

    def release(self, kill: bool = False) -> None:
        if kill:
            self.proc.send_signal(signal.SIGKILL)  # as a queue that kills its experiment would
        else:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)


def test_parallel_stages_each_get_a_gpu_of_their_own_until_all_are_taken(tmp_path):
    first, second = Holder(tmp_path, 2), Holder(tmp_path, 2)
    assert {first.tag, second.tag} == {"cuda:0 (simulated)", "cuda:1 (simulated)"}
    assert first.sharing == second.sharing == 0
    third = Holder(tmp_path, 2)  # more stages than GPUs: it shares one rather than wait
    assert third.sharing == 1 and third.gpus <= {"cuda:0", "cuda:1"}
    # a killed holder's lease ends with it: the next stage gets that GPU to itself
    freed = first if first.gpus != third.gpus else second
    freed.release(kill=True)
    fourth = Holder(tmp_path, 2)
    assert fourth.gpus == freed.gpus and fourth.sharing == 0
    for h in (first, second, third, fourth):
        if h is not freed:
            h.release()


def test_a_distributed_run_leases_its_nproc_gpus_apart_from_the_others(tmp_path):
    single = Holder(tmp_path, 3)
    ddp = Holder(tmp_path, 3, processes=2)
    assert single.gpus == {"cuda:0"} and ddp.gpus == {"cuda:1", "cuda:2"} and ddp.sharing == 0
    single.release()
    ddp.release()
    with pytest.raises(CtclabError, match=r"train.distributed.nproc = 4, but this machine has 3 GPU\(s\)"):
        gpu_lease.take(4, ["0", "1", "2"], tmp_path)


def test_no_lease_on_the_cpu_or_in_a_worker_of_a_launcher_that_holds_one(monkeypatch, tmp_path):
    monkeypatch.setenv(gpu_lease.FOLDER_ENV, str(tmp_path))
    monkeypatch.delenv(gpu_lease.SIMULATED_ENV, raising=False)
    monkeypatch.delenv(gpu_lease.TAG_ENV, raising=False)
    assert gpu_lease.lease_for_stage("cpu") is None and gpu_lease.TAG_ENV not in os.environ
    monkeypatch.setenv(gpu_lease.SIMULATED_ENV, "2")
    monkeypatch.setenv(gpu_lease.TAG_ENV, "cuda:1")  # torchrun's worker: its launcher leased
    assert gpu_lease.lease_for_stage("cuda") is None


def test_gpus_are_named_as_cuda_visible_devices_names_them(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert gpu_lease.visible_gpus(2) == ["0", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3, GPU-8a1f")  # a lease on another study's subset is the same GPU
    assert gpu_lease.visible_gpus(2) == ["3", "GPU-8a1f"]
