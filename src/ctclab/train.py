"""CTC training on CUDA or CPU, tracked in MLflow, resumable from exact checkpoints.

    dvc repro train        # pipeline/train.py with the paths dvc.yaml's cmd gives it

CUDA: autocast (bf16 where supported, else fp16 + grad scaler), packed sequences for cuDNN,
pinned memory. CPU: the unpacked BiLSTM path, deterministic algorithms, full seeding, so a rerun
(and a resumed run) is bit-identical. Batches group similar lengths; their order is seeded per
epoch. The step and the epoch are ctclab.trainer's; this module wires data, dev scoring,
checkpoints and tracking around them. Checkpoints (see ctclab.checkpoint): models/best.pt (by dev greedy distance),
models/last.pt, and a resume slot that an interrupted train stage continues from. Under DDP
(train.distributed, see ctclab.distributed) every rank runs this; rank 0 logs and writes.
"""
from __future__ import annotations

import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from . import checkpoint, distributed, models, provenance, storage, tracking
from .batching import bucket_batches, feasible
from .config import Params, flatten
from .data import Shard, read_meta
from .errors import CtclabError, Interrupted, signal_name
from .inference import device_name, evaluate_split, load_model, select_device
from .metrics import score
from .results import EPOCH_DECODER, HISTORY_COLUMNS, DataMeta, EpochClock, EpochRow, TrainSummary
from .trainer import Trainer

TRACKED_SECTIONS = ("data", "features", "model", "train", "tracking")


def seed_everything(seed: int, device: torch.device) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    else:
        # Every bucketed batch has its own length, so autotuning per shape would cost more than it saves.
        torch.backends.cudnn.benchmark = False


def trainable(train_set: Shard, dev_set: Shard, model: models.CTCModel, data_dir: Path) -> tuple[np.ndarray, dict]:
    """Indices of the train utterances CTC can align after downsampling, and the counts left out."""
    ok_train, ok_dev = feasible(train_set, model.output_lengths), feasible(dev_set, model.output_lengths)
    train_idx = np.flatnonzero(ok_train)
    if len(train_idx) == 0:
        raise CtclabError(f"{data_dir / 'train'}: no utterance has enough frames for CTC after ×{model.downsample} "
                          "downsampling; lower model.stride")
    infeasible = {"train": int((~ok_train).sum()), "dev": int((~ok_dev).sum())}
    if any(infeasible.values()):
        print(f"train: {infeasible['train']} train / {infeasible['dev']} dev utterances have too few frames for "
              f"their labels after ×{model.downsample} downsampling; train leaves them out, dev scores them",
              file=sys.stderr)
    return train_idx, infeasible


class StopSignals:
    """While training, SIGINT and SIGTERM only ask it to stop: the current batch finishes, a resume
    checkpoint is written, the MLflow run is marked KILLED. (Outside the main thread: no handlers.)"""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        try:
            self._previous = {s: signal.signal(s, self._ask) for s in (signal.SIGINT, signal.SIGTERM)}
        except ValueError:
            pass
        return self

    def _ask(self, signum, frame) -> None:
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


class MidEpoch:
    """Mid-epoch resume checkpoints (the Trainer's interruptions): one is due every
    train.checkpoint_minutes and when SIGINT or SIGTERM arrived; the ranks agree on it at a sync
    point (any rank's wish counts), all hand in their RNG states, rank 0 writes, and a stop request
    then ends the training."""

    def __init__(self, t: "Training", epoch: int, run, stop: StopSignals, n_batches: int):
        self.t, self.epoch, self.run, self.stop, self.n_batches = t, epoch, run, stop, n_batches
        self.last_save = time.monotonic()

    def wishes(self, step: int) -> tuple[bool, bool]:
        timed = time.monotonic() - self.last_save >= 60 * self.t.cfg.checkpoint_minutes and step < self.n_batches
        return self.stop.signum is not None, timed

    def save(self, step: int, totals: tuple[float, int], stopping: bool) -> None:
        t = self.t
        t.progress.batch, (t.progress.loss_sum, t.progress.seen) = step, totals
        ckpt = t.trainer.state(t.progress)
        if t.trainer.group.main:
            checkpoint.write_resume(ckpt, t.resume_path, self.run.run_id)
        self.last_save = time.monotonic()
        if stopping:
            signum = self.stop.signum or signal.SIGTERM  # a peer's signal: torchrun sends SIGTERM
            raise Interrupted(signum, f"train: stopped by {signal_name(signum)} in epoch "
                                      f"{self.epoch + 1}/{t.cfg.epochs} after batch {step}/{self.n_batches}; "
                                      f"{t.resume_path} holds it and the next `dvc repro` continues from there")


