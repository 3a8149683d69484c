"""DVC stage `submit`: decode test in the
competition's order, write --out (dvc.yaml: submission/submission.csv) in its format, optionally upload it.

    dvc repro submit      # runs dvc.yaml's cmd (python pipeline/submit.py --data … --out …)
"""
import _environment  # noqa: F401  (first: a one-line stop when ctclab is not importable)
from ctclab import gpu_lease
from ctclab.config import load_params
from ctclab.errors import one_line_errors
from ctclab.inference import select_device
from ctclab.project import stage_arguments
from ctclab.results import describe_test
from ctclab.submission import submit

# decode.beam_width changes the predictions; submit.upload and data.competition decide whether and
# where it uploads. decode.workers only changes the speed.
PARAMS = ["decode.beam_width", "submit.upload", "data.competition"]


@one_line_errors
def main() -> None:
    paths = stage_arguments(__doc__, "data", "models", "out", "metrics")
    p = load_params()
    gpu_lease.lease_for_stage(select_device("auto").type)  # its own GPU when stages share the machine
    r = submit(p.decode, p.submit.upload, p.data.competition, paths.data, paths.models, paths.out, paths.metrics,
               tracking_uri=p.tracking.uri)
    print(f"submit: {r['rows']} rows ({r['format']} format) in {paths.out}{describe_test(r)}")


if __name__ == "__main__":
    main()
