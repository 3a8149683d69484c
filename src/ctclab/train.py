"""CTC training on CUDA or CPU, tracked in MLflow, resumable from exact checkpoints.

    python pipeline/train.py        # or: dvc repro train

CUDA: autocast (bf16 where supported, else fp16 + grad scaler), packed sequences for cuDNN,
pinned memory. CPU: the unpacked BiLSTM path, deterministic algorithms, full seeding, so a rerun
(and a resumed run) is bit-identical. Batches group similar lengths; their order is seeded per
epoch. Checkpoints (see ctclab.checkpoint): models/best.pt (by dev greedy distance),
models/last.pt, and a resume slot that an interrupted train stage continues from.
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import checkpoint, models, storage, tracking
from .batching import bucket_batches, feasible, loader
from .config import Params, TrainConfig, flatten
from .data import Shard
from .errors import CtclabError
from .inference import amp_dtype, device_name, evaluate_split, load_model, select_device
from .metrics import score

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
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch)
    if cfg.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=1)
    return None


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


def train_epoch(model, train_set: Shard, batches, optimizer, scheduler, scaler, cfg: TrainConfig,
                aug_gen: torch.Generator, device: torch.device, desc: str, progress: bool) -> tuple[float, int]:
    """One pass over `batches`; returns (mean train loss per utterance, utterances seen). The
    loss is summed on the device (in float64) and read back every SYNC_EVERY steps on CUDA."""
    from tqdm import tqdm

    model.train()
    dtype = amp_dtype(device, cfg.amp)
    ctc = nn.CTCLoss(blank=0, reduction="mean", zero_infinity=False)
    sync_every = 1 if device.type == "cpu" else SYNC_EVERY
    t0, seen, loss_sum = time.perf_counter(), 0, torch.zeros((), dtype=torch.float64, device=device)
    bar = tqdm(loader(train_set, batches, cfg.loader_workers, device), total=len(batches), desc=desc, unit="batch",
               disable=not progress, file=sys.stderr, leave=False, mininterval=1 if sys.stderr.isatty() else 30)
    for step, batch in enumerate(bar, 1):
        batch.features = spec_augment(batch.features, batch.lengths, cfg.specaugment, aug_gen)
        batch = batch.to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            log_probs, out_lengths = model(batch.features, batch.lengths)
        # CTC in float32 whatever autocast chose: log_probs leave the model as float32
        loss = ctc(log_probs.transpose(0, 1), batch.targets, out_lengths, batch.target_lengths)
        loss_sum += loss.detach().double() * len(batch.labels)
        seen += len(batch.labels)
        if step % sync_every == 0 or step == len(batches):
            total = loss_sum.item()
            if not math.isfinite(total):
                raise RuntimeError(f"non-finite CTC loss in {desc} by batch {step}; lower train.lr")
            # refresh=False: in a log (not a terminal) the bar then writes at most every mininterval
            bar.set_postfix(loss=f"{total / seen:.3f}", utt_s=f"{seen / (time.perf_counter() - t0):.0f}", refresh=False)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        if cfg.scheduler == "cosine":
            scheduler.step()
    return loss_sum.item() / seen, seen


def summarize(history: list[dict], parameters: int, infeasible: dict) -> dict:
    """metrics/train.json: the best epoch's dev scores and what the training was."""
    best = min(history, key=lambda r: r["dev_lev_greedy"])
    return {"epochs": len(history), "best_epoch": best["epoch"], "dev_lev_greedy": best["dev_lev_greedy"],
            "dev_per": best["dev_per"], "dev_loss": best["dev_loss"], "final_train_loss": history[-1]["train_loss"],
            "parameters": parameters, "infeasible_train": infeasible["train"], "infeasible_dev": infeasible["dev"]}


def write_outputs(history: list[dict], summary: dict, run: tracking.RunLog, out_dir: Path, metrics_dir: Path,
                  meta: dict) -> None:
    storage.write_json(metrics_dir / "train.json", summary)
    storage.write_text(metrics_dir / "train_history.csv",
                       ",".join(history[0]) + "\n" + "".join(",".join(str(r[k]) for k in r) + "\n" for r in history))
    # evaluate and submit find this run by the checkpoint's bytes (no run id in DVC's outs)
    run.set_tags({"checkpoint_sha256": storage.sha256_file(out_dir / "best.pt")})
    run.log_metrics({"best_dev_lev_greedy": summary["dev_lev_greedy"], "best_epoch": summary["best_epoch"],
                     "train_seconds": tracking.train_seconds(run.run_id)})
    run.log_artifact(out_dir / "best.pt", "checkpoints")
    run.log_artifact(out_dir / "last.pt", "checkpoints")
    best = load_model(out_dir / "best.pt")
    recognizer = models.Recognizer(best, meta["normalize"], meta["global_stats"])
    run.log_model(recognizer, {"features": {"normalize": meta["normalize"]}, "best_epoch": summary["best_epoch"],
                               "data_hash": meta["data_hash"], "submission_format": meta["submission_format"]},
                  best.input_dim, best.num_classes)


def run_identity(params: Params) -> tuple[str, str]:
    """(run name, study parent run id): a study's training is `<variant>-s<seed>` under the study's
    parent; any other run takes its DVC experiment's name, else `<arch>-h<hidden>-s<seed>`."""
    study, seed = params.study, params.train.seed
    if study.name and study.parent_run_id:
        return f"{study.variant}-s{seed}", study.parent_run_id
    return os.environ.get("DVC_EXP_NAME") or f"{params.model.arch}-h{params.model.hidden}-s{seed}", ""


