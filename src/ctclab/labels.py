"""The 41-class label set shared by every stage, and the one-character phoneme maps.

Index order follows the CMU 11-785 HW3P2 starter code: 0 is the CTC blank, 1 is SIL, then the 39
ARPAbet phonemes. Scoring and beam search work on strings with one character per phoneme.
"""
from __future__ import annotations

BLANK = 0
PHONEMES: tuple[str, ...] = (
    "", "SIL", "AA", "AE", "AH", "AO", "AW", "AY", "B", "CH", "D", "DH", "EH", "ER", "EY", "F", "G",
    "HH", "IH", "IY", "JH", "K", "L", "M", "N", "NG", "OW", "OY", "P", "R", "S", "SH", "T", "TH", "UH",
    "UW", "V", "W", "Y", "Z", "ZH",
)
NUM_CLASSES = len(PHONEMES)
INDEX = {p: i for i, p in enumerate(PHONEMES) if p}

# Spring 2022's PHONEME_MAP (blank first); the embedded corpus uses it too.
S22_CHARS = (" ", ".", "a", "A", "h", "o", "w", "y", "b", "c", "d", "D", "e", "r", "E", "f", "g", "H",
             "i", "I", "j", "k", "l", "m", "n", "N", "O", "Y", "p", "R", "s", "S", "t", "T", "u", "U",
             "v", "W", "?", "z", "Z")
# Fall 2022's map differs in a few symbols (SIL "-", AE "@", NG "G").
F22_CHARS = (" ", "-", "a", "@", "h", "o", "w", "y", "b", "c", "d", "D", "e", "r", "E", "f", "g", "H",
             "i", "I", "j", "k", "l", "m", "n", "G", "O", "Y", "p", "R", "s", "S", "t", "T", "u", "U",
             "v", "W", "?", "z", "Z")
assert len(S22_CHARS) == len(F22_CHARS) == NUM_CLASSES and len(set(S22_CHARS)) == len(set(F22_CHARS)) == NUM_CLASSES


def to_string(indices, chars: tuple[str, ...] = S22_CHARS) -> str:
    """Label indices (no blanks) → one character per phoneme."""
    return "".join(chars[int(i)] for i in indices)
