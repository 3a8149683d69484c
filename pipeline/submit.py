"""DVC stage `submit`: decode test in the
competition's order, write submission/submission.csv in its format, optionally upload it.

    python pipeline/submit.py      # or: dvc repro submit
"""
import _environment  # noqa: F401  (first: a one-line stop when ctclab is not importable)
from ctclab.config import load_params
from ctclab.errors import one_line_errors
from ctclab.submission import submit

# decode.beam_width changes the predictions; submit.upload and data.competition decide whether and
# where it uploads. decode.workers only changes the speed.
PARAMS = ["decode.beam_width", "submit.upload", "data.competition"]


@one_line_errors
def main() -> None:
    p = load_params()
    r = submit(p.decode, p.submit.upload, p.data.competition, tracking_uri=p.tracking.uri)
    extra = f"; test Levenshtein {r['test_lev_beam']:.3f}, PER {r['test_per']:.1%}" if "test_lev_beam" in r else ""
    print(f"submit: {r['rows']} rows ({r['format']} format) in submission/submission.csv{extra}")


if __name__ == "__main__":
    main()
