"""CTC acoustic models (pure torch modules: no files, no tracking): what every architecture is
(`CTCModel`), the registry that maps params.yaml's `model.arch` to one, the blocks the write-up's
architectures share, and the `Recognizer` ctclab logs to MLflow.

An architecture is one module of src/ctclab/archs: a config class (its own knobs, with defaults;
params.yaml's `model.<name>` section sets them) and a CTCModel subclass registered under its name.

    from ctclab.config import ArchConfig
    from ctclab.models import CTCModel, register

    class TinyConfig(ArchConfig):
        hidden: int = 64

    @register("tiny", TinyConfig)
    class Tiny(CTCModel):
        def __init__(self, cfg, input_dim, num_classes): ...
        def output_lengths(self, lengths): return lengths
        def forward(self, x, lengths): return log_probs, self.output_lengths(lengths)

Then `dvc exp run -S model.arch=tiny`. Shipped: lstm (A1), convnext (A2), conv_lstm (A3, the
default) and transformer. The BiLSTM runs packed on CUDA (cuDNN; unpacked under train.cuda_graphs) and unpacked on the CPU, where
backward through packed sequences is far slower; both paths use the same weights and outputs.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from pydantic import ValidationError
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .config import ArchConfig, ModelSection, one_line
from .errors import CtclabError
from .labels import NUM_CLASSES
from .plugins import claim, import_all, is_name

# Version of what checkpoints record of a model (`CTCModel.spec`); 1 had no number (see legacy_spec).
SPEC_VERSION = 2


class ConvNeXtBlock1d(nn.Module):
    """Depthwise 7-tap conv → LayerNorm → Linear(d, 4d) → GELU → Linear(4d, d), plus the input."""

    def __init__(self, dim: int, kernel: int = 7, expansion: int = 4):
        super().__init__()
        self.depthwise = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.expand = nn.Linear(dim, expansion * dim)
        self.act = nn.GELU()
        self.project = nn.Linear(expansion * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, C, T]
        y = self.depthwise(x).transpose(1, 2)
        y = self.project(self.act(self.expand(self.norm(y))))
        return x + y.transpose(1, 2)


class ConvFrontEnd(nn.Module):
    """Strided Conv1d + BatchNorm + GELU layers (one per factor 2 of `stride`), then ConvNeXt blocks."""

    def __init__(self, in_dim: int, dim: int, stride: int, blocks: int, dropout: float):
        super().__init__()
        n_strided = int(math.log2(stride))
        layers, d = [], in_dim
        for i in range(max(1, n_strided)):
            layers += [nn.Conv1d(d, dim, 3, stride=2 if i < n_strided else 1, padding=1), nn.BatchNorm1d(dim), nn.GELU()]
            d = dim
        layers += [ConvNeXtBlock1d(dim) for _ in range(blocks)]
        self.layers = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        for m in self.layers:
            if isinstance(m, nn.Conv1d) and m.stride[0] > 1:
                lengths = (lengths + 2 * m.padding[0] - m.kernel_size[0]) // m.stride[0] + 1
        return lengths

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D] → [B, T', dim]
        return self.dropout(self.layers(x.transpose(1, 2)).transpose(1, 2))


class BiLSTM(nn.Module):
    def __init__(self, in_dim: int, hidden: int, layers: int, dropout: float):
        super().__init__()
        self.lstm = nn.LSTM(in_dim, hidden, num_layers=layers, bidirectional=True, batch_first=True,
                            dropout=dropout if layers > 1 else 0.0)
        self.under_autocast = False  # train.lstm_autocast (set by `recurrence_under_autocast`)
        self.unpacked = False  # train.cuda_graphs (set by `recurrence_unpacked`)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """`lengths` stay on the CPU: packing reads them there, so no host-device wait."""
        if not x.is_cuda:
            return self.forward_unpacked(x, lengths)
        # By default the recurrence runs in fp32 outside autocast: autocast would hand cuDNN fp16
        # (also under bf16 autocast, where no grad scaler guards it) and mean-reduced CTC gradients
        # of ~1e-5 at the LSTM can underflow there. It is latency-bound anyway. train.lstm_autocast
        # keeps it under autocast, to measure what that gains (bench/train_speed.py).
        with contextlib.nullcontext() if self.under_autocast else torch.autocast("cuda", enabled=False):
            x = x if self.under_autocast else x.float()
            if self.unpacked:  # inside a CUDA graph, which cannot read lengths on the host
                return self.forward_unpacked(x, lengths)
            packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
            out, _ = self.lstm(packed)
        return pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])[0]

    def forward_unpacked(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Each direction of each layer as its own single-layer LSTM over the padded batch; the
        backward direction reads each sequence reversed within its own length."""
        lstm, (B, T, _) = self.lstm, x.shape
        steps = torch.arange(T, device=x.device).expand(B, T)
        valid = steps < lengths.to(x.device)[:, None]
        reverse = torch.where(valid, lengths.to(x.device)[:, None] - 1 - steps, steps)
        rev_index = reverse[:, :, None]
        for layer in range(lstm.num_layers):
            outs = []
            for suffix, flip in (("", False), ("_reverse", True)):
                weights = [getattr(lstm, f"{n}_l{layer}{suffix}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
                inp = x.gather(1, rev_index.expand(-1, -1, x.shape[2])) if flip else x
                zeros = x.new_zeros(1, B, lstm.hidden_size)
                out = torch.lstm(inp, (zeros, zeros), weights, True, 1, 0.0, self.training, False, True)[0]
                outs.append(out.gather(1, rev_index.expand(-1, -1, out.shape[2])) if flip else out)
            x = torch.cat(outs, dim=2)
            if layer < lstm.num_layers - 1 and lstm.dropout > 0:
                x = nn.functional.dropout(x, lstm.dropout, self.training)
        return x * valid[:, :, None]


def recurrence_under_autocast(model: nn.Module, on: bool) -> None:
    """train.lstm_autocast: every BiLSTM of `model` runs under the caller's CUDA autocast (on) or in fp32."""
    for module in model.modules():
        if isinstance(module, BiLSTM):
            module.under_autocast = on


def recurrence_unpacked(model: nn.Module, on: bool) -> None:
    """train.cuda_graphs: every BiLSTM of `model` runs unpacked on CUDA too (lengths on the device)."""
    for module in model.modules():
        if isinstance(module, BiLSTM):
            module.unpacked = on


class CTCModel(nn.Module):
    """What every architecture is: features [B, T, D] and lengths [B] (on the CPU) → log-probabilities
    [B, T', classes] and output lengths. A subclass builds its layers from its own config (an
    ArchConfig subclass), says how lengths shrink (`output_lengths`) and is registered with `register`."""

    arch: str = ""  # the registered name, set by `register`

    def __init__(self, cfg: ArchConfig, input_dim: int, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.config, self.input_dim, self.num_classes = cfg, input_dim, num_classes

    @property
    def downsample(self) -> int:
        """T / T' (for messages): the config's `stride` where it has one."""
        return getattr(self.config, "stride", 1)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def compile_parts(self) -> None:
        """train.compile: torch.compile, in place (state-dict keys unchanged), what fuses well. By
        default the whole model with dynamic shapes (every bucketed batch has its own length)."""
        self.compile(dynamic=True)

    def spec(self) -> dict:
        """Everything needed to rebuild this module (stored in checkpoints)."""
        return {"schema_version": SPEC_VERSION, "arch": self.arch, "config": self.config.model_dump(),
                "input_dim": self.input_dim, "num_classes": self.num_classes}


class FrontBodyHead(CTCModel):
    """The write-up's shape: a ConvFrontEnd (`front`, which sets the stride), a `body` over the
    downsampled frames, a `head` to class scores, then log-softmax (in float32 whatever autocast did)."""

    front: ConvFrontEnd
    body: nn.Module
    head: nn.Module

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return self.front.output_lengths(lengths)

    def encode(self, h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The body over the front end's output [B, T', C] (lengths: the output lengths)."""
        return self.body(h, lengths)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out_lengths = self.output_lengths(lengths)
        h = self.encode(self.front(x), out_lengths)
        return torch.log_softmax(self.head(h).float(), dim=-1), out_lengths

    def compile_parts(self) -> None:
        """The parts whose many small ops fuse: the front end, the head, and the body unless it is
        the BiLSTM (cuDNN runs it as one kernel per layer on CUDA; on the CPU it is torch.lstm already)."""
        for part in (self.front, self.head, *([] if isinstance(self.body, BiLSTM) else [self.body])):
            part.compile(dynamic=True)


def dropout(p: float) -> nn.Module:
    return nn.Dropout(p) if p > 0 else nn.Identity()


def kaiming(m: nn.Module) -> None:
    """Kaiming-normal conv and linear weights, zero biases (`model.apply(kaiming)`)."""
    if isinstance(m, (nn.Conv1d, nn.Linear)):
        nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        if m.bias is not None:
            nn.init.zeros_(m.bias)


@dataclass(frozen=True)
class Arch:
    name: str
    config: type[ArchConfig]
    model: type[CTCModel]


_REGISTRY: dict[str, tuple[Arch, type]] = {}  # name → (architecture, the class that registered it)


def register(name: str, config: type[ArchConfig]):
    """Class decorator: `model.arch: <name>` builds this CTCModel subclass from a `config` (read from
    params.yaml's model.<name> section)."""
    if not is_name(name) or name in ModelSection.model_fields or hasattr(ModelSection, name):
        raise CtclabError(f"model.arch {name!r}: expected a lowercase identifier other than "
                          f"{', '.join(ModelSection.model_fields)} (it names params.yaml's model.<name> section)")

    def add(cls: type[CTCModel]) -> type[CTCModel]:
        claim(_REGISTRY, name, Arch(name, config, cls), cls, "model.arch")
        cls.arch = name
        return cls
    return add


def architectures() -> dict[str, Arch]:
    """Every architecture: each module of ctclab.archs is imported (and so registers itself) on first
    use, a user's new file included. A module that cannot be imported is named in one line."""
    from . import archs

    import_all(archs)
    return {name: arch for name, (arch, _) in sorted(_REGISTRY.items())}


class Recognizer(nn.Module):
    """What ctclab logs as an MLflow model: a trained CTCModel plus the feature normalisation its
    training data had (features.normalize and, for `global`, the train mean and std), so a loaded
    model takes raw MFCC. forward: equal-length utterances [B, T, D] → log-probs [B, T', classes];
    for a batch of different lengths call `.model(normalised, lengths)` as ctclab predict does."""

    def __init__(self, model: CTCModel, normalize: str, stats: dict | None):
        super().__init__()
        self.model, self.normalize = model.eval(), normalize
        self.register_buffer("mean", torch.tensor(stats["mean"] if stats else [], dtype=torch.float64))
        self.register_buffer("std", torch.tensor(stats["std"] if stats else [], dtype=torch.float64))

    def stats(self) -> dict | None:
        return {"mean": self.mean.numpy(), "std": self.std.numpy()} if self.normalize == "global" else None

    def forward(self, mfcc: torch.Tensor) -> torch.Tensor:
        x = mfcc.float()
        if self.normalize == "utterance":
            x = (x - x.mean(1, keepdim=True)) / (x.std(1, unbiased=False, keepdim=True) + 1e-5)
        elif self.normalize == "global":
            x = ((x.double() - self.mean) / self.std).float()
        lengths = torch.full((x.shape[0],), x.shape[1], dtype=torch.long)
        return self.model(x, lengths)[0]


def build(cfg: ModelSection, input_dim: int, num_classes: int = NUM_CLASSES) -> CTCModel:
    """The model params.yaml's `model` section asks for: model.arch's class, built from its section."""
    return architectures()[cfg.arch].model(cfg.active, input_dim, num_classes)


def from_spec(spec: dict) -> CTCModel:
    """Rebuild a model from a checkpoint's spec, validating its config like params.yaml. A spec
    written before architectures had their own configs (no schema_version) is read by `legacy_spec`."""
    if "schema_version" not in spec:
        spec = legacy_spec(spec)
    known = architectures()
    if spec["arch"] not in known:
        raise CtclabError(f"checkpoint model_spec: model.arch = {spec['arch']!r}, expected one of {', '.join(known)} "
                          "(a module of src/ctclab/archs registers it)")
    arch = known[spec["arch"]]
    try:
        cfg = arch.config.model_validate(spec["config"])
    except ValidationError as err:
        raise CtclabError(one_line(err, f"checkpoint model_spec ({arch.name})", arch.config)) from None
    return arch.model(cfg, spec["input_dim"], spec["num_classes"])


# Schema 1 (no version): one flat config for all three architectures; knobs an architecture had no
# place for were held at neutral values, and A2 read lstm_layers as its stages.
_LEGACY_RENAMES = {"convnext": {"lstm_layers": "stages", "convnext_blocks": "blocks"}}


def legacy_spec(spec: dict) -> dict:
    """A schema-1 checkpoint spec in today's form: its architecture's own knobs, renamed where they were."""
    config = dict(spec["config"])
    arch = config.pop("arch")
    config = {_LEGACY_RENAMES.get(arch, {}).get(k, k): v for k, v in config.items()}
    fields = architectures()[arch].config.model_fields
    config = {k: v for k, v in config.items() if k in fields}
    if "dropout" in config:
        allowed = fields["dropout"].annotation.model_fields
        config["dropout"] = {k: v for k, v in config["dropout"].items() if k in allowed}
    return {**spec, "schema_version": SPEC_VERSION, "arch": arch, "config": config}


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
