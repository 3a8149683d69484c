"""The evaluate and submit stages' library side: decode with the best checkpoint, score, write
the Kaggle-format submission, log into the training's MLflow run.

    python pipeline/evaluate.py && python pipeline/submit.py      # or: dvc repro
"""
from __future__ import annotations

import csv
import io
import json
import sys
import time
from pathlib import Path


from . import kaggle, storage, tracking
from .config import DecodeConfig, StudyConfig
from .data import Shard
from .decode import BeamDecoder, greedy
from .errors import CtclabError
from .labels import CHAR_MAPS, PHONEMES
from .metrics import distances, score
from .train import evaluate_split, load_model, select_device

SUBMISSION_HEADERS = {"spring2022": ("id", "predictions"), "fall2022": ("index", "label")}


def _run_info(models_dir: Path) -> dict:
    path = models_dir / "mlflow_run.json"
    if not path.is_file():
        raise CtclabError(f"{path}: missing; run the train stage first (dvc repro train)")
    return json.loads(path.read_text())


def _decode(models_dir: Path, shard: Shard, cfg: DecodeConfig, with_greedy: bool):
    device = select_device("auto")
    model = load_model(models_dir / "best.pt", device)
    with BeamDecoder(cfg.beam_width, cfg.workers) as beam:
        decoders = {"greedy": greedy, "beam": beam.decode} if with_greedy else {"beam": beam.decode}
        return evaluate_split(model, shard, 64, device, decoders)


def _phonemes(seq: list[int]) -> str:
    return " ".join(PHONEMES[i] for i in seq)


def evaluate(cfg: DecodeConfig, data_dir="data/processed", models_dir="models", metrics_dir="metrics",
             root=".", log=True, study: StudyConfig | None = None, seed: int = 0) -> dict:
    data_dir, models_dir, metrics_dir = Path(data_dir), Path(models_dir), Path(metrics_dir)
    dev = Shard(data_dir / "dev")
    refs = dev.references()
    _, hyps, seconds = _decode(models_dir, dev, cfg, with_greedy=True)
    g, b = score(hyps["greedy"], refs), score(hyps["beam"], refs)
    result = {"dev_lev_greedy": round(g.mean_distance, 6), "dev_lev_beam": round(b.mean_distance, 6),
              "dev_per": round(b.per, 6), "dev_per_greedy": round(g.per, 6), "beam_width": cfg.beam_width}
    storage.write_json(metrics_dir / "eval.json", result)
    if log:
        d = distances(hyps["beam"], refs)
        worst = sorted(range(len(d)), key=lambda i: (-d[i], i))[:25]
        table = "id\tdistance\treference\thypothesis\n" + "".join(
            f"{dev.ids[i]}\t{d[i]}\t{_phonemes(refs[i])}\t{_phonemes(hyps['beam'][i])}\n" for i in worst)
        info = _run_info(models_dir)
        speed = {"decode_greedy_utterances_per_second": len(dev) / max(seconds["greedy"], 1e-9),
                 "decode_beam_utterances_per_second": len(dev) / max(seconds["beam"], 1e-9)}
        if study is not None and study.name:
            log_study_child(study, seed, cfg, info, {**result, **speed}, table)
        else:
            import mlflow

            with tracking.resume_run(info["tracking_uri"], Path(root), info["run_id"]):
                mlflow.log_metrics({**{f"eval_{k}": v for k, v in result.items()}, **speed})
                mlflow.set_tags({"decode.beam_width": str(cfg.beam_width), "decode.workers": str(cfg.workers)})
                mlflow.log_text(table, f"evaluate/worst_utterances_beam{cfg.beam_width}.tsv")
    return result


