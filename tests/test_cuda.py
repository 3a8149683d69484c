"""The CUDA path: one epoch per architecture, packed cuDNN LSTM vs the CPU path, the LSTM's dtype
and backward under autocast, bf16 and fp16 (+ grad scaler), resume. Skipped without a GPU;
bench/gpu_check.sh runs them on a GPU machine (needs only torch, numpy, pydantic, mlflow-skinny)."""
import math
import os
import signal

import pytest
import torch

from conftest import make_spring2022
from ctclab.checkpoint import RESUME_DIR
from ctclab.data import preprocess
from ctclab.inference import load_checkpoint, load_model
from ctclab.models import BiLSTM, build, recurrence_under_autocast
from ctclab.models import architectures
from project import config, interrupt_training, merge, model_config, project_with_data, run_train

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def processed(tmp_path_factory):
    """A Spring-2022 replica (random MFCC, real layout) preprocessed into shards: numpy only."""
    root = tmp_path_factory.mktemp("cuda")
    preprocess(make_spring2022(root / "raw", n=24), root / "processed", config("features"))
    return root / "processed"


def cuda_project(tmp_path, processed, overrides):
    # the GPU machine may carry only mlflow-skinny: gpu_check.sh names a file store in MLFLOW_TRACKING_URI
    store = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{tmp_path / 'mlflow.db'}"
    base = {"train": {"device": "cuda", "batch_size": 8}, "tracking": {"uri": store}}
    return project_with_data(tmp_path, processed, merge(base, overrides))


@pytest.mark.parametrize("arch", sorted(architectures()))
def test_each_architecture_trains_an_epoch_on_cuda(tmp_path, processed, arch):
    project = cuda_project(tmp_path, processed, {"model": {"arch": arch}, "train": {"epochs": 1}})
    result = run_train(project)
    assert result["epochs"] == 1 and result["final_train_loss"] == result["final_train_loss"]  # not NaN
    ckpt = load_checkpoint(project / "models/last.pt")
    assert all(t.device.type == "cpu" for t in ckpt["model"].values())  # loadable anywhere


def test_compiled_training_runs_and_its_checkpoint_loads_uncompiled(tmp_path, processed):
    project = cuda_project(tmp_path, processed, {"train": {"epochs": 1, "compile": True}})
    result = run_train(project)
    assert math.isfinite(result["final_train_loss"])
    model = load_model(project / "models/best.pt")  # a plain module: the compiled one kept its keys
    assert not any("_orig_mod" in k for k in model.state_dict())


@pytest.mark.parametrize("amp, scaled", [("bf16", False), ("fp16", True)])
def test_bf16_and_fp16_paths(tmp_path, processed, amp, scaled):
    project = cuda_project(tmp_path, processed, {"train": {"epochs": 2, "amp": amp}})
    result = run_train(project)
    assert 0 < result["final_train_loss"] < 1e4
    scaler = load_checkpoint(project / "models/last.pt")["scaler"]
    assert bool(scaler) == scaled  # fp16 keeps a grad-scaler state, bf16 has none
    if scaled:
        assert scaler["scale"] > 0


def test_packed_cudnn_lstm_equals_the_cpu_path():
    torch.manual_seed(1)
    cpu = BiLSTM(8, 16, layers=3, dropout=0.0).eval()
    gpu = BiLSTM(8, 16, layers=3, dropout=0.0).eval()
    gpu.load_state_dict(cpu.state_dict())
    gpu = gpu.cuda()
    x, lengths = torch.randn(5, 23, 8), torch.tensor([23, 17, 9, 2, 1])
    with torch.no_grad():
        expected = cpu(x, lengths)
        got = gpu(x.cuda(), lengths).cpu()
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=2e-3)  # cuDNN may use TF32


def test_lstm_runs_fp32_under_autocast_with_cudnn_backward():
    model = build(model_config(hidden=16, embed_dim=16), 13).cuda().train()
    seen = {}
    model.body.lstm.register_forward_hook(lambda m, i, o: seen.update(dtype=o[0].data.dtype, fn=o[0].data.grad_fn))
    x, lengths = torch.randn(4, 50, 13, device="cuda"), torch.tensor([50, 40, 30, 20])
    with torch.autocast("cuda", dtype=torch.bfloat16):
        log_probs, out_lengths = model(x, lengths)
    assert seen["dtype"] == torch.float32 and "Cudnn" in type(seen["fn"]).__name__
    assert log_probs.dtype == torch.float32 and out_lengths.device.type == "cpu"
    log_probs.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.body.parameters())


def test_train_lstm_autocast_hands_cudnn_the_autocast_dtype_and_trains(tmp_path, processed):
    model = build(model_config(hidden=16, embed_dim=16), 13).cuda().train()
    recurrence_under_autocast(model, True)
    seen = {}
    model.body.lstm.register_forward_hook(lambda m, i, o: seen.update(dtype=o[0].data.dtype))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        log_probs, _ = model(torch.randn(4, 50, 13, device="cuda"), torch.tensor([50, 40, 30, 20]))
    assert seen["dtype"] == torch.bfloat16 and log_probs.dtype == torch.float32
    project = cuda_project(tmp_path, processed, {"train": {"epochs": 1, "lstm_autocast": True, "amp": "bf16"}})
    assert math.isfinite(run_train(project)["final_train_loss"])


def test_killed_cuda_training_resumes_in_the_same_run(tmp_path, processed):
    project = cuda_project(tmp_path, processed, {"train": {"epochs": 40, "checkpoint_minutes": 1e-6}})
    _, _, where = interrupt_training(project, signal.SIGKILL)
    assert 0 <= where["epoch"] < 40 and where["batch"] > 0  # killed mid-epoch
    result = run_train(project)
    history = load_checkpoint(project / "models/last.pt")["history"]
    assert [r["epoch"] for r in history] == list(range(1, 41)) and result["epochs"] == 40
    assert not list((project / RESUME_DIR).glob("*.pt"))
