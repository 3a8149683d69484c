"""The submit stage's library side: decode test in the competition's order, write the Kaggle-format
submission (Spring 2022 `id,predictions`, Fall 2022 `index,label`, each with its own phoneme
map), score it when the data has test transcripts, log it into the training's MLflow run and,
if asked, upload it with the `kaggle` package.

    python pipeline/submit.py      # or: dvc repro submit
"""
from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

from . import kaggle, storage, tracking
from .config import DecodeConfig
from .data import Shard
from .errors import CtclabError
from .inference import decode_split
from .labels import CHAR_MAPS
from .metrics import score

SUBMISSION_HEADERS = {"spring2022": ("id", "predictions"), "fall2022": ("index", "label")}


def write_submission(path: Path, hyps: list[list[int]], fmt: str) -> None:
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
    _, hyps, _ = decode_split(models_dir / "best.pt", test, cfg.beam_width, cfg.workers, with_greedy=False)
    write_submission(out_path, hyps["beam"], meta["submission_format"])
    result = {"rows": len(test), "format": meta["submission_format"], "beam_width": cfg.beam_width}
    if meta["labelled"]["test"]:  # the embedded corpus has test transcripts: score them too
        s = score(hyps["beam"], test.references())
        result.update(test_lev_beam=round(s.mean_distance, 6), test_per=round(s.per, 6))
    storage.write_json(Path(metrics_dir) / "submit.json", result)
    info = tracking.training_run_info(models_dir)
    with tracking.continue_run(info["tracking_uri"], Path(root), info["run_id"]) as run:
        run.log_artifact(out_path, "submission")
        if "test_lev_beam" in result:
            run.log_metrics({"test_lev_beam": result["test_lev_beam"], "test_per": result["test_per"]})
        if upload:
            try:
                kaggle.submit(out_path, f"ctclab MLflow run {info['run_id']}", competition, kaggle_api)
            except CtclabError as err:
                run.set_tags({"kaggle_upload": "failed"})
                raise CtclabError(f"{err} (the submission is kept at {out_path})") from None
            run.set_tags({"kaggle_upload": f"submitted to {competition}"})
            print(f"submit: uploaded {out_path} to {competition}", file=sys.stderr)
    return result
