"""Recognise a dataset folder's layout: HW3P2 Spring 2022, Fall 2022, ctclab's own corpus, or one
of yours (a module in src/ctclab/datasets/).

    Spring 2022: .../train/{mfcc,transcript}, dev/{mfcc,transcript}, test/mfcc + test/test_order.csv;
                 transcripts wrapped in <sos> ... <eos>; submission `id,predictions`.
    Fall 2022:   .../train-clean-100, dev-clean, test-clean (each mfcc/ + transcript/ or
                 transcript/raw/); wrapped in [SOS] ... [EOS], SIL as [SIL]; test order = sorted
                 names; submission `index,label`.
    ctclab:      ctclab_corpus.json beside train/dev/test (Spring 2022's shape, no markers,
                 test transcripts present, so test can be scored too).

A layout is a function registered with `register_layout(kind)` that looks at one folder and
returns a `Layout` (where each split lives, the test order, the submission format) or None; the
folder and the folders below it (three levels) are tried in turn, yours before the built-in ones.
A submission format (the CSV header and one character per class) is registered by name. The
markers to strip are common to all; the feature dimension is always read from the data.
"""
from __future__ import annotations

import csv
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import CtclabError
from .labels import F22_CHARS, NUM_CLASSES, S22_CHARS
from .plugins import claim, import_all, is_name

# The file that marks a folder as ctclab's own corpus layout (written by ctclab.corpus).
CORPUS_MARKER = "ctclab_corpus.json"
MARKERS = {"<sos>", "<eos>", "[SOS]", "[EOS]"}
SYMBOL_ALIASES = {"[SIL]": "SIL"}


@dataclass(frozen=True)
class SubmissionFormat:
    header: tuple[str, str]   # the CSV's two column names: utterance index, phoneme string
    chars: tuple[str, ...]    # one character per class, blank first


_FORMATS: dict[str, SubmissionFormat] = {}


def register_format(name: str, header: tuple[str, str], chars: tuple[str, ...]) -> SubmissionFormat:
    """A submission format a layout can name (call it at a module's top level)."""
    if len(chars) != NUM_CLASSES or len(set(chars)) != NUM_CLASSES:
        raise CtclabError(f"submission format {name!r}: {len(chars)} characters ({len(set(chars))} distinct); "
                          f"expected {NUM_CLASSES} distinct ones, blank first")
    fmt = SubmissionFormat(tuple(header), tuple(chars))
    if _FORMATS.get(name, fmt) != fmt:
        raise CtclabError(f"submission format {name!r}: registered twice, differently; rename one")
    _FORMATS[name] = fmt
    return fmt


def formats() -> dict[str, SubmissionFormat]:
    _import_plugins()
    return dict(_FORMATS)


@dataclass
class Split:
    mfcc_dir: Path
    transcript_dir: Path | None  # None where the competition gives no transcripts (test)


@dataclass
class Layout:
    kind: str  # its registered name: spring2022 | fall2022 | ctclab | yours
    root: Path
    splits: dict[str, Split]
    test_order: list[str] = field(default_factory=list)  # mfcc file names, submission order
    submission_format: str = "spring2022"


Detector = Callable[[Path], "Layout | None"]
_LAYOUTS: dict[str, tuple[Detector, Detector]] = {}
_BUILT_IN = ("ctclab", "spring2022", "fall2022")


def register_layout(kind: str):
    """Function decorator: `detect(folder) -> Layout | None` recognises layout `kind` in one folder."""
    if not is_name(kind):
        raise CtclabError(f"layout {kind!r}: expected a lowercase identifier (it is recorded in meta.json)")

    def add(detect: Detector) -> Detector:
        claim(_LAYOUTS, kind, detect, detect, "layout")
        return detect
    return add


def _import_plugins() -> None:
    from . import datasets

    import_all(datasets)


def _detectors() -> list[tuple[str, Detector]]:
    """Yours first (a new layout may look like a built-in one), then the built-in ones in order."""
    _import_plugins()
    yours = [(k, d) for k, (d, _) in _LAYOUTS.items() if k not in _BUILT_IN]
    return yours + [(k, _LAYOUTS[k][0]) for k in _BUILT_IN]


