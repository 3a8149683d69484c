"""A1: conv embedding → BiLSTM → Linear(2h, classes)."""
from __future__ import annotations

from typing import Literal

from torch import nn

from ..config import AtLeast1, ArchConfig, Probability
from ..models import BiLSTM, ConvFrontEnd, FrontBodyHead, dropout, kaiming, register


class LSTMDropout(ArchConfig):
    embedding: Probability = 0.1   # after the conv front end
    lstm: Probability = 0.2        # between LSTM layers
    classifier: Probability = 0.1  # before the last Linear


class LSTMConfig(ArchConfig):
    hidden: AtLeast1 = 160  # LSTM units per direction
    lstm_layers: AtLeast1 = 2
    embed_dim: AtLeast1 = 128
    stride: Literal[1, 2, 4] = 2
    kaiming: bool = True
    dropout: LSTMDropout = LSTMDropout()


@register("lstm", LSTMConfig)
class ConvBiLSTM(FrontBodyHead):
    def __init__(self, cfg: LSTMConfig, input_dim: int, num_classes: int):
        super().__init__(cfg, input_dim, num_classes)
        self.front = ConvFrontEnd(input_dim, cfg.embed_dim, cfg.stride, 0, cfg.dropout.embedding)
        self.body = BiLSTM(cfg.embed_dim, cfg.hidden, cfg.lstm_layers, cfg.dropout.lstm)
        self.head = nn.Sequential(dropout(cfg.dropout.classifier), nn.Linear(2 * cfg.hidden, num_classes))
        if cfg.kaiming:
            self.apply(kaiming)
