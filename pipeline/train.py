"""DVC stage `train`: train on --data, write checkpoints to --models and train.json +
train_history.csv to --metrics, log everything to one MLflow run.

    dvc repro train      # runs dvc.yaml's cmd: python pipeline/train.py --data data/processed --models models --metrics metrics
"""
import _environment  # noqa: F401  (first: a one-line stop when ctclab is not importable)
import os
import sys

from ctclab import distributed, gpu_lease
from ctclab.config import load_params
from ctclab.errors import one_line_errors
from ctclab.inference import select_device
from ctclab.project import stage_arguments
from ctclab.train import train

# The keys that change what train writes: train.resume only decides whether an interrupted run
# continues, train.loader_workers only how fast batches arrive, train.distributed.rdzv_endpoint only
# where the nodes meet, tracking.* and study.* only where and under which name the run is logged.
PARAMS = ["model", "train.epochs", "train.batch_size", "train.lr", "train.optimizer", "train.weight_decay",
          "train.scheduler", "train.warmup_epochs", "train.grad_clip", "train.seed", "train.device", "train.amp",
          "train.oom", "train.specaugment", "train.compile", "train.lstm_autocast", "train.cuda_graphs",
          "train.distributed.nproc", "train.distributed.nnodes"]


@one_line_errors
def main() -> None:
    paths = stage_arguments(__doc__, "data", "models", "metrics")
    params = load_params()
    device = select_device(params.train.device)
    # a GPU of its own (or its nproc GPUs for torchrun's workers) when trainings share the machine
    gpu_lease.lease_for_stage(device.type, params.train.distributed.nproc)
    if distributed.wanted(params.train.distributed) and not distributed.is_worker():
        # this script again on every process of this node, under torchrun's launcher
        distributed.launch(params.train.distributed, __file__, sys.argv[1:])
        return
    with distributed.worker_errors():
        best, run_id = train(params, paths.data, paths.models, paths.metrics)
    if os.environ.get("RANK", "0") != "0":
        return
    print(f"train: best dev greedy distance {best.dev_lev_greedy:.3f} (PER {best.dev_per:.1%}) "
          f"at epoch {best.best_epoch}; MLflow run {run_id}")


if __name__ == "__main__":
    main()
