"""Training checkpoints: what one holds, writing it (serialised once, written atomically), and
resuming an interrupted training from it.

Every checkpoint carries the model spec and weights, optimizer, scheduler, grad scaler, RNG states
(torch, CUDA, augmentation; each DDP rank's), epoch, history and best metric; a mid-epoch one also the batches of the
epoch already done and the loss summed over them. At an epoch's end it goes to models/last.pt, to
models/best.pt when the dev distance improved, and to .ctclab/resume/<fingerprint>.pt — outside
DVC's outs, so the stage stays in DVC's run cache — with the MLflow run id beside it in
<fingerprint>.json. Mid-epoch (every train.checkpoint_minutes, and on SIGINT/SIGTERM) only the
resume slot is written. A train stage with the same model/train params, data, device and AMP dtype
that finds it resumes, at the batch where it stopped. On the CPU a resumed run is bit-identical to
an uninterrupted one; on CUDA it is not (cuDNN's LSTM dropout draws from its own RNG state, which
is not saved).
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import pickle
import re
import sys
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import storage
from .config import Params, flatten
from .errors import CtclabError

RESUME_DIR = Path(".ctclab") / "resume"


# Keys that cannot change a training's result: a run resumes across a change of these.
RUNTIME_ONLY = {"train.resume", "train.loader_workers", "train.checkpoint_minutes", "train.distributed.rdzv_endpoint"}


def fingerprint(params: Params, data_hash: str, runtime: str) -> str:
    """Identity of a training: its model and train params, the data it reads, and where and in
    which precision it runs (`runtime`, e.g. "cuda:bfloat16"), so that a CPU run never resumes
    on CUDA or an fp16 run from a bf16 one."""
    keys = {k: v for k, v in flatten(params).items() if k.split(".")[0] in ("model", "train") and k not in RUNTIME_ONLY}
    blob = json.dumps(keys, sort_keys=True, default=str) + data_hash + runtime
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Progress:
    """Where a training stands: the epochs done, the best dev distance, the per-epoch rows, and
    within the next epoch the batches done and their summed loss and utterance count."""
    epoch: int = 0
    best: float = math.inf
    history: list[dict] = field(default_factory=list)
    run_id: str | None = None
    batch: int = 0
    loss_sum: float = 0.0
    seen: int = 0
    unsent: list = field(default_factory=list)  # (metrics, step) a lost tracking server has not taken yet


def rng_states(aug_gen: torch.Generator, device: torch.device) -> dict:
    return {"torch": torch.get_rng_state(), "augment": aug_gen.get_state(),
            "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None}


def state(model, optimizer, scheduler, scaler, rngs: list[dict], progress: Progress) -> dict:
    """`rngs`: each rank's RNG states (one entry without DDP)."""
    return {"model_spec": model.spec(), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": scaler.state_dict(), "epoch": progress.epoch, "history": progress.history,
            "best": progress.best, "batch": progress.batch, "loss_sum": progress.loss_sum, "seen": progress.seen,
            "unsent": progress.unsent, "rng": rngs[0], "rng_ranks": rngs}


def write_epoch(ckpt: dict, out_dir: Path, resume_path: Path, improved: bool, run_id: str) -> None:
    """One serialisation, written to last.pt, best.pt (if improved) and the resume slot."""
    data = _serialise(ckpt)
    _write(out_dir / "last.pt", data)
    if improved:
        _write(out_dir / "best.pt", data)
    write_resume(ckpt, resume_path, run_id, data)


def write_resume(ckpt: dict, resume_path: Path, run_id: str, data: bytes | None = None) -> None:
    """The resume slot alone (mid-epoch)."""
    data = _serialise(ckpt) if data is None else data
    _write(resume_path.with_suffix(".json"), json.dumps({"mlflow_run_id": run_id, "epoch": ckpt["epoch"],
                                                         "batch": ckpt["batch"]}).encode())
    _write(resume_path, data)


