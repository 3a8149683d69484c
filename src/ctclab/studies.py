"""Ablation studies as files: experiments/<study>.yaml → DVC experiments → MLflow runs → a report.

    ctclab study run experiments/kaiming.yaml [-j 2] [--seeds 0 1 2] [--smoke]
    ctclab study report experiments/kaiming.yaml [--smoke]

A study file:

    name: kaiming
    question: Does Kaiming init of conv/linear weights lower the dev distance?
    metric: dev_lev_beam          # a key of metrics/eval.json or metrics/train.json; lower is better
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

import dataclasses
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import config
from .errors import CtclabError

METRICS = ("dev_lev_beam", "dev_lev_greedy", "dev_per", "dev_per_greedy")


@dataclass(frozen=True)
class Variant:
    name: str
    params: dict
    baseline: bool = False


@dataclass(frozen=True)
class Study:
    name: str
    question: str
    variants: tuple[Variant, ...]
    seeds: tuple[int, ...]
    metric: str = "dev_lev_beam"
    base: dict = field(default_factory=dict)
    smoke_seeds: tuple[int, ...] = (0,)
    smoke_params: dict = field(default_factory=dict)
    path: str = ""

    @property
    def baseline(self) -> Variant:
        return next(v for v in self.variants if v.baseline)

    def overrides(self, variant: Variant, seed: int, smoke: bool) -> dict:
        """Dotted param overrides for one variant × seed (smoke sizes applied last but one)."""
        out = {**self.base, **(self.smoke_params if smoke else {}), **variant.params}
        out["train.seed"] = seed
        return out

    def exp_name(self, variant: Variant, seed: int, smoke: bool) -> str:
        return f"{self.name}-{variant.name}-s{seed}" + ("-smoke" if smoke else "")

    def parent_name(self, smoke: bool) -> str:
        return self.name + (" (smoke)" if smoke else "")


def _apply(params: config.Params, overrides: dict, where: str) -> config.Params:
    """Params with dotted overrides applied, type-checked like params.yaml itself."""
    raw = dataclasses.asdict(params)
    for key, value in overrides.items():
        node, parts = raw, key.split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                raise CtclabError(f"{where}: unknown param {key!r}; expected a key of params.yaml such as model.kaiming")
            node = node[p]
        if parts[-1] not in node or isinstance(node[parts[-1]], dict):
            raise CtclabError(f"{where}: unknown param {key!r}; expected a key of params.yaml such as model.kaiming")
        node[parts[-1]] = value
    result = config.build(config.Params, raw, where)
    config.check(result, where)
    return result


def load(path: str | Path, params_path: str | Path = "params.yaml") -> Study:
    path = Path(path)
    try:
        raw = config.load_yaml(path.read_text())
    except FileNotFoundError:
        raise CtclabError(f"{path}: no such study file") from None
    except yaml.YAMLError as err:
        raise CtclabError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise CtclabError(f"{path}: expected a mapping with name, question, variants, seeds")
    allowed = {"name", "question", "metric", "base", "variants", "seeds", "smoke"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise CtclabError(f"{path}: unknown key {unknown[0]!r}; expected one of {', '.join(sorted(allowed))}")
    for key in ("name", "question", "variants", "seeds"):
        if not raw.get(key):
            raise CtclabError(f"{path}: missing {key!r}")
    name = str(raw["name"])
    if not name.replace("_", "").replace("-", "").isalnum():
        raise CtclabError(f"{path}: name = {name!r}, expected letters, digits, _ and - only")
    metric = raw.get("metric", "dev_lev_beam")
    if metric not in METRICS:
        raise CtclabError(f"{path}: metric = {metric!r}, expected one of {', '.join(METRICS)}")
    variants = []
    for i, v in enumerate(raw["variants"]):
        if not isinstance(v, dict) or "name" not in v:
            raise CtclabError(f"{path}: variants[{i}] = {v!r}, expected a mapping with name and params")
        extra = sorted(set(v) - {"name", "params", "baseline"})
        if extra:
            raise CtclabError(f"{path}: variants[{i}] has unknown key {extra[0]!r}; expected name, params, baseline")
        variants.append(Variant(str(v["name"]), dict(v.get("params") or {}), bool(v.get("baseline", False))))
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise CtclabError(f"{path}: variant names repeat ({names}); expected unique names")
    if sum(v.baseline for v in variants) != 1:
        raise CtclabError(f"{path}: {sum(v.baseline for v in variants)} variants marked baseline: true; expected exactly one")
    seeds = raw["seeds"]
    if not all(isinstance(s, int) for s in seeds):
        raise CtclabError(f"{path}: seeds = {seeds!r}, expected a list of integers")
    smoke = raw.get("smoke") or {}
    study = Study(name, str(raw["question"]), tuple(variants), tuple(seeds), metric, dict(raw.get("base") or {}),
                  tuple(smoke.get("seeds", (seeds[0],))), dict(smoke.get("params") or {}), str(path))
    base = config.load_params(params_path)
    for v in variants:  # every override must be a real, well-typed param
        for smoke_flag in (False, True):
            _apply(base, study.overrides(v, study.seeds[0], smoke_flag), f"{path}: variant {v.name}")
    return study


# --- running ------------------------------------------------------------------------------------
def worker_env(jobs: int) -> dict[str, str]:
    """Environment for queue workers: with N trainings side by side, each gets cores/N OpenMP
    threads. Two 2-thread trainings on 2 cores were measured 10-25x slower per epoch than one
    (threads spin-waiting on each other), not 2x. A value the user set is kept."""
    from .cli import tool_env

    env = tool_env()
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, jobs))))
    return env


def _dvc(root: Path, *args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    from .cli import tool_env

    r = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=env or tool_env(),
                       capture_output=True, text=True)
    if check and r.returncode:
        raise CtclabError(f"dvc {' '.join(args[:3])} failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
    return r


def _yaml_value(v) -> str:
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


def parent_run(study: Study, smoke: bool, root: Path, create: bool = True):
    """The study's MLflow parent run (found by tags, created if asked)."""
    import mlflow

    from . import tracking

    params = config.load_params(root / "params.yaml")
    exp_id = tracking._configure(params.tracking.uri, params.tracking.experiment, root)
    client = mlflow.MlflowClient()
    found = client.search_runs([exp_id], f"tags.ctclab_study_parent = '{study.name}' and tags.smoke = '{str(smoke).lower()}'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    if found:
        return client, found[0]
    if not create:
        raise CtclabError(f"{study.path}: no MLflow runs for study {study.name!r}"
                          f"{' (smoke)' if smoke else ''}; run `ctclab study run {study.path}` first")
    run = client.create_run(exp_id, run_name=study.parent_name(smoke),
                            tags={"ctclab_study_parent": study.name, "study": study.name, "smoke": str(smoke).lower(),
                                  "question": study.question})
    client.log_text(run.info.run_id, Path(study.path).read_text() if study.path else "", "study.yaml")
    client.set_terminated(run.info.run_id)
    return client, run


def children(client, parent) -> list:
    return client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                              max_results=5000)


