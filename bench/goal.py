"""How every benchmark ends: its last line `<name>: <ratio>x (goal >= <goal>x; …)` and exit status 1
when the ratio is below the goal (or a check beside it failed), so that a regression fails the run.
A ratio that should stay small (a slowdown) has `goal <= <goal>x` and fails above it.
--goal overrides a script's goal (tests/test_bench.py sets an impossible one and expects exit 1)."""
from __future__ import annotations

import argparse
import sys
from typing import NoReturn


def add_goal(ap: argparse.ArgumentParser, default: float, at_most: bool = False) -> None:
    side = "above" if at_most else "below"
    ap.add_argument("--goal", type=float, default=default, help=f"the ratio {side} which it exits 1 (default {default:g})")


def finish(name: str, ratio: float, goal: float, detail: str = "", checks_passed: bool = True,
           at_most: bool = False) -> NoReturn:
    print(f"{name}: {ratio:.2f}x (goal {'<=' if at_most else '>='} {goal:g}x{f'; {detail}' if detail else ''})",
          flush=True)
    met = ratio <= goal if at_most else ratio >= goal
    sys.exit(0 if met and checks_passed else 1)
