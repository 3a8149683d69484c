"""Training speed of A3 at the write-up's size on data shaped like HW3P2's train-clean-100.

    python bench/train_speed.py --device cuda                       # 28,539 utterances, batch 64
    python bench/train_speed.py --device cuda --batch-size 256
    python bench/train_speed.py --device cpu --utterances 64 --epochs 1
    python bench/train_speed.py --device cuda --compile              # train.compile: true
    python bench/train_speed.py --device cuda --batch-size 256 --stride 4   # half the LSTM steps

The data are random features with train-clean-100's shape: 28,539 utterances, ~N(1270, 370)
frames clipped to [150, 2450] (mean ~12.7 s at 10 ms), ~1 label per 8.5 frames, 13 dims — nothing
to download. The model is the write-up's A3 (Conv1d stride 2 + BN + GELU + ConvNeXt block →
4-layer BiLSTM(256), dropout 0.4 → MLP), Adam 2e-3, CTC, length-bucketed batches as in training,
bf16 autocast on CUDA with the LSTM in fp32 (as ctclab.models runs it). Batches are generated on
the device, so the figures are the model's step time; `data s` is the host time spent making the
batch descriptions; `fwd+bwd s` the time inside forward, CTC loss and backward (CUDA events on the
GPU's timeline, the clock on the CPU) and `other` the share of the epoch outside them (batch
making, grad clip, Adam step, launch gaps). Prints epoch seconds, utterances/s, padding fraction,
peak memory and the AMP dtype; the last line is `train_speed: <utt/s>x ...` relative to the 15 s/epoch
goal on CUDA.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ctclab.batching import bucket_batches
from ctclab.config import load_params, with_overrides
from ctclab.inference import amp_dtype, device_name, select_device
from ctclab.models import build, parameter_count

REPO = Path(__file__).resolve().parents[1]
SEED_A3 = {"model.arch": "conv_lstm", "model.conv_lstm.hidden": 256, "model.conv_lstm.lstm_layers": 4,
           "model.conv_lstm.embed_dim": 256, "model.conv_lstm.stride": 2, "model.conv_lstm.convnext_blocks": 1,
           "model.conv_lstm.dropout.lstm": 0.4}


def shapes(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    frames = np.clip(rng.normal(1270, 370, n), 150, 2450).astype(np.int64)
    labels = np.maximum(1, (frames / 8.5 * rng.uniform(0.85, 1.15, n))).astype(np.int64)
    return frames, labels


class Stopwatch:
    """Time inside forward + CTC loss + backward: CUDA events on the GPU's timeline (read once, at the
    epoch's end, so no step waits for them), the clock on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda, self.events, self.cpu_s = device.type == "cuda", [], 0.0

    def __enter__(self):
        if self.cuda:
            self.events.append(torch.cuda.Event(enable_timing=True))
            self.events[-1].record()
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        if self.cuda:
            self.events.append(torch.cuda.Event(enable_timing=True))
            self.events[-1].record()
        self.cpu_s += time.perf_counter() - self.t0

    def seconds(self) -> float:
        if not self.cuda:
            return self.cpu_s
        torch.cuda.synchronize()
        return sum(a.elapsed_time(b) for a, b in zip(self.events[::2], self.events[1::2])) / 1000


def run_epoch(model, optimizer, batches, frames, labels, device, dtype, dim, gen):
    ctc, model_time = nn.CTCLoss(blank=0), Stopwatch(device)
    data_s, padded, real = 0.0, 0, 0
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    for idx in batches:
        t0 = time.perf_counter()
        lengths = torch.from_numpy(frames[idx])
        target_lengths = torch.from_numpy(labels[idx])
        T = int(lengths.max())
        padded, real = padded + T * len(idx), real + int(lengths.sum())
        data_s += time.perf_counter() - t0
        x = torch.randn(len(idx), T, dim, device=device, generator=gen)
        targets = torch.randint(1, 41, (int(target_lengths.sum()),), device=device, generator=gen)
        optimizer.zero_grad(set_to_none=True)
        with model_time:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                log_probs, out_lengths = model(x, lengths)
            loss = ctc(log_probs.transpose(0, 1), targets, out_lengths, target_lengths)
            loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        loss_sum += loss.detach().double()
    final = loss_sum.item()  # the one wait for the device per epoch
    return data_s, model_time.seconds(), 1 - real / max(1, padded), final / max(1, len(batches))


