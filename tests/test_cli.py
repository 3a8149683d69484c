"""The `ctclab` command: the MLflow UI on the project's store, and one-line errors."""
import subprocess
import sys
import time
import urllib.request

from project import ctrl_c, env, free_port, make_project, run


def test_ui_serves_the_project_store(tmp_path):
    project = make_project(tmp_path / "p", git=False)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ctclab", "ui", "--port", str(port)], cwd=project, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        first = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}" in first and f"sqlite:///{project / 'mlflow.db'}" in first
        deadline, status = time.monotonic() + 90, None
        while time.monotonic() < deadline and status != 200:
            try:
                status = urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status
            except OSError:
                time.sleep(0.5)
        assert status == 200
    finally:  # Ctrl-C, as in a terminal (the whole process group): the server and its workers all end
        alive = ctrl_c(proc)
    assert alive == [], [p.pid for p in alive]


def test_outside_a_project_is_one_line(tmp_path):
    r = run(tmp_path, sys.executable, "-m", "ctclab", "run", check=False)
    assert r.returncode == 2 and "not inside a ctclab project" in r.stderr and "Traceback" not in r.stderr


def test_curves_draws_the_training_history_offline(tmp_path):
    project = make_project(tmp_path / "p", git=False)
    missing = run(project, sys.executable, "-m", "ctclab", "curves", check=False)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "run the train stage first" in missing.stderr
    (project / "metrics").mkdir()
    (project / "metrics/train_history.csv").write_text(
        "epoch,train_loss,dev_loss,dev_lev_greedy,dev_per,lr\n1,3.0,60.0,9.0,0.5,0.001\n2,2.0,50.0,4.0,0.2,0.0005\n")
    out = run(project, sys.executable, "-m", "ctclab", "curves").stdout
    assert out.startswith("curves: metrics/train_curves.png (train_loss, dev_loss, dev_lev_greedy, dev_per against epoch")
    assert (project / "metrics/train_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
