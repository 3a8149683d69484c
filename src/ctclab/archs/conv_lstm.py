"""A3, the write-up's best: Conv1d(stride) + BatchNorm + GELU + ConvNeXt block(s) + dropout →
BiLSTM → Linear(2h, 4h) + GELU + Linear(4h, classes)."""
from __future__ import annotations

from typing import Literal

from torch import nn

from ..config import AtLeast1, ArchConfig, NonNegativeInt
from ..models import BiLSTM, ConvFrontEnd, FrontBodyHead, dropout, kaiming, register
from .lstm import LSTMDropout


class ConvLSTMConfig(ArchConfig):
    hidden: AtLeast1 = 128  # LSTM units per direction
    lstm_layers: AtLeast1 = 2
    embed_dim: AtLeast1 = 128
    stride: Literal[1, 2, 4] = 2
    convnext_blocks: NonNegativeInt = 1  # after the strided convs
    kaiming: bool = True
    dropout: LSTMDropout = LSTMDropout()


@register("conv_lstm", ConvLSTMConfig)
class ConvLSTM(FrontBodyHead):
    def __init__(self, cfg: ConvLSTMConfig, input_dim: int, num_classes: int):
        super().__init__(cfg, input_dim, num_classes)
        h = cfg.hidden
        self.front = ConvFrontEnd(input_dim, cfg.embed_dim, cfg.stride, cfg.convnext_blocks, cfg.dropout.embedding)
        self.body = BiLSTM(cfg.embed_dim, h, cfg.lstm_layers, cfg.dropout.lstm)
        self.head = nn.Sequential(nn.Linear(2 * h, 4 * h), nn.GELU(), dropout(cfg.dropout.classifier),
                                  nn.Linear(4 * h, num_classes))
        if cfg.kaiming:
            self.apply(kaiming)
