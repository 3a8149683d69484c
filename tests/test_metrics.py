"""The competition metric: Levenshtein distance on one-character phoneme strings, and PER."""
import pytest

from ctclab.labels import F22_CHARS, INDEX, S22_CHARS, to_string
from ctclab.metrics import distances, score


def test_levenshtein_and_per_on_hand_made_pairs():
    refs = [[1, 2, 3, 4], [5, 6], [7]]
    hyps = [[1, 2, 3, 4], [5, 9, 6], []]  # exact; one insertion; one deletion
    assert distances(hyps, refs) == [0, 1, 1]
    s = score(hyps, refs)
    assert s.mean_distance == pytest.approx(2 / 3) and s.per == pytest.approx(2 / 7) and s.utterances == 3
    assert score([[2, 1]], [[1, 2]]).mean_distance == 2  # a swap is two edits
    assert score([[40, 40]], [[39]]).mean_distance == 2  # a substitution and an insertion
    # PER divides by the reference's length, not the hypothesis's: 3 deletions of 4 phonemes
    assert score([[1]], [[1, 2, 3, 4]]).per == pytest.approx(3 / 4)
    assert score([[1, 2, 3, 4, 5, 6]], [[1, 2]]).per == pytest.approx(4 / 2)  # 4 insertions on 2 phonemes
    with pytest.raises(ValueError):
        distances([[1]], [])


def test_each_phoneme_is_one_character_so_distance_counts_phonemes():
    # Multi-letter phonemes (SH, NG, ZH) must count as one edit, not two
    sh, ng, zh, s = INDEX["SH"], INDEX["NG"], INDEX["ZH"], INDEX["S"]
    assert to_string([sh, ng, zh]) == "SNZ"
    assert distances([[sh, ng]], [[s, ng]]) == [1]
    assert to_string([INDEX["SIL"], INDEX["AE"], INDEX["NG"]], F22_CHARS) == "-@G"
    assert to_string([INDEX["SIL"], INDEX["AE"], INDEX["NG"]], S22_CHARS) == ".AN"


def test_empty_inputs_score_zero_not_nan():
    s = score([], [])
    assert s.mean_distance == 0 and s.per == 0 and s.utterances == 0