def summarize(history: list[dict], parameters: int, infeasible: dict) -> TrainSummary:
    """metrics/train.json: the best epoch's dev scores and what the training was."""
    return TrainSummary.of([EpochRow(**r) for r in history], parameters, infeasible)


def write_outputs(history: list[dict], summary: TrainSummary, run: tracking.RunLog, out_dir: Path, metrics_dir: Path,
                  meta: DataMeta) -> None:
    storage.write_json(metrics_dir / "train.json", asdict(summary))
    storage.write_text(metrics_dir / "train_history.csv", ",".join(HISTORY_COLUMNS) + "\n" + "".join(
        ",".join(str(r[k]) for k in HISTORY_COLUMNS) + "\n" for r in history))
    # evaluate and submit find this run by the checkpoint's bytes (no run id in DVC's outs)
    run.set_tags({"checkpoint_sha256": storage.sha256_file(out_dir / "best.pt")})
    run.log_metrics(summary.tracked(run.store.train_timing(run.run_id)))
    run.log_artifact(out_dir / "best.pt", "checkpoints")
    run.log_artifact(out_dir / "last.pt", "checkpoints")
    best = load_model(out_dir / "best.pt")
    recognizer = models.Recognizer(best, meta.normalize, meta.global_stats)
    run.log_model(recognizer, {"features": {"normalize": meta.normalize}, **summary.model_metadata(),
                               "data_hash": meta.data_hash, "submission_format": meta.submission_format},
                  best.input_dim, best.num_classes)


def run_identity(params: Params) -> tuple[str, str]:
    """(run name, study parent run id): a study's training is `<variant>-s<seed>` under the study's
    parent; any other run takes its DVC experiment's name, else `<arch>-h<hidden>-s<seed>` (no -h… for an
    architecture without `hidden`)."""
    study, seed = params.study, params.train.seed
    if study.name and study.parent_run_id:
        return f"{study.variant}-s{seed}", study.parent_run_id
    hidden = getattr(params.model.active, "hidden", None)
    return os.environ.get("DVC_EXP_NAME") or f"{params.model.arch}{f'-h{hidden}' if hidden else ''}-s{seed}", ""


def data_input(params: Params, meta: DataMeta, data_dir: Path) -> tracking.DataInput:
    d = params.data
    name = {"synthetic": "ctclab-synthetic", "kaggle": d.competition}.get(d.source) or Path(d.path).name
    return tracking.DataInput(name, meta.data_hash[:12], str(data_dir.resolve()), meta.profile())


@dataclass
class TrainData:
    train_set: Shard
    dev_set: Shard
    dev_refs: list[list[int]]
    train_idx: np.ndarray  # the train utterances CTC can align after downsampling

    def batches(self, cfg, epoch: int, world: int) -> list[np.ndarray]:
        """The epoch's global batches: similar lengths together, in a seeded order."""
        frames = self.train_set.frames()[self.train_idx]
        return [self.train_idx[b] for b in bucket_batches(frames, cfg.batch_size, cfg.seed, epoch, world)]


