"""DVC stage `fetch`: put the dataset in --out (dvc.yaml: data/raw).

    dvc repro fetch      # runs dvc.yaml's cmd: python pipeline/fetch.py --out data/raw
"""
import _environment  # noqa: F401  (first: a one-line stop when ctclab is not importable)
from ctclab import sources
from ctclab.config import load_params
from ctclab.errors import one_line_errors
from ctclab.project import stage_arguments

# The keys that change what fetch writes (data.synthetic.workers only changes its speed).
PARAMS = ["data.source", "data.competition", "data.path", "data.synthetic.seed", "data.synthetic.train",
          "data.synthetic.dev", "data.synthetic.test", "data.synthetic.min_words", "data.synthetic.max_words"]


@one_line_errors
def main() -> None:
    paths = stage_arguments(__doc__, "out")
    data = load_params().data
    layout = sources.fetch(data, paths.out)
    print(f"fetch: {data.source} → {layout.kind} layout in {paths.out}")


if __name__ == "__main__":
    main()
