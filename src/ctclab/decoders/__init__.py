"""Decoders beyond ctclab.decode's greedy and beam: one module each, found when evaluate runs.

    # src/ctclab/decoders/my_decoder.py
    from contextlib import nullcontext
    from ctclab.decode import register_decoder

    @register_decoder("my_decoder")
    def open_my_decoder(cfg):          # cfg: params.yaml's decode section
        return nullcontext(my_decode)  # my_decode(log_probs [B, T, C], lengths [B]) -> [[label, ...], ...]

The evaluate stage scores every decoder (metrics/eval.json dev_lev_my_decoder, dev_per_my_decoder;
MLflow eval_dev_lev_my_decoder, …); this folder is a dependency of evaluate in dvc.yaml.
"""
from __future__ import annotations

from .. import decode
from ..plugins import import_all


def available() -> dict[str, decode.Decoder]:
    """Every decoder: greedy and beam, then each module of this folder's (imported on first use)."""
    import sys

    import_all(sys.modules[__name__])
    return decode.registered()
