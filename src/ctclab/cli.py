"""The `ctclab` command.

    ctclab run [dvc repro flags]   dvc repro (e.g. `ctclab run -f`, `ctclab run -s evaluate`), then a
                                   summary (data, utterances, stage times, metrics)
    ctclab ui [--port 5000]        the MLflow UI on the project's tracking store (tracking.uri)
    ctclab study run|report        ablation studies from experiments/<study>.yaml (see ctclab.studies)
    ctclab study promote STUDY     register the study's best variant as ctclab-<arch>@champion (--smoke: @smoke)
    ctclab verify RUN              re-execute a recorded run and compare (MATCH or a table of differences)
    ctclab predict --model URI --mfcc DIR [--beam N] > out.csv
                                   decode MFCC files with a logged/registered MLflow model
    ctclab curves [--out PNG]      the training's learning curves (dvc.yaml's plot) as a PNG, offline
    ctclab params --schema         the JSON schema of params.yaml
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

from .errors import interrupted, one_line_errors
from .project import repo_root, tool_env

_RUNNING = re.compile(r"^Running stage '([^']+)'")
_SKIPPED = re.compile(r"^Stage '([^']+)' (?:didn't change, skipping|is cached - skipping run)")


def repro(args: list[str], cwd: Path) -> tuple[int, dict[str, float | None]]:
    """Run `dvc repro`, echoing its output; return its exit code and each stage's seconds (None = cached)."""
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", *args], cwd=cwd, env=tool_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    times: dict[str, float | None] = {}
    current, started = None, 0.0
    try:
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
    except KeyboardInterrupt:  # dvc (and its stage) got a terminal's Ctrl-C too; a SIGTERM it passes on
        proc.terminate()
        proc.wait()
        raise
    code = proc.wait()
    if current:
        times[current] = time.monotonic() - started
    return code, times


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _training_run(root: Path, checkpoint: Path) -> str:
    from .config import load_params
    from .errors import CtclabError
    from .tracking import open_store

    try:
        return open_store(load_params(root / "params.yaml").tracking.uri, root).checkpoint_run(checkpoint)
    except CtclabError:
        return "? (not in this store)"


def summary(root: Path, times: dict[str, float | None], total: float) -> str:
    """What `ctclab run` made, read from the files at the paths dvc.yaml's commands give."""
    from .data import read_meta
    from .project import stage_paths
    from .results import TrainSummary, describe_eval, describe_test

    lines = ["", "── ctclab summary " + "─" * 40]
    prep, train_at, eval_at, submit_at = (stage_paths(root, s) for s in ("preprocess", "train", "evaluate", "submit"))
    if (prep["out"] / "meta.json").is_file():
        meta = read_meta(prep["out"])
        counts = ", ".join(f"{meta.utterances[s]} {s}" for s in ("train", "dev", "test"))
        lines.append(f"data       {prep['raw'].relative_to(root)} ({meta.layout} layout) → "
                     f"{prep['out'].relative_to(root)}: {counts} utterances, feature dim {meta.feature_dim}, "
                     f"{meta.bad_utterances} bad")
    for stage, seconds in times.items():
        lines.append(f"stage      {stage:<11} {'cached' if seconds is None else f'{seconds:6.1f} s'}")
    def earlier(stage: str) -> str:  # a file this repro did not make or confirm: say so, not pass it off as new
        return "" if stage in times else "  [not from this run: its stage did not run]"
    train = _read_json(train_at["metrics"] / "train.json")
    if train:
        best = TrainSummary(**train)
        lines.append(f"train      dev greedy Levenshtein {best.dev_lev_greedy:.3f}, PER {best.dev_per:.1%} "
                     f"(best of {best.epochs} epochs); MLflow run {_training_run(root, train_at['models'] / 'best.pt')}"
                     + earlier("train"))
    ev = _read_json(eval_at["metrics"] / "eval.json")
    if ev:
        lines.append(f"evaluate   {describe_eval(ev)}{earlier('evaluate')}")
    sub, sub_metrics = submit_at["out"], _read_json(submit_at["metrics"] / "submit.json")
    if sub.is_file() and sub_metrics:
        lines.append(f"submission {sub.relative_to(root)} ({sub_metrics['rows']} rows){describe_test(sub_metrics)}"
                     + earlier("submit"))
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
    from .config import load_params
    from .mlflow_views import address
    from .tracking import open_store, tracking_uri

    root = repo_root()
    tracked = load_params(root / "params.yaml").tracking
    base, uri = f"http://{a.host}:{a.port}", tracking_uri(tracked.uri, root)
    print(f"MLflow UI for {uri} at {base}  (Ctrl-C stops it)", flush=True)
    store = open_store(uri, root)
    store.experiment_id(tracked.experiment)  # the pipeline's, with its view, listed even before any run
    for name, exp_id in store.viewed_experiments():
        print(f"  {name}: {address(base, exp_id, True)}  curves: {address(base, exp_id, True, charts=True)}",
              flush=True)
    os.chdir(root)
    # exec, not a child: signals reach the server (and its workers) directly
    os.execve(sys.executable, [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                               "--host", a.host, "--port", str(a.port)], tool_env())


