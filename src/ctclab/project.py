"""Where the project is and how to run its tools: the repository root (also from inside a DVC
experiment's temp copy) and an environment whose `python` and `dvc` are this interpreter's."""
from __future__ import annotations

import os
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
