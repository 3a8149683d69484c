"""A2: conv stem → residual 1-D ConvNeXt stages (depthwise 7-tap, inverted bottleneck) → Linear.
The stages run at width 2·hidden, the BiLSTM models' output width, so the three architectures
compare at similar parameter counts."""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ..config import AtLeast1, ArchConfig, Probability
from ..models import ConvFrontEnd, ConvNeXtBlock1d, FrontBodyHead, dropout, kaiming, register


class ConvNeXtDropout(ArchConfig):
    embedding: Probability = 0.1   # after the conv stem
    classifier: Probability = 0.1  # before the last Linear


class ConvNeXtConfig(ArchConfig):
    hidden: AtLeast1 = 128  # the stages' width is 2 × hidden
    stages: AtLeast1 = 2
    blocks: AtLeast1 = 1     # ConvNeXt blocks per stage
    embed_dim: AtLeast1 = 128
    stride: Literal[1, 2, 4] = 2
    kaiming: bool = True
    dropout: ConvNeXtDropout = ConvNeXtDropout()


@register("convnext", ConvNeXtConfig)
class ConvNeXt(FrontBodyHead):
    def __init__(self, cfg: ConvNeXtConfig, input_dim: int, num_classes: int):
        super().__init__(cfg, input_dim, num_classes)
        width = 2 * cfg.hidden
        self.front = ConvFrontEnd(input_dim, cfg.embed_dim, cfg.stride, 0, cfg.dropout.embedding)
        self.body = nn.Sequential(nn.Conv1d(cfg.embed_dim, width, 1),
                                  *(ConvNeXtBlock1d(width) for _ in range(cfg.stages * cfg.blocks)))
        self.head = nn.Sequential(dropout(cfg.dropout.classifier), nn.Linear(width, num_classes))
        if cfg.kaiming:
            self.apply(kaiming)

    def encode(self, h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.body(h.transpose(1, 2)).transpose(1, 2)
