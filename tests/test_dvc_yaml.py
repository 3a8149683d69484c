"""dvc.yaml stays true to the code: each stage's deps are exactly its script plus the src/ctclab
modules in the script's import closure, and its params exactly the keys the script declares."""
import ast
import importlib.util
import shlex
import sys
from pathlib import Path

import pytest
import yaml

from ctclab.config import flatten
from ctclab.project import command_paths
from code_imports import PACKAGE, import_closure
from project import DEFAULTS, REPO

PIPELINE = REPO / "pipeline"


def dep_path(module: str) -> str:
    return f"src/ctclab/{module}" if (PACKAGE / module).is_dir() else f"src/ctclab/{module}.py"


def local_imports(script: Path) -> set[str]:
    """Helper modules of pipeline/ a stage script imports (e.g. _environment)."""
    names = {a.name for node in ast.walk(ast.parse(script.read_text())) if isinstance(node, ast.Import) for a in node.names}
    return {f"pipeline/{n}.py" for n in names if (PIPELINE / f"{n}.py").is_file()}


def declared_params(script: Path) -> list[str]:
    sys.path.insert(0, str(PIPELINE))  # as when the script runs: its folder first
    spec = importlib.util.spec_from_file_location(script.stem, script)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(PIPELINE))
    return list(module.PARAMS)


def disagreements(dvc: dict) -> list[str]:
    """Every way dvc.yaml's stages differ from what their scripts import and declare."""
    problems = []
    for name, stage in dvc["stages"].items():
        script = Path(next(w for w in stage["cmd"].split() if w.endswith(".py")))
        deps = set(stage.get("deps", []))
        code_deps = {d for d in deps if d.startswith(("src/", "pipeline/"))}
        helpers = local_imports(REPO / script)  # _environment, whose ctclab imports run first in every stage
        modules = set().union(*(import_closure(REPO / f) for f in [script, *helpers]))
        expected = {str(script)} | helpers | {dep_path(m) for m in modules}
        problems += [f"{name}: missing dep {d}" for d in sorted(expected - code_deps)]
        problems += [f"{name}: dep {d} is not imported by {script}" for d in sorted(code_deps - expected)]
        params = stage.get("params", [])
        if params != declared_params(REPO / script):
            problems.append(f"{name}: params {params} != {script}.PARAMS {declared_params(REPO / script)}")
        problems += path_disagreements(name, stage, deps - code_deps)
    return problems


def path_disagreements(name: str, stage: dict, data_deps: set[str]) -> list[str]:
    """Paths are said once: each one the cmd passes is a dep or out (or holds one), and each data
    dep and out is a path the cmd passes (or inside one): no script reads a path of its own."""
    passed = list(command_paths(shlex.split(stage["cmd"])).values())
    outputs = {next(iter(m)) if isinstance(m, dict) else m
               for m in stage.get("outs", []) + stage.get("metrics", []) + stage.get("plots", [])}
    data_deps = data_deps - {CHECKED}  # fetch's ordering-only dep on validate (see the next test)

    def inside(path: str, folder: str) -> bool:
        return path == folder or path.startswith(folder.rstrip("/") + "/")

    problems = [f"{name}: cmd passes {p}, which is neither a dep nor an out" for p in passed
                if not any(inside(d, p) for d in data_deps | outputs)]
    return problems + [f"{name}: {d} is not a path its cmd passes" for d in sorted(data_deps | outputs)
                       if not any(inside(d, p) for p in passed)]


def test_dvc_yaml_deps_and_params_match_the_code():
    assert disagreements(yaml.safe_load((REPO / "dvc.yaml").read_text())) == []


CHECKED = ".ctclab/params.checked"


def test_validate_runs_first_and_always():
    """A bad params.yaml must stop every `dvc repro` before any stage, even when all are cached:
    validate is always_changed, writes CHECKED, and every other stage is downstream of it."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert stages["validate"]["always_changed"] is True and stages["validate"]["outs"] == [{CHECKED: {"cache": False}}]
    produced_by = {next(iter(o)) if isinstance(o, dict) else o: name
                   for name, s in stages.items() for o in s.get("outs", [])}

    def upstream(name: str) -> set[str]:
        found = {produced_by[d] for d in stages[name].get("deps", []) if d in produced_by}
        return found.union(*(upstream(s) for s in found))
    assert all("validate" in upstream(name) for name in stages if name != "validate")


def test_the_check_catches_a_removed_dep_and_a_stale_param():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    dvc["stages"]["submit"]["deps"].remove("src/ctclab/labels.py")
    dvc["stages"]["train"]["deps"].append("src/ctclab/corpus.py")
    dvc["stages"]["evaluate"]["params"].append("decode.workers")
    dvc["stages"]["preprocess"]["cmd"] = "python pipeline/preprocess.py --raw data/raw"  # reads its out from elsewhere
    dvc["stages"]["fetch"]["cmd"] += " --cache data/cache"
    assert disagreements(dvc) == [
        "fetch: cmd passes data/cache, which is neither a dep nor an out",
        "preprocess: data/processed is not a path its cmd passes",
        "train: dep src/ctclab/corpus.py is not imported by pipeline/train.py",
        f"evaluate: params {dvc['stages']['evaluate']['params']} != pipeline/evaluate.py.PARAMS "
        f"{dvc['stages']['evaluate']['params'][:-1]}",
        "submit: missing dep src/ctclab/labels.py",
    ]


@pytest.mark.parametrize("script", sorted(p for p in PIPELINE.glob("*.py") if not p.stem.startswith("_")),
                         ids=lambda p: p.stem)
def test_declared_params_are_real_keys(script):
    keys = set(flatten(DEFAULTS))
    for p in declared_params(script):
        assert p in keys or any(k.startswith(p + ".") for k in keys), f"{script.name}: {p} is not a params.yaml key"


def test_plots_draw_the_history_columns_ctclab_writes():
    from ctclab.results import HISTORY_COLUMNS

    [plot] = yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
    [(path, spec)] = plot.items()
    assert path == "metrics/train_history.csv" and spec["x"] == HISTORY_COLUMNS[0]
    assert spec["y"] and set(spec["y"]) <= set(HISTORY_COLUMNS[1:])
