"""Ablation studies as files: experiments/<study>.yaml → DVC experiments → MLflow runs → a report.

    ctclab study run experiments/kaiming.yaml [-j 2] [--seeds 0 1 2] [--smoke]
    ctclab study report experiments/kaiming.yaml [--smoke]

A study file:

    name: kaiming
    question: Does Kaiming init of conv/linear weights lower the dev distance?
    metric: dev_lev_beam          # a score of metrics/eval.json (dev_lev_<decoder> or dev_per_<decoder>); lower is better
    base: {train.epochs: 15}      # overrides for every variant
    variants:
      - {name: on, baseline: true, params: {model.kaiming: true}}
      - {name: off, params: {model.kaiming: false}}
    seeds: [0, 1, 2]
    smoke: {seeds: [0, 1], params: {data.synthetic.train: 24, train.epochs: 1}}

Every variant × seed is queued as `dvc exp run --queue -n <study>-<variant>-s<seed> -S ...` and
run by `dvc queue start -j N`. DVC's run cache restores any stage whose deps and params already
ran, so variants that change only decoding reuse one trained model. The evaluate stage of each
experiment logs an MLflow child run (tags study, variant, seed, dvc_exp_name) under the study's
parent run; re-running a study skips variant × seeds whose child run finished.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from . import config, mlflow_views, models, study_runs, tracking
from .decoders import available
from .errors import CtclabError
from .results import DEV, EVAL, SUBMIT_DECODER, eval_metrics, lev, recorded
from .project import stage_params, tool_env

# How long the runner waits with experiments pending and no queue worker alive before it stops.
WORKERLESS_SECONDS = 30
# A look at the queue through a `dvc queue status` process cost 0.7 CPU seconds on a quiet 2-vCPU
# Xeon (2.5 s on a busy one), and looking 2 s after each answer took ~15 % of the machine from a
# default-size study's trainings; DVC's own API in this process costs 0.02 s after a 0.3 s import
# (queue_states; bench/logs/queue-status-cost-2vcpu-xeon.log). The runner looks every poll_seconds
# at first, then every tenth of the time waited so far, and at least every MAX_POLL_SECONDS.
MAX_POLL_SECONDS = 30



class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class Variant(_Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+$")]
    params: dict[str, Any] = {}
    baseline: bool = False


class Smoke(_Strict):
    seeds: list[int] = []
    params: dict[str, Any] = {}


class Study(_Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+$")]
    question: Annotated[str, Field(min_length=1)]
    metric: str = lev(DEV, SUBMIT_DECODER)  # a score of metrics/eval.json (lower is better)
    base: dict[str, Any] = {}
    variants: Annotated[list[Variant], Field(min_length=1)]
    seeds: Annotated[list[int], Field(min_length=1)]
    smoke: Smoke = Smoke()
    path: str = ""

    @model_validator(mode="after")
    def _a_score_evaluate_writes(self):
        scores = eval_metrics(available())
        if self.metric not in scores:
            raise config.rule_error("metric", self.metric, f"one of {', '.join(scores)} (metrics/eval.json's scores)")
        return self

    @model_validator(mode="after")
    def _one_baseline_unique_names(self):
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise config.rule_error("variants", names, "unique names")
        marked = sum(v.baseline for v in self.variants)
        if marked != 1:
            raise config.rule_error("variants", f"{marked} marked baseline: true", "exactly one")
        return self

    @property
    def baseline(self) -> Variant:
        return next(v for v in self.variants if v.baseline)

    @property
    def smoke_seeds(self) -> tuple[int, ...]:
        return tuple(self.smoke.seeds or self.seeds[:1])

    def overrides(self, variant: Variant, seed: int, smoke: bool) -> dict:
        """Dotted param overrides for one variant × seed. A smoke run's params win over the variant's,
        so that a variant training longer (train.epochs) still smokes in one epoch."""
        return {**self.base, **variant.params, **(self.smoke.params if smoke else {}), "train.seed": seed}

    def runs(self, seeds: tuple[int, ...]) -> list[tuple[Variant, int]]:
        """Every variant × seed, in the order they are queued (and DVC's queue runs them): seed by
        seed, so a study stopped midway leaves only the seed(s) in progress incomplete, and every
        finished seed has each variant paired with its baseline."""
        return [(v, s) for s in seeds for v in self.variants]

    def exp_name(self, variant: Variant, seed: int, smoke: bool) -> str:
        return f"{self.name}-{variant.name}-s{seed}" + ("-smoke" if smoke else "")

    def parent_name(self, smoke: bool) -> str:
        return self.name + (" (smoke)" if smoke else "")

    def experiment(self, base: str, smoke: bool) -> str:
        """The study's own MLflow experiment, e.g. `ctclab/kaiming` (smoke runs apart: `ctclab/kaiming-smoke`)."""
        return f"{base}/{self.name}" + ("-smoke" if smoke else "")


def load(path: str | Path, params_path: str | Path = "params.yaml") -> Study:
    """Read and check a study file; every override must be a real, well-typed param."""
    path = Path(path)
    try:
        raw = config.load_yaml(path.read_text())
    except FileNotFoundError:
        raise CtclabError(f"{path}: no such study file") from None
    except config.YAMLError as err:
        raise CtclabError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise CtclabError(f"{path}: expected a mapping with name, question, variants, seeds")
    try:
        study = Study.model_validate({**raw, "path": str(path)})
    except ValidationError as err:
        raise CtclabError(config.one_line(err, str(path), Study)) from None
    models.architectures()  # a variant may set any architecture's knobs: each is checked against its config
    base = config.load_params(params_path)
    for v in study.variants:
        for smoke in (False, True):
            config.with_overrides(base, study.overrides(v, study.seeds[0], smoke), f"{path}: variant {v.name}")
    return study


# --- running ------------------------------------------------------------------------------------
def worker_env(jobs: int) -> dict[str, str]:
    """Environment for queue workers: with N trainings side by side, each gets cores/N OpenMP
    threads (threads of parallel trainings spin-waiting on each other made each many times slower
    than cores/N). A value the user set is kept."""
    env = tool_env()
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, jobs))))
    env["CTCLAB_PARALLEL_JOBS"] = str(jobs)  # recorded by each training: timings under -j N compare only with -j N
    return env


