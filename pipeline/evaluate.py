"""DVC stage `evaluate`: decode --data's dev with --models' best checkpoint and every decoder (greedy, beam,
yours); write eval.json to --metrics; log scores, decode speed and the worst utterances into the training's run (or, inside a study, into a child run of the study's parent run).

    dvc repro evaluate      # runs dvc.yaml's cmd: python pipeline/evaluate.py --data data/processed --models models --metrics metrics
"""
import _environment  # noqa: F401  (first: a one-line stop when ctclab is not importable)
from ctclab import gpu_lease
from ctclab.config import load_params
from ctclab.errors import one_line_errors
from ctclab.evaluate import evaluate
from ctclab.inference import select_device
from ctclab.project import stage_arguments
from ctclab.results import describe_eval

# decode.beam_width changes the scores; study.* and train.seed choose the MLflow run it logs into
# (a study's child run), so DVC's run cache never skips that logging for a new study.
PARAMS = ["decode.beam_width", "study", "train.seed"]


@one_line_errors
def main() -> None:
    paths = stage_arguments(__doc__, "data", "models", "metrics")
    p = load_params()
    gpu_lease.lease_for_stage(select_device("auto").type)  # its own GPU when stages share the machine
    r = evaluate(p.decode, paths.data, paths.models, paths.metrics, study=p.study, seed=p.train.seed,
                 tracking_uri=p.tracking.uri)
    print(f"evaluate: {describe_eval(r)}")


if __name__ == "__main__":
    main()
