"""DVC stage `preprocess`: validate data/raw and write shards to data/processed.

    python pipeline/preprocess.py      # or: dvc repro preprocess
"""
import _environment  # noqa: F401  (first: a one-line stop when ctclab is not importable)
from ctclab.config import load_params
from ctclab.data import preprocess
from ctclab.errors import one_line_errors

PARAMS = ["features"]


@one_line_errors
def main() -> None:
    meta = preprocess("data/raw", "data/processed", load_params().features)
    counts = ", ".join(f"{n} {s}" for s, n in meta["utterances"].items())
    print(f"preprocess: {counts} utterances, feature dim {meta['feature_dim']}, "
          f"{meta['bad_utterances']} bad (data/processed/bad_utterances.json)")


if __name__ == "__main__":
    main()
