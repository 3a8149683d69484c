"""DVC stage `preprocess`: validate --raw and write shards to --out (dvc.yaml: data/raw, data/processed).

    dvc repro preprocess      # runs dvc.yaml's cmd: python pipeline/preprocess.py --raw data/raw --out data/processed
"""
import _environment  # noqa: F401  (first: a one-line stop when ctclab is not importable)
from ctclab.config import load_params
from ctclab.data import preprocess
from ctclab.errors import one_line_errors
from ctclab.project import stage_arguments

PARAMS = ["features"]


@one_line_errors
def main() -> None:
    paths = stage_arguments(__doc__, "raw", "out")
    meta = preprocess(paths.raw, paths.out, load_params().features)
    counts = ", ".join(f"{n} {s}" for s, n in meta.utterances.items())
    print(f"preprocess: {counts} utterances, feature dim {meta.feature_dim}, "
          f"{meta.bad_utterances} bad ({paths.out / 'bad_utterances.json'})")


if __name__ == "__main__":
    main()
