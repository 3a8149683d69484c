"""A study's report from its MLflow child runs: per variant the mean ± std over seeds, a paired
difference against the baseline with a t-based 95 % interval, its p-value Holm-adjusted across the
study's variants and the verdict that follows — with, where no difference is detected, the smallest
one the seeds would have detected and the seeds the observed one needs — per-seed values, learning
curves (mean ± 1 std), and whether the runs' train seconds compare (the CPU share each had).

    ctclab study report experiments/kaiming.yaml [--smoke]   →  experiments/reports/<study>.md
    ctclab study report experiments/kaiming.yaml --from-table   (from <study>.runs.csv alone)

The markdown is rendered from the runs table (ctclab.study_table) in both cases, so the committed
table regenerates the committed report byte for byte.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import optimize, stats

from . import storage, study_table, tracking
from .errors import CtclabError
from .results import EVAL
from .studies import Study, Variant, finished, parent_run, score
from .study_table import StudyRun, Table

ALPHA = 0.05
POWER = 0.8  # the chance of detecting a true difference that a power line speaks of
MAX_SEEDS = 1000  # "needs more than this" beyond
# A training whose CPU share fell below this had less than its cores: another process used them,
# and its seconds do not compare (the default training alone on a 2-vCPU Xeon: 0.984, epochs 0.969–0.992).
FULL_SHARE = 0.9


def paired(diffs: list[float]) -> tuple[float, float, float] | None:
    """Mean of paired differences and its t-based 95 % interval; None with fewer than 2 pairs."""
    if len(diffs) < 2:
        return None
    if np.ptp(diffs) == 0:  # no spread: the interval is the point (scipy would give nan)
        return float(diffs[0]), float(diffs[0]), float(diffs[0])
    lo, hi = stats.ttest_1samp(diffs, 0.0).confidence_interval(0.95)
    return float(np.mean(diffs)), float(lo), float(hi)


def p_value(diffs: list[float]) -> float | None:
    """Two-sided paired t-test p-value that the mean difference is 0; None with fewer than 2 pairs."""
    if len(diffs) < 2:
        return None
    if np.ptp(diffs) == 0:  # no spread: certain, either way
        return 1.0 if diffs[0] == 0 else 0.0
    return float(stats.ttest_1samp(diffs, 0.0).pvalue)


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjustment, in the order given (scipy has Benjamini–Hochberg, not Holm):
    the k-th smallest p times (m - k + 1), made monotone, capped at 1."""
    m = len(pvalues)
    order = np.argsort(pvalues, kind="stable")
    stepped = np.maximum.accumulate((m - np.arange(m)) * np.asarray(pvalues, dtype=float)[order])
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(stepped, 1.0)
    return adjusted.tolist()


def power(n: int, difference: float, sd: float, level: float) -> float:
    """The chance that a two-sided paired t-test over n pairs at `level` finds a true mean
    difference `difference` when the differences spread with standard deviation `sd` (scipy's
    noncentral t)."""
    df, shift = n - 1, abs(difference) / sd * math.sqrt(n)
    critical = stats.t.ppf(1 - level / 2, df)
    upper, lower = float(stats.nct.sf(critical, df, shift)), float(stats.nct.cdf(-critical, df, shift))
    # scipy's noncentral t gives nan deep in a tail at few degrees of freedom: there the tail beyond
    # -critical is ~0, and the one beyond +critical ~1 once the shift is past it
    return (upper if math.isfinite(upper) else float(shift > critical)) + (lower if math.isfinite(lower) else 0.0)


def detectable(n: int, sd: float, level: float) -> float:
    """The smallest true difference that n pairs find with POWER at `level`."""
    high = sd
    while power(n, high, sd, level) < POWER:
        high *= 2
    return float(optimize.brentq(lambda d: power(n, d, sd, level) - POWER, 0.0, high, xtol=1e-9 * sd))


def seeds_needed(difference: float, sd: float, level: float) -> int | None:
    """How many seeds (pairs) find a true `difference` with POWER at `level`; None beyond MAX_SEEDS."""
    return next((n for n in range(2, MAX_SEEDS + 1) if power(n, difference, sd, level) >= POWER), None)