def has(d: Path, *names: str) -> bool:
    return all((d / n).exists() for n in names)


def _candidates(root: Path, depth: int = 3):
    yield root
    if depth and root.is_dir():
        for child in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            yield from _candidates(child, depth - 1)


def transcripts(split_dir: Path) -> Path | None:
    """A split's transcript folder (transcript/, or transcript/raw/ where the .npy files are), if any."""
    t = split_dir / "transcript"
    if (t / "raw").is_dir() and not any(t.glob("*.npy")):
        return t / "raw"
    return t if t.is_dir() else None


def read_test_order(csv_path: Path, mfcc_dir: Path) -> list[str]:
    """The submission order from a CSV whose first column names test mfcc files (after a header)."""
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
    detectors = _detectors()
    for d in _candidates(root):
        for kind, detector in detectors:
            layout = detector(d)
            if layout is not None:
                if layout.submission_format not in formats():
                    raise CtclabError(f"layout {kind}: submission format {layout.submission_format!r}; expected one "
                                      f"of {', '.join(formats())} (or one registered with register_format)")
                return layout
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())[:8]
    raise CtclabError(
        f"{root}: no recognised dataset layout (found {', '.join(entries) or 'nothing'}); expected "
        "train/ dev/ test/ with mfcc/ and transcript/ plus test/test_order.csv (Spring 2022), "
        f"train-clean-100/ dev-clean/ test-clean/ (Fall 2022), a ctclab corpus, or one of: "
        f"{', '.join(k for k, _ in detectors if k not in _BUILT_IN) or 'no layouts in src/ctclab/datasets'}")


register_format("spring2022", ("id", "predictions"), S22_CHARS)
register_format("fall2022", ("index", "label"), F22_CHARS)


@register_layout("ctclab")
def ctclab_corpus(d: Path) -> Layout | None:
    if not ((d / CORPUS_MARKER).is_file() and has(d, "train/mfcc", "dev/mfcc", "test/mfcc")):
        return None
    splits = {s: Split(d / s / "mfcc", transcripts(d / s)) for s in ("train", "dev", "test")}
    return Layout("ctclab", d, splits, read_test_order(d / "test/test_order.csv", d / "test/mfcc"))


@register_layout("spring2022")
def spring2022(d: Path) -> Layout | None:
    if not has(d, "train/mfcc", "train/transcript", "dev/mfcc", "dev/transcript", "test/mfcc"):
        return None
    splits = {s: Split(d / s / "mfcc", transcripts(d / s)) for s in ("train", "dev")}
    splits["test"] = Split(d / "test/mfcc", transcripts(d / "test"))
    order_csv = d / "test" / "test_order.csv"
    if not order_csv.is_file():
        raise CtclabError(f"{order_csv}: missing; a Spring-2022 layout needs it for the submission order")
    return Layout("spring2022", d, splits, read_test_order(order_csv, d / "test/mfcc"))


@register_layout("fall2022")
def fall2022(d: Path) -> Layout | None:
    if not has(d, "train-clean-100/mfcc", "dev-clean/mfcc", "test-clean/mfcc"):
        return None
    names = {"train": "train-clean-100", "dev": "dev-clean", "test": "test-clean"}
    splits = {s: Split(d / n / "mfcc", transcripts(d / n)) for s, n in names.items()}
    order = sorted(p.name for p in (d / "test-clean/mfcc").glob("*.npy"))
    return Layout("fall2022", d, splits, order, "fall2022")


def load_transcript(path: Path) -> list[str]:
    """Phoneme symbols of one transcript file, sentence markers stripped and [SIL] → SIL."""
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError:  # some course copies store object arrays of str: read them without running code
        arr = _load_object_array(path)
    symbols = [str(s) for s in np.asarray(arr).reshape(-1)]
    return [SYMBOL_ALIASES.get(s, s) for s in symbols if s not in MARKERS]


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles an object ndarray of plain values; any other class (os.system, …) is refused."""
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused: the file would import {module}.{name}")
        return super().find_class(module, name)


def _load_object_array(path: Path) -> np.ndarray:
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        _, _, dtype = read_header(f)
        if not dtype.hasobject:
            raise ValueError(f"{path}: not an object array")
        return _ArrayOnlyUnpickler(f).load()
