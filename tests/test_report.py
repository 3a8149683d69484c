"""Report pieces on hand-made runs: per-seed values, Holm-adjusted verdicts, whether timings compare,
and the runs table a report is rendered from (and regenerated from, byte for byte)."""
import math
from pathlib import Path

import numpy as np
import pytest

from ctclab import report, study_runs, study_table, tracking
from ctclab.errors import CtclabError
from ctclab.studies import Study, load
from ctclab.study_table import StudyRun

ROOT = Path(__file__).resolve().parents[1]


def run(variant, seed, value, jobs="1", threads="2", share=0.99, load=1.0, commit=""):
    return StudyRun(variant, seed, f"{variant}{seed}" * 4, value, "", "123", 10.0, share, load, 100.0, jobs, threads,
                    commit, "false", "cpu", "Xeon", "2", "vm", "2.13.0", "synthetic", "24", "ab" * 32,
                    {"dev_lev_greedy": {1: value + 1, 2: value}, "cpu_share": {1: share, 2: share}})


def grouped(study, runs) -> dict:
    return study_table.Table(study_table.Parent("p", "1", "u", "c", ""), runs).by_variant([v.name for v in study.variants])


def compared(study, runs) -> dict:
    return report.compare(study, report.variant_scores(grouped(study, runs)))


STUDY = Study(name="s", question="q?", variants=[{"name": "a", "baseline": True}, {"name": "b"}], seeds=[0, 1])


def test_per_seed_table_lists_every_value_with_its_run():
    by_variant = grouped(STUDY, [run("a", 0, 2.0), run("a", 1, 2.5), run("b", 0, 3.25)])
    lines = report.per_seed(STUDY, by_variant)
    assert lines[3] == "| variant | seed 0 | seed 1 |"
    assert lines[5] == "| a | 2.000 (`a0a0a0a0`) | 2.500 (`a1a1a1a1`) |"
    assert lines[6] == "| b | 3.250 (`b0b0b0b0`) | – |"
    assert lines[8] == "Every run is at commit `unknown`."  # hand-made runs record none


def test_runs_from_several_commits_are_named_with_their_commit():
    def at(commit, *args):
        return run(*args, commit=commit * 40)
    by_variant = grouped(STUDY, [at("1", "a", 0, 2.0), at("2", "a", 1, 2.5), at("2", "b", 0, 3.0)])
    assert report.code_note(by_variant) == (
        "Runs come from 2 commits: `111111111111`: a s0; `222222222222`: a s1, b s0. A study run trains again "
        "each variant × seed of the seeds it runs (the study file's, or `--seeds`) whose params or code differ "
        "from its checkout's; runs of other seeds stay as they ran.")
    # seeds added later to every variant (`--seeds 1`): named by seed, not run by run
    added = grouped(STUDY, [at("1", "a", 0, 2.0), at("1", "b", 0, 3.0), at("2", "a", 1, 2.5), at("2", "b", 1, 3.5)])
    assert report.code_note(added).startswith(
        "Runs come from 2 commits: `111111111111`: seed 0 of every variant; `222222222222`: seed 1 of every variant. ")


def test_timings_compare_only_when_every_run_had_its_cpu_share_under_equal_contention():
    same = report.timing_note(grouped(STUDY, [run("a", 0, 2.0, share=0.97, load=2.4), run("b", 0, 3.0, share=0.995)]))
    assert same == ("Every run trained on 2 torch threads: CPU floats differ with the thread count, so these scores "
                    "are bit-comparable only with runs on as many threads. Train seconds compare: every run had ≥ 90% "
                    "of its CPU share (lowest 0.97, host load at most 2.4 on 2 cores) under the same jobs × threads.")
    # a test suite on the same cores: the run measured less than its share, whatever -j × threads said
    starved = report.timing_note(grouped(STUDY, [run("a", 0, 2.0), run("a", 1, 2.0, share=0.55, load=4.1),
                                                 run("b", 0, 3.0, share=0.8)]))
    assert ("Train seconds do NOT compare: 2 of 3 runs had less than 90% of their CPU share (a s1 0.55, b s0 0.80; "
            "host load up to 4.1 on 2 cores)") in starved
    mixed = report.timing_note(grouped(STUDY, [run("a", 0, 2.0), run("b", 0, 3.0, jobs="2", threads="1")]))
    assert "Runs trained on different or unrecorded thread counts (1, 2)" in mixed and "not bit-comparable" in mixed
    assert "Train seconds do NOT compare across variants: they ran as different jobs × threads (1 × 2, 2 × 1)" in mixed
    old = report.timing_note(grouped(STUDY, [run("a", 0, 2.0, share=math.nan, jobs="", threads="")]))
    assert "thread counts (?)" in old and "1 of 1 runs trained before ctclab measured the CPU share" in old