def log_study_child(study: StudyConfig, seed: int, cfg: DecodeConfig, info: dict, metrics: dict, table: str) -> str:
    """One nested MLflow run per study variant × seed: the training run's params, learning curves
    and provenance tags, plus this evaluation. Several variants may share one cached training run."""
    import os

    import mlflow

    client = mlflow.MlflowClient(info["tracking_uri"])
    parent, training = client.get_run(study.parent_run_id), client.get_run(info["run_id"])
    tags = {k: v for k, v in training.data.tags.items() if not k.startswith("mlflow.")}
    tags.update({"mlflow.parentRunId": study.parent_run_id, "study": study.name, "variant": study.variant,
                 "seed": str(seed), "training_run_id": info["run_id"],
                 "dvc_exp_name": os.environ.get("DVC_EXP_NAME", "")})
    child = client.create_run(parent.info.experiment_id, run_name=f"{study.variant}-s{seed}", tags=tags)
    run_id = child.info.run_id
    params = {**training.data.params, "decode.beam_width": cfg.beam_width, "decode.workers": cfg.workers}
    client.log_batch(run_id, params=[mlflow.entities.Param(k, str(v)) for k, v in params.items()])
    # Learning curves under epoch/… so they never mix with the final scores of the same name.
    history = []
    for key in ("train_loss", "dev_loss", "dev_lev_greedy", "dev_per", "lr", "epoch_seconds"):
        history += [mlflow.entities.Metric(f"epoch/{key}", m.value, m.timestamp, m.step)
                    for m in client.get_metric_history(info["run_id"], key)]
    now = int(time.time() * 1000)
    train_seconds = sum(m.value for m in history if m.key == "epoch/epoch_seconds")
    final = {**{k: v for k, v in metrics.items() if k != "beam_width"}, "train_seconds": train_seconds,
             "parameter_count": float(training.data.tags.get("parameter_count", "nan"))}
    history += [mlflow.entities.Metric(k, float(v), now, 0) for k, v in final.items()]
    for start in range(0, len(history), 900):
        client.log_batch(run_id, metrics=history[start:start + 900])
    client.log_text(run_id, table, f"evaluate/worst_utterances_beam{cfg.beam_width}.tsv")
    client.set_terminated(run_id)
    return run_id


def write_submission(path: Path, ids: list[str], hyps: list[list[int]], fmt: str) -> None:
    chars = CHAR_MAPS[fmt]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(SUBMISSION_HEADERS[fmt])
    for i, h in enumerate(hyps):
        w.writerow([i, "".join(chars[k] for k in h)])
    storage.write_text(path, buf.getvalue())


def submit(cfg: DecodeConfig, upload: bool, competition: str, data_dir="data/processed", models_dir="models",
           out_path="submission/submission.csv", metrics_dir="metrics", root=".", kaggle_api=None) -> dict:
    data_dir, models_dir, out_path = Path(data_dir), Path(models_dir), Path(out_path)
    meta = json.loads((data_dir / "meta.json").read_text())
    test = Shard(data_dir / "test")
    _, hyps, _ = _decode(models_dir, test, cfg, with_greedy=False)
    write_submission(out_path, test.ids, hyps["beam"], meta["submission_format"])
    result = {"rows": len(test), "format": meta["submission_format"], "beam_width": cfg.beam_width}
    if meta["labelled"]["test"]:  # the embedded corpus has test transcripts: score them too
        s = score(hyps["beam"], test.references())
        result.update(test_lev_beam=round(s.mean_distance, 6), test_per=round(s.per, 6))
    storage.write_json(Path(metrics_dir) / "submit.json", result)
    info = _run_info(models_dir)
    import mlflow

    with tracking.resume_run(info["tracking_uri"], Path(root), info["run_id"]):
        mlflow.log_artifact(str(out_path), "submission")
        if "test_lev_beam" in result:
            mlflow.log_metrics({"test_lev_beam": result["test_lev_beam"], "test_per": result["test_per"]})
        if upload:
            try:
                kaggle.submit(out_path, f"ctclab MLflow run {info['run_id']}", competition, kaggle_api)
            except CtclabError as err:
                mlflow.set_tag("kaggle_upload", "failed")
                raise CtclabError(f"{err} (the submission is kept at {out_path})") from None
            mlflow.set_tag("kaggle_upload", f"submitted to {competition}")
            print(f"submit: uploaded {out_path} to {competition}", file=sys.stderr)
    return result
