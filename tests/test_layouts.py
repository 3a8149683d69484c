"""Layout detection for the HW3P2 Spring 2022 / Fall 2022 replicas and ctclab's own corpus."""
import pickle

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


def documented_layout() -> str:
    """The layout module src/ctclab/datasets/__init__.py shows, as written there."""
    import textwrap

    from ctclab import datasets

    doc = datasets.__doc__
    start = doc.index("    # src/ctclab/datasets/flat_npz.py")
    return textwrap.dedent(doc[start:doc.index("\n\n", doc.index("return Layout(", start))])


def test_a_new_layout_is_one_file_and_the_stages_read_it(tmp_path):
    import json
    import shutil

    from project import make_project, stage

    spring = make_spring2022(tmp_path / "spring") / "hw3p2_student_data" / "hw3p2_student_data"
    flat = tmp_path / "flat"  # the same utterances in the documented example's layout
    for split in ("train", "dev", "test"):
        shutil.copytree(spring / split / "mfcc", flat / f"{split}_feats")
        if split != "test":
            shutil.copytree(spring / split / "transcript", flat / f"{split}_labels")
    project = make_project(tmp_path / "p", {"data": {"source": "local", "path": str(flat)}}, git=False)
    plugin = project / "src/ctclab/datasets/flat_npz.py"
    plugin.write_text(documented_layout())
    stage(project, "fetch")
    stage(project, "preprocess")
    meta = json.loads((project / "data/processed/meta.json").read_text())
    assert meta["layout"] == "flat_npz" and meta["submission_format"] == "spring2022"
    assert meta["utterances"] == {"train": 6, "dev": 6, "test": 6} and meta["labelled"]["test"] is False
    plugin.unlink()  # without the file the folder is no dataset ctclab knows: one line
    r = stage(project, "fetch", check=False)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no recognised dataset layout" in r.stderr


def test_a_submission_format_needs_one_distinct_character_per_class_and_one_meaning():
    from ctclab.labels import S22_CHARS

    with pytest.raises(CtclabError, match="'short': 3 characters .3 distinct.; expected 41 distinct ones"):
        layouts.register_format("short", ("id", "x"), ("a", "b", "c"))
    with pytest.raises(CtclabError, match="'spring2022': registered twice, differently"):
        layouts.register_format("spring2022", ("index", "label"), S22_CHARS)
    assert layouts.register_format("spring2022", ("id", "predictions"), S22_CHARS) == layouts.formats()["spring2022"]


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_object_array_transcripts_load_without_running_code(tmp_path):
    """Some course copies store transcripts as object arrays (a pickle inside the .npy): their
    strings load, and any other object in one is refused before it is built."""
    from ctclab.layouts import load_transcript

    plain = tmp_path / "plain.npy"
    np.save(plain, np.array(["<sos>", "AA", "[SIL]", "B", "<eos>"], dtype=object), allow_pickle=True)
    assert load_transcript(plain) == ["AA", "SIL", "B"]
    marker, hostile = tmp_path / "RAN", tmp_path / "hostile.npy"
    np.save(hostile, np.array([_RunsCode(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(pickle.UnpicklingError, match=r"refused: the file would import (io|builtins)\.open"):
        load_transcript(hostile)
    assert not marker.exists()
