"""Scoring: Levenshtein distance on one-character phoneme strings (the `Levenshtein` package)."""
from __future__ import annotations

from dataclasses import dataclass

import Levenshtein

from .labels import to_string


@dataclass(frozen=True)
class Score:
    mean_distance: float  # the competition metric: mean edit distance per utterance
    per: float            # phoneme error rate: total distance / total reference length
    utterances: int


def distances(hyps: list[list[int]], refs: list[list[int]]) -> list[int]:
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses for {len(refs)} references")
    return [Levenshtein.distance(to_string(h), to_string(r)) for h, r in zip(hyps, refs)]


def score(hyps: list[list[int]], refs: list[list[int]]) -> Score:
    d = distances(hyps, refs)
    total_ref = sum(len(r) for r in refs)
    return Score(sum(d) / max(1, len(d)), sum(d) / max(1, total_ref), len(d))
