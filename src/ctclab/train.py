"""CTC training on CUDA or CPU, tracked in MLflow, resumable from exact checkpoints.

    python pipeline/train.py        # or: dvc repro train

CUDA: autocast (bf16 where supported, else fp16 + grad scaler), packed sequences for cuDNN,
pinned memory. CPU: the unpacked BiLSTM path, deterministic algorithms, full seeding, so a rerun
(and a resumed run) is bit-identical. Batches group similar lengths; their order is seeded per
epoch. Checkpoints carry the model spec, weights, optimizer, scheduler, scaler, RNG state, epoch
and best metric, written atomically: models/best.pt (by dev greedy distance) and models/last.pt.
While training, .ctclab/resume/<fingerprint>.pt holds the last finished epoch; a train stage with
the same params and data that finds it continues from there, in the same MLflow run.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import models, storage, tracking
from .config import Params, flatten
from .data import Shard
from .decode import greedy
from .errors import CtclabError
from .metrics import score

RESUME_DIR = Path(".ctclab") / "resume"
TRACKED_SECTIONS = ("data", "features", "model", "train", "tracking")


def select_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise CtclabError("params.yaml: train.device = 'cuda', but no CUDA device is available; use auto or cpu")
    return torch.device("cuda" if choice in ("cuda", "auto") and torch.cuda.is_available() else "cpu")


def seed_everything(seed: int, device: torch.device) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    else:
        # Every bucketed batch has its own length, so autotuning per shape would cost more than it saves.
        torch.backends.cudnn.benchmark = False


def ctc_min_frames(labels: np.ndarray) -> int:
    """Fewest output frames CTC needs: one per label plus a blank between equal neighbours."""
    return int(len(labels) + np.sum(labels[1:] == labels[:-1])) if len(labels) else 0


def feasible(shard: Shard, model: models.CTCModel) -> np.ndarray:
    out = model.output_lengths(torch.as_tensor(shard.frames())).numpy()
    need = np.array([ctc_min_frames(shard.label(i)) for i in range(len(shard))])
    return out >= need


def bucket_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Similar lengths together (less padding), batch order shuffled; reproducible per (seed, epoch)."""
    rng = np.random.default_rng([seed, epoch])
    jitter = rng.uniform(0, 0.1 * max(1.0, float(np.median(lengths))), len(lengths))
    order = np.argsort(lengths + jitter, kind="stable")
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


@dataclass
class Batch:
    features: torch.Tensor  # [B, T, D]
    lengths: torch.Tensor   # [B]
    targets: torch.Tensor   # concatenated label indices
    target_lengths: torch.Tensor
    labels: list[list[int]]

    def to(self, device: torch.device) -> "Batch":
        pin = device.type == "cuda"
        move = (lambda t: t.pin_memory().to(device, non_blocking=True)) if pin else (lambda t: t.to(device))
        return Batch(move(self.features), move(self.lengths), move(self.targets), move(self.target_lengths), self.labels)


def collate(shard: Shard, indices) -> Batch:
    items = [shard.item(int(i)) for i in indices]
    lengths = torch.tensor([len(x) for x, _ in items])
    feats = torch.zeros(len(items), int(lengths.max()), shard.feature_dim)
    for k, (x, _) in enumerate(items):
        feats[k, : len(x)] = torch.as_tensor(np.array(x))
    labels = [y.tolist() for _, y in items]
    targets = torch.from_numpy(np.concatenate([y for _, y in items])) if items else torch.zeros(0, dtype=torch.long)
    return Batch(feats, lengths, targets.long(), torch.tensor([len(y) for y in labels]), labels)


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


def amp_dtype(device: torch.device) -> torch.dtype | None:
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@torch.no_grad()
def evaluate_split(model, shard: Shard, batch_size: int, device: torch.device, decoders: dict | None = None):
    """Loss over the utterances CTC can align, and each decoder's hypotheses for every utterance
    (in shard order). Returns (loss, {decoder name: hypotheses}, {decoder name: seconds})."""
    model.eval()
    decoders = decoders or {"greedy": greedy}
    ctc = nn.CTCLoss(blank=0, reduction="sum", zero_infinity=True)
    order = np.argsort(shard.frames(), kind="stable")
    hyps: dict[str, dict[int, list[int]]] = {name: {} for name in decoders}
    seconds = dict.fromkeys(decoders, 0.0)
    total_loss, total_utts = 0.0, 0
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = collate(shard, idx).to(device)
        with torch.autocast(device.type, dtype=amp_dtype(device), enabled=amp_dtype(device) is not None):
            log_probs, out_lengths = model(batch.features, batch.lengths)
        if batch.targets.numel():
            ok = out_lengths >= batch.target_lengths
            loss = ctc(log_probs.transpose(0, 1), batch.targets, out_lengths, batch.target_lengths)
            total_loss, total_utts = total_loss + float(loss), total_utts + int(ok.sum())
        for name, decode in decoders.items():
            t0 = time.perf_counter()
            hyps[name].update(zip(idx.tolist(), decode(log_probs, out_lengths)))
            seconds[name] += time.perf_counter() - t0
    ordered = {name: [h[i] for i in range(len(shard))] for name, h in hyps.items()}
    return total_loss / max(1, total_utts), ordered, seconds


