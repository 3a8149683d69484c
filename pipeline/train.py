"""DVC stage `train` (params: model.*, train.*, tracking.*): train on data/processed, write models/
and metrics/train.json + metrics/train_history.csv, log everything to one MLflow run.

    python pipeline/train.py      # or: dvc repro train
"""
from ctclab.config import load_params
from ctclab.errors import one_line_errors
from ctclab.train import train


@one_line_errors
def main() -> None:
    result = train(load_params())
    print(f"train: best dev greedy distance {result['dev_lev_greedy']:.3f} (PER {result['dev_per']:.1%}) "
          f"at epoch {result['best_epoch']}; MLflow run {result['mlflow_run_id']}")


if __name__ == "__main__":
    main()