def test_holm_adjustment_against_a_hand_computed_case():
    # sorted p: 0.0005054853 × 3 = 0.0015164560; 0.0430149067 × 2 = 0.0860298135; 0.0604815026 × 1 = 0.0604815026,
    # made monotone → 0.0860298135 for the last two; returned in the order given
    adjusted = report.holm([0.0430149067, 0.0005054853, 0.0604815026])
    assert adjusted == pytest.approx([0.0860298135, 0.0015164560, 0.0860298135], abs=1e-9)
    assert report.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert report.holm([]) == []


def test_p_value_is_the_paired_t_test():
    from scipy import stats

    t = -1.05 / ((0.05 / 3) ** 0.5 / 2)  # mean / (sd / sqrt(n)) for the diffs below, by hand
    assert report.p_value([-1.0, -1.2, -0.9, -1.1]) == pytest.approx(2 * stats.t.sf(abs(t), 3), rel=1e-9)
    assert report.p_value([0.3, 0.3]) == 0.0 and report.p_value([0.0, 0.0]) == 1.0 and report.p_value([1.0]) is None


def test_a_variant_significant_alone_is_not_after_holm():
    study = Study(name="s", question="q?", seeds=[0, 1, 2, 3],
                  variants=[{"name": "a", "baseline": True}, {"name": "b"}, {"name": "c"}, {"name": "d"}])
    diffs = {"b": [-1.0, -1.2, -0.9, -1.1], "c": [-0.5, -0.1, -0.3, -0.6], "d": [0.1, 0.5, 0.2, 0.6]}
    runs = [run("a", s, 5.0) for s in range(4)]
    runs += [run(v, s, 5.0 + d[s]) for v, d in diffs.items() for s in range(4)]
    comparisons = compared(study, runs)
    assert comparisons["c"].p == pytest.approx(0.0430149, abs=1e-6)  # < 0.05 on its own
    assert comparisons["c"].p_holm == pytest.approx(0.0860298, abs=1e-6)
    assert comparisons["b"].p_holm == pytest.approx(0.0015165, abs=1e-6)
    lines = {v.name: report._row(study, v, grouped(study, runs)[v.name], comparisons.get(v.name))
             for v in study.variants}
    assert "| better |" in lines["b"] and "| 0.001 (0.002) |" in lines["b"]
    assert "| no detectable difference with 4 seeds; ≥ " in lines["c"] and "| 0.043 (0.086) |" in lines["c"]
    assert "| -0.375 [" in lines["c"] and "| baseline |" in lines["a"]


def test_studies_recorded_before_study_experiments_still_report(tmp_path):
    """Parents in the main experiment, final scores as bare `dev_lev_beam`, curves as `epoch/…`."""
    import mlflow

    from project import make_project

    project = make_project(tmp_path / "p", git=False)
    store = f"sqlite:///{project / 'mlflow.db'}"
    parent = study_runs.create_parent(tracking.open_store(store, project), "ctclab", "s", False, "s", "q?", "")
    client = mlflow.MlflowClient(store)
    for variant, value in (("a", 2.0), ("b", 3.0)):
        child = client.create_run(parent.experiment_id, tags={"mlflow.parentRunId": parent.run_id, "variant": variant,
                                                              "seed": "0"})
        client.log_metric(child.info.run_id, "dev_lev_beam", value)
        client.log_metric(child.info.run_id, "epoch/dev_lev_greedy", value + 1, step=1)
        client.set_terminated(child.info.run_id)
    study = Study(name="s", question="q?", variants=[{"name": "a", "baseline": True}, {"name": "b"}], seeds=[0])
    md = report.report(study, project)
    written = md.read_bytes()
    assert "| a | 2.000 (`" in md.read_text() and "| 3.000 (`" in md.read_text()
    assert f"parent run `{parent.run_id}`" in md.read_text()
    # the runs table alone regenerates it: no MLflow store needed
    (project / "mlflow.db").unlink()
    md.unlink()
    assert report.report(study, project, from_table=True).read_bytes() == written
    assert not (project / "mlflow.db").exists()