def fingerprint(params: Params, data_hash: str) -> str:
    blob = json.dumps({k: v for k, v in flatten(params).items() if k.split(".")[0] in ("model", "train")},
                      sort_keys=True, default=str) + data_hash
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _save(path: Path, obj: dict) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    storage.write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CtclabError(f"{path}: no checkpoint; run the train stage first (dvc repro train)")
    return torch.load(path, map_location="cpu", weights_only=False)


def load_model(path: str | Path, device: torch.device | str = "cpu") -> models.CTCModel:
    ckpt = load_checkpoint(path)
    model = models.from_spec(ckpt["model_spec"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()


def _make_scheduler(opt, cfg, steps_per_epoch: int):
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch)
    if cfg.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=1)
    return None


def train(params: Params, data_dir: str | Path = "data/processed", out_dir: str | Path = "models",
          metrics_dir: str | Path = "metrics", root: str | Path = ".", progress: bool = True) -> dict:
    from tqdm import tqdm

    import mlflow

    cfg, data_dir, out_dir, metrics_dir, root = params.train, Path(data_dir), Path(out_dir), Path(metrics_dir), Path(root)
    meta_path = data_dir / "meta.json"
    if not meta_path.is_file():
        raise CtclabError(f"{meta_path}: missing; run the preprocess stage first (dvc repro preprocess)")
    meta = json.loads(meta_path.read_text())
    device = select_device(cfg.device)
    seed_everything(cfg.seed, device)
    train_set, dev_set = Shard(data_dir / "train"), Shard(data_dir / "dev")
    model = models.build(params.model, train_set.feature_dim).to(device)
    ok_train, ok_dev = feasible(train_set, model), feasible(dev_set, model)
    train_idx = np.flatnonzero(ok_train)
    if len(train_idx) == 0:
        raise CtclabError(f"{data_dir / 'train'}: no utterance has enough frames for CTC after ×{model.downsample} "
                          "downsampling; lower model.stride")
    infeasible = {"train": int((~ok_train).sum()), "dev": int((~ok_dev).sum())}
    if any(infeasible.values()):
        print(f"train: {infeasible['train']} train / {infeasible['dev']} dev utterances have too few frames for "
              f"their labels after ×{model.downsample} downsampling; train leaves them out, dev scores them",
              file=sys.stderr)

    opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    optimizer = opt_cls(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train_idx) / cfg.batch_size)
    scheduler = _make_scheduler(optimizer, cfg, steps_per_epoch)
    dtype = amp_dtype(device)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    ctc = nn.CTCLoss(blank=0, reduction="mean", zero_infinity=False)
    aug_gen = torch.Generator().manual_seed(cfg.seed)

    fp = fingerprint(params, meta["data_hash"])
    resume_path = root / RESUME_DIR / f"{fp}.pt"
    start_epoch, best, history, run_id = 0, math.inf, [], None
    if cfg.resume == "auto" and resume_path.is_file():
        state = torch.load(resume_path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        aug_gen.set_state(state["rng"]["augment"])
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"])
        start_epoch, best, history, run_id = state["epoch"], state["best"], state["history"], state["mlflow_run_id"]
        print(f"train: resuming after epoch {start_epoch} from {resume_path}", file=sys.stderr)
    else:
        for stale in (out_dir / "best.pt", out_dir / "last.pt"):
            stale.unlink(missing_ok=True)

    run = tracking.start_run(params.tracking.uri, params.tracking.experiment, root, run_id)
    with run:
        run_id = run.info.run_id
        if start_epoch == 0:
            mlflow.log_params({k: v for k, v in flatten(params).items() if k.split(".")[0] in TRACKED_SECTIONS})
            mlflow.set_tags({**tracking.provenance_tags(root, meta["data_hash"], str(device)),
                             "parameter_count": str(models.parameter_count(model)),
                             "infeasible_train": str(infeasible["train"]), "infeasible_dev": str(infeasible["dev"])})
            mlflow.log_text(tracking.pip_freeze(), "environment/pip-freeze.txt")
        refs = dev_set.references()
        for epoch in range(start_epoch, cfg.epochs):
            model.train()
            t0, seen, loss_sum = time.perf_counter(), 0, 0.0
            batches = bucket_batches(train_set.frames()[train_idx], cfg.batch_size, cfg.seed, epoch)
            bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", disable=not progress,
                       file=sys.stderr, leave=False,
                       mininterval=1 if sys.stderr.isatty() else 30)
            for b in bar:
                batch = collate(train_set, train_idx[b])
                batch.features = spec_augment(batch.features, batch.lengths, cfg.specaugment, aug_gen)
                batch = batch.to(device)
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    log_probs, out_lengths = model(batch.features, batch.lengths)
                loss = ctc(log_probs.transpose(0, 1), batch.targets, out_lengths, batch.target_lengths)
                if not torch.isfinite(loss):
                    raise RuntimeError(f"non-finite CTC loss at epoch {epoch + 1}; lower train.lr")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                if cfg.scheduler == "cosine":
                    scheduler.step()
                seen += len(b)
                loss_sum += loss.item() * len(b)
                bar.set_postfix(loss=f"{loss.item():.3f}", utt_s=f"{seen / (time.perf_counter() - t0):.0f}")
            train_seconds = time.perf_counter() - t0
            dev_loss, hyps, _ = evaluate_split(model, dev_set, 2 * cfg.batch_size, device)
            s = score(hyps["greedy"], refs)
            if cfg.scheduler == "plateau":
                scheduler.step(s.mean_distance)
            row = {"epoch": epoch + 1, "train_loss": round(loss_sum / seen, 6), "dev_loss": round(dev_loss, 6),
                   "dev_lev_greedy": round(s.mean_distance, 6), "dev_per": round(s.per, 6),
                   "lr": optimizer.param_groups[0]["lr"]}
            history.append(row)
            timing = {"epoch_seconds": time.perf_counter() - t0, "utterances_per_second": seen / train_seconds}
            mlflow.log_metrics({**{k: v for k, v in row.items() if k != "epoch"}, **timing}, step=epoch + 1)
            print(f"epoch {epoch + 1}/{cfg.epochs}: train loss {row['train_loss']:.3f}, dev loss {dev_loss:.3f}, "
                  f"dev greedy distance {s.mean_distance:.3f}, PER {s.per:.1%} ({timing['epoch_seconds']:.0f} s)",
                  file=sys.stderr)
            ckpt = {"model_spec": model.spec(), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "scaler": scaler.state_dict(), "epoch": epoch + 1, "history": history,
                    "rng": {"torch": torch.get_rng_state(), "augment": aug_gen.get_state(),
                            "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None}}
            improved = s.mean_distance < best
            best = min(best, s.mean_distance)
            ckpt["best"] = best
            _save(out_dir / "last.pt", ckpt)
            if improved:
                _save(out_dir / "best.pt", ckpt)
            _save(resume_path, {**ckpt, "mlflow_run_id": run_id})

        best_row = min(history, key=lambda r: r["dev_lev_greedy"])
        summary = {"epochs": cfg.epochs, "best_epoch": best_row["epoch"], "dev_lev_greedy": best_row["dev_lev_greedy"],
                   "dev_per": best_row["dev_per"], "dev_loss": best_row["dev_loss"],
                   "final_train_loss": history[-1]["train_loss"], "parameters": models.parameter_count(model),
                   "infeasible_train": infeasible["train"], "infeasible_dev": infeasible["dev"]}
        storage.write_json(metrics_dir / "train.json", summary)
        storage.write_text(metrics_dir / "train_history.csv",
                           ",".join(history[0]) + "\n" + "".join(",".join(str(r[k]) for k in r) + "\n" for r in history))
        storage.write_json(out_dir / "mlflow_run.json", {"run_id": run_id, "tracking_uri": mlflow.get_tracking_uri()})
        mlflow.log_metrics({"best_dev_lev_greedy": best_row["dev_lev_greedy"], "best_epoch": best_row["epoch"]})
        mlflow.log_artifact(str(out_dir / "best.pt"), "checkpoints")
        mlflow.log_artifact(str(out_dir / "last.pt"), "checkpoints")
    resume_path.unlink(missing_ok=True)
    return {**summary, "mlflow_run_id": run_id}
