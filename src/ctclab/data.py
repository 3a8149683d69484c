"""Preprocessing into compact shards, and reading them back for training and decoding.

A split's shard is one folder with one contiguous float32 feature array plus offsets, so
training memory-maps a handful of files instead of opening thousands:

    <split>/features.npy       float32 [total_frames, feature_dim]
    <split>/frame_offsets.npy  int64 [N + 1]
    <split>/labels.npy         int16 [total_labels]   (label indices, 1..40; empty for unlabelled test)
    <split>/label_offsets.npy  int64 [N + 1]
    <split>/ids.json           utterance ids (test: in submission order)
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import layouts, storage
from .config import FeaturesConfig
from .errors import CtclabError
from .labels import INDEX
from .results import DataMeta

SPLITS = ("train", "dev", "test")


@dataclass
class Utterance:
    """One valid utterance as found by the scan: where its features are, and its labels."""
    uid: str
    path: Path
    frames: int
    labels: np.ndarray  # int16 indices


class RunningStats:
    """Per-dimension mean and std over many arrays without holding them (Chan et al.'s merge)."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, None, None

    def add(self, x: np.ndarray) -> None:
        x = x.astype(np.float64)
        n, mean, m2 = len(x), x.mean(0), ((x - x.mean(0)) ** 2).sum(0)
        if self.n == 0:
            self.n, self.mean, self.m2 = n, mean, m2
            return
        total, delta = self.n + n, mean - self.mean
        self.mean = self.mean + delta * n / total
        self.m2 = self.m2 + m2 + delta ** 2 * self.n * n / total
        self.n = total

    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / self.n)


def _problem(report: list, split: str, path: Path, problem: str) -> None:
    report.append({"split": split, "file": str(path), "problem": problem})


def _load_features(path: Path, expected_dim: int | None) -> tuple[np.ndarray | None, str | None]:
    try:
        x = np.load(path, allow_pickle=False)
    except Exception as err:  # a corrupt or non-npy file is a data problem, not a crash
        return None, f"cannot be read as .npy ({type(err).__name__})"
    if x.ndim != 2 or not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        return None, f"shape {x.shape} dtype {x.dtype}, expected a 2-D float array [frames, features]"
    if expected_dim is not None and x.shape[1] != expected_dim:
        return None, f"feature dim {x.shape[1]}, expected {expected_dim} (the first train utterance's)"
    return x.astype(np.float32), None


def _check_labels(x: np.ndarray, transcript: Path) -> tuple[np.ndarray | None, str | None]:
    try:
        symbols = layouts.load_transcript(transcript)
    except Exception as err:  # corrupt, not .npy, or a pickle that would run code: a data problem
        return None, f"cannot be read as a transcript .npy ({type(err).__name__}: {str(err)[:80]})"
    unknown = sorted({s for s in symbols if s not in INDEX})
    if unknown:
        return None, f"unknown symbols {unknown[:5]}, expected SIL or ARPAbet phonemes"
    if not symbols:
        return None, "no labels after stripping sentence markers"
    if len(x) < len(symbols):
        return None, f"{len(x)} frames for {len(symbols)} labels; CTC needs frames >= labels"
    return np.array([INDEX[s] for s in symbols], np.int16), None


def scan_split(split: str, where: layouts.Split, order: list[str] | None, expected_dim: int | None,
               report: list, stats: RunningStats | None = None) -> tuple[list[Utterance], int | None]:
    """Validate one split file by file, holding one utterance's features at a time; bad ones go
    to `report` and are left out. Features of the valid ones feed `stats` when given."""
    mfcc = {p.name: p for p in where.mfcc_dir.glob("*.npy")}
    trans = {p.name: p for p in where.transcript_dir.glob("*.npy")} if where.transcript_dir else {}
    names = order if order else sorted(mfcc)
    if trans:
        for name in sorted(set(trans) - set(mfcc)):
            _problem(report, split, trans[name], "transcript has no matching mfcc file")
    utts = []
    for name in names:
        x, err = _load_features(mfcc[name], expected_dim)
        if not err:
            expected_dim = expected_dim or x.shape[1]
            err = ("0 frames; expected at least one feature frame" if len(x) == 0 else
                   f"{int(np.sum(~np.isfinite(x)))} non-finite values (NaN/inf)" if not np.all(np.isfinite(x)) else
                   "mfcc file has no matching transcript" if trans and name not in trans else None)
        labels, where_bad = np.zeros(0, np.int16), mfcc[name]
        if not err and trans:
            labels, err = _check_labels(x, trans[name])
            where_bad = trans[name] if err and not err.endswith("frames >= labels") else mfcc[name]
        if err:
            _problem(report, split, where_bad, err)
            continue
        if stats is not None:
            stats.add(x)
        utts.append(Utterance(Path(name).stem, mfcc[name], len(x), labels))
    return utts, expected_dim


