"""Report pieces on hand-made runs: per-seed values and whether timings compare."""
from ctclab import report, tracking
from ctclab.studies import Study


def run(variant, seed, value, jobs="1", threads="2"):
    return tracking.RunRecord(f"{variant}{seed}" * 4, "FINISHED", seed, {}, {"dev_lev_beam": value},
                              {"variant": variant, "seed": str(seed), "parallel_jobs": jobs, "torch_threads": threads})


STUDY = Study(name="s", question="q?", variants=[{"name": "a", "baseline": True}, {"name": "b"}], seeds=[0, 1])


def test_per_seed_table_lists_every_value_with_its_run():
    by_variant = report.latest_by_variant(STUDY, [run("a", 0, 2.0), run("a", 1, 2.5), run("b", 0, 3.25)])
    lines = report.per_seed(STUDY, by_variant)
    assert lines[3] == "| variant | seed 0 | seed 1 |"
    assert lines[5] == "| a | 2.000 (`a0a0a0a0`) | 2.500 (`a1a1a1a1`) |"
    assert lines[6] == "| b | 3.250 (`b0b0b0b0`) | – |"


def test_timings_compare_only_under_equal_contention():
    same = report.latest_by_variant(STUDY, [run("a", 0, 2.0), run("b", 0, 3.0)])
    assert report.timing_note(same).startswith("Train seconds were all measured under the same contention")
    mixed = report.latest_by_variant(STUDY, [run("a", 0, 2.0), run("b", 0, 3.0, jobs="2", threads="1")])
    assert "NOT comparable" in report.timing_note(mixed)
    old = report.latest_by_variant(STUDY, [tracking.RunRecord("x" * 32, "FINISHED", 0, {}, {"dev_lev_beam": 1.0},
                                                                {"variant": "a", "seed": "0"})])
    assert "NOT comparable" in report.timing_note(old)  # unrecorded contention is never assumed equal
