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


def _graph_batch(seed: int, frames: int, lengths: list[int]):
    from ctclab.batching import Batch
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(len(lengths), frames, 13)
    for k, n in enumerate(lengths):
        x[k, :n] = torch.randn(n, 13, generator=g)
    targets = [torch.randint(2, 41, (n // 8,), generator=g) for n in lengths]
    return Batch(x, torch.tensor(lengths), torch.cat(targets), torch.tensor([len(t) for t in targets]),
                 [t.tolist() for t in targets])


def test_cuda_graphs_replay_what_the_eager_step_computes(monkeypatch):
    """train.cuda_graphs: the graphed steps (one capture per shape, replays after) compute the same
    losses and gradients, and leave the same BatchNorm statistics, as eager steps on the same padded
    batches (in fp32 without TF32, so that only summation order differs)."""
    import copy

    from ctclab.cuda_graphs import GRAPH_FRAMES
    from ctclab.trainer import Trainer
    from project import config

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    eager = build(model_config(hidden=24, embed_dim=16, **{"dropout.embedding": 0.0, "dropout.lstm": 0.0,
                                                            "dropout.classifier": 0.0}), 13).cuda()
    graphed = copy.deepcopy(eager)
    cfg = {"device": "cuda", "amp": "off", "lr": 1e-3}
    plain = Trainer(eager, config("train", **cfg), torch.device("cuda"), steps_per_epoch=4)
    graphs = Trainer(graphed, config("train", cuda_graphs=True, **cfg), torch.device("cuda"), steps_per_epoch=4)
    eager.train(), graphs.net.train()
    shapes = [(1, 2 * GRAPH_FRAMES, [128, 100, 77]), (2, 2 * GRAPH_FRAMES, [120, 90, 65]),  # capture, replay
              (3, GRAPH_FRAMES, [64, 40, 33]), (4, 2 * GRAPH_FRAMES, [99, 98, 70])]          # a 2nd shape, the 1st again
    for seed, frames, lengths in shapes:
        batch = _graph_batch(seed, frames, lengths)
        torch.testing.assert_close(graphs.step(batch), plain.step(batch), rtol=1e-4, atol=1e-4)
        for (name, a), b in zip(eager.named_parameters(), graphed.parameters()):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-6, msg=name)
    assert sorted(graphs.net.graphs) == [(3, GRAPH_FRAMES), (3, 2 * GRAPH_FRAMES)]
    # BatchNorm's running statistics: the capture's passes undone (weights: their gradients above;
    # a conv bias before BatchNorm has a zero gradient, whose rounding noise Adam turns into ±lr steps)
    for (name, a), b in zip(eager.named_buffers(), graphed.buffers()):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4, msg=name)


def test_cuda_graphs_micro_batches_after_an_out_of_memory_add_up(monkeypatch):
    """A batch that runs out of memory is split; its micro-batches run eagerly even where a graph of
    their shape exists (replays would overwrite each other's gradients instead of adding them)."""
    import copy

    from ctclab import models
    from ctclab.trainer import Trainer
    from project import config

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    eager = build(model_config(hidden=24, embed_dim=16, **{"dropout.embedding": 0.0, "dropout.lstm": 0.0,
                                                            "dropout.classifier": 0.0}), 13).cuda().train()
    graphed = copy.deepcopy(eager)
    cfg = {"device": "cuda", "amp": "off", "oom": "split"}
    plain = Trainer(eager, config("train", **cfg), torch.device("cuda"), steps_per_epoch=2)
    graphs = Trainer(graphed, config("train", cuda_graphs=True, **cfg), torch.device("cuda"), steps_per_epoch=2)
    pair = _graph_batch(5, 128, [128, 100])
    graphs.step(pair), plain.step(pair)
    assert (2, 128) in graphs.net.graphs

    real_forward = models.FrontBodyHead.forward

    def small_memory(self, x, lengths):  # a device that holds at most 2 utterances
        if len(x) > 2:
            raise torch.OutOfMemoryError("injected")
        return real_forward(self, x, lengths)

    monkeypatch.setattr(models.FrontBodyHead, "forward", small_memory)
    four = _graph_batch(6, 128, [128, 120, 110, 100]).to(torch.device("cuda"))
    for trainer in (plain, graphs):
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.gradients(four, per_rank=4)  # 4 fails (the capture too), then 2 + 2
    assert (4, 128) in graphs.net.too_big
    for (name, a), b in zip(eager.named_parameters(), graphed.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-6, msg=name)


def test_cuda_graphs_draw_new_dropout_masks_on_every_replay_and_train(tmp_path, processed):
    from ctclab.cuda_graphs import GraphedModel

    model = build(model_config(hidden=24, embed_dim=16), 13).cuda().train()
    net = GraphedModel(model, None)
    batch = _graph_batch(0, 128, [128, 90]).to(torch.device("cuda"))
    first, second = (net(batch.features, batch.lengths)[0].detach().clone() for _ in range(2))
    assert not torch.equal(first, second) and len(net.graphs) == 1
    project = cuda_project(tmp_path, processed, {"train": {"epochs": 2, "cuda_graphs": True}})
    assert math.isfinite(run_train(project)["final_train_loss"])
