"""Every name ctclab gives a measurement, in one place (pure: no files, no tracking).

    per-epoch row       EpochRow: metrics/train_history.csv, and MLflow curves at step = epoch
    training summary    TrainSummary: metrics/train.json; MLflow best_dev_lev_greedy, best_epoch, train_seconds,
                        train_cpu_share
    evaluation          eval_scores(): metrics/eval.json (dev_lev_<decoder>, dev_per_<decoder>), and in
                        MLflow the same keys behind `eval_`, with decode_<decoder>_utterances_per_second
    test scores         submit_scores(): metrics/submit.json and MLflow (test_lev_beam, test_per_beam)
    the data            DataMeta: data/processed/meta.json (what preprocess made; ctclab.data reads it)

A decoder registered in ctclab.decode gets its keys from `lev` and `per`, so a new decoder's scores
appear in eval.json and MLflow with nothing else edited. Tracking's curves, verify's checks, the
studies' metric choice, the CLI summary and dvc.yaml's plots (tests/test_dvc_yaml.py) derive from here.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, fields

# The version of these names in MLflow runs (tag ctclab_schema). 2: params as params.yaml names
# them with a `model.<arch>` section each, dev_per_<decoder> and test_per_beam. Untagged runs are 1.
RUN_SCHEMA = 2

DEV, TEST = "dev", "test"
# The decoder that scores every epoch (and so picks models/best.pt) and the one submissions use.
EPOCH_DECODER, SUBMIT_DECODER = "greedy", "beam"
EVAL = "eval_"  # MLflow's name for an eval.json key: eval_<key>


@dataclass(frozen=True)
class DataMeta:
    """data/processed/meta.json: what preprocess made of the raw data."""
    layout: str                   # the detected layout's registered name (ctclab.layouts)
    submission_format: str        # the CSV format submissions take (ctclab.layouts.formats)
    feature_dim: int
    normalize: str                # features.normalize as applied
    global_stats: dict | None     # per-dimension train mean and std (normalize: global), else None
    utterances: dict[str, int]    # per split
    frames: dict[str, int]        # per split
    labelled: dict[str, bool]     # per split: transcripts present (test is scored only when it is)
    bad_utterances: int           # left out, listed in bad_utterances.json
    data_hash: str                # sha256 of the shards: the data's identity in runs and resume

    def profile(self) -> dict:
        """What MLflow's dataset view shows of it."""
        return {k: getattr(self, k) for k in ("layout", "feature_dim", "utterances", "frames", "normalize", "data_hash")}


def lev(split: str, decoder: str) -> str:
    """Mean Levenshtein distance per utterance (phonemes as characters), e.g. dev_lev_beam."""
    return f"{split}_lev_{decoder}"


def per(split: str, decoder: str) -> str:
    """Phoneme error rate: total edit distance / total reference length, e.g. dev_per_beam."""
    return f"{split}_per_{decoder}"


def decode_speed(decoder: str) -> str:
    return f"decode_{decoder}_utterances_per_second"


@dataclass(frozen=True)
class EpochRow:
    """One epoch, as metrics/train_history.csv has it (and MLflow, but for `epoch`, as curves)."""
    epoch: int
    train_loss: float      # CTC loss over the epoch's training batches (dropout on, mean over labels)
    dev_loss: float        # CTC loss summed per dev utterance (another unit than train_loss)
    dev_lev_greedy: float  # = lev(DEV, EPOCH_DECODER): the best epoch is the lowest
    dev_per: float         # greedy PER on dev
    lr: float              # at the epoch's end

    def values(self) -> dict[str, float]:
        """The curves' values (all but `epoch`)."""
        return {k: v for k, v in asdict(self).items() if k != "epoch"}


HISTORY_COLUMNS = tuple(f.name for f in fields(EpochRow))
EPOCH_SECONDS = "epoch_seconds"
# The process's CPU seconds ÷ (wall seconds × torch threads) over an epoch: ~1.0 when the training had
# its cores to itself; another process on them shows as less (measured, not assumed from -j × threads).
CPU_SHARE = "cpu_share"
HOST_LOAD = "host_load_1m"  # the host's 1-minute load average at the epoch's end (os.getloadavg)
TIMING = (EPOCH_SECONDS, "utterances_per_second", CPU_SHARE, HOST_LOAD)  # per-epoch MLflow curves beside the row's
CURVES = (*HISTORY_COLUMNS[1:], EPOCH_SECONDS, CPU_SHARE, HOST_LOAD)  # what a study child copies from a shared training
SELECT_BY = lev(DEV, EPOCH_DECODER)
assert SELECT_BY in HISTORY_COLUMNS
BEST = "best_" + SELECT_BY
TRAIN_SECONDS = "train_seconds"
TRAIN_CPU_SHARE = "train_cpu_share"  # CPU_SHARE over all epochs (weighted by their seconds)
VERIFIED_CURVES = ("train_loss", SELECT_BY)  # what `ctclab verify` compares epoch by epoch


