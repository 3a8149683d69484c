"""The dependency directions the README promises, read from the source: a clone checks them
(an import that breaks one fails here, naming the module and what it reached)."""
import pytest

from code_imports import PACKAGE, module_files, outside_imports, reaches

# No files, no tracking, no training loop: what a model, a decoder or a score may run.
PURE = ("models", "archs", "cuda_graphs", "decode", "decoders", "metrics", "mlflow_views")
IMPURE = {"storage", "data", "checkpoint", "tracking", "provenance", "train", "trainer", "studies", "study_runs"}


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_reach_no_files_tracking_or_training(module):
    assert reaches(module) & IMPURE == set()


@pytest.mark.parametrize("module", ["evaluate", "submission", "tracking", "inference"])
def test_scoring_and_tracking_never_import_the_training_code(module):
    """Training calls tracking, never the reverse; evaluate and submit load a checkpoint, they
    never run the code that trained it."""
    assert reaches(module) & {"train", "trainer", "distributed", "cuda_graphs"} == set()


def test_only_tracking_imports_mlflow():
    users = {f.relative_to(PACKAGE).as_posix() for f in PACKAGE.rglob("*.py") if "mlflow" in outside_imports(f)}
    assert users == {"tracking.py"}


def test_the_checks_see_a_forbidden_import(tmp_path, monkeypatch):
    """The reader above finds lazy imports inside functions, as a forbidden one would be written."""
    import code_imports
    fake = tmp_path / "ctclab"
    fake.mkdir()
    (fake / "train.py").write_text("import os\n")
    (fake / "metrics.py").write_text("def score():\n    from .tracking import Store\n    import mlflow\n")
    (fake / "tracking.py").write_text("from ctclab import train\n")
    monkeypatch.setattr(code_imports, "PACKAGE", fake)
    assert reaches("metrics") == {"tracking", "train"}
    assert outside_imports(module_files("metrics")[0]) == {"mlflow"}
