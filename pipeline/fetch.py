"""DVC stage `fetch` (params: data.*): put the dataset in data/raw.

    python pipeline/fetch.py      # or: dvc repro fetch
"""
from ctclab import sources
from ctclab.config import load_params
from ctclab.errors import one_line_errors


@one_line_errors
def main() -> None:
    data = load_params().data
    layout = sources.fetch(data, "data/raw")
    print(f"fetch: {data.source} → {layout.kind} layout in data/raw")


if __name__ == "__main__":
    main()
