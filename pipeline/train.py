"""DVC stage `train`: train on data/processed, write models/
and metrics/train.json + metrics/train_history.csv, log everything to one MLflow run.

    python pipeline/train.py      # or: dvc repro train
"""
import _environment  # noqa: F401  (first: a one-line stop when ctclab is not importable)
import os

from ctclab import distributed
from ctclab.config import load_params
from ctclab.errors import one_line_errors
from ctclab.inference import select_device
from ctclab.train import train

# The keys that change what train writes: train.resume only decides whether an interrupted run
# continues, train.loader_workers only how fast batches arrive, train.distributed.rdzv_endpoint only
# where the nodes meet, tracking.* and study.* only where and under which name the run is logged.
PARAMS = ["model", "train.epochs", "train.batch_size", "train.lr", "train.optimizer", "train.weight_decay",
          "train.scheduler", "train.warmup_epochs", "train.grad_clip", "train.seed", "train.device", "train.amp",
          "train.oom", "train.specaugment", "train.compile", "train.distributed.nproc", "train.distributed.nnodes"]


@one_line_errors
def main() -> None:
    params = load_params()
    if distributed.wanted(params.train.distributed) and not distributed.is_worker():
        # this script again on every process of this node, under torchrun's launcher
        distributed.launch(params.train.distributed, select_device(params.train.device), __file__)
        return
    with distributed.worker_errors():
        best, run_id = train(params)
    if os.environ.get("RANK", "0") != "0":
        return
    print(f"train: best dev greedy distance {best.dev_lev_greedy:.3f} (PER {best.dev_per:.1%}) "
          f"at epoch {best.best_epoch}; MLflow run {run_id}")


if __name__ == "__main__":
    main()