@dataclass(frozen=True)
class TrainSummary:
    """metrics/train.json: the best epoch's dev scores and what the training was."""
    epochs: int
    best_epoch: int
    dev_lev_greedy: float
    dev_per: float
    dev_loss: float
    final_train_loss: float
    parameters: int
    infeasible_train: int
    infeasible_dev: int

    @classmethod
    def of(cls, history: list[EpochRow], parameters: int, infeasible: dict) -> "TrainSummary":
        best = min(history, key=lambda r: getattr(r, SELECT_BY))
        return cls(len(history), best.epoch, best.dev_lev_greedy, best.dev_per, best.dev_loss,
                   history[-1].train_loss, parameters, infeasible["train"], infeasible["dev"])

    def tracked(self, timing: dict[str, float]) -> dict[str, float]:
        """What MLflow gets of it when the training ends (timing: Store.train_timing's)."""
        return {BEST: self.dev_lev_greedy, **self.model_metadata(), **timing}

    def model_metadata(self) -> dict[str, int]:
        """What the logged MLflow model records of the training that chose it."""
        return {"best_epoch": self.best_epoch}


class EpochClock:
    """An epoch's TIMING, started when the epoch starts: wall seconds, utterances per second of
    its training part, the CPU share its torch threads got, and the host's load at its end."""

    def __init__(self, threads: int):
        self.threads, self.wall, self.cpu = threads, time.perf_counter(), time.process_time()

    def timing(self, seen: int, train_seconds: float) -> dict[str, float]:
        wall = time.perf_counter() - self.wall
        share = (time.process_time() - self.cpu) / (wall * self.threads)
        return dict(zip(TIMING, (wall, seen / train_seconds, share, os.getloadavg()[0])))


def eval_scores(scores: dict, beam_width: int) -> dict:
    """metrics/eval.json from each decoder's dev Score (ctclab.metrics.Score)."""
    out: dict = {}
    for decoder, s in scores.items():
        out[lev(DEV, decoder)], out[per(DEV, decoder)] = round(s.mean_distance, 6), round(s.per, 6)
    return {**out, "beam_width": beam_width}


def eval_metrics(decoders) -> tuple[str, ...]:
    """The eval.json keys that are scores (lower is better), for these decoder names."""
    return tuple(k for d in decoders for k in (lev(DEV, d), per(DEV, d)))


def submit_scores(score) -> dict:
    """metrics/submit.json's scores of the submission's decoder on a labelled test split."""
    return {lev(TEST, SUBMIT_DECODER): round(score.mean_distance, 6), per(TEST, SUBMIT_DECODER): round(score.per, 6)}


# Schema 1 named the beam's PER without its decoder; runs recorded then are read through this.
LEGACY_NAMES = {per(DEV, "beam"): "dev_per", per(TEST, "beam"): "test_per"}


def recorded(values: dict, key: str, prefix: str = ""):
    """`values[prefix + key]`, or the value under the name schema 1 gave it, or under `key` bare
    (MLflow runs from before evaluate's `eval_` prefix); None when it is in none of them."""
    for name in (prefix + key, prefix + LEGACY_NAMES.get(key, key), key):
        if name in values:
            return values[name]
    return None


def describe_eval(result: dict) -> str:
    """metrics/eval.json in one line: every decoder's dev distance, the submission decoder's PER."""
    prefix = lev(DEV, "")
    decoders = sorted((k[len(prefix):] for k in result if k.startswith(prefix)),
                      key=lambda d: (d != EPOCH_DECODER, d != SUBMIT_DECODER, d))  # greedy, beam, the others

    def label(decoder: str) -> str:  # the beam with its width, e.g. beam(10)
        return f"{decoder}({result['beam_width']})" if decoder == "beam" else decoder
    dists = ", ".join(f"{label(d)} {result[lev(DEV, d)]:.3f}" for d in decoders)
    ber = recorded(result, per(DEV, SUBMIT_DECODER))
    return f"dev Levenshtein {dists}" + (f", PER {ber:.1%}" if ber is not None else "")


def describe_test(result: dict) -> str:
    """metrics/submit.json's test scores as '; test Levenshtein 3.142, PER 17.4%', or '' when unscored."""
    distance, rate = recorded(result, lev(TEST, SUBMIT_DECODER)), recorded(result, per(TEST, SUBMIT_DECODER))
    return f"; test Levenshtein {distance:.3f}, PER {rate:.1%}" if distance is not None else ""