def _dvc(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=tool_env(), capture_output=True, text=True)
    if check and r.returncode:
        raise CtclabError(f"dvc {' '.join(args[:3])} failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
    return r


def _yaml_value(v) -> str:
    return config.dump_yaml(v, flow=True).strip().removesuffix("...").strip()


def parent_run(study: Study, smoke: bool, root: Path, create: bool = True) -> study_runs.ParentRun:
    """The study's MLflow parent run in the study's experiment (found by tags, created if asked),
    whose address opens on the study's runs and curves (mlflow_views.study_view). A report also
    finds parents recorded before studies had experiments of their own."""
    t = config.load_params(root / "params.yaml").tracking
    store, experiment = tracking.open_store(t.uri, root), study.experiment(t.experiment, smoke)
    parent = study_runs.find_parent(store, experiment, study.name, smoke)
    if parent is None and not create:
        parent = study_runs.find_parent(store, t.experiment, study.name, smoke)
        if parent is None:
            raise CtclabError(f"{study.path}: no MLflow runs for study {study.name!r}"
                              f"{' (smoke)' if smoke else ''}; run `ctclab study run {study.path}` first")
        return parent  # in the pipeline's experiment, which keeps its own view
    if parent is None:
        text = Path(study.path).read_text() if study.path else ""
        parent = study_runs.create_parent(store, experiment, study.name, smoke, study.parent_name(smoke),
                                          study.question, text)
    store.show_view(parent.experiment_id, mlflow_views.study_view(
        study.name, parent.run_id, [v.name for v in study.variants], study.metric))
    return parent


def score(child: tracking.RunRecord, metric: str) -> float | None:
    """A child run's final value of `metric` as evaluate logged it (`eval_<metric>`; older runs'
    names are read by results.recorded)."""
    return recorded(child.metrics, metric, EVAL)


def finished(child: tracking.RunRecord, metric: str) -> bool:
    return child.status == "FINISHED" and score(child, metric) is not None


class Identity:
    """What a variant × seed would run now, to tell whether a finished run stands for it: the same
    resolved params (every key a stage of dvc.yaml depends on, study.* aside) and the same code
    (dvc.yaml and every file of src/ and pipeline/ a stage depends on unchanged since the run's
    commit, which was clean). The data follows from both: it is made by fetch and preprocess from
    those params and that code. Code no stage depends on (reports, the study runner) changes no
    result, as DVC's run cache agrees, so it sends nothing back to train."""

    CODE_FOLDERS = ("src/", "pipeline/")
    # what a queued DVC experiment changes in its copy of the commit: params.yaml (its -S values,
    # compared as params) and DVC's own record
    EXPERIMENT_EDITS = {"params.yaml", "dvc.lock"}

    def __init__(self, study: Study, root: Path, smoke: bool):
        self.study, self.root, self.smoke = study, root, smoke
        self.base = config.load_params(root / "params.yaml")
        # study.* differs between children by design; submit.* decides only the upload, not a dev score
        self.keys = {k for k in stage_params(root) if not k.startswith(("study", "submit"))}
        dvc_yaml = config.load_yaml((root / "dvc.yaml").read_text())  # readable: stage_params read it
        self.code = sorted({d for stage in dvc_yaml["stages"].values() for d in stage.get("deps", [])
                            if d.startswith(self.CODE_FOLDERS)}) + ["dvc.yaml"]
        self._same_code: dict[str, str | None] = {}

    def params(self, variant: Variant, seed: int) -> dict[str, str]:
        """The resolved params that decide its result, as MLflow records them (strings)."""
        resolved = config.with_overrides(self.base, self.study.overrides(variant, seed, self.smoke), str(self.study.path))
        return {k: str(v) for k, v in config.flatten(resolved).items()
                if any(k == p or k.startswith(p + ".") for p in self.keys)}

    def why_not(self, run: tracking.RunRecord, variant: Variant, seed: int) -> str | None:
        """Why `run` cannot stand for this variant × seed now; None when it can."""
        differ = [f"{k} {run.params.get(k, 'unrecorded')} → {v}" for k, v in self.params(variant, seed).items()
                  if run.params.get(k) != v]
        if differ:
            return f"params changed ({'; '.join(differ[:3])}{' …' if len(differ) > 3 else ''})"
        if run.tags.get("git_dirty") != "false" and not set(run.tags.get("git_dirty_files", "?").split()) <= self.EXPERIMENT_EDITS:
            return "its run was trained from uncommitted code"
        return self._code_changed(run.tags.get("mlflow.source.git.commit", ""))

    def _code_changed(self, commit: str) -> str | None:
        if commit not in self._same_code:
            r = subprocess.run(["git", "diff", "--name-only", commit, "HEAD", "--", *self.code], cwd=self.root,
                               capture_output=True, text=True)
            changed = r.stdout.split()
            self._same_code[commit] = (f"its commit {commit[:12]} is not in this repository" if r.returncode or not commit
                                       else f"code changed since its commit {commit[:12]} ({', '.join(changed[:3])}"
                                            f"{' …' if len(changed) > 3 else ''})" if changed else None)
        return self._same_code[commit]


def _queue(study: Study, root: Path, seeds: tuple[int, ...], smoke: bool, parent: study_runs.ParentRun):
    """Queue every variant × seed without a finished child run that stands for what would run now
    (Identity); return (queued, skipped) names. One still queued or running from an interrupted
    `ctclab study run` is waited for, not queued again."""
    latest = {(c.tags.get("variant"), c.tags.get("seed")): c
              for c in sorted(parent.children(), key=lambda c: c.start_time) if finished(c, study.metric)}
    identity = Identity(study, root, smoke)
    _say_unchecked(study, latest, identity, seeds, smoke)
    names = [study.exp_name(v, s, smoke) for v, s in study.runs(seeds)]
    in_queue = {n for n, state in queue_states(root, names)[0].items() if state in ("Queued", "Running")}
    queued, skipped = [], []
    for v, s in study.runs(seeds):
        name = study.exp_name(v, s, smoke)
        done = latest.get((v.name, str(s)))
        stale = identity.why_not(done, v, s) if done is not None else None
        if done is not None and stale is None:
            skipped.append(name)
            continue
        if stale:
            print(f"study {study.name}: {v.name} seed {s} runs again: {stale}", flush=True)
        if name in in_queue:
            queued.append(name)
            continue
        _dvc(root, "exp", "remove", name, check=False)  # a failed earlier attempt keeps the name
        overrides = {**study.overrides(v, s, smoke), "study.name": study.name, "study.variant": v.name,
                     "study.parent_run_id": parent.run_id}
        sets = [a for k, val in overrides.items() for a in ("-S", f"{k}={_yaml_value(val)}")]
        _dvc(root, "exp", "run", "--queue", "-n", name, *sets)
        queued.append(name)
    return queued, skipped


def _say_unchecked(study: Study, latest: dict, identity: Identity, seeds: tuple[int, ...], smoke: bool) -> None:
    """One line per reason when the report will count finished runs of seeds outside this run's
    (`--seeds` adds seeds) that no longer stand for what would run now: they are kept, not trained
    again."""
    variants = {v.name: v for v in study.variants}
    unchecked: dict[str, list[int]] = {}
    for (v, s), run in latest.items():
        if v in variants and s is not None and int(s) not in seeds:
            why = identity.why_not(run, variants[v], int(s))
            if why:
                unchecked.setdefault(why, []).append(int(s))
    for why, stale in unchecked.items():
        listed = " ".join(map(str, sorted(set(stale))))
        runs = f"{len(stale)} earlier run{'s' * (len(stale) > 1)} of seed{'s' * (len(set(stale)) > 1)} {listed}"
        print(f"study {study.name}: the report also counts {runs}, kept as they ran although {why}; "
              f"`--seeds {listed}{' --smoke' * smoke}` trains them again", flush=True)


# What a queued experiment runs: `dvc exp run --queue` takes tracked files as they are in the
# workspace (modified or not) but leaves untracked ones out.
CODE_PATHS = ("src", "pipeline", "params.yaml", "dvc.yaml")


def uncommitted_code(root: Path) -> tuple[list[str], list[str]]:
    """(untracked, modified) files under CODE_PATHS: a queued experiment would leave the first out
    and silently take the second, and a study's runs must be the commit they record."""
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--", *CODE_PATHS], cwd=root,
                         capture_output=True, text=True).stdout
    lines = out.splitlines()
    return [l[3:] for l in lines if l.startswith("?? ")], [l[3:] for l in lines if l and not l.startswith("?? ")]


