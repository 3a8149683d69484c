"""Training speed of ctclab's own Trainer (ctclab.trainer: the step and epoch `dvc repro` runs), two
configurations side by side: `base` (A3 at the write-up's size and the flags) and `versus` (base with
--versus's params.yaml overrides; by default stride 4), on a shard shaped like HW3P2's train-clean-100.

    python bench/train_speed.py --device cuda                                   # batch 64: stride 2 vs 4
    python bench/train_speed.py --device cuda --versus train.batch_size=256 --goal 2
    python bench/train_speed.py --device cuda --utterances 1920 --versus train.compile=true --goal 1
    python bench/train_speed.py --device cuda --utterances 1920 --versus train.lstm_autocast=true --goal 1
    python bench/train_speed.py --device cpu --utterances 64 --batch-size 16 --epochs 2

The data are random features with train-clean-100's shape (bench/synthetic.py: 28,539
utterances, ~N(1270, 370) frames clipped to [150, 2450], ~1 label per 8.5 frames, 13 dims), written
once as a ctclab shard under --shards (1.9 GB at full size) and read through the product's
DataLoader. The model is the write-up's A3 (Conv1d stride 2 + BN + GELU + ConvNeXt block →
4-layer BiLSTM(256), dropout 0.4 → MLP; --hidden shrinks it for rehearsals); everything else is params.yaml's train section (Adam
2e-3, length-bucketed batches, AMP as train.amp says, train.loader_workers). Both models start from
seed 0 and are warmed up; their timed epochs alternate, which goes first swapping every epoch, so a
slow spell of a shared machine hits both. An epoch is `Trainer.epoch`; `step s` is the time inside
`Trainer.step` (SpecAugment, forward, CTC loss, backward, clip, Adam, scheduler: CUDA events on the
GPU's timeline, the clock on the CPU) and `other` the share of the epoch outside it (waiting for
the DataLoader, sync points, launch gaps). Prints per configuration and epoch the seconds,
utterances/s, padding, loss and peak memory, then a 28,539-utterance epoch's seconds of each (the
GPU goal is 8 s); the last line is `train_speed: <base s / versus s>x (goal >= <goal>x; …)`, and
the exit status 1 below the goal.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml

from ctclab.batching import bucket_batches
from ctclab.config import load_params, with_overrides
from ctclab.cuda_graphs import padded_length
from ctclab.inference import device_name, select_device
from ctclab.models import build, parameter_count
from ctclab.train import seed_everything
from ctclab.trainer import Trainer

from goal import add_goal, finish  # bench/goal.py, next to this script
from synthetic import train_clean_100_lengths, write_shard

REPO = Path(__file__).resolve().parents[1]
SEED_A3 = {"model.arch": "conv_lstm", "model.conv_lstm.hidden": 256, "model.conv_lstm.lstm_layers": 4,
           "model.conv_lstm.embed_dim": 256, "model.conv_lstm.stride": 2, "model.conv_lstm.convnext_blocks": 1,
           "model.conv_lstm.dropout.lstm": 0.4}
# By default: stride 4 (half the LSTM's sequential steps) against the write-up's stride 2, which the
# stride study found 1.71x faster per training on the CPU (experiments/reports/stride.md).
VERSUS = ("model.conv_lstm.stride=4",)
GOAL = 1.5


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
    ap.add_argument("--epochs", type=int, default=1, help="timed epochs of each configuration, alternated")
    ap.add_argument("--warmup", type=int, default=5, help="batches run before timing (cuDNN plans, allocator)")
    ap.add_argument("--profile", type=int, default=0, help="also profile this many batches of `base`: top kernels")
    ap.add_argument("--compile", action="store_true", help="train.compile: torch.compile the non-recurrent parts")
    ap.add_argument("--stride", type=int, choices=[2, 4], default=2,
                    help="model.conv_lstm.stride: 4 halves the LSTM's sequential steps (the write-up's A3 has 2)")
    ap.add_argument("--versus", nargs="+", metavar="KEY=VALUE",
                    help=f"params.yaml overrides of the configuration `base` is compared with (default {' '.join(VERSUS)})")
    ap.add_argument("--hidden", type=int, default=256, help="A3's hidden and embedding width (256: the write-up's)")
    ap.add_argument("--shards", type=Path, default=Path("/tmp/ctclab-bench-shards"),
                    help="where the synthetic shard is written once per size and read again")
    add_goal(ap, GOAL)
    args = ap.parse_args()
    if args.versus is None:
        args.versus = list(VERSUS)
    return args


def configurations(args) -> dict:
    """`base` (A3 and the flags) and `versus` (base with --versus's overrides) as params."""
    base = with_overrides(load_params(REPO / "params.yaml"), {
        **SEED_A3, "model.conv_lstm.hidden": args.hidden, "model.conv_lstm.embed_dim": args.hidden,
        "model.conv_lstm.stride": args.stride, "train.batch_size": args.batch_size, "train.seed": 0,
        "train.device": args.device, "train.compile": args.compile, "train.epochs": max(2, args.epochs),
        "train.warmup_epochs": 0}, "train_speed")
    pairs = [o.split("=", 1) for o in args.versus]
    if any(len(p) != 2 for p in pairs):
        raise SystemExit(f"train_speed: --versus takes KEY=VALUE, got {' '.join(args.versus)}")
    return {"base": base, "versus": with_overrides(base, {k: yaml.safe_load(v) for k, v in pairs}, "--versus")}


def setup(name: str, params, shard, device, args) -> tuple[TimedTrainer, list]:
    """The configuration's Trainer (from seed 0, warmed up) and its epochs' batches."""
    seed_everything(0, device)
    model = build(params.model, shard.feature_dim).to(device)
    if params.train.compile:
        model.compile_parts()  # compiled during the warmup batches
    frames, size = shard.frames(), params.train.batch_size
    batches = [bucket_batches(frames, size, 0, epoch) for epoch in range(args.epochs)]
    trainer = TimedTrainer(model, params.train, device, len(batches[0]))
    if args.warmup:
        trainer.timed_epoch(shard, bucket_batches(frames, size, 0, 99)[:args.warmup], f"{name} warmup")
    t0 = time.perf_counter()
    if captured := trainer.prepare(shard, [b for epoch in batches for b in epoch]):  # train.cuda_graphs
        print(f"{name}: {captured} CUDA graphs captured for the timed epochs' shapes in "
              f"{time.perf_counter() - t0:.1f} s (once per shape in a training; not timed below)")
    print(f"{name}: A3 {parameter_count(model) / 1e6:.2f} M params; batch {size}; amp {trainer.dtype}; LSTM "
          f"{'under autocast' if params.train.lstm_autocast else 'in fp32'}; "
          f"{'compiled' if params.train.compile else 'CUDA graphs' if trainer.graphed else 'eager'}; "
          f"stride {params.model.active.stride}; "
          f"{params.train.loader_workers} loader workers")
    return trainer, batches


def main() -> None:
    args = arguments()
    device = select_device(args.device)
    frames = train_clean_100_lengths(args.utterances)
    shard = write_shard(args.shards / f"train-clean-100-shape-{args.utterances}", frames, seed=0)
    setups = {name: setup(name, params, shard, device, args) for name, params in configurations(args).items()}
    print(f"{device_name(device)}; {args.utterances} utterances, mean {frames.mean():.0f} frames, "
          f"{shard.label_offsets[-1] / len(shard):.0f} labels; versus = base with {' '.join(args.versus) or 'nothing'}")
    print(f"{'config':>7}{'epoch':>6}{'seconds':>9}{'utt/s':>9}{'step s':>8}{'other':>7}{'padding':>9}{'loss':>9}"
          f"{'peak GiB':>10}")
    seconds = {name: [] for name in setups}
    for epoch in range(args.epochs):
        # side by side: the two configurations' epochs alternate, and which goes first swaps each epoch
        for name in (("base", "versus") if epoch % 2 == 0 else ("versus", "base")):
            trainer, batches = setups[name]
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            secs, step_s, loss = trainer.timed_epoch(shard, batches[epoch], f"{name} epoch {epoch + 1}")
            seconds[name].append(secs)
            longest = [int(frames[b].max()) for b in batches[epoch]]  # what each batch is padded to:
            longest = [padded_length(n) for n in longest] if trainer.graphed else longest  # a graph's shape
            padded = sum(len(b) * n for b, n in zip(batches[epoch], longest))
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
            print(f"{name:>7}{epoch + 1:>6}{secs:>9.1f}{args.utterances / secs:>9.0f}{step_s:>8.1f}{1 - step_s / secs:>7.1%}"
                  f"{1 - frames.sum() / padded:>9.1%}{loss:>9.2f}{peak:>10.2f}")
    if args.profile:
        trainer, _ = setups["base"]
        profile(trainer, shard, bucket_batches(frames, args.batch_size, 0, 98)[:args.profile])
    per_epoch = {name: sum(s) / len(s) * 28539 / args.utterances for name, s in seconds.items()}
    print(f"\na 28,539-utterance epoch: base {per_epoch['base']:.1f} s, versus {per_epoch['versus']:.1f} s "
          f"(the GPU goal: <= 8 s; {device_name(device)})")
    finish("train_speed", sum(seconds["base"]) / sum(seconds["versus"]), args.goal,
           f"versus ({' '.join(args.versus)}) over base, "
           f"{args.epochs} epoch{'s' if args.epochs != 1 else ''} each")


if __name__ == "__main__":
    main()
