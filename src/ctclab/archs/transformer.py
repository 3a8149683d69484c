"""A Transformer encoder on the conv front end: no recurrence, so every time step runs in parallel
(the question "what if we drop the BiLSTM", which matters most on a GPU).

Conv1d(stride) + BatchNorm + GELU (+ ConvNeXt blocks) + dropout → sinusoidal positions → pre-norm
Transformer encoder layers (torch's own nn.TransformerEncoderLayer, GELU, padded frames masked out
of attention) → LayerNorm → dropout → Linear(d_model, classes). Each layer is built on its own (not
deep-copied from one, as nn.TransformerEncoder does), so no two layers start from the same weights.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import model_validator
from torch import nn

from ..config import AtLeast1, ArchConfig, NonNegativeInt, Probability, rule_error
from ..models import ConvFrontEnd, FrontBodyHead, dropout, kaiming, register


class TransformerDropout(ArchConfig):
    embedding: Probability = 0.1   # after the conv front end
    attention: Probability = 0.1   # inside each layer: attention weights and feed-forward (torch's `dropout`)
    classifier: Probability = 0.1  # before the last Linear


class TransformerConfig(ArchConfig):
    d_model: AtLeast1 = 128
    layers: AtLeast1 = 4
    heads: AtLeast1 = 4
    ff_mult: AtLeast1 = 4  # feed-forward width = ff_mult × d_model
    stride: Literal[1, 2, 4] = 2
    convnext_blocks: NonNegativeInt = 1
    kaiming: bool = False  # Kaiming on the front end's convs and the head; the layers keep torch's init
    dropout: TransformerDropout = TransformerDropout()

    @model_validator(mode="after")
    def _heads_divide_width(self):
        if self.d_model % self.heads:
            raise rule_error("heads", self.heads, f"a divisor of d_model ({self.d_model})")
        return self


def sinusoids(steps: int, dim: int, device: torch.device) -> torch.Tensor:
    """The original Transformer's fixed position signal [steps, dim] (computed, so any length works)."""
    position = torch.arange(steps, device=device, dtype=torch.float32)[:, None]
    rate = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    out = torch.zeros(steps, dim, device=device)
    out[:, 0::2] = torch.sin(position * rate)
    out[:, 1::2] = torch.cos(position * rate)[:, : dim // 2]
    return out


class Encoder(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        d = cfg.d_model
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d, cfg.heads, cfg.ff_mult * d, cfg.dropout.attention, activation="gelu",
                                       batch_first=True, norm_first=True) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(d)

    def forward(self, h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        steps = h.shape[1]
        padding = torch.arange(steps, device=h.device)[None, :] >= lengths.to(h.device)[:, None]
        h = h + sinusoids(steps, h.shape[2], h.device).to(h.dtype)
        for layer in self.layers:
            h = layer(h, src_key_padding_mask=padding)
        return self.norm(h)


@register("transformer", TransformerConfig)
class Transformer(FrontBodyHead):
    def __init__(self, cfg: TransformerConfig, input_dim: int, num_classes: int):
        super().__init__(cfg, input_dim, num_classes)
        self.front = ConvFrontEnd(input_dim, cfg.d_model, cfg.stride, cfg.convnext_blocks, cfg.dropout.embedding)
        self.body = Encoder(cfg)
        self.head = nn.Sequential(dropout(cfg.dropout.classifier), nn.Linear(cfg.d_model, num_classes))
        if cfg.kaiming:
            self.front.apply(kaiming)
            self.head.apply(kaiming)