def _listed(files: list[str]) -> str:
    return f"{', '.join(files[:5])}{' …' if len(files) > 5 else ''}"


def run_study(study: Study, root: Path, jobs: int = 1, seeds: tuple[int, ...] | None = None,
              smoke: bool = False, poll_seconds: float = 2.0) -> dict:
    seeds = tuple(seeds or (study.smoke_seeds if smoke else study.seeds))
    unseen, changed = uncommitted_code(root)
    if unseen:
        raise CtclabError(f"{root}: untracked {_listed(unseen)} would be left out of the queued experiments (DVC "
                          "queues tracked files only); `git add` or remove them")
    if changed:
        raise CtclabError(f"{root}: uncommitted changes to {_listed(changed)} would run in every experiment of the "
                          "study while its runs record the commit without them; commit them (git commit -am …) or "
                          f"reset them (git checkout -- {' '.join(changed[:5])})")
    parent = parent_run(study, smoke, root)
    parent.note_start(seeds)
    t0 = time.monotonic()
    try:
        queued, skipped = _queue(study, root, seeds, smoke, parent)
        runs, curves = parent.ui_addresses()
        print(f"study {study.name}: {len(queued)} experiments queued, {len(skipped)} already complete; MLflow UI"
              f"{parent.ui_where()}: {runs} (curves: {curves})", flush=True)
        failed = _wait(study, root, queued, jobs, t0, poll_seconds)
    except KeyboardInterrupt:
        previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
        try:  # ending the queue must not itself be cut short
            stop_queue(root, [study.exp_name(v, s, smoke) for v, s in study.runs(seeds)])
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        raise
    return {"queued": queued, "skipped": skipped, "failed": failed, "seconds": time.monotonic() - t0,
            "parent_run_id": parent.run_id,
            "ui": f"{runs} (curves: {curves}){parent.ui_where()}"}


