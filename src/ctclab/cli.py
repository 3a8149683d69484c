"""The `ctclab` command.

    ctclab run                 dvc repro, then a summary (data, utterances, stage times, metrics)
    ctclab ui [--port 5000]    the MLflow UI on the project's tracking store
    ctclab study run|report    ablation studies from experiments/<study>.yaml (see ctclab.studies)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from . import studies
from .errors import CtclabError, one_line_errors


def repo_root(start: Path | None = None) -> Path:
    here = (start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / "dvc.yaml").is_file() and (d / "params.yaml").is_file():
            return d
    raise CtclabError(f"{here}: not inside a ctclab project (no dvc.yaml + params.yaml above it)")


def tool_env() -> dict[str, str]:
    """Environment in which `python` and `dvc` are this interpreter's (the project venv's)."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


_RUNNING = re.compile(r"^Running stage '([^']+)'")
_SKIPPED = re.compile(r"^Stage '([^']+)' didn't change, skipping")


def repro(args: list[str], cwd: Path) -> tuple[int, dict[str, float | None]]:
    """Run `dvc repro`, echoing its output; return its exit code and each stage's seconds (None = cached)."""
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", *args], cwd=cwd, env=tool_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    times: dict[str, float | None] = {}
    current, started = None, 0.0
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        running, skipped = _RUNNING.match(line.strip()), _SKIPPED.match(line.strip())
        if running or skipped:
            now = time.monotonic()
            if current:
                times[current] = now - started
                current = None
            if running:
                current, started = running.group(1), now
            else:
                times[skipped.group(1)] = None
    code = proc.wait()
    if current:
        times[current] = time.monotonic() - started
    return code, times


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def summary(root: Path, times: dict[str, float | None], total: float) -> str:
    lines = ["", "── ctclab summary " + "─" * 40]
    meta = _read_json(root / "data/processed/meta.json")
    if meta:
        counts = ", ".join(f"{meta['utterances'][s]} {s}" for s in ("train", "dev", "test"))
        lines.append(f"data       data/raw ({meta['layout']} layout) → data/processed: {counts} utterances, "
                     f"feature dim {meta['feature_dim']}, {meta['bad_utterances']} bad")
    for stage, seconds in times.items():
        lines.append(f"stage      {stage:<11} {'cached' if seconds is None else f'{seconds:6.1f} s'}")
    train = _read_json(root / "metrics/train.json")
    run = _read_json(root / "models/mlflow_run.json") or {}
    if train:
        lines.append(f"train      dev greedy Levenshtein {train['dev_lev_greedy']:.3f}, PER {train['dev_per']:.1%} "
                     f"(best of {train['epochs']} epochs); MLflow run {run.get('run_id', '?')}")
    ev = _read_json(root / "metrics/eval.json")
    if ev:
        lines.append(f"evaluate   dev Levenshtein greedy {ev['dev_lev_greedy']:.3f}, beam({ev['beam_width']}) "
                     f"{ev['dev_lev_beam']:.3f}, PER {ev['dev_per']:.1%}")
    sub, sub_metrics = root / "submission/submission.csv", _read_json(root / "metrics/submit.json")
    if sub.is_file() and sub_metrics:
        scored = (f"; test Levenshtein {sub_metrics['test_lev_beam']:.3f}, PER {sub_metrics['test_per']:.1%}"
                  if "test_lev_beam" in sub_metrics else "")
        lines.append(f"submission {sub.relative_to(root)} ({sub_metrics['rows']} rows){scored}")
    lines.append(f"total      {total:.1f} s")
    return "\n".join(lines)


def cmd_run(a) -> int:
    root = repo_root()
    t0 = time.monotonic()
    code, times = repro(a.dvc_args, root)
    print(summary(root, times, time.monotonic() - t0))
    if code:
        print(f"ctclab: dvc repro failed (exit {code}); the stages above that finished are cached", file=sys.stderr)
    return code


def cmd_ui(a) -> int:
    from .tracking import tracking_uri

    root = repo_root()
    uri = tracking_uri("", root)
    print(f"MLflow UI for {uri} at http://{a.host}:{a.port}  (Ctrl-C stops it)", flush=True)
    os.chdir(root)
    # exec, not a child: signals reach the server (and its workers) directly
    os.execve(sys.executable, [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                               "--host", a.host, "--port", str(a.port)], tool_env())


@one_line_errors
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="ctclab", description="CTC phoneme-recognition experiments with DVC + MLflow")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="dvc repro the pipeline and print a summary")
    p.add_argument("dvc_args", nargs=argparse.REMAINDER, help="extra arguments for dvc repro")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("ui", help="start the MLflow UI on the project's tracking store")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=cmd_ui)
    studies.add_commands(sub)
    a = ap.parse_args(argv)
    sys.exit(a.func(a))
