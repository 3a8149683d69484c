"""Running a trained model: device and AMP choice, checkpoint → model, and one pass over a split
that gives the CTC loss and each decoder's hypotheses. Used by training (per-epoch dev scores),
evaluate, submit and the benchmarks; it knows nothing of optimisers or tracking.
"""
from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import checkpoint, models
from .batching import collate, ctc_min_frames
from .data import Shard
from .config import DecodeConfig
from .decode import greedy, registered
from .errors import CtclabError
from .results import EPOCH_DECODER


def select_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise CtclabError("params.yaml: train.device = 'cuda', but no CUDA device is available; use auto or cpu")
    return torch.device("cuda" if choice in ("cuda", "auto") and torch.cuda.is_available() else "cpu")


def device_name(device: torch.device) -> str:
    import platform

    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()


def amp_dtype(device: torch.device, choice: str = "auto") -> torch.dtype | None:
    """Autocast dtype: none on the CPU or with `off`; `auto` = bf16 where supported, else fp16."""
    if device.type != "cuda" or choice == "off":
        return None
    if choice == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[choice]


REMAKE = "re-create it with `dvc repro -f train` (or `dvc checkout models` if the train stage's outs are cached)"


def load_checkpoint(path: str | Path) -> dict:
    return checkpoint.read(path, REMAKE)


def load_model(path: str | Path, device: torch.device | str = "cpu") -> models.CTCModel:
    return model_from(load_checkpoint(path), path, REMAKE).to(device).eval()


def model_from(saved: dict, path: str | Path, fix: str) -> models.CTCModel:
    """The model a checkpoint's spec and weights make; one line naming `path` and `fix` if they don't."""
    try:
        model = models.from_spec(saved["model_spec"])
        model.load_state_dict(saved["model"])
    except CtclabError as err:
        raise CtclabError(f"{path}: {err}; {fix}") from None
    except (KeyError, RuntimeError, TypeError, AttributeError, ValueError) as err:
        raise CtclabError(f"{path}: its model spec or weights do not make a model ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:160]}); {fix}") from None
    return model.eval()


@torch.no_grad()
def evaluate_split(model, shard: Shard, batch_size: int, device: torch.device, decoders: dict | None = None,
                   amp: str = "auto"):
    """Mean CTC loss over the utterances CTC can align (the others are scored by the decoders
    but left out of the loss), and each decoder's hypotheses for every utterance (in shard
    order). Returns (loss, {decoder name: hypotheses}, {decoder name: seconds})."""
    model.eval()
    decoders = decoders or {EPOCH_DECODER: greedy}
    ctc = nn.CTCLoss(blank=0, reduction="sum", zero_infinity=True)
    dtype = amp_dtype(device, amp)
    order = np.argsort(shard.frames(), kind="stable")
    hyps: dict[str, dict[int, list[int]]] = {name: {} for name in decoders}
    seconds = dict.fromkeys(decoders, 0.0)
    total_loss, total_utts = 0.0, 0
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = collate(shard, idx).to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            log_probs, out_lengths = model(batch.features, batch.lengths)
        if batch.targets.numel():
            ok = out_lengths >= torch.tensor([ctc_min_frames(np.array(y)) for y in batch.labels])
            loss = ctc(log_probs.transpose(0, 1), batch.targets, out_lengths, batch.target_lengths)
            total_loss, total_utts = total_loss + float(loss), total_utts + int(ok.sum())
        for name, decode in decoders.items():
            t0 = time.perf_counter()
            hyps[name].update(zip(idx.tolist(), decode(log_probs, out_lengths)))
            seconds[name] += time.perf_counter() - t0
    ordered = {name: [h[i] for i in range(len(shard))] for name, h in hyps.items()}
    return total_loss / max(1, total_utts), ordered, seconds


def decode_split(checkpoint_path: Path, shard: Shard, cfg: DecodeConfig, decoders: list[str]):
    """A checkpoint over a split with these registered decoders: (loss, hypotheses, seconds)."""
    device = select_device("auto")
    return decode_shard(load_model(checkpoint_path, device), shard, cfg, decoders, device)


def decode_shard(model, shard: Shard, cfg: DecodeConfig, decoders: list[str], device: torch.device | None = None):
    device = device or select_device("auto")
    known = registered()
    with ExitStack() as opened:
        fns = {name: opened.enter_context(known[name].open(cfg)) for name in decoders}
        return evaluate_split(model.to(device).eval(), shard, 64, device, fns)