def cmd_curves(a) -> int:
    from .project import history_plot
    from .report import plot_history

    root = repo_root()
    csv, x, ys = history_plot(root)
    out = Path(a.out) if a.out else csv.with_name("train_curves.png")
    plot_history(csv, out, x, ys)
    shown = out.relative_to(root) if out.is_relative_to(root) else out
    print(f"curves: {shown} ({', '.join(ys)} against {x}, from {csv.relative_to(root)})")
    return 0


def cmd_params(a) -> int:
    from . import models  # noqa: F401  (its registry: each model.<arch> section is checked and described too)
    from .config import json_schema, load_params

    if a.schema:
        print(json.dumps(json_schema(), indent=2))
    else:
        load_params(repo_root() / "params.yaml")
        print("params.yaml: valid")
    return 0


def cmd_study_run(a) -> int:
    from . import report, studies

    root = repo_root()
    study = studies.load(a.study, root / "params.yaml")
    try:
        result = studies.run_study(study, root, a.jobs, tuple(a.seeds) if a.seeds else None, a.smoke)
    except KeyboardInterrupt as err:
        raise interrupted(err, f"study {study.name}", "its unfinished experiments left DVC's queue and its workers "
                          "stopped; finished runs are kept, and the same command runs the rest") from None
    print(f"study {study.name}: {len(result['queued']) - len(result['failed'])} ran, {len(result['skipped'])} skipped "
          f"(already complete), {len(result['failed'])} failed in {result['seconds']:.0f} s; parent MLflow run "
          f"{result['parent_run_id']}; MLflow UI: {result['ui']}")
    for name in result["failed"]:
        print(f"  FAILED {name}: see its log with `dvc queue logs {name}`")
    if len(result["queued"]) > len(result["failed"]) or result["skipped"]:  # a finished run to report
        md = report.report(study, root, a.smoke)
        print(f"report: {md.relative_to(root)}")
    return 1 if result["failed"] else 0


def cmd_study_report(a) -> int:
    from . import report, studies

    root = repo_root()
    md = report.report(studies.load(a.study, root / "params.yaml"), root, a.smoke, from_table=a.from_table)
    print(f"report: {md.relative_to(root)}{' (from its runs table)' if a.from_table else ''}")
    return 0


def cmd_study_promote(a) -> int:
    from . import report, studies

    root = repo_root()
    print(report.promote(studies.load(a.study, root / "params.yaml"), root, a.smoke, a.force))
    return 0


def cmd_verify(a) -> int:
    from .config import load_params
    from .verify import report, verify

    root = repo_root()
    outcome = verify(root, load_params(root / "params.yaml").tracking.uri, a.run, a.keep)
    print(report(outcome))
    return 0 if outcome.match else 1


