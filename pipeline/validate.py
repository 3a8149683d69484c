"""DVC stage `validate`: check all of params.yaml (every section, every architecture's), then write --out.

    dvc repro validate   # runs dvc.yaml's cmd: python pipeline/validate.py --params params.yaml --out .ctclab/params.checked

Each stage reads only its own keys, and a stage whose keys did not change is not run at all, so
without this stage a misspelt key (`train.sheduler`) or a value out of range in a section whose
stages are cached would be ignored in silence. dvc.yaml marks it always_changed and puts it first:
fetch depends on --out, so `dvc repro`, `dvc exp run` and `ctclab run` stop here, in one line, before
any other stage. --out's text never changes, so a passing check never makes fetch stale.
"""
import _environment  # noqa: F401  (first: a one-line stop when ctclab is not importable)
import ctclab.models  # noqa: F401  (its registry lets load_params check every model.<arch> section)
from ctclab import storage
from ctclab.config import load_params
from ctclab.errors import one_line_errors
from ctclab.project import stage_arguments

PARAMS: list[str] = []  # it reads the whole file, and runs whether or not any key changed
CHECKED = b"params.yaml passed pipeline/validate.py\n"


@one_line_errors
def main() -> None:
    paths = stage_arguments(__doc__, "params", "out")
    load_params(paths.params)
    storage.write_bytes(paths.out, CHECKED)
    print(f"validate: {paths.params} is valid")


if __name__ == "__main__":
    main()
