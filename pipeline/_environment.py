"""Imported first by every stage script.

- A stage run by a Python that cannot import ctclab (say `.venv/bin/dvc repro` without activating
  the venv, so `python` is another interpreter) stops with one line naming that Python and the fix,
  instead of a ModuleNotFoundError traceback.
- The stage then runs the ctclab beside this script, not whichever one the environment installed:
  a queued DVC experiment (`dvc exp run --queue`, `ctclab study run`) runs in a copy of its commit
  under .dvc/tmp/exps, while the editable install points at the checkout's src/, which may have
  changed since it was queued. What ran is the code of the experiment's own commit.
- Before torch starts, the stage takes as many CPU threads as other processes leave free
  (ctclab.threads: on a busy machine torch's threads would wait on each other).
"""
import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("ctclab") is None:
    venv = Path(__file__).resolve().parents[1] / ".venv"
    sys.exit(f"{Path(sys.argv[0]).name}: ctclab is not importable by {sys.executable}; run the stages with the "
             f"project's environment: `source {venv}/bin/activate` first (or `make run`)")
_OWN_SRC = Path(__file__).resolve().parents[1] / "src"
if (_OWN_SRC / "ctclab" / "__init__.py").is_file():
    sys.path.insert(0, str(_OWN_SRC))

from ctclab import threads  # noqa: E402  (after the path above: this stage's own ctclab)

threads.settle()