def cmd_predict(a) -> int:
    from .config import load_params
    from .submission import predict
    from .tracking import open_store

    from .errors import CtclabError
    from .layouts import formats

    if a.format is not None and a.format not in formats():
        raise CtclabError(f"--format {a.format}: unknown; expected one of {', '.join(formats())}")
    root = repo_root()
    params = load_params(root / "params.yaml")
    recognizer = open_store(params.tracking.uri, root).load_model(a.model)
    beam = a.beam or params.decode.beam_width
    sys.stdout.write(predict(recognizer, Path(a.mfcc), beam, params.decode.workers, a.format))
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ctclab", description="CTC phoneme-recognition experiments with DVC + MLflow")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="dvc repro the pipeline and print a summary; other flags go to dvc repro",
                       usage="ctclab run [dvc repro flags and targets, e.g. -f or -s evaluate]")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("ui", help="start the MLflow UI on the project's tracking store")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=cmd_ui)
    p = sub.add_parser("curves", help="the training's learning curves as a PNG, offline (dvc.yaml's plot)")
    p.add_argument("--out", help="the PNG (default: beside train_history.csv, train_curves.png)")
    p.set_defaults(func=cmd_curves)
    p = sub.add_parser("params", help="check params.yaml, or print its JSON schema")
    p.add_argument("--schema", action="store_true", help="print the JSON schema (for editors)")
    p.set_defaults(func=cmd_params)
    p = sub.add_parser("study", help="run or report an ablation study (experiments/<study>.yaml)")
    ssub = p.add_subparsers(dest="study_command", required=True)
    r = ssub.add_parser("run", help="queue every variant × seed as a DVC experiment and run them")
    r.add_argument("study")
    r.add_argument("-j", "--jobs", type=int, default=1)
    r.add_argument("--seeds", type=int, nargs="+")
    r.add_argument("--smoke", action="store_true", help="the study's smoke size (tiny corpus, 1 epoch)")
    r.set_defaults(func=cmd_study_run)
    q = ssub.add_parser("report", help="write experiments/reports/<study>.md and its runs table <study>.runs.csv "
                                       "from MLflow")
    q.add_argument("study")
    q.add_argument("--smoke", action="store_true")
    q.add_argument("--from-table", action="store_true",
                   help="regenerate the report from experiments/reports/<study>.runs.csv alone (no MLflow store needed)")
    q.set_defaults(func=cmd_study_report)
    q = ssub.add_parser("promote", help="register the report's best variant (its best seed) as ctclab-<arch>@champion "
                                        "(@smoke for --smoke)")
    q.add_argument("study")
    q.add_argument("--smoke", action="store_true")
    q.add_argument("--force", action="store_true", help="move the alias even from a model that scored better on the same data")
    q.set_defaults(func=cmd_study_promote)
    p = sub.add_parser("verify", help="re-execute a recorded run (train → evaluate) and compare: MATCH or the differences")
    p.add_argument("run", help="an MLflow run id, or a DVC experiment / run name")
    p.add_argument("--keep", action="store_true", help="keep the temporary worktree")
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser("predict", help="decode a folder of MFCC .npy files with an MLflow model to a submission CSV")
    p.add_argument("--model", required=True, help="e.g. models:/ctclab-conv_lstm@champion or runs:/<run id>/model")
    p.add_argument("--mfcc", required=True, help="a dataset folder (its test split) or a folder of .npy files")
    p.add_argument("--beam", type=int, help="beam width (default: decode.beam_width)")
    p.add_argument("--format", help="CSV format: spring2022, fall2022 or one registered in src/ctclab/datasets "
                                    "(default: the dataset's)")
    p.set_defaults(func=cmd_predict)
    return ap


@one_line_errors
def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = parser()
    if argv[:1] == ["run"] and not {"-h", "--help"} & set(argv[1:]):
        # everything after `run` belongs to dvc repro, flags included (argparse would refuse `-f`)
        a = ap.parse_args(["run"])
        a.dvc_args = [x for x in argv[1:] if x != "--"]
    else:
        a = ap.parse_args(argv)
    try:
        sys.exit(a.func(a))
    except KeyboardInterrupt as err:  # the study runner says its own line (Interrupted); the rest this one
        raise interrupted(err, a.command, "outputs not finished were removed, finished ones kept") from None
