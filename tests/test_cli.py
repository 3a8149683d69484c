"""The `ctclab` command: the MLflow UI on the project's store, and one-line errors."""
import os
import signal
import subprocess
import sys
import time
import urllib.request

import psutil

from project import env, free_port, make_project, run


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
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
        _, alive = psutil.wait_procs(family, timeout=60)
        for p in alive:
            p.kill()
    assert alive == [], [p.pid for p in alive]


def test_outside_a_project_is_one_line(tmp_path):
    r = run(tmp_path, sys.executable, "-m", "ctclab", "run", check=False)
    assert r.returncode == 2 and "not inside a ctclab project" in r.stderr and "Traceback" not in r.stderr