def _write_shard(out: Path, utts: list[Utterance], dim: int, normalise) -> None:
    """Each utterance is read again, normalised and written straight into the memory-mapped
    features file (temp name, then rename): memory stays one utterance whatever the split size."""
    out.mkdir(parents=True, exist_ok=True)
    frame_offsets = np.cumsum([0] + [u.frames for u in utts]).astype(np.int64)
    label_offsets = np.cumsum([0] + [len(u.labels) for u in utts]).astype(np.int64)
    tmp = out / ".features.npy.tmp"
    feats = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(int(frame_offsets[-1]), dim))
    for u, start in zip(utts, frame_offsets[:-1]):
        feats[start:start + u.frames] = normalise(np.load(u.path, allow_pickle=False).astype(np.float32))
    feats.flush()
    del feats
    os.replace(tmp, out / "features.npy")
    storage.save_npy(out / "frame_offsets.npy", frame_offsets)
    labels = np.concatenate([u.labels for u in utts]) if utts else np.zeros(0, np.int16)
    storage.save_npy(out / "labels.npy", labels.astype(np.int16))
    storage.save_npy(out / "label_offsets.npy", label_offsets)
    storage.write_json(out / "ids.json", [u.uid for u in utts])


def _check_usable(raw, out: Path, data: dict, report: list) -> None:
    for split in SPLITS:
        if not data[split]:
            raise CtclabError(f"{raw}: no usable utterances in the {split} split "
                              f"({sum(r['split'] == split for r in report)} bad); see {out / 'bad_utterances.json'}")
        if split == "test" and any(r["split"] == "test" for r in report):
            raise CtclabError(f"{raw}: bad test utterances would leave rows out of the submission; "
                              f"see {out / 'bad_utterances.json'}")


def preprocess(raw: str | Path, out: str | Path, cfg: FeaturesConfig) -> DataMeta:
    """Validate, normalise and shard every split of the dataset under `raw`; return the meta dict.
    Streams: one utterance in memory at a time. The bad-utterance report is written even when
    `cfg.on_bad == 'fail'` stops the stage; an interrupt (Ctrl-C, SIGTERM) removes `out` whole."""
    try:
        return _preprocess(layouts.detect(raw), raw, Path(out), cfg)
    except KeyboardInterrupt:
        shutil.rmtree(out, ignore_errors=True)
        raise


def _preprocess(layout: layouts.Layout, raw, out: Path, cfg: FeaturesConfig) -> DataMeta:
    report: list[dict] = []
    data: dict[str, list[Utterance]] = {}
    dim, train_stats = None, RunningStats() if cfg.normalize == "global" else None
    for split in SPLITS:
        order = layout.test_order if split == "test" else None
        stats = train_stats if split == "train" else None
        data[split], dim = scan_split(split, layout.splits[split], order, dim, report, stats)
    storage.write_json(out / "bad_utterances.json", report)
    if report and cfg.on_bad == "fail":
        first = report[0]
        raise CtclabError(f"{first['file']}: {first['problem']} ({len(report)} bad utterances in all, listed in "
                          f"{out / 'bad_utterances.json'}); fix them or set features.on_bad: skip")
    _check_usable(raw, out, data, report)
    # full precision: predict normalises new audio with these exact numbers
    stats = {"mean": train_stats.mean.tolist(), "std": (train_stats.std() + 1e-5).tolist()} if train_stats else None
    normalise = normaliser(cfg.normalize, stats)
    for split in SPLITS:
        _write_shard(out / split, data[split], dim, normalise)
    meta = DataMeta(
        layout=layout.kind, submission_format=layout.submission_format, feature_dim=dim,
        normalize=cfg.normalize, global_stats=stats,
        utterances={s: len(data[s]) for s in SPLITS},
        frames={s: int(sum(u.frames for u in data[s])) for s in SPLITS},
        labelled={s: bool(sum(len(u.labels) for u in data[s])) for s in SPLITS},
        bad_utterances=len(report),
        data_hash=storage.sha256_files(out, [f"{s}/{f}" for s in SPLITS for f in SHARD_FILES]),
    )
    storage.write_json(out / "meta.json", dataclasses.asdict(meta))
    return meta