def _wait(study: Study, root: Path, queued: list[str], jobs: int, t0: float, poll_seconds: float) -> list[str]:
    """Run the queued experiments to their end; return the names of those that failed."""
    if queued:
        # Workers exit by themselves once the queue is empty. No `dvc queue stop` here: a stop
        # request can outlive this call and shut down the workers of the next study mid-queue.
        if queue_states(root, [])[1] is not True:  # workers of an interrupted earlier run may still be at it
            start_workers(root, jobs)
        dead_since, restarted = None, False
        while True:
            states, workers = queue_states(root, queued)
            pending = [n for n, s in states.items() if s in ("Queued", "Running", None)]
            print(f"  {len(queued) - len(pending)}/{len(queued)} finished ({time.monotonic() - t0:.0f} s)", flush=True)
            if not pending:
                break
            # DVC's queue can lose a worker, or leave a failed experiment marked Running after its
            # worker exited: with no worker alive for WORKERLESS_SECONDS, nothing will finish. Queued
            # experiments get new workers once; orphaned "Running" ones cannot be helped.
            dead_since = None if workers is not False else (dead_since or time.monotonic())  # None: unknown
            if dead_since and time.monotonic() - dead_since > WORKERLESS_SECONDS:
                waiting = [n for n in pending if states[n] in ("Queued", None)]
                if waiting and not restarted:
                    print(f"study {study.name}: no DVC queue worker alive for {WORKERLESS_SECONDS} s with {len(waiting)} "
                          "experiments queued; starting workers again (once)", flush=True)
                    start_workers(root, jobs)
                    dead_since, restarted = None, True
                else:
                    print(f"study {study.name}: no DVC queue worker alive for {WORKERLESS_SECONDS} s; stopped waiting for "
                          f"{', '.join(pending)}", flush=True)
                    break
            time.sleep(min(MAX_POLL_SECONDS, max(poll_seconds, (time.monotonic() - t0) / 10)))
    states = queue_states(root, queued)[0] if queued else {}
    return sorted(n for n, s in states.items() if s != "Success")


