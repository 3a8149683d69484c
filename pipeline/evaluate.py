"""DVC stage `evaluate`: decode dev with the best checkpoint and every decoder (greedy, beam, yours);
write metrics/eval.json; log scores, decode speed and the worst utterances into the training's run (or, inside a study, into a child run of the study's parent run).

    python pipeline/evaluate.py      # or: dvc repro evaluate
"""
import _environment  # noqa: F401  (first: a one-line stop when ctclab is not importable)
from ctclab.config import load_params
from ctclab.errors import one_line_errors
from ctclab.evaluate import evaluate
from ctclab.results import describe_eval

# decode.beam_width changes the scores; study.* and train.seed choose the MLflow run it logs into
# (a study's child run), so DVC's run cache never skips that logging for a new study.
PARAMS = ["decode.beam_width", "study", "train.seed"]


@one_line_errors
def main() -> None:
    p = load_params()
    r = evaluate(p.decode, study=p.study, seed=p.train.seed, tracking_uri=p.tracking.uri)
    print(f"evaluate: {describe_eval(r)}")


if __name__ == "__main__":
    main()
