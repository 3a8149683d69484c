"""DVC stage `submit`: decode test in the
competition's order, write submission/submission.csv in its format, optionally upload it.

    python pipeline/submit.py      # or: dvc repro submit
"""
import _environment  # noqa: F401  (first: a one-line stop when ctclab is not importable)
from ctclab.config import load_params
from ctclab.errors import one_line_errors
from ctclab.results import describe_test
from ctclab.submission import submit

# decode.beam_width changes the predictions; submit.upload and data.competition decide whether and
# where it uploads. decode.workers only changes the speed.
PARAMS = ["decode.beam_width", "submit.upload", "data.competition"]


@one_line_errors
def main() -> None:
    p = load_params()
    r = submit(p.decode, p.submit.upload, p.data.competition, tracking_uri=p.tracking.uri)
    print(f"submit: {r['rows']} rows ({r['format']} format) in submission/submission.csv{describe_test(r)}")


if __name__ == "__main__":
    main()
