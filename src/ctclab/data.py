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

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import layouts, storage
from .config import FeaturesConfig
from .errors import CtclabError
from .labels import INDEX

SPLITS = ("train", "dev", "test")


@dataclass
class Utterance:
    uid: str
    features: np.ndarray
    labels: np.ndarray  # int16 indices


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


def read_split(split: str, where: layouts.Split, order: list[str] | None, expected_dim: int | None,
               report: list) -> tuple[list[Utterance], int | None]:
    """Load and validate one split; bad utterances go to `report` and are left out."""
    mfcc = {p.name: p for p in where.mfcc_dir.glob("*.npy")}
    trans = {p.name: p for p in where.transcript_dir.glob("*.npy")} if where.transcript_dir else {}
    names = order if order else sorted(mfcc)
    if trans:
        for name in sorted(set(trans) - set(mfcc)):
            _problem(report, split, trans[name], "transcript has no matching mfcc file")
    utts = []
    for name in names:
        x, err = _load_features(mfcc[name], expected_dim)
        if err:
            _problem(report, split, mfcc[name], err)
            continue
        expected_dim = expected_dim or x.shape[1]
        if len(x) == 0:
            _problem(report, split, mfcc[name], "0 frames; expected at least one feature frame")
            continue
        if not np.all(np.isfinite(x)):
            _problem(report, split, mfcc[name], f"{int(np.sum(~np.isfinite(x)))} non-finite values (NaN/inf)")
            continue
        if not trans:
            utts.append(Utterance(Path(name).stem, x, np.zeros(0, np.int16)))
            continue
        if name not in trans:
            _problem(report, split, mfcc[name], "mfcc file has no matching transcript")
            continue
        symbols = layouts.load_transcript(trans[name])
        unknown = sorted({s for s in symbols if s not in INDEX})
        if unknown:
            _problem(report, split, trans[name], f"unknown symbols {unknown[:5]}, expected SIL or ARPAbet phonemes")
            continue
        if not symbols:
            _problem(report, split, trans[name], "no labels after stripping sentence markers")
            continue
        if len(x) < len(symbols):
            _problem(report, split, mfcc[name], f"{len(x)} frames for {len(symbols)} labels; CTC needs frames >= labels")
            continue
        utts.append(Utterance(Path(name).stem, x, np.array([INDEX[s] for s in symbols], np.int16)))
    return utts, expected_dim


def _write_shard(out: Path, utts: list[Utterance], dim: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    frame_offsets = np.cumsum([0] + [len(u.features) for u in utts]).astype(np.int64)
    label_offsets = np.cumsum([0] + [len(u.labels) for u in utts]).astype(np.int64)
    # Written through a memory map (temp name, then rename) so big corpora never sit in RAM twice.
    tmp = out / ".features.npy.tmp"
    feats = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(int(frame_offsets[-1]), dim))
    for u, start in zip(utts, frame_offsets[:-1]):
        feats[start:start + len(u.features)] = u.features
    feats.flush()
    del feats
    os.replace(tmp, out / "features.npy")
    storage.save_npy(out / "frame_offsets.npy", frame_offsets)
    labels = np.concatenate([u.labels for u in utts]) if utts else np.zeros(0, np.int16)
    storage.save_npy(out / "labels.npy", labels.astype(np.int16))
    storage.save_npy(out / "label_offsets.npy", label_offsets)
    storage.write_json(out / "ids.json", [u.uid for u in utts])


def preprocess(raw: str | Path, out: str | Path, cfg: FeaturesConfig) -> dict:
    """Validate, normalise and shard every split of the dataset under `raw`; return the meta dict.
    The bad-utterance report is written even when `cfg.on_bad == 'fail'` stops the stage."""
    layout = layouts.detect(raw)
    out = Path(out)
    report: list[dict] = []
    data: dict[str, list[Utterance]] = {}
    dim = None
    for split in SPLITS:
        order = layout.test_order if split == "test" else None
        data[split], dim = read_split(split, layout.splits[split], order, dim, report)
    storage.write_json(out / "bad_utterances.json", report)
    if report and cfg.on_bad == "fail":
        first = report[0]
        raise CtclabError(f"{first['file']}: {first['problem']} ({len(report)} bad utterances in all, listed in "
                          f"{out / 'bad_utterances.json'}); fix them or set features.on_bad: skip")
    for split in SPLITS:
        if not data[split]:
            raise CtclabError(f"{raw}: no usable utterances in the {split} split "
                              f"({sum(r['split'] == split for r in report)} bad); see {out / 'bad_utterances.json'}")
        if split == "test" and any(r["split"] == "test" for r in report):
            raise CtclabError(f"{raw}: bad test utterances would leave rows out of the submission; "
                              f"see {out / 'bad_utterances.json'}")
    stats = normalize(data, cfg.normalize)
    for split in SPLITS:
        _write_shard(out / split, data[split], dim)
    meta = {
        "layout": layout.kind, "submission_format": layout.submission_format, "feature_dim": dim,
        "normalize": cfg.normalize, "global_stats": stats,
        "utterances": {s: len(data[s]) for s in SPLITS},
        "frames": {s: int(sum(len(u.features) for u in data[s])) for s in SPLITS},
        "labelled": {s: bool(sum(len(u.labels) for u in data[s])) for s in SPLITS},
        "bad_utterances": len(report),
        "data_hash": storage.sha256_files(out, [f"{s}/{f}" for s in SPLITS for f in SHARD_FILES]),
    }
    storage.write_json(out / "meta.json", meta)
    return meta


SHARD_FILES = ("features.npy", "frame_offsets.npy", "labels.npy", "label_offsets.npy", "ids.json")


def normalize(data: dict[str, list[Utterance]], mode: str) -> dict | None:
    """Normalise features in place; global statistics come from train only."""
    if mode == "utterance":
        for utts in data.values():
            for u in utts:
                u.features = ((u.features - u.features.mean(0)) / (u.features.std(0) + 1e-5)).astype(np.float32)
        return None
    if mode == "global":
        frames = np.concatenate([u.features for u in data["train"]]).astype(np.float64)
        mean, std = frames.mean(0), frames.std(0) + 1e-5
        for utts in data.values():
            for u in utts:
                u.features = ((u.features - mean) / std).astype(np.float32)
        return {"mean": mean.round(6).tolist(), "std": std.round(6).tolist()}
    return None


class Shard:
    """Read-only, memory-mapped view of one split's shard."""

    def __init__(self, folder: str | Path):
        folder = self.folder = Path(folder)
        missing = [f for f in SHARD_FILES if not (folder / f).is_file()]
        if missing:
            raise CtclabError(f"{folder}: missing {', '.join(missing)}; run the preprocess stage (dvc repro preprocess)")
        self.features = np.load(folder / "features.npy", mmap_mode="r")
        self.frame_offsets = np.load(folder / "frame_offsets.npy")
        self.labels = np.load(folder / "labels.npy")
        self.label_offsets = np.load(folder / "label_offsets.npy")
        self.ids = json.loads((folder / "ids.json").read_text())

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