def read_meta(folder: str | Path) -> DataMeta:
    """A preprocessed folder's meta.json; missing or unreadable is one line with the fix."""
    path = Path(folder) / "meta.json"
    if not path.is_file():
        raise CtclabError(f"{path}: missing; run the preprocess stage first (dvc repro preprocess)")
    try:
        return DataMeta(**json.loads(path.read_text()))
    except (ValueError, TypeError) as err:  # cut short, not JSON, or other keys
        raise CtclabError(f"{path}: not a meta.json preprocess wrote ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:120]}); re-make it with `dvc repro -f preprocess`") from None


REMAKE_SHARDS = "re-make them with `dvc repro -f preprocess` (or `dvc checkout` if they are cached)"
SHARD_FILES = ("features.npy", "frame_offsets.npy", "labels.npy", "label_offsets.npy", "ids.json")


def normaliser(mode: str, stats: dict | None):
    """The per-utterance feature transform; `global` uses the train split's mean and std (+1e-5)."""
    if mode == "utterance":
        return lambda x: ((x - x.mean(0)) / (x.std(0) + 1e-5)).astype(np.float32)
    if mode == "global":
        mean, std = np.asarray(stats["mean"], np.float64), np.asarray(stats["std"], np.float64)
        return lambda x: ((x - mean) / std).astype(np.float32)
    return lambda x: x


def shard_folder(mfcc_dir: Path, order: list[str] | None, out: Path, normalize: str, stats: dict | None) -> "Shard":
    """Unlabelled MFCC files (in `order`, else by name) as a shard, normalised as a model's training
    data was — exactly as preprocess does, so decoding them matches the submission byte for byte."""
    report: list[dict] = []
    utts, dim = scan_split("input", layouts.Split(Path(mfcc_dir), None), order, None, report)
    if report:
        raise CtclabError(f"{report[0]['file']}: {report[0]['problem']} ({len(report)} bad files in {mfcc_dir})")
    if not utts:
        raise CtclabError(f"{mfcc_dir}: no .npy MFCC files; expected [frames, features] arrays")
    _write_shard(Path(out), utts, dim, normaliser(normalize, stats))
    return Shard(out)


class Shard:
    """Read-only, memory-mapped view of one split's shard."""

    def __init__(self, folder: str | Path):
        folder = self.folder = Path(folder)
        missing = [f for f in SHARD_FILES if not (folder / f).is_file()]
        if missing:
            raise CtclabError(f"{folder}: missing {', '.join(missing)}; run the preprocess stage (dvc repro preprocess)")
        try:
            reading = folder / "features.npy"
            self.features = np.load(reading, mmap_mode="r")
            for name in ("frame_offsets", "labels", "label_offsets"):
                reading = folder / f"{name}.npy"
                setattr(self, name, np.load(reading))
            reading = folder / "ids.json"
            self.ids = json.loads(reading.read_text())
            reading = folder
            consistent = (self.features.ndim == 2 and len(self.frame_offsets) == len(self.ids) + 1 == len(self.label_offsets)
                          and self.frame_offsets[-1] == len(self.features) and self.label_offsets[-1] == len(self.labels))
        except (ValueError, OSError, EOFError, TypeError, IndexError) as err:  # cut short, garbage, not .npy
            raise CtclabError(f"{reading}: shard file cut short or corrupt ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:80]}); {REMAKE_SHARDS}") from None
        if not consistent:
            raise CtclabError(f"{folder}: shard files disagree on its utterances or frames; {REMAKE_SHARDS}")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def feature_dim(self) -> int:
        return int(self.features.shape[1])

    def frames(self) -> np.ndarray:
        return np.diff(self.frame_offsets)

    def label(self, i: int) -> np.ndarray:
        return self.labels[self.label_offsets[i]:self.label_offsets[i + 1]].astype(np.int64)

    def references(self) -> list[list[int]]:
        """Every utterance's label indices, without touching the features."""
        return [self.label(i).tolist() for i in range(len(self))]

    def item(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        f0, f1 = self.frame_offsets[i], self.frame_offsets[i + 1]
        return np.asarray(self.features[f0:f1]), self.label(i)