def verdict(mean_diff: float | None, p_adjusted: float | None, n: int) -> str:
    if p_adjusted is None:
        return f"no interval with n={n} seed{'s' if n != 1 else ''}"
    if p_adjusted < ALPHA:
        return "better" if mean_diff < 0 else "worse"
    return f"no detectable difference with {n} seeds"


@dataclass
class Comparison:
    """One variant against the baseline, seed by seed."""
    seeds: list[int]
    diffs: list[float]
    interval: tuple[float, float, float] | None
    p: float | None
    p_holm: float | None = None
    level: float | None = None  # the Holm step's level this comparison's p was held to

    def verdict(self) -> str:
        said = verdict(float(np.mean(self.diffs)), self.p_holm, len(self.diffs))
        undecided = self.p_holm is not None and self.p_holm >= ALPHA
        return said + self.power_note() if undecided else said

    def power_note(self) -> str:
        """What the seeds could have found (at POWER, at its Holm level, with the spread of its
        differences), and how many would find the difference seen."""
        sd = float(np.std(self.diffs, ddof=1)) if len(self.diffs) > 1 else 0.0
        if self.level is None or sd == 0:
            return ""
        needed = seeds_needed(float(np.mean(self.diffs)), sd, self.level)
        return (f"; ≥ {detectable(len(self.diffs), sd, self.level):.3f} would have been detected; "
                f"the observed {np.mean(self.diffs):+.3f} needs " + (f"~{needed} seeds" if needed else f"> {MAX_SEEDS} seeds"))


def compare(study: Study, scores: dict[str, dict[int, float]]) -> dict[str, Comparison]:
    """Paired comparison of every non-baseline variant with the baseline ({variant: {seed: score}}),
    Holm-adjusted together."""
    base = scores[study.baseline.name]
    out = {}
    for v in study.variants:
        if v.baseline or not scores[v.name]:
            continue
        rs = scores[v.name]
        common = sorted(set(rs) & set(base))
        diffs = [rs[s] - base[s] for s in common]
        out[v.name] = Comparison(common, diffs, paired(diffs), p_value(diffs))
    tested = [c for c in out.values() if c.p is not None]
    for c, adjusted in zip(tested, holm([c.p for c in tested])):
        c.p_holm = adjusted
    # Holm holds the k-th smallest of m p-values to ALPHA / (m - k + 1)
    for rank, c in enumerate(sorted(tested, key=lambda c: c.p)):
        c.level = ALPHA / (len(tested) - rank)
    return out


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return float(np.mean(xs)), (float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0)


def latest_by_variant(study: Study, runs: list[tracking.RunRecord]) -> dict[str, dict[int, tracking.RunRecord]]:
    """Finished child runs as {variant: {seed: run}}; the latest run of a variant × seed wins."""
    by_variant: dict[str, dict[int, tracking.RunRecord]] = {v.name: {} for v in study.variants}
    for c in sorted(runs, key=lambda c: c.start_time):
        v, s = c.tags.get("variant"), c.tags.get("seed")
        if v in by_variant and s is not None and finished(c, study.metric):
            by_variant[v][int(s)] = c
    return by_variant


