"""Decoder benchmark: greedy (torch) vs fast-ctc-decode prefix beam search at several beam widths,
with 1 and 2 worker processes, on the same posteriors. Prints utterances/s, the speed ratio to
beam 1 × 1 worker, agreement with greedy, and dev distance/PER when references exist; the last line
is the widest beam's speed-up from 2 worker processes over 1 (their outputs must be identical).

    .venv/bin/python bench/decode.py                 # trained model's dev posteriors (after make run)
    .venv/bin/python bench/decode.py --random 64     # or 64 random blank-heavy utterances of 400 frames
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ctclab.data import Shard
from ctclab.decode import BeamDecoder, greedy
from ctclab.metrics import score
from ctclab.inference import evaluate_split, load_model

from goal import add_goal, finish  # bench/goal.py, next to this script


def posteriors(args):
    if args.random or not Path("models/best.pt").is_file():
        g = torch.Generator().manual_seed(0)
        logits = torch.randn(args.random or 64, 400, 41, generator=g) * 3
        logits[..., 0] += 3
        return logits.log_softmax(-1), torch.full((len(logits),), 400), None, "random, 400 frames"
    dev = Shard("data/processed/dev")
    model = load_model("models/best.pt")
    captured = []
    evaluate_split(model, dev, 64, torch.device("cpu"), {"keep": lambda lp, n: captured.append((lp, n)) or [[]] * len(n)})
    T = max(lp.shape[1] for lp, _ in captured)
    lp = torch.cat([torch.nn.functional.pad(x, (0, 0, 0, T - x.shape[1])) for x, _ in captured])
    lengths = torch.cat([n for _, n in captured])
    # evaluate_split decodes in length order; put the references in that order too
    order = sorted(range(len(dev)), key=lambda i: (dev.frames()[i], i))
    refs = [dev.label(i).tolist() for i in order]
    return lp, lengths, refs, f"trained model on {len(dev)} dev utterances, mean {float(lengths.float().mean()):.0f} output frames"


def timed(fn, repeats):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--random", type=int, default=0)
    ap.add_argument("--widths", type=int, nargs="+", default=[1, 5, 10, 25, 50])
    ap.add_argument("--repeats", type=int, default=3)
    add_goal(ap, 1.8)
    args = ap.parse_args()
    lp, lengths, refs, what = posteriors(args)
    n = len(lengths)
    print(f"posteriors: {what}; {n} utterances, best of {args.repeats} runs\n")
    print(f"{'decoder':<22}{'workers':>8}{'utt/s':>10}{'× beam1/1w':>12}{'= greedy':>10}{'dist':>8}{'PER':>8}")
    secs, ref_out = timed(lambda: greedy(lp, lengths), args.repeats)
    rows = [("greedy (torch)", 1, secs, ref_out)]
    for w in args.widths:
        for workers in (1, 2):
            with BeamDecoder(w, workers) as beam:
                beam.decode(lp[:2], lengths[:2])  # start the pool outside the timing
                secs, out = timed(lambda: beam.decode(lp, lengths), args.repeats)
            rows.append((f"fast-ctc-decode b={w}", workers, secs, out))
    base = next(r[2] for r in rows if r[0] == f"fast-ctc-decode b={args.widths[0]}" and r[1] == 1)
    for name, workers, secs, out in rows:
        same = sum(a == b for a, b in zip(out, ref_out)) / n
        dist = f"{score(out, refs).mean_distance:8.3f}{score(out, refs).per:8.1%}" if refs else ""
        print(f"{name:<22}{workers:>8}{n / secs:>10.0f}{base / secs:>12.2f}{same:>10.0%}{dist}")
    worker_mismatch = [r[0] for r in rows if r[1] == 2 and r[3] != next(x[3] for x in rows if x[0] == r[0] and x[1] == 1)]
    print(f"\n1 vs 2 workers identical output: {'yes' if not worker_mismatch else 'NO: ' + ', '.join(worker_mismatch)}")
    wide = max(args.widths)
    one, two = (next(r[2] for r in rows if r[0] == f"fast-ctc-decode b={wide}" and r[1] == w) for w in (1, 2))
    same = "" if not worker_mismatch else ", OUTPUT DIFFERS"
    finish("decode", one / two, args.goal, f"beam {wide}, 2 workers vs 1{same}", checks_passed=not worker_mismatch)


if __name__ == "__main__":
    main()
