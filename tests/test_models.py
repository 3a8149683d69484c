"""Every registered architecture's shapes, lengths, learning on a fixed batch and checkpoint spec; the
write-up's ablation knobs; checkpoints written before architectures had their own configs."""
from pathlib import Path

import pytest
import torch
from torch import nn

from ctclab.batching import ctc_min_frames
from ctclab.errors import CtclabError
from ctclab.models import BiLSTM, architectures, build, from_spec
from project import model_config

ARCHS = sorted(architectures())  # a module added to src/ctclab/archs is tested here with nothing else edited


def tiny(arch="conv_lstm", dropout=None, **kw):
    """A small model config of the write-up's architectures; dropout=(embedding, lstm, classifier)."""
    values = {"hidden": 24, "embed_dim": 16, "lstm_layers": 2, "stride": 2, **kw}
    if dropout is not None:
        values.update(zip(("dropout.embedding", "dropout.lstm", "dropout.classifier"), map(float, dropout)))
    return model_config(arch, **values)


def without_dropout(arch: str, **values):
    """`arch` at its params.yaml size with every dropout knob at 0, whatever the architecture calls them."""
    section = getattr(model_config(arch), arch).model_dump()
    zeros = {f"dropout.{k}": 0.0 for k in section.get("dropout", {})}
    return model_config(arch, **zeros, **values)