def data_input(params: Params, meta: dict, data_dir: Path) -> tracking.DataInput:
    d = params.data
    name = {"synthetic": "ctclab-synthetic", "kaggle": d.competition}.get(d.source) or Path(d.path).name
    profile = {k: meta[k] for k in ("layout", "feature_dim", "utterances", "frames", "normalize", "data_hash")}
    return tracking.DataInput(name, meta["data_hash"][:12], str(data_dir.resolve()), profile)


def train(params: Params, data_dir: str | Path = "data/processed", out_dir: str | Path = "models",
          metrics_dir: str | Path = "metrics", root: str | Path = ".", progress: bool = True) -> dict:
    cfg, data_dir, out_dir, metrics_dir, root = params.train, Path(data_dir), Path(out_dir), Path(metrics_dir), Path(root)
    meta = read_meta(data_dir)
    device = select_device(cfg.device)
    seed_everything(cfg.seed, device)
    train_set, dev_set = Shard(data_dir / "train"), Shard(data_dir / "dev")
    model = models.build(params.model, train_set.feature_dim).to(device)
    train_idx, infeasible = trainable(train_set, dev_set, model, data_dir)

    optimizer = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.optimizer](
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = make_scheduler(optimizer, cfg, math.ceil(len(train_idx) / cfg.batch_size))
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype(device, cfg.amp) == torch.float16)
    aug_gen = torch.Generator().manual_seed(cfg.seed)

    fingerprint = checkpoint.fingerprint(params, meta["data_hash"], f"{device.type}:{amp_dtype(device, cfg.amp)}")
    resume_path = root / checkpoint.RESUME_DIR / f"{fingerprint}.pt"
    state = checkpoint.resume(resume_path, model, optimizer, scheduler, scaler, aug_gen, device) if cfg.resume == "auto" else None
    if state is not None:
        print(f"train: resuming after epoch {state.epoch} from {resume_path}", file=sys.stderr)
    else:
        state = checkpoint.Progress()
        for stale in (out_dir / "best.pt", out_dir / "last.pt"):
            stale.unlink(missing_ok=True)

    logged = {k: v for k, v in flatten(params).items() if k.split(".")[0] in TRACKED_SECTIONS}
    tags = {**tracking.provenance_tags(root, meta["data_hash"], str(device), device_name(device)),
            "parameter_count": models.parameter_count(model), "amp_dtype": str(amp_dtype(device, cfg.amp)), **{f"infeasible_{k}": v for k, v in infeasible.items()}}
    if params.study.name:
        tags.update({"study": params.study.name, "variant": params.study.variant, "seed": cfg.seed})
    name, parent = run_identity(params)
    with tracking.training_run(params.tracking.uri, params.tracking.experiment, root, state.run_id, logged, tags,
                               name, parent) as run:
        if state.run_id is None:
            run.log_data(data_input(params, meta, data_dir))
        state.run_id = run.run_id
        refs = dev_set.references()
        for epoch in range(state.epoch, cfg.epochs):
            t0 = time.perf_counter()
            batches = bucket_batches(train_set.frames()[train_idx], cfg.batch_size, cfg.seed, epoch)
            train_loss, seen = train_epoch(model, train_set, [train_idx[b] for b in batches], optimizer, scheduler,
                                           scaler, cfg, aug_gen, device, f"epoch {epoch + 1}/{cfg.epochs}", progress)
            train_seconds = time.perf_counter() - t0
            dev_loss, hyps, _ = evaluate_split(model, dev_set, 2 * cfg.batch_size, device, amp=cfg.amp)
            s = score(hyps["greedy"], refs)
            if cfg.scheduler == "plateau":
                scheduler.step(s.mean_distance)
            row = {"epoch": epoch + 1, "train_loss": round(train_loss, 6), "dev_loss": round(dev_loss, 6),
                   "dev_lev_greedy": round(s.mean_distance, 6), "dev_per": round(s.per, 6),
                   "lr": optimizer.param_groups[0]["lr"]}
            timing = {"epoch_seconds": time.perf_counter() - t0, "utterances_per_second": seen / train_seconds}
            run.log_metrics({**{k: v for k, v in row.items() if k != "epoch"}, **timing}, step=epoch + 1)
            print(f"epoch {epoch + 1}/{cfg.epochs}: train loss {row['train_loss']:.3f}, dev loss {dev_loss:.3f}, "
                  f"dev greedy distance {s.mean_distance:.3f}, PER {s.per:.1%} ({timing['epoch_seconds']:.0f} s)",
                  file=sys.stderr)
            improved = s.mean_distance < state.best
            state.epoch, state.best = epoch + 1, min(state.best, s.mean_distance)
            state.history.append(row)
            ckpt = checkpoint.state(model, optimizer, scheduler, scaler, aug_gen, device, state)
            checkpoint.write_epoch(ckpt, out_dir, resume_path, improved, run.run_id)

        summary = summarize(state.history, models.parameter_count(model), infeasible)
        write_outputs(state.history, summary, run, out_dir, metrics_dir, meta)
    checkpoint.clear(resume_path)
    return {**summary, "mlflow_run_id": state.run_id}
