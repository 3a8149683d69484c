"""CTC training on CUDA or CPU, tracked in MLflow, resumable from exact checkpoints.

    python pipeline/train.py        # or: dvc repro train

CUDA: autocast (bf16 where supported, else fp16 + grad scaler), packed sequences for cuDNN,
pinned memory. CPU: the unpacked BiLSTM path, deterministic algorithms, full seeding, so a rerun
(and a resumed run) is bit-identical. Batches group similar lengths; their order is seeded per
epoch. Checkpoints (see ctclab.checkpoint): models/best.pt (by dev greedy distance),
models/last.pt, and a resume slot that an interrupted train stage continues from. Under DDP
(train.distributed, see ctclab.distributed) every rank runs this; rank 0 logs and writes.
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import checkpoint, distributed, models, storage, tracking
from .batching import Batch, bucket_batches, feasible, loader
from .config import Params, TrainConfig, flatten
from .data import Shard
from .errors import CtclabError
from .inference import amp_dtype, device_name, evaluate_split, load_model, select_device
from .metrics import score
from .results import EPOCH_DECODER, HISTORY_COLUMNS, TIMING, EpochRow, TrainSummary

TRACKED_SECTIONS = ("data", "features", "model", "train", "tracking")
# On CUDA, reading a value back waits for the GPU: loss and finiteness are read every this many steps.
SYNC_EVERY = 25


def seed_everything(seed: int, device: torch.device) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    else:
        # Every bucketed batch has its own length, so autotuning per shape would cost more than it saves.
        torch.backends.cudnn.benchmark = False


def spec_augment(x: torch.Tensor, lengths: torch.Tensor, cfg, gen: torch.Generator) -> torch.Tensor:
    """Zero random time and feature bands (train only), drawn from a seeded generator."""
    if cfg.time_masks == 0 and cfg.freq_masks == 0:
        return x
    x = x.clone()
    B, _, D = x.shape
    for b in range(B):
        for _ in range(cfg.freq_masks):
            w = int(torch.randint(0, cfg.freq_width + 1, (1,), generator=gen))
            f0 = int(torch.randint(0, max(1, D - w), (1,), generator=gen))
            x[b, :, f0:f0 + w] = 0
        for _ in range(cfg.time_masks):
            w = int(torch.randint(0, cfg.time_width + 1, (1,), generator=gen))
            t0 = int(torch.randint(0, max(1, int(lengths[b]) - w), (1,), generator=gen))
            x[b, t0:t0 + w] = 0
    return x


def make_scheduler(opt, cfg: TrainConfig, steps_per_epoch: int):
    """The lr schedule: cosine and warmup step once a batch, plateau once an epoch on the dev score."""
    sched = torch.optim.lr_scheduler
    if cfg.scheduler == "plateau":
        return sched.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=1)
    warmup = cfg.warmup_epochs * steps_per_epoch
    after = sched.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch - warmup) \
        if cfg.scheduler == "cosine" else None
    if not warmup:
        return after
    ramp = sched.LinearLR(opt, start_factor=1 / warmup, total_iters=warmup)  # lr/warmup … lr
    if after is None:
        return ramp  # LinearLR holds the full lr once its ramp is done
    return sched.SequentialLR(opt, [ramp, after], milestones=[warmup])


def read_meta(data_dir: Path) -> dict:
    meta_path = data_dir / "meta.json"
    if not meta_path.is_file():
        raise CtclabError(f"{meta_path}: missing; run the preprocess stage first (dvc repro preprocess)")
    return json.loads(meta_path.read_text())


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


class TrainingInterrupted(CtclabError):
    """SIGINT/SIGTERM: the training stopped at a batch boundary after saving where it was."""

    def __init__(self, signum: int, message: str):
        super().__init__(message, exit_code=128 + signum)  # the shell's convention: 130 SIGINT, 143 SIGTERM


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


def backward(model, batch: Batch, ctc, scaler, dtype, weight: float) -> torch.Tensor:
    """Forward, CTC loss and backward of `weight` × the loss (gradients accumulate); the loss."""
    with torch.autocast(batch.features.device.type, dtype=dtype, enabled=dtype is not None):
        log_probs, out_lengths = model(batch.features, batch.lengths)
    # CTC in float32 whatever autocast chose: log_probs leave the model as float32
    loss = ctc(log_probs.transpose(0, 1), batch.targets, out_lengths, batch.target_lengths)
    scaler.scale(loss * weight).backward()
    return loss.detach()


def fitting_backward(model, batch: Batch, ctc, scaler, dtype, oom: str, optimizer,
                     per_rank: float | None = None) -> torch.Tensor:
    """Gradients of the global batch's mean loss; returns this batch's summed loss (float64).
    `per_rank`: the global batch's utterances per rank under DDP (which averages the ranks'
    gradients), else this batch's size. Out of memory, with train.oom: split, the batch goes through
    again as micro-batches of half the size (and half again…), each loss weighted by its share, so
    the accumulated gradient is the whole batch's (BatchNorm sees smaller batches). Under DDP an
    out-of-memory stops the group instead: each micro-batch's backward would be a collective."""
    size, n = len(batch.labels), len(batch.labels)
    per_rank = per_rank or n
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    while True:
        try:
            return sum(backward(model, part, ctc, scaler, dtype, len(part.labels) / per_rank).double() * len(part.labels)
                       for part in batch.chunks(size))
        except torch.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            if batch.features.is_cuda:
                torch.cuda.empty_cache()
            where = (f"out of memory on a batch of {n} utterances (longest {int(batch.lengths.max())} frames, "
                     f"{models.parameter_count(model):,} parameters)")
            if oom == "fail" or size == 1 or ddp:
                how = " even one at a time" if size == 1 else " (under train.distributed a rank cannot split alone)" if ddp else ""
                raise CtclabError(f"train: {where}{how}; lower train.batch_size or model size"
                                  f"{'' if ddp else ' (or set train.oom: split)'}") from None
            size = (size + 1) // 2
            print(f"train: {where}; retrying as micro-batches of ≤ {size} with accumulated gradients "
                  "(same effective batch)", file=sys.stderr)