def test_a_runs_table_reads_back_exactly_what_was_written(tmp_path):
    """Doubles to the last bit, run ids of digits and an `e` as text, curves of different lengths,
    unrecorded values as unrecorded."""
    awkward = [run("a", 0, 0.1 + 0.2), run("b", 0, 2.0 / 3, share=math.nan, threads=""),
               StudyRun(**{**run("b", 1, 1e-17).__dict__, "run_id": "12345e67" * 4,
                           "curves": {"dev_lev_greedy": {1: 5.0, 2: 4.0, 3: 1 / 7}, "cpu_share": {}}})]
    table = study_table.Table(study_table.Parent("p" * 32, "7", "http://h/#/x?a=1&b=2", "http://h/#/y", " (after `ctclab ui`)"),
                              awkward)
    path = tmp_path / "s.runs.csv"
    study_table.write(table, path)
    back = study_table.read(path)
    assert back.parent == table.parent and [r.run_id for r in back.runs] == [r.run_id for r in awkward]
    assert back.runs[0].score == 0.1 + 0.2 and back.runs[2].score == 1e-17 and back.runs[1].score == 2.0 / 3
    assert math.isnan(back.runs[1].train_cpu_share) and back.runs[1].torch_threads == ""
    assert back.runs[2].curve() == [(1, 5.0), (2, 4.0), (3, 1 / 7)] and back.runs[0].curve() == [(1, 1.1 + 0.2), (2, 0.1 + 0.2)]
    assert back.runs[2].curves["cpu_share"] == {} and back.runs[0].curves["cpu_share"] == {1: 0.99, 2: 0.99}
    study_table.write(back, tmp_path / "again.csv")
    assert (tmp_path / "again.csv").read_bytes() == path.read_bytes()
    assert report.render(STUDY, False, back) == report.render(STUDY, False, table)


@pytest.mark.parametrize("edit, message", [
    (lambda text: text.replace("train_cpu_share,", "cpu,", 1), "no column train_cpu_share; expected the runs table"),
    (lambda text: text.replace(",0.99,", ",high,", 1), "column train_cpu_share of run a0a0a0a0 is 'high', "
                                                          "expected a number"),
    (lambda text: text.splitlines()[0] + "\n", "no rows; expected the runs table"),
])
def test_a_broken_runs_table_is_named_in_one_line(tmp_path, edit, message):
    path = tmp_path / "s.runs.csv"
    study_table.write(study_table.Table(study_table.Parent("p", "1", "u", "c", ""), [run("a", 0, 2.0)]), path)
    path.write_text(edit(path.read_text()))
    with pytest.raises(CtclabError) as err:
        study_table.read(path)
    assert str(err.value) == f"{path}: {message}" + ("" if "expected a number" in message else
                                                     " `ctclab study report` writes")


COMMITTED = sorted((ROOT / "experiments/reports").glob("*.runs.csv"))


def test_every_committed_study_report_has_its_runs_table():
    """A reviewer with only a clone recomputes a default-size report from its table (smoke reports,
    made by the tests' tiny studies, need none)."""
    reports = sorted(p for p in (ROOT / "experiments/reports").glob("*.md") if not p.stem.endswith("-smoke"))
    assert reports and [p.stem for p in reports if not p.with_suffix(".runs.csv").is_file()] == []


@pytest.mark.parametrize("table", COMMITTED, ids=[t.name for t in COMMITTED])
def test_every_committed_runs_table_regenerates_its_report_byte_for_byte(table):
    stem = table.name.removesuffix(".runs.csv")
    name, smoke = stem.removesuffix("-smoke"), stem.endswith("-smoke")
    study = load(ROOT / "experiments" / f"{name}.yaml", ROOT / "params.yaml")
    assert report.render(study, smoke, study_table.read(table)) == (table.parent / f"{stem}.md").read_text()


def test_power_lines_say_what_the_seeds_could_detect_and_what_would_decide():
    from scipy import stats
    # the smallest detectable difference is detected 80 % of the time (simulated paired t-tests)
    rng = np.random.default_rng(0)
    for n, sd, level in ((3, 0.3, 0.0125), (5, 0.2, 0.05)):
        d = report.detectable(n, sd, level)
        found = stats.ttest_1samp(rng.normal(d, sd, (100_000, n)), 0.0, axis=1).pvalue < level
        assert abs(found.mean() - report.POWER) < 0.01, (n, sd, level, found.mean())
    needed = report.seeds_needed(-0.258, 0.3, 0.0125)  # dropout_placement's `all`, roughly
    assert report.power(needed, 0.258, 0.3, 0.0125) >= 0.8 > report.power(needed - 1, 0.258, 0.3, 0.0125)
    assert report.seeds_needed(0.001, 1.0, 0.01) is None  # beyond MAX_SEEDS
    # Holm's levels: the smallest of m p-values faced 0.05/m, the next 0.05/(m - 1)
    study = Study(name="s", question="q?", seeds=[0, 1, 2],
                  variants=[{"name": "a", "baseline": True}, {"name": "b"}, {"name": "c"}])
    runs = [run("a", s, x) for s, x in enumerate((2.0, 2.1, 2.2))] + \
        [run("b", s, x) for s, x in enumerate((2.1, 2.5, 1.9))] + [run("c", s, 1.0 + s / 9) for s in range(3)]
    c = compared(study, runs)
    assert (c["c"].level, c["b"].level) == (0.025, 0.05)
    said = c["b"].verdict()
    assert said.startswith("no detectable difference with 3 seeds; ≥ ") and " would have been detected; the observed +" in said
    assert said.endswith(f"needs ~{report.seeds_needed(np.mean(c['b'].diffs), np.std(c['b'].diffs, ddof=1), 0.05)} seeds")
