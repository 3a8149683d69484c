"""ctclab verify's pieces: recorded params back into params.yaml, and the comparison (the whole
re-execution runs in tests/test_pipeline.py)."""
import yaml

from ctclab import tracking, verify
from project import REPO

HW = {"cpu_model": "AMD EPYC", "device": "cpu", "device_name": "x86_64", "torch_version": "2.13.0", "torch_threads": "2"}


def record(metrics, tags=None, run_id="r" * 32):
    return tracking.RunRecord(run_id, "FINISHED", 0, {}, metrics, {**HW, "checkpoint_sha256": "a" * 64, **(tags or {})})


SCORES = {"best_dev_lev_greedy": 2.5, "eval_dev_lev_greedy": 2.5, "eval_dev_lev_beam": 2.4, "eval_dev_per_beam": 0.12,
          "eval_dev_per_greedy": 0.13}
CURVES = {"train_loss": [3.0, 2.0], "dev_lev_greedy": [3.1, 2.5]}


def test_recorded_params_come_back_with_their_types(tmp_path):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    recorded = {"train.epochs": "3", "train.lr": "0.01", "model.lstm.kaiming": "False", "train.checkpoint_minutes": "10.0",
                "data.path": "", "tracking.uri": "http://elsewhere", "model.arch": "lstm"}
    verify.write_params(tmp_path, recorded, "7", "sqlite:////tmp/own.db")
    p = yaml.safe_load((tmp_path / "params.yaml").read_text())
    assert p["train"]["epochs"] == 3 and p["train"]["lr"] == 0.01 and p["model"]["lstm"]["kaiming"] is False
    assert p["train"]["checkpoint_minutes"] == 10 and p["data"]["path"] == "" and p["model"]["arch"] == "lstm"
    assert p["decode"]["beam_width"] == 7 and p["tracking"]["uri"] == "sqlite:////tmp/own.db"  # its own store
    assert set(p["study"].values()) == {""}


def test_same_hardware_must_match_bit_for_bit():
    same = verify.compare(record(SCORES), CURVES, record(SCORES), CURVES)
    assert same.same_hardware and same.match and len(same.rows) == 8
    off = verify.compare(record(SCORES), CURVES, record({**SCORES, "eval_dev_lev_beam": 2.4000001}), CURVES)
    assert not off.match
    table = verify.table(off)
    assert "| eval_dev_lev_beam | 2.400000 | 2.400000 | DIFFERS |" in table and table.count("DIFFERS") == 1
    other_bytes = verify.compare(record(SCORES), CURVES, record(SCORES, {"checkpoint_sha256": "b" * 64}), CURVES)
    assert [r[0] for r in other_bytes.rows if not r[3]] == ["checkpoint sha256"]


def test_other_hardware_compares_scores_within_the_tolerance():
    elsewhere = record({**SCORES, "eval_dev_lev_beam": 2.4 * 1.05}, {"cpu_model": "Intel Xeon", "checkpoint_sha256": "b" * 64})
    outcome = verify.compare(record(SCORES), CURVES, elsewhere, {"train_loss": [9.0], "dev_lev_greedy": [9.0]})
    assert not outcome.same_hardware and outcome.match  # bytes and curves are not compared across hardware
    assert "cpu_model AMD EPYC → Intel Xeon" in outcome.hardware_note and "±10%" in outcome.hardware_note
    far = record({**SCORES, "eval_dev_lev_beam": 2.4 * 1.2}, {"cpu_model": "Intel Xeon"})
    assert not verify.compare(record(SCORES), CURVES, far, CURVES).match


def test_package_versions_are_read_and_differences_named():
    recorded = "# Editable install\n-e /repo\nnumpy==2.4.6\ntorch==2.13.0\nscipy==1.17.1\n"
    again = "numpy==2.4.6\ntorch==2.14.0\nrich==14.0.0\n"
    assert verify.package_changes(recorded, again) == ["rich – → 14.0.0", "scipy 1.17.1 → –", "torch 2.13.0 → 2.14.0"]
    assert verify.package_changes(recorded, recorded) == []
    outcome = verify.compare(record(SCORES), CURVES, record(SCORES), CURVES)
    outcome.packages = ["torch 2.13.0 → 2.14.0"]
    assert verify.report(outcome).splitlines()[:3] == [
        "same hardware: bit-identical expected", "packages differ from the recorded run: torch 2.13.0 → 2.14.0",
        "MATCH (8 checks)"]