def fixed_batch(dim=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([60, 48, 37, 30])
    x = torch.randn(4, 60, dim, generator=g)
    targets = [torch.randint(2, 41, (n,), generator=g) for n in (9, 7, 6, 5)]
    return x, lengths, torch.cat(targets), torch.tensor([len(t) for t in targets])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("stride", [1, 2, 4])
def test_shapes_and_output_lengths(arch, stride):
    if "stride" not in architectures()[arch].config.model_fields:
        pytest.skip(f"{arch} has no stride knob")
    torch.manual_seed(0)
    model = build(model_config(arch, stride=stride), input_dim=28).eval()
    x, lengths = torch.randn(3, 41, 28), torch.tensor([41, 20, 5])
    log_probs, out_lengths = model(x, lengths)
    assert log_probs.shape[0] == 3 and log_probs.shape[2] == 41
    assert log_probs.shape[1] == out_lengths.max()
    assert out_lengths.tolist() == [-(-n // stride) for n in (41, 20, 5)] and model.downsample == stride
    # normalised (a missing log-softmax is off by far more): one fresh-clone run, unseeded then, saw convnext
    # stride 1 off by 8.8e-5 under xdist, which 60 seeds alone did not reproduce (≤ 3e-7); float32 noise allowed
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(3, log_probs.shape[1]), atol=2e-4, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_decreases_on_a_fixed_batch(arch):
    """Every architecture learns through the product's own training step (ctclab.trainer)."""
    from ctclab.batching import Batch
    from ctclab.trainer import Trainer
    from project import config

    torch.manual_seed(0)
    model = build(without_dropout(arch), input_dim=13)
    trainer = Trainer(model, config("train", lr=3e-3, device="cpu"), torch.device("cpu"), steps_per_epoch=25)
    x, lengths, targets, target_lengths = fixed_batch()
    labels = [t.tolist() for t in torch.split(targets, target_lengths.tolist())]
    model.train()
    losses = [trainer.step(Batch(x, lengths, targets, target_lengths, labels)).item() / len(labels) for _ in range(25)]
    assert losses[-1] < 0.7 * losses[0], losses


def test_unpacked_cpu_bilstm_equals_packed():
    torch.manual_seed(1)
    lstm = BiLSTM(8, 16, layers=3, dropout=0.3).eval()
    x, lengths = torch.randn(5, 23, 8), torch.tensor([23, 17, 9, 2, 1])
    packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    reference = nn.utils.rnn.pad_packed_sequence(lstm.lstm(packed)[0], batch_first=True, total_length=23)[0]
    torch.testing.assert_close(lstm.forward_unpacked(x, lengths), reference, atol=1e-5, rtol=1e-5)  # float reassociation differs across CPUs


def count(model, kind):
    return sum(isinstance(m, kind) for m in model.modules())


def test_dropout_placement_knobs_change_the_module():
    none = build(tiny(dropout=(0, 0, 0)), 13)
    assert count(none, nn.Dropout) == 0 and none.body.lstm.dropout == 0
    emb = build(tiny(dropout=(0.3, 0, 0)), 13)
    assert isinstance(emb.front.dropout, nn.Dropout) and emb.front.dropout.p == 0.3 and count(emb, nn.Dropout) == 1
    lstm = build(tiny(dropout=(0, 0.4, 0)), 13)
    assert lstm.body.lstm.dropout == 0.4 and count(lstm, nn.Dropout) == 0
    cls = build(tiny(dropout=(0, 0, 0.2)), 13)
    assert [type(m) for m in cls.head][2] is nn.Dropout and count(cls, nn.Dropout) == 1


def test_lstm_dropout_changes_training_outputs_only_between_layers():
    x, lengths = torch.randn(2, 30, 13), torch.tensor([30, 21])
    torch.manual_seed(0)
    model = build(tiny(dropout=(0, 0.5, 0)), 13).train()
    a, _ = model(x, lengths)
    b, _ = model(x, lengths)
    assert not torch.allclose(a, b)  # dropout active in training
    model.eval()
    torch.testing.assert_close(model(x, lengths)[0], model(x, lengths)[0])


def test_kaiming_knob_changes_initial_statistics():
    torch.manual_seed(0)
    on = build(tiny(kaiming=True), 13)
    torch.manual_seed(0)
    off = build(tiny(kaiming=False), 13)
    w_on, w_off = on.head[0].weight, off.head[0].weight  # Linear(2h, 4h)
    fan_in = w_on.shape[1]
    assert abs(w_on.std().item() - (2 / fan_in) ** 0.5) < 0.15 * (2 / fan_in) ** 0.5
    assert abs(w_off.std().item() - (1 / (3 * fan_in)) ** 0.5) < 0.15 * (1 / (3 * fan_in)) ** 0.5
    assert on.head[0].bias.abs().sum() == 0 and off.head[0].bias.abs().sum() > 0
    # LSTM weights keep PyTorch's init either way
    torch.testing.assert_close(on.body.lstm.weight_hh_l0, off.body.lstm.weight_hh_l0)


@pytest.mark.parametrize("arch", ARCHS)
def test_spec_rebuilds_the_same_module(arch):
    model = build(model_config(arch), 28).eval()
    clone = from_spec(model.spec())
    clone.load_state_dict(model.state_dict())
    assert type(clone) is type(model) and clone.config == model.config and clone.input_dim == 28
    x, lengths = torch.randn(2, 30, 28), torch.tensor([30, 17])
    torch.testing.assert_close(clone.eval()(x, lengths), model(x, lengths))


@pytest.mark.parametrize("arch", ["conv_lstm", "lstm", "convnext"])
def test_a_checkpoint_from_before_architecture_configs_rebuilds_and_gives_its_outputs(arch):
    """tests/data/schema1_models.pt: tiny models and their outputs, saved by ctclab at 9d3b7db, when
    one flat config served all three architectures (neutral knobs, A2's stages in lstm_layers)."""
    saved = torch.load(Path(__file__).parent / "data" / "schema1_models.pt", weights_only=True)[arch]
    assert "schema_version" not in saved["model_spec"]
    model = from_spec(saved["model_spec"])
    model.load_state_dict(saved["model"])
    assert model.arch == arch and model.spec()["schema_version"] == 2
    torch.testing.assert_close(model.eval()(saved["input"], torch.tensor([30, 22]))[0], saved["log_probs"])


def test_ctc_min_frames_counts_repeats():
    import numpy as np
    assert ctc_min_frames(np.array([3, 3, 4, 4, 4, 5])) == 9
    assert ctc_min_frames(np.array([1, 2, 3])) == 3


def test_a_checkpoint_spec_is_validated_when_rebuilt():
    spec = build(tiny(), 13).spec()
    spec["config"]["hidden"] = "24"
    with pytest.raises(CtclabError, match=r"model_spec \(conv_lstm\): hidden = '24', expected an integer"):
        from_spec(spec)
    spec["arch"] = "gone"
    with pytest.raises(CtclabError, match="model_spec: model.arch = 'gone', expected one of conv_lstm, "):
        from_spec(spec)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit's, raised while torch._dynamo loads
@pytest.mark.parametrize("arch", ARCHS)
def test_compiled_parts_keep_the_state_dict_a_checkpoint_needs(arch):
    """train.compile compiles in place: a compiled training's checkpoint loads into a plain model."""
    plain = build(model_config(arch), 13)
    compiled = build(model_config(arch), 13)
    compiled.compile_parts()
    assert list(compiled.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(compiled.state_dict())


@pytest.fixture
def archs_folder(tmp_path, monkeypatch):
    """A second folder of the ctclab.archs package, and a registry that forgets what it adds."""
    import sys

    from ctclab import archs, models

    monkeypatch.setattr(archs, "__path__", [*archs.__path__, str(tmp_path)])
    monkeypatch.setattr(models, "_REGISTRY", dict(models._REGISTRY))
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("ctclab.archs.") and m.split(".")[-1] in
                 {p.stem for p in tmp_path.glob("*.py")}]:
        del sys.modules[name]


def test_a_module_dropped_into_archs_is_registered_validated_and_built(archs_folder):
    from test_pipeline import USER_ARCH

    (archs_folder / "frame_mlp.py").write_text(USER_ARCH)
    assert "frame_mlp" in architectures()
    cfg = model_config("frame_mlp", hidden=7)
    model = build(cfg, 13)
    assert type(model).__name__ == "FrameMLP" and model.config.hidden == 7 and model.downsample == 1
    with pytest.raises(CtclabError, match=r"model.frame_mlp.hidden = 'x', expected an integer"):
        model_config("frame_mlp", hidden="x")


def test_a_module_that_cannot_be_imported_is_named_in_one_line(archs_folder):
    (archs_folder / "broken.py").write_text("import torch\nclass Half(:\n")
    with pytest.raises(CtclabError) as err:
        architectures()
    message = str(err.value)
    assert message.startswith(f"{archs_folder / 'broken.py'}: cannot be imported (SyntaxError: ") and "\n" not in message


def test_a_name_taken_twice_or_not_an_identifier_is_refused(archs_folder):
    from ctclab.config import ArchConfig
    from ctclab.models import CTCModel, register

    class Other(CTCModel):
        pass
    with pytest.raises(CtclabError, match="model.arch 'conv_lstm': registered twice"):
        register("conv_lstm", ArchConfig)(Other)
    with pytest.raises(CtclabError, match="model.arch 'arch': expected a lowercase identifier other than arch"):
        register("arch", ArchConfig)


def test_cuda_graphs_pad_to_few_shapes_and_leave_the_cpu_step_as_it_is():
    from ctclab.cuda_graphs import GRAPH_FRAMES, padded_length
    from ctclab.trainer import Trainer
    from project import config

    assert [padded_length(n) for n in (1, GRAPH_FRAMES, GRAPH_FRAMES + 1)] == [GRAPH_FRAMES, GRAPH_FRAMES, 2 * GRAPH_FRAMES]
    model = build(tiny(), 13)
    trainer = Trainer(model, config("train", cuda_graphs=True, device="cpu"), torch.device("cpu"), steps_per_epoch=1)
    assert trainer.net is model and not trainer.graphed  # the CPU trains exactly as without it
