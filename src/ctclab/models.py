"""The write-up's CTC acoustic models (pure torch modules: no files, no tracking).

    lstm       A1: conv embedding → BiLSTM → Linear(2h, classes)
    convnext   A2: conv stem → residual 1-D ConvNeXt stages (depthwise 7-tap, inverted bottleneck)
    conv_lstm  A3: Conv1d(stride) + BatchNorm + GELU + ConvNeXt block(s) + dropout → BiLSTM →
               Linear(2h, 4h) + GELU + Linear(4h, classes)

Every model maps features [B, T, D] and lengths [B] to log-probabilities [B, T', classes] and
output lengths; `downsample` says T/T'. Ablation knobs: dropout.embedding (after the front end),
dropout.lstm (between LSTM layers), dropout.classifier (before the last Linear), kaiming. Knobs an
architecture has no place for are refused by ctclab.config (A1 has no ConvNeXt blocks, A2 no
LSTM); for A2, lstm_layers is the number of residual stages and convnext_blocks the blocks in each.

The BiLSTM runs packed on CUDA (cuDNN) and unpacked on the CPU, where backward through packed
sequences is far slower; both paths use the same weights and give the same outputs.
"""
from __future__ import annotations

import math
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .config import ModelConfig
from .labels import NUM_CLASSES


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

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """`lengths` stay on the CPU: packing reads them there, so no host-device wait."""
        if x.is_cuda:
            # The recurrence runs in fp32 outside autocast: autocast would hand cuDNN fp16 (also
            # under bf16 autocast, where no grad scaler guards it) and mean-reduced CTC gradients
            # of ~1e-5 at the LSTM can underflow there. It is latency-bound anyway.
            with torch.autocast("cuda", enabled=False):
                packed = pack_padded_sequence(x.float(), lengths.cpu(), batch_first=True, enforce_sorted=False)
                out, _ = self.lstm(packed)
            return pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])[0]
        return self.forward_unpacked(x, lengths)

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


class CTCModel(nn.Module):
    def __init__(self, cfg: ModelConfig, input_dim: int, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.config, self.input_dim, self.num_classes = cfg, input_dim, num_classes
        d, h = cfg.dropout, cfg.hidden
        blocks = cfg.convnext_blocks if cfg.arch == "conv_lstm" else 0
        self.front = ConvFrontEnd(input_dim, cfg.embed_dim, cfg.stride, blocks, d.embedding)
        if cfg.arch == "convnext":
            # A2: as many residual stages as the LSTM models have layers, at the BiLSTM's output
            # width (2h), so the three architectures compare at similar parameter counts.
            stages = [nn.Conv1d(cfg.embed_dim, 2 * h, 1)]
            for _ in range(cfg.lstm_layers):
                stages += [ConvNeXtBlock1d(2 * h) for _ in range(cfg.convnext_blocks)]
            self.body = nn.Sequential(*stages)
            head_in = 2 * h
        else:
            self.body = BiLSTM(cfg.embed_dim, h, cfg.lstm_layers, d.lstm)
            head_in = 2 * h
        drop = nn.Dropout(d.classifier) if d.classifier > 0 else nn.Identity()
        if cfg.arch == "conv_lstm":
            self.head = nn.Sequential(nn.Linear(head_in, 4 * h), nn.GELU(), drop, nn.Linear(4 * h, num_classes))
        else:
            self.head = nn.Sequential(drop, nn.Linear(head_in, num_classes))
        if cfg.kaiming:
            self.apply(_kaiming)

    @property
    def downsample(self) -> int:
        return self.config.stride

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return self.front.output_lengths(lengths)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out_lengths = self.output_lengths(lengths)
        h = self.front(x)
        if isinstance(self.body, BiLSTM):
            h = self.body(h, out_lengths)
        else:
            h = self.body(h.transpose(1, 2)).transpose(1, 2)
        logits = self.head(h)
        return torch.log_softmax(logits.float(), dim=-1), out_lengths

    def spec(self) -> dict:
        """Everything needed to rebuild this module (stored in checkpoints)."""
        return {"config": self.config.model_dump(), "input_dim": self.input_dim, "num_classes": self.num_classes}


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


def _kaiming(m: nn.Module) -> None:
    if isinstance(m, (nn.Conv1d, nn.Linear)):
        nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def build(cfg: ModelConfig, input_dim: int, num_classes: int = NUM_CLASSES) -> CTCModel:
    return CTCModel(cfg, input_dim, num_classes)


def from_spec(spec: dict) -> CTCModel:
    """Rebuild a model from a checkpoint's spec, validating its config like params.yaml."""
    from .config import one_line
    from .errors import CtclabError
    from pydantic import ValidationError

    try:
        cfg = ModelConfig.model_validate(spec["config"])
    except ValidationError as err:
        raise CtclabError(one_line(err, "checkpoint model_spec", ModelConfig)) from None
    return CTCModel(cfg, spec["input_dim"], spec["num_classes"])


def compile_parts(model: CTCModel) -> CTCModel:
    """torch.compile, in place (state-dict keys unchanged), the parts whose many small ops fuse: the
    conv front end, A2's ConvNeXt stages and the head. The BiLSTM stays eager: cuDNN runs it as one
    kernel per layer on CUDA, and the CPU path is torch.lstm already. Shapes vary with every
    bucketed batch, hence dynamic shapes (one graph, not one per length)."""
    for part in (model.front, model.head, *([] if isinstance(model.body, BiLSTM) else [model.body])):
        part.compile(dynamic=True)
    return model


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
