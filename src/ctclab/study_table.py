"""A study's runs as one table: experiments/reports/<study>.runs.csv, beside the report.

`ctclab study report` reads the runs from MLflow into this table, writes it, and renders the
markdown from the table it wrote; `ctclab study report --from-table` renders from the committed
table alone. So a reviewer with only a clone (no mlflow.db) recomputes every number of a report,
byte for byte, and can check each one against the runs.

One row per run the report counts (the latest finished run of each variant × seed): its ids, the
study metric, every other figure the report shows, the variant's params against the baseline, the
commit, the contention it trained under (jobs × threads, CPU share, host load), the hardware and
data, and its learning curve (`dev_lev_greedy@<epoch>`) and per-epoch CPU share (`cpu_share@<epoch>`).
The parent run's ids and UI addresses repeat on every row, so the file stands alone. Floats are
written as Python writes them (shortest round-trip form) and read back as the same doubles.
"""
from __future__ import annotations

import math
import os
import platform
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from . import storage, tracking
from .errors import CtclabError
from .results import CPU_SHARE, HOST_LOAD, SELECT_BY, SUBMIT_DECODER, TRAIN_CPU_SHARE, TRAIN_SECONDS, decode_speed

CURVES = (SELECT_BY, CPU_SHARE)  # per-epoch columns, `<name>@<epoch>`


@dataclass(frozen=True)
class Parent:
    """The study's parent run and where the MLflow UI shows it."""
    parent_run_id: str
    experiment_id: str
    ui_runs: str
    ui_curves: str
    ui_where: str


@dataclass(frozen=True)
class StudyRun:
    """One run as the report counts it ('' where the run did not record a value; nan for a number)."""
    variant: str
    seed: int
    run_id: str
    score: float
    params_vs_baseline: str
    parameters: str
    train_seconds: float
    train_cpu_share: float  # nan: trained before ctclab measured it
    host_load_max: float    # the highest 1-minute load at an epoch's end
    decode_utterances_per_second: float
    parallel_jobs: str
    torch_threads: str
    commit: str
    git_dirty: str
    device: str
    device_name: str
    cpu_count: str
    host: str
    torch_version: str
    data_source: str
    train_utterances: str
    data_hash: str
    curves: dict[str, dict[int, float]]  # CURVES name → {epoch: value}

    def curve(self, name: str = SELECT_BY) -> list[tuple[int, float]]:
        return sorted(self.curves.get(name, {}).items())


SCALARS = tuple(f.name for f in fields(StudyRun) if f.name != "curves")
NUMBERS = {"seed": int, "score": float, "train_seconds": float, "train_cpu_share": float, "host_load_max": float,
           "decode_utterances_per_second": float}


@dataclass(frozen=True)
class Table:
    parent: Parent
    runs: list[StudyRun]

    def by_variant(self, variants: list[str]) -> dict[str, dict[int, StudyRun]]:
        out: dict[str, dict[int, StudyRun]] = {v: {} for v in variants}
        for r in self.runs:
            out.setdefault(r.variant, {})[r.seed] = r
        return out


def from_record(r: tracking.RunRecord, score: float, params_vs_baseline: str, store: tracking.Store) -> StudyRun:
    """A child run as the table keeps it. A host's core count unrecorded by older runs is known
    only when this is their host; it is resolved here, so that rendering depends on the table alone."""
    t, m = r.tags, r.metrics
    cores = t.get("cpu_count") or (str(os.cpu_count()) if t.get("host") == platform.node() else "")
    # runs from before the curves took the row's names logged them under epoch/
    key = f"epoch/{SELECT_BY}" if f"epoch/{SELECT_BY}" in m else SELECT_BY
    curves = {name: {step: v for step, v in store.metric_history(r.run_id, source) if step >= 1}
              for name, source in ((SELECT_BY, key), (CPU_SHARE, CPU_SHARE))}
    loads = [v for _, v in store.metric_history(r.run_id, HOST_LOAD)]
    return StudyRun(
        variant=t["variant"], seed=int(t["seed"]), run_id=r.run_id, score=score, params_vs_baseline=params_vs_baseline,
        parameters=r.params.get("parameter_count", t.get("parameter_count", "")),
        train_seconds=m.get(TRAIN_SECONDS, math.nan), train_cpu_share=m.get(TRAIN_CPU_SHARE, math.nan),
        host_load_max=max(loads) if loads else math.nan,
        decode_utterances_per_second=m.get(decode_speed(SUBMIT_DECODER), math.nan),
        parallel_jobs=t.get("parallel_jobs", ""), torch_threads=t.get("torch_threads", ""),
        commit=t.get("mlflow.source.git.commit", ""), git_dirty=t.get("git_dirty", ""), device=t.get("device", ""),
        device_name=t.get("device_name", ""), cpu_count=cores, host=t.get("host", ""),
        torch_version=t.get("torch_version", ""), data_source=r.params.get("data.source", ""),
        train_utterances=r.params.get("data.synthetic.train", ""), data_hash=t.get("data_hash", ""), curves=curves)


def write(table: Table, path: Path) -> None:
    import pandas as pd

    epochs = {name: sorted({e for r in table.runs for e in r.curves.get(name, {})}) for name in CURVES}
    rows = [{**asdict(table.parent), **{k: getattr(r, k) for k in SCALARS},
             **{f"{name}@{e}": r.curves.get(name, {}).get(e, math.nan) for name in CURVES for e in epochs[name]}}
            for r in table.runs]
    columns = [*asdict(table.parent), *SCALARS, *(f"{name}@{e}" for name in CURVES for e in epochs[name])]
    storage.write_text(path, pd.DataFrame(rows, columns=columns).to_csv(index=False, lineterminator="\n"))


def read(path: Path) -> Table:
    """The table at `path`; one line naming the file and what is wrong when it is not one."""
    import pandas as pd

    try:  # every cell as text: a run id of digits and one `e` must not become a float
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise CtclabError(f"{path}: no runs table; `ctclab study report` (with the study's MLflow runs) writes it") from None
    except (ValueError, pd.errors.ParserError) as err:
        raise CtclabError(f"{path}: not a CSV runs table ({str(err).splitlines()[0]})") from None
    missing = [c for c in (*Parent.__dataclass_fields__, *SCALARS) if c not in frame.columns]
    if missing or frame.empty:
        found = f"no column {', '.join(missing[:3])}" if missing else "no rows"
        raise CtclabError(f"{path}: {found}; expected the runs table `ctclab study report` writes")
    rows = frame.to_dict("records")
    try:
        runs = [_run(row) for row in rows]
    except ValueError as err:
        raise CtclabError(f"{path}: {err}") from None
    return Table(Parent(**{k: rows[0][k] for k in Parent.__dataclass_fields__}), runs)


def _run(row: dict[str, str]) -> StudyRun:
    def number(column: str, kind=float):
        text = row[column]
        if text == "":
            return math.nan
        try:
            return kind(text)
        except ValueError:
            raise ValueError(f"column {column} of run {row.get('run_id', '?')} is {text!r}, expected a number") from None

    values = {k: number(k, NUMBERS[k]) if k in NUMBERS else row[k] for k in SCALARS}
    curves: dict[str, dict[int, float]] = {name: {} for name in CURVES}
    for column in row:
        name, _, epoch = column.partition("@")
        if name in curves and row[column] != "":
            curves[name][int(epoch)] = number(column)
    return StudyRun(**values, curves=curves)