def _finished(child, metric: str) -> bool:
    return child.info.status == "FINISHED" and metric in child.data.metrics


def run_study(study: Study, root: Path, jobs: int = 1, seeds: tuple[int, ...] | None = None,
              smoke: bool = False, poll_seconds: float = 2.0) -> dict:
    seeds = tuple(seeds or (study.smoke_seeds if smoke else study.seeds))
    client, parent = parent_run(study, smoke, root)
    done = {(c.data.tags.get("variant"), c.data.tags.get("seed")) for c in children(client, parent)
            if _finished(c, study.metric)}
    queued, skipped = [], []
    for v in study.variants:
        for s in seeds:
            name = study.exp_name(v, s, smoke)
            if (v.name, str(s)) in done:
                skipped.append(name)
                continue
            _dvc(root, "exp", "remove", name, check=False)  # a failed earlier attempt keeps the name
            overrides = {**study.overrides(v, s, smoke), "study.name": study.name, "study.variant": v.name,
                         "study.parent_run_id": parent.info.run_id}
            sets = [a for k, val in overrides.items() for a in ("-S", f"{k}={_yaml_value(val)}")]
            _dvc(root, "exp", "run", "--queue", "-n", name, *sets)
            queued.append(name)
    print(f"study {study.name}: {len(queued)} experiments queued, {len(skipped)} already complete", flush=True)
    t0 = time.monotonic()
    if queued:
        # Workers exit by themselves once the queue is empty. No `dvc queue stop` here: a stop
        # request can outlive this call and shut down the workers of the next study mid-queue.
        # The workers outlive this call: they must not hold our output pipes, or we wait on them.
        subprocess.run([sys.executable, "-m", "dvc", "queue", "start", "-j", str(jobs)], cwd=root,
                       env=worker_env(jobs), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        while True:
            states = queue_states(root, queued)
            pending = [n for n, s in states.items() if s in ("Queued", "Running", None)]
            print(f"  {len(queued) - len(pending)}/{len(queued)} finished ({time.monotonic() - t0:.0f} s)", flush=True)
            if not pending:
                break
            time.sleep(poll_seconds)
    states = queue_states(root, queued) if queued else {}
    failed = sorted(n for n, s in states.items() if s != "Success")
    return {"queued": queued, "skipped": skipped, "failed": failed, "seconds": time.monotonic() - t0,
            "parent_run_id": parent.info.run_id}


def queue_states(root: Path, names: list[str]) -> dict[str, str | None]:
    """Each named experiment's queue status (Queued, Running, Success, Failed), from `dvc queue status`."""
    out = _dvc(root, "queue", "status", check=False).stdout
    states: dict[str, str | None] = dict.fromkeys(names)
    for line in out.splitlines():
        cols = line.split()
        if len(cols) >= 2 and cols[1] in states:
            states[cols[1]] = cols[-1]
    return states


# --- reporting ----------------------------------------------------------------------------------
def paired(diffs: list[float]) -> tuple[float, float, float] | None:
    """Mean of paired differences and its t-based 95 % interval; None with fewer than 2 pairs."""
    from scipy import stats

    n = len(diffs)
    if n < 2:
        return None
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def verdict(interval, n: int) -> str:
    if interval is None:
        return f"no interval with n={n} seed{'s' if n != 1 else ''}"
    _, lo, hi = interval
    if hi < 0:
        return "better"
    if lo > 0:
        return "worse"
    return f"no detectable difference with {n} seeds"


def _mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


def report(study: Study, root: Path, smoke: bool = False, out_dir: str | Path = "experiments/reports") -> Path:
    import platform

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import storage

    client, parent = parent_run(study, smoke, root, create=False)
    runs = [c for c in children(client, parent) if _finished(c, study.metric)]
    by_variant: dict[str, dict[int, object]] = {v.name: {} for v in study.variants}
    for c in sorted(runs, key=lambda c: c.info.start_time):
        v, s = c.data.tags.get("variant"), c.data.tags.get("seed")
        if v in by_variant and s is not None:
            by_variant[v][int(s)] = c  # the latest run of a variant × seed wins
    out_dir = root / out_dir
    stem = study.name + ("-smoke" if smoke else "")
    base = by_variant[study.baseline.name]
    lines = [f"# Study: {study.name}{' (smoke size)' if smoke else ''}", "", f"**Question.** {study.question}", "",
             f"Metric: `{study.metric}` on dev (lower is better). MLflow parent run `{parent.info.run_id}` "
             f"in experiment `{parent.info.experiment_id}`.", ""]
    any_run = next((c for runs_ in by_variant.values() for c in runs_.values()), None)
    if any_run is not None:
        t = any_run.data.tags
        # runs from before the cpu_count tag existed: the count is known only if this is their host
        cores = t.get("cpu_count") or (str(os.cpu_count()) if t.get("host") == platform.node() else None)
        hardware = ", ".join(x for x in (t.get("device_name"), cores and f"{cores} CPU cores") if x)
        lines += [f"Data: `{any_run.data.params.get('data.source', '?')}` corpus, "
                  f"{any_run.data.params.get('data.synthetic.train', '?')} train utterances (data hash "
                  f"`{t.get('data_hash', '?')[:12]}`). Hardware: {t.get('device', '?')}"
                  f"{f' ({hardware})' if hardware else ''} on `{t.get('host', '?')}`, torch {t.get('torch_version', '?')}.",
                  ""]
    lines += ["| variant | params vs baseline | n | mean ± std | Δ vs baseline (95 % CI) | verdict | parameters | "
              "train s | decode utt/s | runs |", "|---|---|---|---|---|---|---|---|---|---|"]
    curves = {}
    for v in study.variants:
        rs = by_variant[v.name]
        if not rs:
            lines.append(f"| {v.name} | {_diff(v, study)} | 0 | – | – | no finished runs | – | – | – | – |")
            continue
        values = [rs[s].data.metrics[study.metric] for s in sorted(rs)]
        m, sd = _mean_std(values)
        if v.baseline:
            delta, word = "–", "baseline"
        else:
            common = sorted(set(rs) & set(base))
            interval = paired([rs[s].data.metrics[study.metric] - base[s].data.metrics[study.metric] for s in common])
            delta = (f"{interval[0]:+.3f} [{interval[1]:+.3f}, {interval[2]:+.3f}]" if interval else
                     (f"{rs[common[0]].data.metrics[study.metric] - base[common[0]].data.metrics[study.metric]:+.3f}"
                      if common else "–"))
            word = verdict(interval, len(common))
        first = rs[sorted(rs)[0]]
        train_s = _mean_std([r.data.metrics.get("train_seconds", float("nan")) for r in rs.values()])[0]
        decode = _mean_std([r.data.metrics.get("decode_beam_utterances_per_second", float("nan")) for r in rs.values()])[0]
        ids = ", ".join(f"`{rs[s].info.run_id[:8]}`" for s in sorted(rs))
        lines.append(f"| {v.name} | {_diff(v, study)} | {len(rs)} | {m:.3f} ± {sd:.3f} | {delta} | {word} | "
                     f"{first.data.params.get('parameter_count', first.data.tags.get('parameter_count', '?'))} | "
                     f"{train_s:.0f} | {decode:.0f} | {ids} |")
        curves[v.name] = [_curve(client, r) for r in rs.values()]
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, per_seed in curves.items():
        steps = sorted({s for c in per_seed for s, _ in c})
        mean = [sum(v for c in per_seed for s, v in c if s == st) / max(1, sum(1 for c in per_seed for s, _ in c if s == st))
                for st in steps]
        ax.plot(steps, mean, marker="o", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("dev greedy Levenshtein (mean over seeds)")
    ax.set_title(f"{study.name}: learning curves")
    ax.legend()
    fig.tight_layout()
    png = out_dir / f"{stem}_curves.png"
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    lines += ["", "Verdicts compare each variant with the baseline seed by seed (paired differences, t-based 95 % "
              "interval; negative = lower distance than baseline).", "", f"![learning curves]({png.name})", ""]
    md = out_dir / f"{stem}.md"
    storage.write_text(md, "\n".join(lines))
    client.log_artifact(parent.info.run_id, str(md), "report")
    client.log_artifact(parent.info.run_id, str(png), "report")
    return md


def _curve(client, run) -> list[tuple[int, float]]:
    """Per-epoch dev greedy distance of a child run (epochs count from 1)."""
    key = "epoch/dev_lev_greedy" if "epoch/dev_lev_greedy" in run.data.metrics else "dev_lev_greedy"
    return [(h.step, h.value) for h in client.get_metric_history(run.info.run_id, key) if h.step >= 1]


def _diff(v: Variant, study: Study) -> str:
    b = study.baseline.params
    diff = {k: val for k, val in v.params.items() if b.get(k) != val}
    diff.update({k: "default" for k in b if k not in v.params})
    return ", ".join(f"`{k}={val}`" for k, val in diff.items()) or "–"


def add_commands(sub) -> None:
    p = sub.add_parser("study", help="run or report an ablation study (experiments/<study>.yaml)")
    ssub = p.add_subparsers(dest="study_command", required=True)
    r = ssub.add_parser("run", help="queue every variant × seed as a DVC experiment and run them")
    r.add_argument("study")
    r.add_argument("-j", "--jobs", type=int, default=1)
    r.add_argument("--seeds", type=int, nargs="+")
    r.add_argument("--smoke", action="store_true", help="the study's smoke size (tiny corpus, 1 epoch)")
    r.set_defaults(func=_cmd_run)
    q = ssub.add_parser("report", help="write experiments/reports/<study>.md from MLflow")
    q.add_argument("study")
    q.add_argument("--smoke", action="store_true")
    q.set_defaults(func=_cmd_report)


def _cmd_run(a) -> int:
    from .cli import repo_root

    root = repo_root()
    study = load(a.study, root / "params.yaml")
    result = run_study(study, root, a.jobs, tuple(a.seeds) if a.seeds else None, a.smoke)
    print(f"study {study.name}: {len(result['queued']) - len(result['failed'])} ran, {len(result['skipped'])} skipped "
          f"(already complete), {len(result['failed'])} failed in {result['seconds']:.0f} s; parent MLflow run "
          f"{result['parent_run_id']}")
    for name in result["failed"]:
        print(f"  FAILED {name}: see its log with `dvc queue logs {name}`")
    if result["queued"] or result["skipped"]:
        md = report(study, root, a.smoke)
        print(f"report: {md.relative_to(root)}")
    return 1 if result["failed"] else 0


def _cmd_report(a) -> int:
    from .cli import repo_root

    root = repo_root()
    md = report(load(a.study, root / "params.yaml"), root, a.smoke)
    print(f"report: {md.relative_to(root)}")
    return 0
