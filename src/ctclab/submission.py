"""The submit stage's library side: decode test in the competition's order, write the Kaggle-format
submission (Spring 2022 `id,predictions`, Fall 2022 `index,label`, each with its own phoneme
map), score it when the data has test transcripts, log it into the training's MLflow run and,
if asked, upload it with the `kaggle` package. `predict` does the same for any folder of MFCC files
with a logged MLflow model (`ctclab predict`).

    dvc repro submit      # pipeline/submit.py with the paths dvc.yaml's cmd gives it
"""
from __future__ import annotations

import csv
import io
import sys
import tempfile
from pathlib import Path

from . import kaggle, layouts, storage, tracking
from .config import DecodeConfig
from .data import Shard, read_meta, shard_folder
from .errors import CtclabError
from .inference import decode_shard, decode_split
from .metrics import score
from .results import SUBMIT_DECODER, submit_scores

def submission_csv(hyps: list[list[int]], fmt: str) -> str:
    """A submission in format `fmt` (a name layouts.formats() knows): its header, then one row per
    utterance, each phoneme one character."""
    form = layouts.formats()[fmt]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(form.header)
    for i, h in enumerate(hyps):
        w.writerow([i, "".join(form.chars[k] for k in h)])
    return buf.getvalue()


def write_submission(path: Path, hyps: list[list[int]], fmt: str) -> None:
    storage.write_text(path, submission_csv(hyps, fmt))


def predict(recognizer, folder: str | Path, beam_width: int, workers: int, fmt: str | None = None) -> str:
    """Decode a folder of MFCC .npy files with a logged model (ctclab.models.Recognizer) into a
    submission CSV. `folder` is a dataset (Spring/Fall 2022 or ctclab layout: its test split, in the
    competition's order and format) or a folder of .npy files (by name; Spring 2022's format unless
    `fmt` says otherwise). Features are normalised as the model's training data was."""
    folder = Path(folder)
    if any(folder.glob("*.npy")):
        mfcc_dir, order, layout_fmt = folder, None, "spring2022"
    else:
        layout = layouts.detect(folder)
        mfcc_dir, order, layout_fmt = layout.splits["test"].mfcc_dir, layout.test_order, layout.submission_format
    with tempfile.TemporaryDirectory(prefix="ctclab-predict-") as tmp:
        shard = shard_folder(mfcc_dir, order, Path(tmp), recognizer.normalize, recognizer.stats())
        cfg = DecodeConfig(beam_width=beam_width, workers=workers)
        _, hyps, _ = decode_shard(recognizer.model, shard, cfg, [SUBMIT_DECODER])
    return submission_csv(hyps[SUBMIT_DECODER], fmt or layout_fmt)


def submit(cfg: DecodeConfig, upload: bool, competition: str, data_dir: str | Path, models_dir: str | Path,
           out_path: str | Path, metrics_dir: str | Path, root=".", kaggle_api=None, tracking_uri: str = "") -> dict:
    data_dir, models_dir, out_path = Path(data_dir), Path(models_dir), Path(out_path)
    meta = read_meta(data_dir)
    test = Shard(data_dir / "test")
    _, hyps, _ = decode_split(models_dir / "best.pt", test, cfg, [SUBMIT_DECODER])
    write_submission(out_path, hyps[SUBMIT_DECODER], meta.submission_format)
    result = {"rows": len(test), "format": meta.submission_format, "beam_width": cfg.beam_width}
    # the embedded corpus has test transcripts: score them too
    scores = submit_scores(score(hyps[SUBMIT_DECODER], test.references())) if meta.labelled["test"] else {}
    storage.write_json(Path(metrics_dir) / "submit.json", {**result, **scores})
    store = tracking.open_store(tracking_uri, root)
    run_id = store.checkpoint_run(models_dir / "best.pt")
    with store.continue_run(run_id) as run:
        run.log_artifact(out_path, "submission")
        if scores:
            run.log_metrics(scores)
        if upload:
            try:
                kaggle.submit(out_path, f"ctclab MLflow run {run_id}", competition, kaggle_api)
            except CtclabError as err:
                run.set_tags({"kaggle_upload": "failed"})
                raise CtclabError(f"{err} (the submission is kept at {out_path})") from None
            run.set_tags({"kaggle_upload": f"submitted to {competition}"})
            print(f"submit: uploaded {out_path} to {competition}", file=sys.stderr)
    return {**result, **scores}