@dataclass
class Training:
    """One training's epochs: its Trainer, its data, where it stands, and where it checkpoints."""
    trainer: Trainer
    data: TrainData
    progress: checkpoint.Progress
    out_dir: Path
    resume_path: Path

    @property
    def cfg(self):
        return self.trainer.cfg

    def run_epoch(self, epoch: int, run: tracking.RunLog | None, stop: StopSignals, progress_bar: bool) -> None:
        """One epoch (from where a resumed one stopped): train, score dev, log, checkpoint. Rank 0
        scores dev and broadcasts the scores; it alone (`run` is None elsewhere) logs and writes."""
        trainer, state, group, t0 = self.trainer, self.progress, self.trainer.group, time.perf_counter()
        clock = EpochClock(torch.get_num_threads())
        batches = self.data.batches(self.cfg, epoch, group.world)
        desc = f"epoch {epoch + 1}/{self.cfg.epochs}"
        done = (state.loss_sum, state.seen) if group.main else (0.0, 0)
        train_loss, seen = trainer.epoch(self.data.train_set, batches, desc, state.batch, done,
                                         MidEpoch(self, epoch, run, stop, len(batches)), progress_bar)
        train_seconds = time.perf_counter() - t0
        dev_loss, distance, per = group.broadcast(self.score_dev() if group.main else None)
        if self.cfg.scheduler == "plateau":
            trainer.scheduler.step(distance)  # on rank 0's score everywhere, so that the ranks' lrs agree
        row = EpochRow(epoch + 1, round(train_loss, 6), round(dev_loss, 6), round(distance, 6), round(per, 6),
                       trainer.optimizer.param_groups[0]["lr"])
        timing = clock.timing(seen, train_seconds)
        improved = distance < state.best
        state.epoch, state.best, state.batch, state.loss_sum, state.seen = epoch + 1, min(state.best, distance), 0, 0.0, 0
        state.history.append(asdict(row))
        ckpt = trainer.state(state)  # serialised below, after run.send has taken what it sent out of state.unsent
        if not group.main:
            return
        state.unsent.append(({**row.values(), **timing}, epoch + 1))
        run.send(state.unsent)  # a lost tracking server must not stop the training
        # two units: the optimised CTC loss is per target phoneme (CTCLoss mean), the dev loss per utterance
        print(f"{desc}: train loss {row.train_loss:.3f}/phoneme, dev loss {dev_loss:.3f}/utterance, dev greedy distance "
              f"{distance:.3f}, PER {per:.1%} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        checkpoint.write_epoch(ckpt, self.out_dir, self.resume_path, improved, run.run_id)

    def score_dev(self) -> tuple[float, float, float]:
        """(dev loss, mean greedy distance, PER): what picks the best epoch."""
        dev_loss, hyps, _ = evaluate_split(self.trainer.model, self.data.dev_set, 2 * self.cfg.batch_size,
                                           self.trainer.device, amp=self.cfg.amp)
        s = score(hyps[EPOCH_DECODER], self.data.dev_refs)
        return dev_loss, s.mean_distance, s.per


def setup(params: Params, data_dir: Path, out_dir: Path, root: Path) -> tuple[Training, DataMeta, dict]:
    """Seeded model, Trainer and data — resumed from the resume slot when one matches. Under DDP
    rank 0 reads the slot and every rank resumes from its broadcast copy (no shared disk)."""
    cfg = params.train
    meta = read_meta(data_dir)
    group, device = distributed.join(select_device(cfg.device))
    seed_everything(cfg.seed, device)  # the same initial weights on every rank
    train_set, dev_set = Shard(data_dir / "train"), Shard(data_dir / "dev")
    model = models.build(params.model, train_set.feature_dim).to(device)
    train_idx, infeasible = trainable(train_set, dev_set, model, data_dir)
    data = TrainData(train_set, dev_set, dev_set.references(), train_idx)
    if cfg.compile:
        model.compile_parts()
    trainer = Trainer(model, cfg, device, len(data.batches(cfg, 0, group.world)), group)
    fingerprint = checkpoint.fingerprint(params, meta.data_hash, f"{device.type}:{trainer.dtype}")
    resume_path = root / checkpoint.RESUME_DIR / f"{fingerprint}.pt"
    saved = group.broadcast(checkpoint.load_resume(resume_path) if cfg.resume == "auto" and group.main else None)
    if saved is not None:
        progress = trainer.restore(saved)
        if group.main:
            print(f"train: resuming epoch {progress.epoch + 1} after batch {progress.batch} from {resume_path}",
                  file=sys.stderr)
    else:
        progress = checkpoint.Progress()
        if group.main:
            for stale in (out_dir / "best.pt", out_dir / "last.pt"):
                stale.unlink(missing_ok=True)
    return Training(trainer, data, progress, out_dir, resume_path), meta, infeasible


def train(params: Params, data_dir: str | Path, out_dir: str | Path, metrics_dir: str | Path, root: str | Path = ".",
          progress: bool = True) -> tuple[TrainSummary, str]:
    """Train (resuming an interrupted run with the same params); rank 0's summary and MLflow run id.
    Under DDP every rank calls this; rank 0 logs and writes, the others `follow`."""
    data_dir, out_dir, metrics_dir, root = Path(data_dir), Path(out_dir), Path(metrics_dir), Path(root)
    t, meta, infeasible = setup(params, data_dir, out_dir, root)
    try:
        if not t.trainer.group.main:
            return follow(t, infeasible)
        return lead(t, params, meta, infeasible, data_dir, out_dir, metrics_dir, root, progress)
    finally:
        t.trainer.group.close()


def follow(t: Training, infeasible: dict) -> tuple[TrainSummary, str]:
    """A DDP rank other than 0: the same epochs on its shares, nothing logged or written."""
    t.progress.run_id = t.trainer.group.broadcast(None)
    with StopSignals() as stop:
        for epoch in range(t.progress.epoch, t.cfg.epochs):
            t.run_epoch(epoch, None, stop, progress_bar=False)
    return summarize(t.progress.history, models.parameter_count(t.trainer.model), infeasible), t.progress.run_id


def lead(t: Training, params: Params, meta: DataMeta, infeasible: dict, data_dir: Path, out_dir: Path,
         metrics_dir: Path, root: Path, progress: bool) -> tuple[TrainSummary, str]:
    """Rank 0 (the only process without DDP): the training, its MLflow run and its files."""
    trainer, state = t.trainer, t.progress
    logged = {k: v for k, v in flatten(params).items() if k.split(".")[0] in TRACKED_SECTIONS}
    tags = {**provenance.tags(root, meta.data_hash, str(trainer.device), device_name(trainer.device)),
            "parameter_count": models.parameter_count(trainer.model), "amp_dtype": str(trainer.dtype),
            "world_size": trainer.group.world, "process_group": trainer.group.backend,
            **{f"infeasible_{k}": v for k, v in infeasible.items()}}
    if params.study.name:
        tags.update({"study": params.study.name, "variant": params.study.variant, "seed": t.cfg.seed})
    name, parent = run_identity(params)
    store = tracking.open_store(params.tracking.uri, root)
    with StopSignals() as stop, store.training_run(params.tracking.experiment, state.run_id, logged, tags, name,
                                                   parent) as run:
        if state.run_id is None:
            run.log_data(data_input(params, meta, data_dir))
        state.run_id = trainer.group.broadcast(run.run_id)
        try:
            for epoch in range(state.epoch, t.cfg.epochs):
                t.run_epoch(epoch, run, stop, progress)
        except Interrupted:
            run.end("KILLED")
            raise
        summary = summarize(state.history, models.parameter_count(trainer.model), infeasible)
        try:
            error = run.send(state.unsent)
            if error is None:
                write_outputs(state.history, summary, run, out_dir, metrics_dir, meta)
        except tracking.UNREACHABLE as err:
            error = err
        if error is not None:
            raise CtclabError(f"train: finished all {t.cfg.epochs} epochs, but the tracking store {run.uri} cannot "
                              f"be reached ({type(error).__name__}); {t.resume_path} keeps the training and its unsent "
                              "metrics: run `dvc repro` again once the store answers to log them")
    checkpoint.clear(t.resume_path)
    return summary, state.run_id
