"""DVC stage `train`: train on data/processed, write models/
and metrics/train.json + metrics/train_history.csv, log everything to one MLflow run.

    python pipeline/train.py      # or: dvc repro train
"""
import _environment  # noqa: F401  (first: a one-line stop when ctclab is not importable)
from ctclab.config import load_params
from ctclab.errors import one_line_errors
from ctclab.train import train

# The keys that change what train writes: train.resume only decides whether an interrupted run
# continues, train.loader_workers only how fast batches arrive, tracking.* and study.* only where and
# under which name the run is logged.
PARAMS = ["model", "train.epochs", "train.batch_size", "train.lr", "train.optimizer", "train.weight_decay",
          "train.scheduler", "train.grad_clip", "train.seed", "train.device", "train.amp", "train.oom",
          "train.specaugment"]


@one_line_errors
def main() -> None:
    result = train(load_params())
    print(f"train: best dev greedy distance {result['dev_lev_greedy']:.3f} (PER {result['dev_per']:.1%}) "
          f"at epoch {result['best_epoch']}; MLflow run {result['mlflow_run_id']}")


if __name__ == "__main__":
    main()