class MidEpoch:
    """Mid-epoch resume checkpoints: one is due every train.checkpoint_minutes and when SIGINT or
    SIGTERM arrived; the ranks agree on it at a sync point (any rank's wish counts), all hand in
    their RNG states, rank 0 writes, and a stop request then ends the training."""

    def __init__(self, t: "Training", epoch: int, run, stop: StopSignals, n_batches: int):
        self.t, self.epoch, self.run, self.stop, self.n_batches = t, epoch, run, stop, n_batches
        self.last_save = time.monotonic()

    def wishes(self, step: int) -> tuple[bool, bool]:
        """(stop, save) as this rank sees them after batch `step`."""
        timed = time.monotonic() - self.last_save >= 60 * self.t.cfg.checkpoint_minutes and step < self.n_batches
        return self.stop.signum is not None, timed

    def save(self, step: int, totals: tuple[float, int], stopping: bool) -> None:
        t = self.t
        t.state.batch, (t.state.loss_sum, t.state.seen) = step, totals
        ckpt = t.checkpoint()
        if t.group.main:
            checkpoint.write_resume(ckpt, t.resume_path, self.run.run_id)
        self.last_save = time.monotonic()
        if stopping:
            signum = self.stop.signum or signal.SIGTERM  # a peer's signal: torchrun sends SIGTERM
            raise TrainingInterrupted(signum, f"train: stopped by {signal.Signals(signum).name} in epoch "
                                      f"{self.epoch + 1}/{t.cfg.epochs} after batch {step}/{self.n_batches}; "
                                      f"{t.resume_path} holds it and the next `dvc repro` continues from there")


def non_finite(desc: str, train_set: Shard, batches, first: int, last: int) -> CtclabError:
    """The one line for a non-finite loss summed over batches `first`..`last` (1-based)."""
    ids = [train_set.ids[i] for b in batches[first - 1:last] for i in b]
    return CtclabError(f"{desc}: non-finite CTC loss in batch{'es' if last > first else ''} "
                       f"{first}{f'–{last}' if last > first else ''} of {len(batches)} (utterances "
                       f"{', '.join(ids[:6])}{' …' if len(ids) > 6 else ''}); the checkpoints of the epochs "
                       "before are kept; lower train.lr or check those utterances")


