"""Imported first by every stage script. A stage run by a Python that cannot import ctclab (say
`.venv/bin/dvc repro` without activating the venv, so `python` is another interpreter) stops
with one line naming that Python and the fix, instead of a ModuleNotFoundError traceback."""
import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("ctclab") is None:
    venv = Path(__file__).resolve().parents[1] / ".venv"
    sys.exit(f"{Path(sys.argv[0]).name}: ctclab is not importable by {sys.executable}; run the stages with the "
             f"project's environment: `source {venv}/bin/activate` first (or `make run`)")