def lstm_under_autocast() -> None:
    """What ctclab.models avoids, for comparison: cuDNN's LSTM fed by autocast."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    from ctclab import models

    def forward(self, x, lengths):
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(packed)
        return pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])[0]

    models.BiLSTM.forward = forward


def profile(model, optimizer, batches, frames, labels, device, dtype, gen) -> None:
    """Where a step's time goes: the ten most expensive ops (self time on the device, or the CPU)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        run_epoch(model, optimizer, batches, frames, labels, device, dtype, 13, gen)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=10, max_name_column_width=45))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--utterances", type=int, default=28539)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=5, help="batches run before timing (cuDNN plans, allocator)")
    ap.add_argument("--profile", type=int, default=0, help="also profile this many batches: top kernels by time")
    ap.add_argument("--compile", action="store_true", help="train.compile: torch.compile the non-recurrent parts")
    ap.add_argument("--stride", type=int, choices=[2, 4], default=2,
                    help="model.conv_lstm.stride: 4 halves the LSTM's sequential steps (the write-up's A3 has 2)")
    ap.add_argument("--lstm-autocast", action="store_true",
                    help="run the LSTM under autocast as PyTorch would (cuDNN in reduced precision) instead of ctclab's fp32")
    args = ap.parse_args()
    device = select_device(args.device)
    if args.lstm_autocast:
        lstm_under_autocast()
    params = with_overrides(load_params(REPO / "params.yaml"), {**SEED_A3, "model.conv_lstm.stride": args.stride}, "train_speed")
    torch.manual_seed(0)
    model = build(params.model, 13).to(device).train()
    if args.compile:
        model.compile_parts()  # compiled during the warmup batches
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    dtype, gen = amp_dtype(device), torch.Generator(device=device).manual_seed(0)
    frames, labels = shapes(args.utterances)
    run_epoch(model, optimizer, bucket_batches(frames, args.batch_size, 0, 99)[:args.warmup], frames, labels,
              device, dtype, 13, gen)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    print(f"A3 {parameter_count(model) / 1e6:.2f} M params on {device_name(device)}; {args.utterances} utterances, "
          f"mean {frames.mean():.0f} frames, {labels.mean():.0f} labels; batch {args.batch_size}; amp {dtype}; "
          f"LSTM {'under autocast' if args.lstm_autocast else 'in fp32'}; {'compiled' if args.compile else 'eager'}; "
          f"stride {args.stride}")
    print(f"{'epoch':>5}{'seconds':>9}{'utt/s':>9}{'data s':>8}{'fwd+bwd s':>11}{'other':>7}{'padding':>9}"
          f"{'loss':>9}{'peak GiB':>10}")
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        batches = bucket_batches(frames, args.batch_size, 0, epoch)
        data_s, model_s, pad, loss = run_epoch(model, optimizer, batches, frames, labels, device, dtype, 13, gen)
        secs = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        print(f"{epoch + 1:>5}{secs:>9.1f}{args.utterances / secs:>9.0f}{data_s:>8.2f}{model_s:>11.1f}"
              f"{1 - model_s / secs:>7.1%}{pad:>9.1%}{loss:>9.2f}{peak:>10.2f}")
    if args.profile:
        profile(model, optimizer, bucket_batches(frames, args.batch_size, 0, 98)[:args.profile], frames, labels,
                device, dtype, gen)
    print(f"train_speed: {15.0 / secs * args.utterances / 28539:.2f}x (goal >= 1.0x: a 28,539-utterance epoch in "
          f"<= 15 s; batch {args.batch_size}, {device_name(device)})")


if __name__ == "__main__":
    main()