def train_epoch(model, train_set: Shard, batches, optimizer, scheduler, scaler, cfg: TrainConfig,
                aug_gen: torch.Generator, device: torch.device, desc: str, progress: bool,
                start: int = 0, done: tuple[float, int] = (0.0, 0), mid: MidEpoch | None = None,
                group: distributed.Group = distributed.SINGLE) -> tuple[float, int]:
    """One pass over the global `batches` from batch `start` on (a resumed epoch: `done` = loss sum
    and utterances of the batches before, counted once, on rank 0); each rank trains on its share.
    Returns (mean train loss per utterance, utterances seen) over all ranks. The loss is summed on
    the device (float64) and read back, summed over the ranks, at sync points: every step on the
    CPU, every SYNC_EVERY steps on CUDA; there `mid` may write a resume checkpoint and stop."""
    from tqdm import tqdm

    model.train()
    dtype = amp_dtype(device, cfg.amp)
    ctc = nn.CTCLoss(blank=0, reduction="mean", zero_infinity=False)
    sync_every = 1 if device.type == "cpu" else SYNC_EVERY
    t0, seen, totals = time.perf_counter(), done[1], (done[0], done[1])
    loss_sum = torch.tensor(done[0], dtype=torch.float64, device=device)
    # under DDP every share of a batch is padded to the batch's longest utterance: what one process sees
    frames = train_set.frames()
    pad_to = [int(frames[b].max()) for b in batches[start:]] if group.world > 1 else None
    rng = torch.get_rng_state()
    shares = [group.share(b) for b in batches[start:]]
    batch_iter = iter(loader(train_set, shares, cfg.loader_workers, device, pad_to))
    if start:  # the epoch's loader already drew its seed from torch's RNG before the checkpoint
        torch.set_rng_state(rng)
    bar = tqdm(batch_iter, total=len(batches), initial=start, desc=desc, unit="batch",
               disable=not (progress and group.main), file=sys.stderr, leave=False,
               mininterval=1 if sys.stderr.isatty() else 30)
    for step, batch in enumerate(bar, start + 1):
        batch.features = spec_augment(batch.features, batch.lengths, cfg.specaugment, aug_gen)
        batch = batch.to(device)
        optimizer.zero_grad(set_to_none=True)
        loss_sum += fitting_backward(model, batch, ctc, scaler, dtype, cfg.oom, optimizer,
                                     len(batches[step - 1]) / group.world)
        seen += len(batch.labels)
        stopping = saving = False
        wishes = mid.wishes(step) if mid is not None else (False, False)
        # one process answers a stop or a due checkpoint at once; ranks must agree, at sync points
        if step % sync_every == 0 or step == len(batches) or (group.world == 1 and any(wishes)):
            summed = group.sum(torch.stack([loss_sum, *loss_sum.new_tensor([seen, *wishes])])).tolist()
            totals, (stopping, saving) = (summed[0], int(summed[1])), (summed[2] > 0, summed[3] > 0)
            if not math.isfinite(totals[0]):
                raise non_finite(desc, train_set, batches, max(start + 1, step - sync_every + 1), step)
            # refresh=False: in a log (not a terminal) the bar then writes at most every mininterval
            bar.set_postfix(loss=f"{totals[0] / totals[1]:.3f}",
                            utt_s=f"{totals[1] / (time.perf_counter() - t0):.0f}", refresh=False)
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        if scheduler is not None and cfg.scheduler != "plateau":
            scheduler.step()
        if stopping or saving:
            mid.save(step, totals, stopping)
    if start >= len(batches):  # resumed after the epoch's last batch: the ranks' totals still add up
        summed = group.sum(torch.stack([loss_sum, loss_sum.new_tensor(seen)])).tolist()
        totals = (summed[0], int(summed[1]))
    return totals[0] / totals[1], totals[1]


def summarize(history: list[dict], parameters: int, infeasible: dict) -> TrainSummary:
    """metrics/train.json: the best epoch's dev scores and what the training was."""
    return TrainSummary.of([EpochRow(**r) for r in history], parameters, infeasible)