def stop_queue(root: Path, names: list[str]) -> None:
    """An interrupted study ends what it started: its queued experiments leave DVC's queue, running
    ones are killed (their training gets SIGINT and saves nothing the next run needs: finished
    runs are what a re-run skips), and the queue's workers stop."""
    states, _ = queue_states(root, names)
    waiting = [n for n, state in states.items() if state == "Queued"]
    running = [n for n, state in states.items() if state == "Running"]
    if waiting:
        _dvc(root, "queue", "remove", *waiting, check=False)
    if running:
        _dvc(root, "queue", "kill", *running, check=False)
    _dvc(root, "queue", "stop", "--kill", check=False)


def start_workers(root: Path, jobs: int) -> None:
    # The workers outlive this call: they must not hold our output pipes, or we wait on them.
    subprocess.run([sys.executable, "-m", "dvc", "queue", "start", "-j", str(jobs)], cwd=root,
                   env=worker_env(jobs), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)


def queue_states(root: Path, names: list[str]) -> tuple[dict[str, str | None], bool | None]:
    """Each named experiment's queue status (Queued, Running, Success, Failed) and whether any queue
    worker is alive (None when DVC cannot say: not a DVC repository), read as `dvc queue status`
    reads them, through DVC's API in this process (a `dvc` process per look costs 35 times the CPU)."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    states: dict[str, str | None] = dict.fromkeys(names)
    try:
        with Repo(str(root)) as repo:
            queue = repo.experiments.celery_queue
            for task in queue.status():
                if task.get("name") in states:
                    states[task["name"]] = task["status"]
            workers = queue.worker_status()  # the workers that answered celery's one-second question
    except DvcException:
        workers = None
    if worker_processes(root):  # alive, whether or not it answered DVC's question in time
        return states, True
    return states, None if workers is None else len(workers) > 0


def worker_processes(root: Path) -> bool:
    """Whether a DVC queue worker process of this repository runs. `dvc queue status` asks the
    workers through celery with a one-second timeout, which a busy worker on a loaded machine can
    miss for longer than WORKERLESS_SECONDS (a test run beside a study did)."""
    import psutil

    for proc in psutil.process_iter(["cmdline", "cwd", "status"]):
        info = proc.info
        if ("queue-worker" in (info["cmdline"] or []) and info["cwd"] == str(root.resolve())
                and info["status"] != psutil.STATUS_ZOMBIE):
            return True
    return False
