"""How every benchmark ends: its last line `<name>: <ratio>x (goal >= <goal>x; …)` and exit status 1
when the ratio is below the goal (or a check beside it failed), so that a regression fails the run.
--goal overrides a script's goal (tests/test_bench.py sets an impossible one and expects exit 1)."""
from __future__ import annotations

import argparse
import sys
from typing import NoReturn


def add_goal(ap: argparse.ArgumentParser, default: float) -> None:
    ap.add_argument("--goal", type=float, default=default, help=f"the ratio below which it exits 1 (default {default:g})")


def finish(name: str, ratio: float, goal: float, detail: str = "", checks_passed: bool = True) -> NoReturn:
    print(f"{name}: {ratio:.2f}x (goal >= {goal:g}x{f'; {detail}' if detail else ''})", flush=True)
    sys.exit(0 if ratio >= goal and checks_passed else 1)
