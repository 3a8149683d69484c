"""Layout detection for the HW3P2 Spring 2022 / Fall 2022 replicas and ctclab's own corpus."""
import numpy as np
import pytest

from conftest import make_fall2022, make_spring2022
from ctclab import layouts
from ctclab.errors import CtclabError


def test_spring2022_found_below_the_archive_folders(tmp_path):
    layout = layouts.detect(make_spring2022(tmp_path))
    assert layout.kind == "spring2022" and layout.submission_format == "spring2022"
    assert layout.root == tmp_path / "hw3p2_student_data" / "hw3p2_student_data"
    assert layout.splits["test"].transcript_dir is None
    assert sorted(layout.test_order) == [f"test_{i:04d}.npy" for i in range(6)]
    assert layout.test_order != sorted(layout.test_order)  # the csv's order, not the sorted one


@pytest.mark.parametrize("raw_subdir", [True, False])
def test_fall2022_transcripts_under_raw_or_directly(tmp_path, raw_subdir):
    layout = layouts.detect(make_fall2022(tmp_path, raw_subdir=raw_subdir))
    assert layout.kind == "fall2022" and layout.submission_format == "fall2022"
    expected = "raw" if raw_subdir else "transcript"
    assert layout.splits["train"].transcript_dir.name == expected
    assert layout.test_order == sorted(layout.test_order)


def test_ctclab_corpus_marker(tiny_corpus):
    layout = layouts.detect(tiny_corpus)
    assert layout.kind == "ctclab" and (tiny_corpus / layouts.CORPUS_MARKER).is_file()
    assert layout.splits["test"].transcript_dir is not None  # the embedded test split is labelled


def test_transcripts_lose_markers_and_sil_alias(tmp_path):
    p = tmp_path / "t.npy"
    np.save(p, np.array(["[SOS]", "[SIL]", "AH", "[SIL]", "[EOS]"]))
    assert layouts.load_transcript(p) == ["SIL", "AH", "SIL"]
    np.save(p, np.array(["<sos>", "SIL", "B", "<eos>"]))
    assert layouts.load_transcript(p) == ["SIL", "B"]


def test_missing_test_order_and_unknown_names_are_one_line(tmp_path):
    root = make_spring2022(tmp_path) / "hw3p2_student_data" / "hw3p2_student_data"
    order = root / "test" / "test_order.csv"
    order.write_text("file\ntest_0000.npy\nnope.npy\n")
    with pytest.raises(CtclabError, match=r"test_order.csv: names 'nope.npy' \(1 missing in all\)"):
        layouts.detect(tmp_path)
    order.unlink()
    with pytest.raises(CtclabError, match="test_order.csv: missing; a Spring-2022 layout needs it"):
        layouts.detect(tmp_path)


def test_an_unknown_folder_lists_what_it_found(tmp_path):
    (tmp_path / "mfcc").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CtclabError) as err:
        layouts.detect(tmp_path)
    assert "no recognised dataset layout (found mfcc/, notes.txt)" in str(err.value)
    with pytest.raises(CtclabError, match="not a folder"):
        layouts.detect(tmp_path / "notes.txt")
