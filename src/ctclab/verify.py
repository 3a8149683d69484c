"""Re-execute a recorded training and say whether it gives the same answer.

    ctclab verify RUN        # an MLflow run id, or a DVC experiment / run name

Reads the run's commit, params, data hash, hardware and package versions (its `pip freeze`) from MLflow; checks the commit out in a
temporary git worktree (applying the recorded `git diff` when the tree was dirty), writes the
recorded params into its params.yaml with a tracking store of its own, takes the data from this
repository when its hash matches (else fetches and preprocesses there and refuses if the hash
differs), runs train → evaluate as that commit's dvc.yaml says (its `cmd`, with its paths), and
compares the checkpoint's sha256 and the scores. It runs on the thread count the run recorded, so
a study's 1-thread training (-j 2) is re-executed bit for bit on a machine with more cores. On the same
hardware (CPU model, torch version and threads, device) everything must be bit-identical; on other
hardware the scores must agree within TOLERANCE (CPU floats differ across machines). Prints MATCH
or a table of differences; exits 1 on a mismatch, 2 when it cannot verify.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


from . import config, tracking
from .errors import CtclabError
from .results import BEST, DEV, EVAL, VERIFIED_CURVES
from .project import stage_command, stage_paths, tool_env

# Relative tolerance for scores re-executed on other hardware.
TOLERANCE = 0.10
CURVES = VERIFIED_CURVES
HARDWARE = ("cpu_model", "device", "device_name", "torch_version", "torch_threads")


@dataclass
class Outcome:
    rows: list[tuple[str, str, str, bool]]  # what, recorded, re-executed, equal
    same_hardware: bool
    hardware_note: str
    packages: list[str] = field(default_factory=list)  # "name a → b" where the environments differ

    @property
    def match(self) -> bool:
        return all(ok for *_, ok in self.rows)


def typed(recorded: str, like):
    """An MLflow param (a string) as the type params.yaml has for it."""
    if isinstance(like, bool):
        return recorded == "True"
    if isinstance(like, (int, float)):  # an int in params.yaml may be a float key (10 for 10.0)
        value = float(recorded)
        return int(value) if isinstance(like, int) and value.is_integer() else value
    return recorded


def write_params(worktree: Path, recorded: dict, beam_width: str | None, store: str) -> None:
    """The commit's params.yaml with the run's recorded values, its own tracking store, no study."""
    path = worktree / "params.yaml"
    raw = config.load_yaml(path.read_text())
    for key, value in recorded.items():
        node, *parents = raw, *key.split(".")[:-1]
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        leaf = key.split(".")[-1]
        if isinstance(node, dict) and leaf in node and not key.startswith("tracking."):
            node[leaf] = typed(value, node[leaf])
    if beam_width is not None:
        raw["decode"]["beam_width"] = int(beam_width)
    raw["tracking"]["uri"] = store
    raw["study"] = {k: "" for k in raw.get("study", {})}
    path.write_text(config.dump_yaml(raw))


def compare(recorded, recorded_curves: dict, again, again_curves: dict) -> Outcome:
    """Recorded run vs re-executed run (tracking RunRecords) and their per-epoch curves."""
    rec_hw = {k: recorded.tags.get(k, "?") for k in HARDWARE}
    new_hw = {k: again.tags.get(k, "?") for k in HARDWARE}
    same = rec_hw == new_hw
    note = ("same hardware: bit-identical expected" if same else
            "different hardware (" + "; ".join(f"{k} {rec_hw[k]} → {new_hw[k]}" for k in HARDWARE
                                                 if rec_hw[k] != new_hw[k]) +
            f"): scores compared within ±{TOLERANCE:.0%}, not bit for bit")
    rows = []
    if same:
        a, b = recorded.tags.get("checkpoint_sha256", "?"), again.tags.get("checkpoint_sha256", "?")
        rows.append(("checkpoint sha256", a[:16], b[:16], a == b))
    for key in scores(recorded.metrics):
        a, b = recorded.metrics.get(key), again.metrics.get(key)
        ok = a is not None and b is not None and (a == b if same else abs(a - b) <= TOLERANCE * max(abs(a), 1e-9))
        rows.append((key, _fmt(a), _fmt(b), ok))
    for key in CURVES if same else ():
        a, b = recorded_curves.get(key, []), again_curves.get(key, [])
        rows.append((f"{key} per epoch ({len(a)})", _fmt(a[-1] if a else None), _fmt(b[-1] if b else None), a == b))
    return Outcome(rows, same, note)


def scores(metrics: dict) -> list[str]:
    """The recorded run's scores: its best epoch's, and each decoder's from evaluate (whatever
    decoders and names the recorded commit had: it is that commit that runs again)."""
    return [BEST, *sorted(k for k in metrics if k.startswith(EVAL + DEV + "_"))]


def package_changes(recorded: str, again: str) -> list[str]:
    """Packages whose version differs between two `pip freeze` outputs (editable installs aside)."""
    def versions(text: str) -> dict[str, str]:
        pairs = (line.split("==", 1) for line in text.splitlines() if "==" in line and not line.startswith(("#", "-e")))
        return {name.lower(): version for name, version in pairs}
    a, b = versions(recorded), versions(again)
    return [f"{n} {a.get(n, '–')} → {b.get(n, '–')}" for n in sorted(set(a) | set(b)) if a.get(n) != b.get(n)]


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.6f}"


def table(outcome: Outcome) -> str:
    lines = ["| what | recorded | re-executed | |", "|---|---|---|---|"]
    lines += [f"| {what} | {a} | {b} | {'same' if ok else 'DIFFERS'} |" for what, a, b, ok in outcome.rows]
    return "\n".join(lines)


def _git(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if check and r.returncode:
        raise CtclabError(f"git {' '.join(args[:2])} failed in {root}: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
    return r


def _stage(worktree: Path, name: str, threads: str) -> None:
    """Run a stage as the recorded commit's dvc.yaml says (its script, its paths), on the recorded
    number of torch threads (CPU floats depend on it: a study run with -j 2 trained on one), saying
    as it goes which stage runs and each epoch's line (a re-training can take as long as the training did)."""
    env = {**tool_env(), "PYTHONPATH": str(worktree / "src")}  # the recorded commit's code, not this checkout's
    env.pop("MLFLOW_TRACKING_URI", None)
    if threads.isdigit():
        env["OMP_NUM_THREADS"] = threads
    print(f"verify: {name} …", file=sys.stderr, flush=True)
    proc = subprocess.Popen(stage_command(worktree, name), cwd=worktree, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    last = "(no output)"
    try:
        for line in proc.stdout:
            line = line.strip()
            last = line or last
            if line.startswith(("epoch ", f"{name}: ")) and "%|" not in line:  # results, not progress bars
                print(f"verify:   {line}", file=sys.stderr, flush=True)
        proc.wait()
    except KeyboardInterrupt:  # the stage got a terminal's Ctrl-C too; a SIGTERM verify passes on
        proc.terminate()
        proc.wait()
        raise
    if proc.returncode:
        raise CtclabError(f"verify: the {name} stage failed in {worktree}: {last}")


def _processed(worktree: Path) -> Path:
    """Where the recorded commit's stages read their shards (commits before dvc.yaml passed paths: data/processed)."""
    return stage_paths(worktree, "preprocess").get("out", worktree / "data" / "processed")


def prepare(root: Path, worktree: Path, run, data_hash: str) -> str:
    """Data for the worktree: this repository's shards when their hash matches, else fetched and
    preprocessed there. Returns how it got them."""
    from .data import read_meta

    here, there = stage_paths(root, "preprocess")["out"], _processed(worktree)
    if (here / "meta.json").is_file() and read_meta(here).data_hash == data_hash:
        shutil.copytree(here, there)
        return f"data {data_hash[:12]} from {here}"
    _stage(worktree, "fetch")
    _stage(worktree, "preprocess")
    made = read_meta(there).data_hash
    if made != data_hash:
        raise CtclabError(f"verify: run {run.run_id} trained on data {data_hash[:12]}, but its params now give data "
                          f"{made[:12]}; cannot verify on other data")
    return f"data {data_hash[:12]} re-made by fetch + preprocess"


def verify(root: Path, configured_uri: str, run_ref: str, keep: bool = False) -> Outcome:
    recorded = tracking.open_store(configured_uri, root)
    run = recorded.find_run(run_ref)
    commit = run.tags.get("mlflow.source.git.commit") or run.tags.get("git_commit") or "unknown"
    if commit == "unknown" or _git(root, "cat-file", "-e", f"{commit}^{{commit}}", check=False).returncode:
        raise CtclabError(f"verify: run {run.run_id} was recorded at commit {commit[:12]}, which this repository "
                          "does not have; fetch it first")
    data_hash = run.tags.get("data_hash", "")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bar for one small file
    diff = recorded.run_text(run.run_id, "environment/git.diff") if run.tags.get("git_dirty") == "true" else ""
    if run.tags.get("git_dirty") == "true" and not diff:
        raise CtclabError(f"verify: run {run.run_id} was trained from a dirty tree and logged no git diff; its code "
                          "cannot be re-created")
    worktree = Path(tempfile.mkdtemp(prefix="ctclab-verify-")) / "tree"
    _git(root, "worktree", "add", "--detach", str(worktree), commit)
    try:
        if diff:
            (worktree / ".recorded.diff").write_text(diff)
            _git(worktree, "apply", ".recorded.diff")
        store_uri = f"sqlite:///{worktree / 'verify.db'}"
        write_params(worktree, run.params, run.tags.get("decode.beam_width"), store_uri)
        t0 = time.monotonic()
        how = prepare(root, worktree, run, data_hash)
        threads = run.tags.get("torch_threads", "")
        print(f"verify: run {run.run_id} (commit {commit[:12]}{', with its diff' if diff else ''}; {how}); "
              f"re-executing train → evaluate in {worktree}"
              f"{f' on {threads} torch thread(s), as recorded' if threads.isdigit() else ''}", file=sys.stderr, flush=True)
        for stage in ("train", "evaluate"):
            _stage(worktree, stage, threads)
        rerun = tracking.open_store(store_uri, worktree)
        models = stage_paths(worktree, "train").get("models", worktree / "models")  # older commits: models/
        again = rerun.record(rerun.checkpoint_run(models / "best.pt"))
        print(f"verify: re-executed in {time.monotonic() - t0:.0f} s", file=sys.stderr)
        curves = {k: [v for _, v in rerun.metric_history(again.run_id, k)] for k in CURVES}
        recorded_curves = {k: [v for _, v in recorded.metric_history(run.run_id, k)] for k in CURVES}
        outcome = compare(run, recorded_curves, again, curves)
        outcome.packages = package_changes(recorded.run_text(run.run_id, "environment/pip-freeze.txt"),
                                           rerun.run_text(again.run_id, "environment/pip-freeze.txt"))
        return outcome
    finally:
        if not keep:
            _git(root, "worktree", "remove", "--force", str(worktree), check=False)
            shutil.rmtree(worktree.parent, ignore_errors=True)


def report(outcome: Outcome) -> str:
    lines = [outcome.hardware_note, ("packages as recorded" if not outcome.packages else
                                     f"packages differ from the recorded run: {', '.join(outcome.packages[:8])}"
                                     f"{' …' if len(outcome.packages) > 8 else ''}")]
    if outcome.match:
        lines.append(f"MATCH ({len(outcome.rows)} checks)")
    else:
        lines += ["MISMATCH", table(outcome)]
    return os.linesep.join(lines)
