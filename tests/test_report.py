"""Report pieces on hand-made runs: per-seed values, Holm-adjusted verdicts, whether timings compare."""
import numpy as np
import pytest

from ctclab import report, study_runs, tracking
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
    assert lines[8] == "Every run is at commit `unknown`."  # hand-made runs record none


def test_runs_from_several_commits_are_named_with_their_commit():
    def at(commit, *args):
        r = run(*args)
        r.tags["mlflow.source.git.commit"] = commit * 40
        return r
    by_variant = report.latest_by_variant(STUDY, [at("1", "a", 0, 2.0), at("2", "a", 1, 2.5), at("2", "b", 0, 3.0)])
    assert report.code_note(by_variant) == ("Runs by commit (one from an earlier commit was reused only where its "
                                            "params and code equal the newest): `111111111111`: a s0; "
                                            "`222222222222`: a s1, b s0.")


def test_timings_compare_only_under_equal_contention():
    same = report.latest_by_variant(STUDY, [run("a", 0, 2.0), run("b", 0, 3.0)])
    assert report.timing_note(same).startswith("Train seconds were all measured under the same contention")
    mixed = report.latest_by_variant(STUDY, [run("a", 0, 2.0), run("b", 0, 3.0, jobs="2", threads="1")])
    assert "NOT comparable" in report.timing_note(mixed)
    old = report.latest_by_variant(STUDY, [tracking.RunRecord("x" * 32, "FINISHED", 0, {}, {"dev_lev_beam": 1.0},
                                                                {"variant": "a", "seed": "0"})])
    assert "NOT comparable" in report.timing_note(old)  # unrecorded contention is never assumed equal


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
    comparisons = report.compare(study, report.latest_by_variant(study, runs))
    assert comparisons["c"].p == pytest.approx(0.0430149, abs=1e-6)  # < 0.05 on its own
    assert comparisons["c"].p_holm == pytest.approx(0.0860298, abs=1e-6)
    assert comparisons["b"].p_holm == pytest.approx(0.0015165, abs=1e-6)
    lines = {v.name: report._row(study, v, report.latest_by_variant(study, runs)[v.name], comparisons.get(v.name))
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
    md = report.report(Study(name="s", question="q?", variants=[{"name": "a", "baseline": True}, {"name": "b"}],
                             seeds=[0]), project).read_text()
    assert "| a | 2.000 (`" in md and "| 3.000 (`" in md and f"parent run `{parent.run_id}`" in md


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
    c = report.compare(study, report.latest_by_variant(study, runs))
    assert (c["c"].level, c["b"].level) == (0.025, 0.05)
    said = c["b"].verdict()
    assert said.startswith("no detectable difference with 3 seeds; ≥ ") and " would have been detected; the observed +" in said
    assert said.endswith(f"needs ~{report.seeds_needed(np.mean(c['b'].diffs), np.std(c['b'].diffs, ddof=1), 0.05)} seeds")