def write_outputs(history: list[dict], summary: TrainSummary, run: tracking.RunLog, out_dir: Path, metrics_dir: Path,
                  meta: dict) -> None:
    storage.write_json(metrics_dir / "train.json", asdict(summary))
    storage.write_text(metrics_dir / "train_history.csv", ",".join(HISTORY_COLUMNS) + "\n" + "".join(
        ",".join(str(r[k]) for k in HISTORY_COLUMNS) + "\n" for r in history))
    # evaluate and submit find this run by the checkpoint's bytes (no run id in DVC's outs)
    run.set_tags({"checkpoint_sha256": storage.sha256_file(out_dir / "best.pt")})
    run.log_metrics(summary.tracked(tracking.train_seconds(run.run_id)))
    run.log_artifact(out_dir / "best.pt", "checkpoints")
    run.log_artifact(out_dir / "last.pt", "checkpoints")
    best = load_model(out_dir / "best.pt")
    recognizer = models.Recognizer(best, meta["normalize"], meta["global_stats"])
    run.log_model(recognizer, {"features": {"normalize": meta["normalize"]}, "best_epoch": summary.best_epoch,
                               "data_hash": meta["data_hash"], "submission_format": meta["submission_format"]},
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


def data_input(params: Params, meta: dict, data_dir: Path) -> tracking.DataInput:
    d = params.data
    name = {"synthetic": "ctclab-synthetic", "kaggle": d.competition}.get(d.source) or Path(d.path).name
    profile = {k: meta[k] for k in ("layout", "feature_dim", "utterances", "frames", "normalize", "data_hash")}
    return tracking.DataInput(name, meta["data_hash"][:12], str(data_dir.resolve()), profile)


@dataclass
class Training:
    """Everything one training loop touches (built by `train`)."""
    cfg: TrainConfig
    model: models.CTCModel   # what checkpoints and evaluation use
    net: nn.Module           # what the training steps call: the model, or its DDP wrapper
    group: distributed.Group
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    aug_gen: torch.Generator
    device: torch.device
    train_set: Shard
    dev_set: Shard
    dev_refs: list[list[int]]
    train_idx: np.ndarray
    state: checkpoint.Progress
    out_dir: Path
    resume_path: Path

    def checkpoint(self) -> dict:
        """The training's state; under DDP with every rank's RNG states (a collective: all ranks call it)."""
        rngs = self.group.gather(checkpoint.rng_states(self.aug_gen, self.device))
        return checkpoint.state(self.model, self.optimizer, self.scheduler, self.scaler, rngs, self.state)


def run_epoch(t: Training, epoch: int, run: tracking.RunLog | None, stop: StopSignals, progress: bool) -> None:
    """One epoch (from where a resumed one stopped): train, score dev, log, checkpoint. Mid-epoch,
    a resume checkpoint every train.checkpoint_minutes and when a stop signal arrives. Rank 0 scores
    dev and broadcasts the scores; it alone (`run` is None elsewhere) logs and writes."""
    cfg, state, group, t0 = t.cfg, t.state, t.group, time.perf_counter()
    frames = t.train_set.frames()[t.train_idx]
    batches = [t.train_idx[b] for b in bucket_batches(frames, cfg.batch_size, cfg.seed, epoch, group.world)]
    desc = f"epoch {epoch + 1}/{cfg.epochs}"
    done = (state.loss_sum, state.seen) if group.main else (0.0, 0)
    train_loss, seen = train_epoch(t.net, t.train_set, batches, t.optimizer, t.scheduler, t.scaler, cfg, t.aug_gen,
                                   t.device, desc, progress, state.batch, done, MidEpoch(t, epoch, run, stop, len(batches)),
                                   group)
    train_seconds = time.perf_counter() - t0
    if group.main:
        dev_loss, hyps, _ = evaluate_split(t.model, t.dev_set, 2 * cfg.batch_size, t.device, amp=cfg.amp)
        s = score(hyps[EPOCH_DECODER], t.dev_refs)
        dev = (dev_loss, s.mean_distance, s.per)
    # rank 0's scores on every rank: the plateau scheduler and "best" must not drift apart
    dev_loss, distance, per = group.broadcast(dev if group.main else None)
    if cfg.scheduler == "plateau":
        t.scheduler.step(distance)
    row = EpochRow(epoch + 1, round(train_loss, 6), round(dev_loss, 6), round(distance, 6), round(per, 6),
                   t.optimizer.param_groups[0]["lr"])
    timing = dict(zip(TIMING, (time.perf_counter() - t0, seen / train_seconds)))
    improved = distance < state.best
    state.epoch, state.best, state.batch, state.loss_sum, state.seen = epoch + 1, min(state.best, distance), 0, 0.0, 0
    state.history.append(asdict(row))
    ckpt = t.checkpoint()  # serialised below, after run.send has taken what it sent out of state.unsent
    if not group.main:
        return
    state.unsent.append(({**row.values(), **timing}, epoch + 1))
    run.send(state.unsent)  # a lost tracking server must not stop the training
    print(f"{desc}: train loss {row.train_loss:.3f}, dev loss {dev_loss:.3f}, dev greedy distance "
          f"{distance:.3f}, PER {per:.1%} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    checkpoint.write_epoch(ckpt, t.out_dir, t.resume_path, improved, run.run_id)


def setup(params: Params, data_dir: Path, out_dir: Path, root: Path) -> tuple[Training, dict, dict]:
    """Seeded model, optimizer, scheduler and data — resumed from the resume slot when one matches.
    Under DDP rank 0 reads the slot and every rank resumes from its broadcast copy (no shared disk)."""
    cfg = params.train
    meta = read_meta(data_dir)
    device = select_device(cfg.device)
    group, device = distributed.join(device)
    seed_everything(cfg.seed, device)  # the same initial weights on every rank
    train_set, dev_set = Shard(data_dir / "train"), Shard(data_dir / "dev")
    model = models.build(params.model, train_set.feature_dim).to(device)
    train_idx, infeasible = trainable(train_set, dev_set, model, data_dir)
    if cfg.compile:
        model.compile_parts()
    net = group.wrap(model, device)
    optimizer = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.optimizer](
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(bucket_batches(train_set.frames()[train_idx], cfg.batch_size, cfg.seed, 0, group.world))
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype(device, cfg.amp) == torch.float16)
    aug_gen = torch.Generator().manual_seed(cfg.seed)
    if group.rank:  # dropout and augmentation draw differently on each rank's share
        torch.manual_seed(cfg.seed + 7919 * group.rank)
        aug_gen.manual_seed(cfg.seed + 7919 * group.rank)
    fingerprint = checkpoint.fingerprint(params, meta["data_hash"], f"{device.type}:{amp_dtype(device, cfg.amp)}")
    resume_path = root / checkpoint.RESUME_DIR / f"{fingerprint}.pt"
    saved = group.broadcast(checkpoint.load_resume(resume_path) if cfg.resume == "auto" and group.main else None)
    if saved is not None:
        state = checkpoint.restore(saved, model, optimizer, scheduler, scaler, aug_gen, device, group.rank)
        if group.main:
            print(f"train: resuming epoch {state.epoch + 1} after batch {state.batch} from {resume_path}", file=sys.stderr)
    else:
        state = checkpoint.Progress()
        if group.main:
            for stale in (out_dir / "best.pt", out_dir / "last.pt"):
                stale.unlink(missing_ok=True)
    t = Training(cfg, model, net, group, optimizer, scheduler, scaler, aug_gen, device, train_set, dev_set,
                 dev_set.references(), train_idx, state, out_dir, resume_path)
    return t, meta, infeasible


def train(params: Params, data_dir: str | Path = "data/processed", out_dir: str | Path = "models",
          metrics_dir: str | Path = "metrics", root: str | Path = ".", progress: bool = True) -> tuple[TrainSummary, str]:
    """Train (resuming an interrupted run with the same params); rank 0's summary and MLflow run id.
    Under DDP every rank calls this; rank 0 logs and writes, the others `follow`."""
    data_dir, out_dir, metrics_dir, root = Path(data_dir), Path(out_dir), Path(metrics_dir), Path(root)
    t, meta, infeasible = setup(params, data_dir, out_dir, root)
    try:
        if not t.group.main:
            return follow(t, infeasible)
        return lead(t, params, meta, infeasible, data_dir, out_dir, metrics_dir, root, progress)
    finally:
        t.group.close()


def follow(t: Training, infeasible: dict) -> tuple[TrainSummary, str]:
    """A DDP rank other than 0: the same epochs on its shares, nothing logged or written."""
    t.state.run_id = t.group.broadcast(None)
    with StopSignals() as stop:
        for epoch in range(t.state.epoch, t.cfg.epochs):
            run_epoch(t, epoch, None, stop, progress=False)
    return summarize(t.state.history, models.parameter_count(t.model), infeasible), t.state.run_id


def lead(t: Training, params: Params, meta: dict, infeasible: dict, data_dir: Path, out_dir: Path,
         metrics_dir: Path, root: Path, progress: bool) -> tuple[TrainSummary, str]:
    """Rank 0 (the only process without DDP): the training, its MLflow run and its files."""
    device, state = t.device, t.state
    logged = {k: v for k, v in flatten(params).items() if k.split(".")[0] in TRACKED_SECTIONS}
    tags = {**tracking.provenance_tags(root, meta["data_hash"], str(device), device_name(device)),
            "parameter_count": models.parameter_count(t.model), "amp_dtype": str(amp_dtype(device, t.cfg.amp)),
            "world_size": t.group.world, **{f"infeasible_{k}": v for k, v in infeasible.items()}}
    if params.study.name:
        tags.update({"study": params.study.name, "variant": params.study.variant, "seed": t.cfg.seed})
    name, parent = run_identity(params)
    with StopSignals() as stop, tracking.training_run(params.tracking.uri, params.tracking.experiment, root,
                                                        state.run_id, logged, tags, name, parent) as run:
        if state.run_id is None:
            run.log_data(data_input(params, meta, data_dir))
        state.run_id = t.group.broadcast(run.run_id)
        try:
            for epoch in range(state.epoch, t.cfg.epochs):
                run_epoch(t, epoch, run, stop, progress)
        except TrainingInterrupted:
            run.end("KILLED")
            raise
        summary = summarize(state.history, models.parameter_count(t.model), infeasible)
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
