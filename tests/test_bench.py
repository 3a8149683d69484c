"""Every benchmark, at a tiny size: it ends with its ratio line and leaves no process running
(bench/tracking.py's `mlflow server` starts job consumers in sessions of their own; decode's
beam search runs worker processes)."""
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import psutil
import pytest

from project import REPO, env, make_project, survivors

TINY = {
    "contention.py": ["--synthetic", "24", "--epochs", "1", "--rounds", "1"],
    "decode.py": ["--random", "8", "--widths", "1", "5", "--repeats", "1"],
    "loader.py": ["--utterances", "24", "--hidden", "32"],
    "tracking.py": ["--epochs", "2", "--steps", "2"],
    "train_speed.py": ["--utterances", "12", "--batch-size", "8", "--warmup", "0"],
}
RATIO_LINE = re.compile(r"(\w+): \d+\.\d+x \(goal (>=|<=) (\d+(\.\d+)?)x.*\)")
# no ratio reaches them: every benchmark must fail its run (a slowdown's goal is an upper bound)
IMPOSSIBLE = {">=": "1000", "<=": "0.001"}
AT_MOST = {"contention.py"}


def test_every_benchmark_is_covered():
    assert sorted(TINY) == sorted(p.name for p in (REPO / "bench").glob("*.py") if p.name not in ("synthetic.py", "goal.py"))


@pytest.mark.parametrize("script", sorted(TINY))
def test_a_benchmark_ends_with_its_ratio_and_leaves_nothing_running(tmp_path, request, script):
    project = make_project(tmp_path / "p", git=False)  # its params.yaml; no data: synthetic shards stand in
    # the benchmark's temp files apart, under a short path: the forkserver's socket lives there and
    # a Unix socket's path may not exceed 107 bytes (pytest's tmp_path under xdist comes close)
    scratch = Path(tempfile.mkdtemp(prefix="ctclab-bench-"))
    request.addfinalizer(lambda: shutil.rmtree(scratch, ignore_errors=True))
    extra = ["--shards", str(scratch / "shards")] if script in ("train_speed.py", "contention.py") else []
    side = "<=" if script in AT_MOST else ">="
    r = subprocess.run([sys.executable, str(REPO / "bench" / script), *TINY[script], *extra, "--goal", IMPOSSIBLE[side]],
                       cwd=project, env=env({"TMPDIR": str(scratch)}), capture_output=True, text=True, timeout=600)
    last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    # it ran to its ratio line, and below the goal it fails the run (exit 1, not a crash's 2 or more)
    assert r.returncode == 1 and RATIO_LINE.fullmatch(last), r.stdout[-1500:] + r.stderr[-1500:]
    assert RATIO_LINE.fullmatch(last).group(1, 2, 3) == (script.removesuffix(".py"), side, IMPOSSIBLE[side])
    assert survivors(tmp_path, timeout_s=30) == [] and survivors(scratch, timeout_s=30) == []
    assert [p for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE
            and "forkserver" not in " ".join(p.cmdline()) and "resource_tracker" not in " ".join(p.cmdline())] == []


@pytest.mark.parametrize("ratio, goal, checks, status", [(1.9, 1.8, True, 0), (1.8, 1.8, True, 0), (1.7, 1.8, True, 1),
                                                         (2.5, 1.8, False, 1)])
def test_a_benchmark_passes_only_at_or_above_its_goal_with_its_checks_passed(ratio, goal, checks, status):
    r = subprocess.run([sys.executable, "-c", f"from goal import finish; finish('x', {ratio}, {goal}, 'y', {checks})"],
                       cwd=REPO / "bench", capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout) == (status, f"x: {ratio:.2f}x (goal >= {goal:g}x; y)\n")


@pytest.mark.parametrize("ratio, goal, status", [(1.4, 1.5, 0), (1.5, 1.5, 0), (1.6, 1.5, 1)])
def test_a_slowdown_passes_only_at_or_below_its_goal(ratio, goal, status):
    r = subprocess.run([sys.executable, "-c", f"from goal import finish; finish('x', {ratio}, {goal}, at_most=True)"],
                       cwd=REPO / "bench", capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout) == (status, f"x: {ratio:.2f}x (goal <= {goal:g}x)\n")


def test_gpu_check_rehearses_every_step_on_the_cpu_and_records_each_figure(tmp_path):
    """bench/gpu_check.sh --rehearse: the GPU call's steps (CUDA tests, the pipeline's stages at a
    tiny size, DDP under torchrun with one process, the speed levers) on the CPU, so that the one
    call a lent GPU gets has run before; its figures go to $OUT, never into bench/RESULTS.md."""
    committed = (REPO / "bench" / "RESULTS.md").read_bytes()
    r = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--rehearse"], cwd=REPO,
                       env=env({"OUT": str(tmp_path), "PYTHON": sys.executable}), capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = [l for l in (tmp_path / "RESULTS.md").read_text().splitlines() if l.startswith("| ")]
    figures = {name: [l for l in lines if name in l] for name in
               ("CUDA tests", "pipeline at HW3P2 size", "DDP under torchrun", "train_speed: ")}
    assert "skipped" in figures["CUDA tests"][0]
    assert "fetch → submit on cpu" in figures["pipeline at HW3P2 size"][0] and "dev greedy" in figures["pipeline at HW3P2 size"][0]
    assert "process group gloo, world size 1" in figures["DDP under torchrun"][0]
    assert len(figures["train_speed: "]) == 3  # batch, stride, LSTM under autocast (compile, CUDA graphs: on the GPU only)
    assert not any("FAILED" in l for l in lines), lines
    assert (REPO / "bench" / "RESULTS.md").read_bytes() == committed
    with tarfile.open(tmp_path / "gpu_check_logs.tar.gz") as logs:  # every line's log comes back in one file
        linked = set(re.findall(r"\(logs/(gpu_check-[\d-]+/[\w.]+)\)", "\n".join(lines)))
        assert len(linked) == len(lines) and linked <= {n.removeprefix("./") for n in logs.getnames()}
    assert survivors(tmp_path, timeout_s=30) == []


def test_gpu_check_past_its_budget_skips_the_steps_left_and_still_returns_its_results(tmp_path):
    r = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--rehearse"], cwd=REPO,
                       env=env({"OUT": str(tmp_path), "PYTHON": sys.executable, "GPU_CHECK_BUDGET_S": "1"}),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "gpu_check: out of time (budget 1 s), skipped:" in r.stdout, r.stdout + r.stderr
    results = (tmp_path / "RESULTS.md").read_text()
    assert "pipeline at HW3P2 size: FAILED at validate: exit 124" in results and "skipped: out of time" in results
    assert (tmp_path / "gpu_check_logs.tar.gz").is_file()