def _header(study: Study, smoke: bool, table: Table) -> list[str]:
    p, r = table.parent, table.runs[0]
    hardware = ", ".join(x for x in (r.device_name, r.cpu_count and f"{r.cpu_count} CPU cores") if x)
    return [f"# Study: {study.name}{' (smoke size)' if smoke else ''}", "", f"**Question.** {study.question}", "",
            f"Metric: `{study.metric}` on dev (lower is better). MLflow parent run `{p.parent_run_id}` "
            f"in experiment `{p.experiment_id}`; the MLflow UI{p.ui_where} shows its runs at "
            f"{p.ui_runs} and their curves at {p.ui_curves}. Every run, with its curve, is in "
            f"[{_stem(study, smoke)}.runs.csv]({_stem(study, smoke)}.runs.csv) (`ctclab study report --from-table` "
            "regenerates this report from it).", "",
            f"Data: `{r.data_source or '?'}` corpus, {r.train_utterances or '?'} train utterances (data hash "
            f"`{r.data_hash[:12] or '?'}`). Hardware: {r.device or '?'}{f' ({hardware})' if hardware else ''} on "
            f"`{r.host or '?'}`, torch {r.torch_version or '?'}.", "",
            "| variant | params vs baseline | n | mean ± std | Δ vs baseline (95 % CI) | p (Holm) | verdict | "
            "parameters | train s | CPU share | jobs × threads | decode utt/s | runs |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]


def _stem(study: Study, smoke: bool) -> str:
    return study.name + ("-smoke" if smoke else "")


def _contention(rs: dict[int, StudyRun]) -> str:
    """'-j × threads' the variant's trainings ran with ('?' for runs from before it was recorded)."""
    seen = sorted({f"{r.parallel_jobs or '?'} × {r.torch_threads or '?'}" for r in rs.values()})
    return ", ".join(seen) or "–"


def per_seed(study: Study, by_variant: dict[str, dict[int, StudyRun]]) -> list[str]:
    """Every variant's value for every seed, with its run id, so a reader can check each mean."""
    seeds = sorted({s for rs in by_variant.values() for s in rs})
    lines = ["", f"Per seed (`{study.metric}`, child run id):", "",
             "| variant | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for v in study.variants:
        rs = by_variant[v.name]
        cells = [f"{rs[s].score:.3f} (`{rs[s].run_id[:8]}`)" if s in rs else "–" for s in seeds]
        lines.append(f"| {v.name} | " + " | ".join(cells) + " |")
    return lines + ["", code_note(by_variant)]


def code_note(by_variant: dict[str, dict[int, StudyRun]]) -> str:
    """Which commits the runs come from. Several can appear: a study run trains a variant × seed of
    the seeds it runs again when its params or code differ from the checkout's (ctclab.studies.
    Identity), and leaves the runs of other seeds as they are, whatever code they ran."""
    seeds_at: dict[str, dict[str, list[int]]] = {}
    for v, rs in by_variant.items():
        for s, r in sorted(rs.items()):
            seeds_at.setdefault(r.commit[:12] or "unknown", {}).setdefault(v, []).append(s)
    if len(seeds_at) == 1:
        return f"Every run is at commit `{next(iter(seeds_at))}`."
    return (f"Runs come from {len(seeds_at)} commits: " + "; ".join(
        f"`{c}`: {_seeds_of(by_seeds, list(by_variant))}" for c, by_seeds in seeds_at.items())
        + ". A study run trains again each variant × seed of the seeds it runs (the study file's, or `--seeds`) "
        "whose params or code differ from its checkout's; runs of other seeds stay as they ran.")


def _seeds_of(seeds_by_variant: dict[str, list[int]], variants: list[str]) -> str:
    """'seeds 0, 1 of every variant', or per variant where they differ."""
    sets = {tuple(s) for s in seeds_by_variant.values()}
    if len(sets) == 1 and list(seeds_by_variant) == variants:
        return f"seed{'s' * (len(next(iter(sets))) > 1)} {', '.join(map(str, next(iter(sets))))} of every variant"
    return ", ".join(f"{v} s{s}" for v, seeds in seeds_by_variant.items() for s in seeds)


def timing_note(by_variant: dict[str, dict[int, StudyRun]]) -> str:
    """Whether the scores are bit-comparable (one thread count) and the train seconds comparable
    (the same jobs × threads, and every run had its CPU share as measured, not assumed)."""
    runs = [r for rs in by_variant.values() for r in rs.values()]
    threads = sorted({r.torch_threads or "?" for r in runs})
    if len(threads) == 1 and threads != ["?"]:
        floats = (f"Every run trained on {threads[0]} torch thread{'s' if threads[0] != '1' else ''}: CPU floats differ "
                  "with the thread count, so these scores are bit-comparable only with runs on as many threads.")
    else:
        floats = (f"Runs trained on different or unrecorded thread counts ({', '.join(threads)}): CPU floats differ with "
                  "the thread count, so their scores are not bit-comparable.")
    unmeasured = [r for r in runs if math.isnan(r.train_cpu_share)]
    short = sorted((r for r in runs if r.train_cpu_share < FULL_SHARE), key=lambda r: r.train_cpu_share)
    conditions = {_contention(rs) for rs in by_variant.values() if rs}
    if unmeasured:
        return (f"{floats} Train seconds do NOT compare: {len(unmeasured)} of {len(runs)} runs trained before ctclab "
                "measured the CPU share a training had, so their contention is unknown.")
    if short:
        listed = ", ".join(f"{r.variant} s{r.seed} {r.train_cpu_share:.2f}" for r in short[:6])
        return (f"{floats} Train seconds do NOT compare: {len(short)} of {len(runs)} runs had less than "
                f"{FULL_SHARE:.0%} of their CPU share ({listed}{' …' if len(short) > 6 else ''}; host load up to "
                f"{max(r.host_load_max for r in runs):.1f} on {runs[0].cpu_count or '?'} cores): another process used "
                "their cores.")
    if len(conditions) > 1:
        return f"{floats} Train seconds do NOT compare across variants: they ran as different jobs × threads ({', '.join(sorted(conditions))})."
    return (f"{floats} Train seconds compare: every run had ≥ {FULL_SHARE:.0%} of its CPU share (lowest "
            f"{min(r.train_cpu_share for r in runs):.2f}, host load at most {max(r.host_load_max for r in runs):.1f} on "
            f"{runs[0].cpu_count or '?'} cores) under the same jobs × threads.")


def _row(study: Study, v: Variant, rs: dict[int, StudyRun], comparison: Comparison | None) -> str:
    if not rs:
        return f"| {v.name} | {_diff(v, study)} | 0 | – | – | – | no finished runs | – | – | – | – | – | – |"
    m, sd = mean_std([rs[s].score for s in sorted(rs)])
    if v.baseline:
        delta, p, word = "–", "–", "baseline"
    elif comparison is None or not comparison.diffs:
        delta, p, word = "–", "–", "no seed shared with the baseline"
    else:
        c = comparison
        delta = f"{c.interval[0]:+.3f} [{c.interval[1]:+.3f}, {c.interval[2]:+.3f}]" if c.interval else f"{c.diffs[0]:+.3f}"
        p = f"{c.p:.3f} ({c.p_holm:.3f})" if c.p is not None else "–"
        word = c.verdict()
    first = rs[sorted(rs)[0]]
    train_s = mean_std([r.train_seconds for r in rs.values()])[0]
    share = min(r.train_cpu_share for r in rs.values())
    decode = mean_std([r.decode_utterances_per_second for r in rs.values()])[0]
    ids = ", ".join(f"`{rs[s].run_id[:8]}`" for s in sorted(rs))
    return (f"| {v.name} | {first.params_vs_baseline} | {len(rs)} | {m:.3f} ± {sd:.3f} | {delta} | {p} | {word} | "
            f"{first.parameters or '?'} | {train_s:.{0 if train_s >= 10 else 1}f} | "
            f"{'?' if math.isnan(share) else f'{share:.2f}'} | {_contention(rs)} | {decode:.0f} | {ids} |")


def plot_history(csv: Path, png: Path, x: str, ys: list[str]) -> None:
    """A training's learning curves (train_history.csv, one panel per column) as a PNG: what
    `dvc plots show` draws, without the Vega scripts it loads from the network."""
    import matplotlib
    import pandas as pd

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        history = pd.read_csv(csv)
    except (OSError, ValueError) as err:
        raise CtclabError(f"{csv}: no readable training history ({type(err).__name__}); run the train stage "
                          "first (dvc repro train)") from None
    fig, axes = plt.subplots(1, len(ys), figsize=(3.2 * len(ys), 3), squeeze=False)
    for ax, y in zip(axes[0], ys):
        ax.plot(history[x], history[y], marker="o")
        ax.set_xlabel(x)
        ax.set_title(y)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)


def _plot_curves(study: Study, by_variant: dict[str, dict[int, StudyRun]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, rs in by_variant.items():
        if not rs:
            continue
        curves = [dict(r.curve()) for r in rs.values()]
        steps = sorted({s for c in curves for s in c})
        values = [[c[st] for c in curves if st in c] for st in steps]
        mean = np.array([np.mean(v) for v in values])
        sd = np.array([np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in values])
        line, = ax.plot(steps, mean, marker="o", label=f"{name} (n={len(rs)})")
        ax.fill_between(steps, mean - sd, mean + sd, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("epoch")
    ax.set_ylabel("dev greedy Levenshtein (mean ± 1 std over seeds)")
    ax.set_title(f"{study.name}: learning curves")
    ax.legend()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100, metadata={"Software": None})  # no matplotlib version in the bytes
    plt.close(fig)


def report(study: Study, root: Path, smoke: bool = False, out_dir: str | Path = "experiments/reports",
           from_table: bool = False) -> Path:
    """Write experiments/reports/<study>.md (and its curves' PNG) from the study's MLflow runs, by
    way of the runs table written beside it; `from_table`: from that table alone (no MLflow)."""
    out_dir, stem = root / out_dir, _stem(study, smoke)
    csv, md, png = out_dir / f"{stem}.runs.csv", out_dir / f"{stem}.md", out_dir / f"{stem}_curves.png"
    if not from_table:
        parent = parent_run(study, smoke, root, create=False)
        study_table.write(collect(study, parent), csv)
    table = study_table.read(csv)
    storage.write_text(md, render(study, smoke, table))
    _plot_curves(study, table.by_variant([v.name for v in study.variants]), png)
    if not from_table:
        parent.log_artifacts([md, png, csv], "report")
    return md


def collect(study: Study, parent) -> Table:
    """The runs the report counts, read from MLflow, as a table."""
    by_variant = latest_by_variant(study, parent.children())
    if not any(by_variant.values()):
        raise CtclabError(f"{study.path}: no finished runs of study {study.name!r} yet; `ctclab study run "
                          f"{study.path}` first (a run needs its `{EVAL}{study.metric}`)")
    runs, curves = parent.ui_addresses()
    head = study_table.Parent(parent.run_id, parent.experiment_id, runs, curves, parent.ui_where())
    variants = {v.name: v for v in study.variants}
    return Table(head, [study_table.from_record(r, score(r, study.metric), _diff(variants[name], study), parent.store)
                        for name, rs in by_variant.items() for _, r in sorted(rs.items())])


def render(study: Study, smoke: bool, table: Table) -> str:
    """The report's markdown: a function of the study file and its runs table only."""
    by_variant = table.by_variant([v.name for v in study.variants])
    comparisons = compare(study, variant_scores(by_variant))
    lines = _header(study, smoke, table)
    lines += [_row(study, v, by_variant[v.name], comparisons.get(v.name)) for v in study.variants]
    lines += per_seed(study, by_variant)
    lines += ["", f"Verdicts compare each variant with the baseline seed by seed: paired differences, a t-based 95 % "
              f"interval (negative = lower distance than baseline) and a paired t-test whose p-values are "
              f"Holm-adjusted across the study's {len(comparisons)} comparison{'s' if len(comparisons) != 1 else ''} (in brackets); a variant is better "
              f"or worse only when its adjusted p < {ALPHA}. Where it is neither, the verdict says the smallest true difference "
              f"its seeds would have detected with {POWER:.0%} power (paired t-test at the level Holm held its p to, "
              f"{ALPHA}/m for the smallest of m p-values, {ALPHA}/(m − 1) for the next…, with the spread of its "
              f"differences) and how many seeds the observed difference needs at that level. CPU share: the process's "
              f"CPU seconds ÷ (wall seconds × torch threads) over the training, lowest of the variant's runs. "
              + timing_note(by_variant), "", f"![learning curves (mean ± 1 std over seeds)]({_stem(study, smoke)}_curves.png)", ""]
    return "\n".join(lines)


def variant_scores(by_variant: dict) -> dict[str, dict[int, float]]:
    return {v: {s: r.score for s, r in rs.items()} for v, rs in by_variant.items()}


def _diff(v: Variant, study: Study) -> str:
    b = study.baseline.params
    diff = {k: val for k, val in v.params.items() if b.get(k) != val}
    diff.update({k: "default" for k in b if k not in v.params})
    return ", ".join(f"`{k}={val}`" for k, val in diff.items()) or "–"


def promote(study: Study, root: Path, smoke: bool = False, force: bool = False) -> str:
    """Register the study's best variant (lowest mean; its best seed's model) as `ctclab-<arch>`,
    with the study's verdict for it in the version's description, and point the alias at it:
    `champion`, or `smoke` for a smoke study (never champion). An alias already on a model that
    scored better on the same metric and data stays there unless `force`; the line says what the
    alias pointed at before."""
    parent = parent_run(study, smoke, root, create=False)
    by_variant = latest_by_variant(study, parent.children())
    means = {v: mean_std([score(r, study.metric) for r in rs.values()])[0] for v, rs in by_variant.items() if rs}
    if not means:
        raise CtclabError(f"{study.path}: no finished runs to promote; run `ctclab study run {study.path}` first")
    best = min(means, key=means.get)
    seed, child = min(by_variant[best].items(), key=lambda kv: score(kv[1], study.metric))
    training_run = child.tags.get("training_run_id") or child.run_id
    model_id = parent.store.logged_model_id(training_run)
    if model_id is None:
        raise CtclabError(f"study {study.name}: the best run ({best}, seed {seed}, MLflow run {training_run}) has no "
                          "logged model (recorded before ctclab logged models); re-run the study")
    arch, alias = child.params.get("model.arch", "model"), "smoke" if smoke else "champion"
    name, value, data = f"ctclab-{arch}", score(child, study.metric), child.tags.get("data_hash", "")
    before = _against_current(parent.store.alias_version(name, alias), name, alias, study.metric, value, data, force)
    description = (f"Study {study.name}{' (smoke)' if smoke else ''}: best variant {best} (mean {study.metric} "
                   f"{means[best]:.3f} over {len(by_variant[best])} seeds; this is seed {seed}, {value:.3f}); "
                   f"verdict vs baseline: {_promoted_verdict(study, by_variant, best)}. Question: {study.question}")
    version = parent.store.register(model_id, name, alias, description,
                                    {"study": study.name, "variant": best, "seed": seed, "smoke": str(smoke).lower(),
                                     "training_run_id": training_run, "metric": study.metric, study.metric: value,
                                     "data_hash": data})
    return f"{name} version {version} (alias {alias}; {before}): {description}"


def _promoted_verdict(study: Study, by_variant: dict, best: str) -> str:
    comparison = compare(study, {v: {s: score(r, study.metric) for s, r in rs.items()}
                                 for v, rs in by_variant.items()}).get(best)
    if best == study.baseline.name:
        return "the baseline, and no variant beat it"
    if comparison is None or not comparison.diffs:
        return "not compared (no seed shared with the baseline)"
    return comparison.verdict()


def _against_current(current: tuple[str, dict] | None, name: str, alias: str, metric: str, value: float, data: str,
                     force: bool) -> str:
    """What `name@alias` pointed at before, refusing to move it to a worse model on the same data."""
    if current is None:
        return "a new alias"
    version, tags = current
    comparable = tags.get("metric") == metric and tags.get("data_hash") == data and data
    if not comparable:
        return f"it pointed at version {version}, not compared: another metric or data"
    held = float(tags[metric])
    if held < value and not force:
        raise CtclabError(f"{name}@{alias} is version {version}, {metric} {held:.3f} on the same data (study "
                          f"{tags.get('study', '?')}); this study's best scores {value:.3f}: the alias stays where it "
                          f"is (`ctclab study promote … --force` moves it anyway)")
    return f"it pointed at version {version}, {metric} {held:.3f} on the same data" + (" (--force)" if held < value else "")
