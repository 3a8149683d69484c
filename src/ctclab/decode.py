"""CTC decoding (pure: tensors and arrays in, label sequences out).

Greedy is vectorised in torch. Beam search is CTC prefix beam search from `fast-ctc-decode`
(Rust; its authors report the same output as ctcdecode, faster; ctcdecode itself cannot be
installed from PyPI here, so that is not re-measured): it takes
probabilities, blank first, and returns a string, so labels travel as one character each. It
holds the GIL, so `workers > 1` parallelises across utterances with processes.

Decoders share one interface — `decode(log_probs [B, T, C], lengths [B]) -> list[list[int]]` —
and a registry: `register_decoder(name)` on a function that takes the decode params and returns a
context manager giving such a callable (a pool, a loaded LM, … is closed after use). The evaluate
stage scores every registered decoder; another backend (ctcdecode, flashlight-text with a phoneme
LM) is one module in src/ctclab/decoders.
"""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from .config import DecodeConfig
from .errors import worker_context
from .labels import BLANK, NUM_CLASSES
from .plugins import claim

DecodeFn = Callable[[torch.Tensor, torch.Tensor], list[list[int]]]


@dataclass(frozen=True)
class Decoder:
    name: str
    open: Callable[[DecodeConfig], AbstractContextManager[DecodeFn]]


_DECODERS: dict[str, tuple[Decoder, object]] = {}  # name → (decoder, the function that registered it)


def register_decoder(name: str):
    """Decorator: `open(cfg: DecodeConfig)` gives a context manager whose value decodes a batch.
    Its scores are dev_lev_<name> and dev_per_<name> (ctclab.results)."""
    def add(open_fn: Callable[[DecodeConfig], AbstractContextManager[DecodeFn]]):
        claim(_DECODERS, name, Decoder(name, open_fn), open_fn, "decoder")
        return open_fn
    return add


def registered() -> dict[str, Decoder]:
    """The decoders registered so far (ctclab.decoders.available() also imports the user's)."""
    return {name: decoder for name, (decoder, _) in _DECODERS.items()}

# Private-use code points: one character per class, blank first, never clashing with anything.
_ALPHABET = [chr(0xE000 + i) for i in range(NUM_CLASSES)]
_CHAR_TO_INDEX = {c: i for i, c in enumerate(_ALPHABET)}


def greedy(log_probs: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    """Best path: argmax per frame, collapse repeats, drop blanks."""
    best = log_probs.argmax(-1)  # [B, T]
    T = best.shape[1]
    valid = torch.arange(T, device=best.device)[None, :] < lengths.to(best.device)[:, None]
    changed = torch.ones_like(best, dtype=torch.bool)
    changed[:, 1:] = best[:, 1:] != best[:, :-1]
    keep = valid & changed & (best != BLANK)
    best, keep = best.cpu(), keep.cpu()
    return [best[i][keep[i]].tolist() for i in range(best.shape[0])]


def _beam_one(args) -> list[int]:
    from fast_ctc_decode import beam_search

    probs, beam_width = args
    if len(probs) == 0:
        return []
    text, _ = beam_search(probs, _ALPHABET, beam_size=beam_width, beam_cut_threshold=0.0)
    return [_CHAR_TO_INDEX[c] for c in text]


class BeamDecoder:
    """CTC prefix beam search via fast-ctc-decode; reuse one instance to keep its worker pool."""

    def __init__(self, beam_width: int, workers: int = 1):
        self.beam_width, self.workers = beam_width, workers
        # forkserver, not fork: the caller may already hold a CUDA context, which a forked child can't use
        self._pool = ProcessPoolExecutor(workers, mp_context=worker_context()) if workers > 1 else None

    def decode(self, log_probs: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
        probs = log_probs.detach().float().exp().cpu().numpy()
        jobs = [(np.ascontiguousarray(probs[i, : int(n)], dtype=np.float32), self.beam_width)
                for i, n in enumerate(lengths.tolist())]
        if self._pool is None:
            return [_beam_one(j) for j in jobs]
        return list(self._pool.map(_beam_one, jobs, chunksize=max(1, len(jobs) // (4 * self.workers))))

    __call__ = decode

    def close(self, cancel: bool = False) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=cancel)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self.close(cancel=exc_type is not None)  # interrupted: drop the queued chunks, end the workers


@register_decoder("greedy")
def _open_greedy(cfg: DecodeConfig) -> AbstractContextManager[DecodeFn]:
    return nullcontext(greedy)


@register_decoder("beam")
def _open_beam(cfg: DecodeConfig) -> AbstractContextManager[DecodeFn]:
    return BeamDecoder(cfg.beam_width, cfg.workers)