def _serialise(ckpt: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    return buf.getvalue()


def _write(path: Path, data: bytes) -> None:
    """Atomic (temp file + rename): a failed write leaves the previous file as it was."""
    try:
        storage.write_bytes(path, data)
    except OSError as err:
        raise CtclabError(f"{path}: could not write the checkpoint ({err.strerror or err}); the previous "
                          f"{path.name} is intact") from None


def read(path: str | Path, fix: str) -> dict:
    """A checkpoint, loaded without running code: torch.load(weights_only=True) takes tensors and
    plain data only, so a file from a team remote that carries a pickled object is refused before
    anything in it runs. Missing, cut short, garbage or not a checkpoint: CtclabError, one line
    naming the file and `fix` (e.g. "re-create it with `dvc repro -f train`")."""
    path = Path(path)
    if not path.is_file():
        raise CtclabError(f"{path}: no checkpoint; {fix}")
    try:
        with warnings.catch_warnings():  # torch's note on an unusual pickle protocol: garbage gets its own line below
            warnings.simplefilter("ignore")
            saved = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        blocked = _blocked_global(err)
        if blocked:
            raise CtclabError(f"{path}: refused, it would run or build Python objects ({blocked}), not only "
                              f"tensors and plain data; ctclab loads checkpoints without running code; {fix}") from None
        raise CtclabError(f"{path}: not a readable checkpoint (garbage: not torch.save's format); {fix}") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        raise CtclabError(f"{path}: not a readable checkpoint (cut short or corrupt: {_first_line(err)}); {fix}") from None
    except Exception:  # the unpickler fed garbage fails in its own ways (IndexError, KeyError, …)
        raise CtclabError(f"{path}: not a readable checkpoint (garbage: not torch.save's format); {fix}") from None
    if not isinstance(saved, dict) or not {"model_spec", "model"} <= set(saved):
        raise CtclabError(f"{path}: not a ctclab checkpoint (no model_spec and model weights); {fix}")
    return saved


def _first_line(err: BaseException) -> str:
    line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return line.split(". ")[0][:120]


def _blocked_global(err: pickle.UnpicklingError) -> str | None:
    """The object torch's weights-only unpickler refused to import (e.g. `GLOBAL posix.system`), if
    that is why it stopped; None when the bytes are simply not a pickle it can read."""
    found = re.search(r"(?:unsupported GLOBAL|Unsupported global: GLOBAL) ([\w.]+)", str(err))
    return f"GLOBAL {found.group(1)}" if found else None


def load_resume(resume_path: Path) -> dict | None:
    """An interrupted training's saved state with its MLflow run id, or None if there is none. A
    slot that cannot be read (cut short, garbage, refused) is set aside as <name>.corrupt with a
    one-line warning, and training starts afresh: the slot only ever saves time."""
    run_file = resume_path.with_suffix(".json")
    if not (resume_path.is_file() and run_file.is_file()):
        return None
    try:
        saved = read(resume_path, "")
        run_id = json.loads(run_file.read_text())["mlflow_run_id"]
    except (CtclabError, ValueError, KeyError, TypeError) as err:
        for f in (resume_path, run_file):
            f.replace(f.with_name(f.name + ".corrupt"))
        reason = str(err).removeprefix(f"{resume_path}: ").removesuffix("; ") if isinstance(err, CtclabError) else \
            f"{run_file.name} unreadable: {_first_line(err) or type(err).__name__}"
        print(f"ctclab: warning: resume checkpoint {resume_path} set aside as {resume_path.name}.corrupt "
              f"({reason}); training starts from epoch 1", file=sys.stderr)
        return None
    return {**saved, "run_id": run_id}


def restore(saved: dict, model, optimizer, scheduler, scaler, aug_gen: torch.Generator, device: torch.device,
            rank: int = 0) -> Progress:
    """Load a saved state into the given objects; each DDP rank takes its own RNG states."""
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(saved["scheduler"])
    scaler.load_state_dict(saved["scaler"])
    rng = saved.get("rng_ranks", [saved["rng"]])[rank]
    torch.set_rng_state(rng["torch"])
    aug_gen.set_state(rng["augment"])
    if device.type == "cuda" and rng.get("cuda") is not None:
        torch.cuda.set_rng_state(rng["cuda"])
    return Progress(saved["epoch"], saved["best"], saved["history"], saved["run_id"], saved.get("batch", 0),
                    saved.get("loss_sum", 0.0), saved.get("seen", 0), saved.get("unsent", []))


def clear(resume_path: Path) -> None:
    resume_path.unlink(missing_ok=True)
    resume_path.with_suffix(".json").unlink(missing_ok=True)
