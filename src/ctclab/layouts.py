"""Recognise a dataset folder's layout: HW3P2 Spring 2022, Fall 2022, or ctclab's own corpus.

    Spring 2022: .../train/{mfcc,transcript}, dev/{mfcc,transcript}, test/mfcc + test/test_order.csv;
                 transcripts wrapped in <sos> ... <eos>; submission `id,predictions`.
    Fall 2022:   .../train-clean-100, dev-clean, test-clean (each mfcc/ + transcript/ or
                 transcript/raw/); wrapped in [SOS] ... [EOS], SIL as [SIL]; test order = sorted
                 names; submission `index,label`.
    ctclab:      ctclab_corpus.json beside train/dev/test (Spring 2022's shape, no markers,
                 test transcripts present, so test can be scored too).

The layout decides where each split lives, the test order, the submission format and the markers
to strip; the feature dimension is always read from the data.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import CtclabError

# The file that marks a folder as ctclab's own corpus layout (written by ctclab.corpus).
CORPUS_MARKER = "ctclab_corpus.json"
MARKERS = {"<sos>", "<eos>", "[SOS]", "[EOS]"}
SYMBOL_ALIASES = {"[SIL]": "SIL"}


@dataclass
class Split:
    mfcc_dir: Path
    transcript_dir: Path | None  # None where the competition gives no transcripts (test)


@dataclass
class Layout:
    kind: str  # spring2022 | fall2022 | ctclab
    root: Path
    splits: dict[str, Split]
    test_order: list[str] = field(default_factory=list)  # mfcc file names, submission order

    @property
    def submission_format(self) -> str:
        return "fall2022" if self.kind == "fall2022" else "spring2022"


def _has(d: Path, *names: str) -> bool:
    return all((d / n).exists() for n in names)


def _candidates(root: Path, depth: int = 3):
    yield root
    if depth and root.is_dir():
        for child in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            yield from _candidates(child, depth - 1)


def _transcripts(split_dir: Path) -> Path | None:
    t = split_dir / "transcript"
    if (t / "raw").is_dir() and not any(t.glob("*.npy")):
        return t / "raw"
    return t if t.is_dir() else None


def _read_test_order(csv_path: Path, mfcc_dir: Path) -> list[str]:
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise CtclabError(f"{csv_path}: empty; expected a header row and one mfcc file name per row")
    names = [r[0].strip() for r in rows[1:] if r and r[0].strip()]
    missing = [n for n in names if not (mfcc_dir / n).is_file()]
    if missing:
        raise CtclabError(f"{csv_path}: names {missing[0]!r} ({len(missing)} missing in all), "
                          f"which is not in {mfcc_dir}; expected every row to name a test mfcc file")
    return names


def detect(root: str | Path) -> Layout:
    root = Path(root)
    if not root.is_dir():
        raise CtclabError(f"{root}: not a folder; expected an HW3P2 dataset folder or a ctclab corpus")
    for d in _candidates(root):
        if (d / CORPUS_MARKER).is_file() and _has(d, "train/mfcc", "dev/mfcc", "test/mfcc"):
            splits = {s: Split(d / s / "mfcc", _transcripts(d / s)) for s in ("train", "dev", "test")}
            return Layout("ctclab", d, splits, _read_test_order(d / "test/test_order.csv", d / "test/mfcc"))
        if _has(d, "train/mfcc", "train/transcript", "dev/mfcc", "dev/transcript", "test/mfcc"):
            splits = {s: Split(d / s / "mfcc", _transcripts(d / s)) for s in ("train", "dev")}
            splits["test"] = Split(d / "test/mfcc", _transcripts(d / "test"))
            order_csv = d / "test" / "test_order.csv"
            if not order_csv.is_file():
                raise CtclabError(f"{order_csv}: missing; a Spring-2022 layout needs it for the submission order")
            return Layout("spring2022", d, splits, _read_test_order(order_csv, d / "test/mfcc"))
        if _has(d, "train-clean-100/mfcc", "dev-clean/mfcc", "test-clean/mfcc"):
            names = {"train": "train-clean-100", "dev": "dev-clean", "test": "test-clean"}
            splits = {s: Split(d / n / "mfcc", _transcripts(d / n)) for s, n in names.items()}
            order = sorted(p.name for p in (d / "test-clean/mfcc").glob("*.npy"))
            return Layout("fall2022", d, splits, order)
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())[:8]
    raise CtclabError(
        f"{root}: no recognised dataset layout (found {', '.join(entries) or 'nothing'}); expected "
        "train/ dev/ test/ with mfcc/ and transcript/ plus test/test_order.csv (Spring 2022), "
        "train-clean-100/ dev-clean/ test-clean/ (Fall 2022), or a ctclab corpus")


def load_transcript(path: Path) -> list[str]:
    """Phoneme symbols of one transcript file, sentence markers stripped and [SIL] → SIL."""
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError:  # some course copies store object arrays of str
        arr = np.load(path, allow_pickle=True)
    symbols = [str(s) for s in np.asarray(arr).reshape(-1)]
    return [SYMBOL_ALIASES.get(s, s) for s in symbols if s not in MARKERS]
