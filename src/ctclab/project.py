"""Where the project is and how to run its tools: the repository root (also from inside a DVC
experiment's temp copy), the stages' paths as dvc.yaml's commands give them, and an environment
whose `python` and `dvc` are this interpreter's."""
from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
from pathlib import Path

from .errors import CtclabError


def repo_root(start: Path | None = None) -> Path:
    """The nearest folder at or above `start` (default: the cwd) with dvc.yaml and params.yaml."""
    here = (start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / "dvc.yaml").is_file() and (d / "params.yaml").is_file():
            return d
    raise CtclabError(f"{here}: not inside a ctclab project (no dvc.yaml + params.yaml above it)")


def real_root(path: str | Path) -> Path:
    """The real repository root, also from inside `dvc exp run --queue/--temp`'s copy under
    .dvc/tmp/exps (so every experiment shares one tracking store and one resume folder)."""
    path = Path(path).resolve()
    parts = path.parts
    for i in range(len(parts) - 2):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return path


def tool_env() -> dict[str, str]:
    """Environment in which `python` and `dvc` are this interpreter's (the project venv's)."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


# dvc.yaml is the one place the pipeline's paths are written: each stage's `cmd` passes them to its
# script as `--name path` (as iterative/example-get-started does), beside the same paths as deps/outs.
@contextlib.contextmanager
def _dvc_yaml(root: Path, wanted: str):
    """dvc.yaml, parsed; a missing file, bad YAML or a missing `wanted` part read from it inside the
    block is one line."""
    from .config import YAMLError, load_yaml

    dvc_yaml = Path(root) / "dvc.yaml"
    try:
        yield load_yaml(dvc_yaml.read_text())
    except (OSError, YAMLError, KeyError, TypeError, AttributeError, IndexError, ValueError) as err:
        raise CtclabError(f"{dvc_yaml}: no readable {wanted} ({type(err).__name__}); expected the project's "
                          "dvc.yaml") from None


def stage_command(root: Path, stage: str) -> list[str]:
    """A dvc.yaml stage's `cmd` as arguments, with this interpreter for its `python`."""
    with _dvc_yaml(root, f"`stages.{stage}.cmd`") as dvc:
        args = shlex.split(dvc["stages"][stage]["cmd"])
    return [sys.executable, *args[1:]] if args and args[0] == "python" else args


def stage_params(root: Path) -> set[str]:
    """Every params key (or section) some stage of dvc.yaml depends on: what can change a result."""
    with _dvc_yaml(root, "stages with params") as dvc:
        return {k for stage in dvc["stages"].values() for k in stage.get("params", [])}


def history_plot(root: Path) -> tuple[Path, str, list[str]]:
    """dvc.yaml's learning-curve plot: (its CSV, x column, y columns)."""
    with _dvc_yaml(root, "`plots` entry with x and y") as dvc:
        [(path, spec)] = dvc["plots"][0].items()
        return Path(root) / path, spec["x"], list(spec["y"])


def command_paths(args: list[str]) -> dict[str, str]:
    """The `--name path` pairs of a stage command's arguments, as written."""
    return {a[2:]: b for a, b in zip(args, args[1:]) if a.startswith("--")}


def stage_paths(root: Path, stage: str) -> dict[str, Path]:
    """The paths a stage's `cmd` passes (`--models models` → {"models": root/models})."""
    return {name: Path(root) / path for name, path in command_paths(stage_command(root, stage)).items()}


def stage_arguments(script_doc: str, *names: str) -> argparse.Namespace:
    """A stage script's paths from its command line (dvc.yaml's `cmd`), each required."""
    parser = argparse.ArgumentParser(description=script_doc.strip().splitlines()[0])
    for name in names:
        parser.add_argument(f"--{name}", type=Path, required=True, metavar="PATH")
    return parser.parse_args()
