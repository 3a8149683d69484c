"""Training speed of ctclab's own Trainer (ctclab.trainer: the step and epoch `dvc repro` runs) with
A3 at the write-up's size, on a shard shaped like HW3P2's train-clean-100.

    python bench/train_speed.py --device cuda                       # 28,539 utterances, batch 64
    python bench/train_speed.py --device cuda --batch-size 256
    python bench/train_speed.py --device cpu --utterances 64 --epochs 1
    python bench/train_speed.py --device cuda --compile              # train.compile: true
    python bench/train_speed.py --device cuda --batch-size 256 --stride 4   # half the LSTM steps

The data are random features with train-clean-100's shape (bench/synthetic.py: 28,539
utterances, ~N(1270, 370) frames clipped to [150, 2450], ~1 label per 8.5 frames, 13 dims), written
once as a ctclab shard under --shards (1.9 GB at full size) and read through the product's
DataLoader. The model is the write-up's A3 (Conv1d stride 2 + BN + GELU + ConvNeXt block →
4-layer BiLSTM(256), dropout 0.4 → MLP); everything else is params.yaml's train section (Adam
2e-3, length-bucketed batches, AMP as train.amp says, train.loader_workers), with the batch size,
device and compile switch from the flags. An epoch is `Trainer.epoch`; `step s` is the time inside
`Trainer.step` (SpecAugment, forward, CTC loss, backward, clip, Adam, scheduler: CUDA events on the
GPU's timeline, the clock on the CPU) and `other` the share of the epoch outside it (waiting for
the DataLoader, sync points, launch gaps). Prints epoch seconds, utterances/s, padding fraction,
peak memory and the AMP dtype; the last line is `train_speed: <ratio>x ...`, the 15 s/epoch goal
on CUDA over the measured time (scaled to 28,539 utterances).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ctclab.batching import bucket_batches
from ctclab.config import load_params, with_overrides
from ctclab.inference import device_name, select_device
from ctclab.models import build, parameter_count
from ctclab.train import seed_everything
from ctclab.trainer import Trainer

from synthetic import train_clean_100_lengths, write_shard  # bench/synthetic.py, next to this script

REPO = Path(__file__).resolve().parents[1]
SEED_A3 = {"model.arch": "conv_lstm", "model.conv_lstm.hidden": 256, "model.conv_lstm.lstm_layers": 4,
           "model.conv_lstm.embed_dim": 256, "model.conv_lstm.stride": 2, "model.conv_lstm.convnext_blocks": 1,
           "model.conv_lstm.dropout.lstm": 0.4}


class Stopwatch:
    """Time inside a block: CUDA events on the GPU's timeline (read once, at the epoch's end, so no
    step waits for them), the clock on the CPU."""

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


class TimedTrainer(Trainer):
    """The product's Trainer, its `step` inside a stopwatch (its `epoch` calls this step)."""

    def step(self, batch, per_rank=None):
        with self.watch:
            return super().step(batch, per_rank)

    def timed_epoch(self, shard, batches, desc: str) -> tuple[float, float, float]:
        """(epoch seconds, seconds inside step, mean loss) of one Trainer.epoch."""
        self.watch = Stopwatch(self.device)
        t0 = time.perf_counter()
        loss, _ = self.epoch(shard, batches, desc)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, self.watch.seconds(), loss


def lstm_under_autocast() -> None:
    """What ctclab.models avoids, for comparison: cuDNN's LSTM fed by autocast."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    from ctclab import models

    def forward(self, x, lengths):
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(packed)
        return pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])[0]

    models.BiLSTM.forward = forward


def profile(trainer: TimedTrainer, shard, batches) -> None:
    """Where a step's time goes: the ten most expensive ops (self time on the device, or the CPU)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    cuda = trainer.device.type == "cuda"
    with torch_profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        trainer.timed_epoch(shard, batches, "profile")
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=10, max_name_column_width=45))


def arguments() -> argparse.Namespace:
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
    ap.add_argument("--shards", type=Path, default=Path("/tmp/ctclab-bench-shards"),
                    help="where the synthetic shard is written once per size and read again")
    return ap.parse_args()


def main() -> None:
    args = arguments()
    device = select_device(args.device)
    if args.lstm_autocast:
        lstm_under_autocast()
    params = with_overrides(load_params(REPO / "params.yaml"), {
        **SEED_A3, "model.conv_lstm.stride": args.stride, "train.batch_size": args.batch_size, "train.seed": 0,
        "train.device": args.device, "train.compile": args.compile, "train.epochs": max(2, args.epochs),
        "train.warmup_epochs": 0}, "train_speed")
    frames = train_clean_100_lengths(args.utterances)
    shard = write_shard(args.shards / f"train-clean-100-shape-{args.utterances}", frames, seed=0)
    seed_everything(0, device)
    model = build(params.model, shard.feature_dim).to(device)
    if args.compile:
        model.compile_parts()  # compiled during the warmup batches
    batches = [bucket_batches(frames, args.batch_size, 0, epoch) for epoch in range(args.epochs)]
    trainer = TimedTrainer(model, params.train, device, len(batches[0]))
    if args.warmup:
        trainer.timed_epoch(shard, bucket_batches(frames, args.batch_size, 0, 99)[:args.warmup], "warmup")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    print(f"A3 {parameter_count(model) / 1e6:.2f} M params on {device_name(device)}; {args.utterances} utterances, "
          f"mean {frames.mean():.0f} frames, {shard.label_offsets[-1] / len(shard):.0f} labels; batch "
          f"{args.batch_size}; amp {trainer.dtype}; LSTM {'under autocast' if args.lstm_autocast else 'in fp32'}; "
          f"{'compiled' if args.compile else 'eager'}; stride {args.stride}; {params.train.loader_workers} loader workers")
    print(f"{'epoch':>5}{'seconds':>9}{'utt/s':>9}{'step s':>8}{'other':>7}{'padding':>9}{'loss':>9}{'peak GiB':>10}")
    for epoch, epoch_batches in enumerate(batches):
        secs, step_s, loss = trainer.timed_epoch(shard, epoch_batches, f"epoch {epoch + 1}")
        padded = sum(len(b) * int(frames[b].max()) for b in epoch_batches)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        print(f"{epoch + 1:>5}{secs:>9.1f}{args.utterances / secs:>9.0f}{step_s:>8.1f}{1 - step_s / secs:>7.1%}"
              f"{1 - frames.sum() / padded:>9.1%}{loss:>9.2f}{peak:>10.2f}")
    if args.profile:
        profile(trainer, shard, bucket_batches(frames, args.batch_size, 0, 98)[:args.profile])
    ratio = 15.0 / secs * args.utterances / 28539
    print(f"train_speed: {ratio:.2f}x (goal >= 1.0x: a 28,539-utterance epoch in <= 15 s; batch {args.batch_size}, "
          f"{device_name(device)})")
    sys.exit(0 if ratio >= 1.0 else 1)  # below the goal (always, on a CPU): exit 1


if __name__ == "__main__":
    main()
