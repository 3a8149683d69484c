"""The evaluate stage's library side: decode dev with the best checkpoint and every registered
decoder (greedy, beam, and any in src/ctclab/decoders), score it, write metrics/eval.json, and log scores, decode speed and the worst utterances into the
training's MLflow run. Inside a study that run is the variant × seed's child run; when DVC's run
cache handed over another variant's trained model, a child run of its own is made for this variant.

    dvc repro evaluate      # pipeline/evaluate.py with the paths dvc.yaml's cmd gives it
"""
from __future__ import annotations

from pathlib import Path

from . import storage, study_runs, tracking
from .config import DecodeConfig, StudyConfig
from .data import Shard
from .decoders import available
from .inference import decode_split
from .labels import PHONEMES
from .metrics import distances, score
from .results import EVAL, SUBMIT_DECODER, decode_speed, eval_scores


def _phonemes(seq: list[int]) -> str:
    return " ".join(PHONEMES[i] for i in seq)


def worst_utterances(shard: Shard, hyps: list[list[int]], refs: list[list[int]], n: int = 25) -> str:
    """A TSV of the n utterances with the largest edit distance (ties by position)."""
    d = distances(hyps, refs)
    worst = sorted(range(len(d)), key=lambda i: (-d[i], i))[:n]
    return "id\tdistance\treference\thypothesis\n" + "".join(
        f"{shard.ids[i]}\t{d[i]}\t{_phonemes(refs[i])}\t{_phonemes(hyps[i])}\n" for i in worst)


def evaluate(cfg: DecodeConfig, data_dir: str | Path, models_dir: str | Path, metrics_dir: str | Path,
             root=".", log=True, study: StudyConfig | None = None, seed: int = 0, tracking_uri: str = "") -> dict:
    data_dir, models_dir, metrics_dir = Path(data_dir), Path(models_dir), Path(metrics_dir)
    dev = Shard(data_dir / "dev")
    refs = dev.references()
    decoders = list(available())
    _, hyps, seconds = decode_split(models_dir / "best.pt", dev, cfg, decoders)
    result = eval_scores({d: score(hyps[d], refs) for d in decoders}, cfg.beam_width)
    storage.write_json(metrics_dir / "eval.json", result)
    if not log:
        return result
    store = tracking.open_store(tracking_uri, root)
    run_id = store.checkpoint_run(models_dir / "best.pt")
    table = {f"evaluate/worst_utterances_beam{cfg.beam_width}.tsv": worst_utterances(dev, hyps[SUBMIT_DECODER], refs)}
    speed = {decode_speed(d): len(dev) / max(seconds[d], 1e-9) for d in decoders}
    scores = {**{EVAL + k: v for k, v in result.items()}, **speed}
    decode_tags = {"decode.beam_width": cfg.beam_width, "decode.workers": cfg.workers}
    labels = {"study": study.name, "variant": study.variant, "seed": str(seed)} if study is not None and study.name else {}
    if labels and not study_runs.is_child(store, run_id, study.parent_run_id, labels):
        # the trained model came from another variant's training (DVC's run cache): a child run of its own
        study_runs.log_child(store, run_id, study.parent_run_id, labels, decode_tags, scores, table)
        return result
    with store.continue_run(run_id) as run:
        run.log_metrics(scores)
        run.set_tags(decode_tags)
        if labels:  # a study child: decode params compare in the UI like training params (fixed per variant)
            run.log_params(decode_tags)
        for path, text in table.items():
            run.log_text(text, path)
    return result
