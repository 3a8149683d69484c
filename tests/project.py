"""A throwaway copy of the ctclab project (pipeline, dvc.yaml, src) with tiny params, for tests
that run the real stages through DVC or as subprocesses."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import yaml

import ctclab.models  # noqa: F401  (first: its registry lets load_params check every model.<arch> section)
from ctclab.config import load_params, with_overrides
from ctclab.project import stage_command

REPO = Path(__file__).resolve().parents[1]
DEFAULTS = load_params(REPO / "params.yaml")


def config(section: str, **values):
    """One section of the repository's params.yaml with some keys changed (dotted names inside
    the section as `**{"dropout.lstm": 0.0}`), validated like params.yaml."""
    params = with_overrides(DEFAULTS, {f"{section}.{k}": v for k, v in values.items()}, "test overrides")
    return getattr(params, section)

def model_config(arch: str = "conv_lstm", **values):
    """params.yaml's model section running `arch`, some of its knobs changed (dotted names inside
    the architecture's section as `**{"dropout.lstm": 0.0}`), validated like params.yaml."""
    overrides = {"model.arch": arch, **{f"model.{arch}.{k}": v for k, v in values.items()}}
    return with_overrides(DEFAULTS, overrides, "test overrides").model


TINY_PARAMS = {
    "data": {"synthetic": {"seed": 5, "train": 16, "dev": 4, "test": 4, "min_words": 2, "max_words": 4, "workers": 1}},
    "model": {"conv_lstm": {"hidden": 16, "embed_dim": 16, "lstm_layers": 1},
              "lstm": {"hidden": 16, "embed_dim": 16, "lstm_layers": 1},
              "convnext": {"hidden": 16, "embed_dim": 16, "stages": 1}},
    "train": {"epochs": 2, "batch_size": 4},
    "decode": {"beam_width": 4},
}


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(base.get(k, {}), v) if isinstance(v, dict) else v
    return out


def make_project(dest: Path, overrides: dict | None = None, git: bool = True) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, dest / name)
    for folder in ("pipeline", "src"):
        shutil.copytree(REPO / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    params = merge(yaml.safe_load((REPO / "params.yaml").read_text()), merge(TINY_PARAMS, overrides or {}))
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if git:
        run(dest, "git", "init", "-q")
        run(dest, sys.executable, "-m", "dvc", "init", "-q")
        run(dest, sys.executable, "-m", "dvc", "config", "core.analytics", "false")
    return dest


def project_with_data(dest: Path, processed: Path, overrides: dict | None = None) -> Path:
    """A project copy (no git) with already preprocessed shards in data/processed."""
    project = make_project(dest, overrides, git=False)
    shutil.copytree(processed, project / "data" / "processed")
    return project


def run_train(project: Path) -> dict:
    """The train stage's library call, in-process, on a project copy: metrics/train.json's summary
    and the MLflow run id."""
    from dataclasses import asdict

    import pytest

    from ctclab.train import train

    with pytest.MonkeyPatch.context() as m:  # the project's own store (mlflow.set_tracking_uri leaves this set)
        m.delenv("MLFLOW_TRACKING_URI", raising=False)
        summary, run_id = train(load_params(project / "params.yaml"), project / "data/processed", project / "models",
                                project / "metrics", root=project, progress=False)
    return {**asdict(summary), "mlflow_run_id": run_id}


def interrupt_training(project: Path, sig: int, deadline_s: float = 600) -> tuple[int, str, dict]:
    """Start the train stage as its own process, send it `sig` once a mid-epoch resume checkpoint
    exists (batches of an epoch done), and return (exit code, stderr, that checkpoint's epoch and
    batch). The deadline covers imports and pip freeze on a slow machine."""
    import json
    import time

    from ctclab.checkpoint import RESUME_DIR

    proc = subprocess.Popen(stage_command(project, "train"), cwd=project, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline, where = time.monotonic() + deadline_s, None
    while where is None and time.monotonic() < deadline and proc.poll() is None:
        for pointer in (project / RESUME_DIR).glob("*.json"):
            saved = json.loads(pointer.read_text())
            if saved["batch"] > 0 and pointer.with_suffix(".pt").is_file():
                where = saved
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=deadline_s)
    assert where is not None, f"training finished or failed before it could be interrupted:\n{err[-2000:]}"
    return proc.returncode, err, where


def env(extra: dict | None = None) -> dict:
    e = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    e.pop("MLFLOW_TRACKING_URI", None)
    return {**e, **(extra or {})}


def run(cwd: Path, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(list(cmd), cwd=cwd, env=env(kw.pop("env", None)), capture_output=True, text=True, **kw)
    if check and r.returncode:
        raise AssertionError(f"{cmd} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def stage(cwd: Path, name: str, **kw) -> subprocess.CompletedProcess:
    """A stage run as dvc.yaml's cmd says (its script, its paths), without DVC."""
    return run(cwd, *stage_command(cwd, name), **kw)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1: a SQL (sqlite) backend and a proxied artifact store,
    both under `folder`. start() waits for /health; stop() kills it as a lost server would go."""

    def __init__(self, folder: Path, port: int | None = None):
        self.folder, self.port = folder, port or free_port()
        self.uri, self.process = f"http://127.0.0.1:{self.port}", None

    def options(self) -> tuple[list[str], dict]:
        """Extra `mlflow server` arguments and environment (none for a server without accounts)."""
        return [], {}

    def start(self) -> "MlflowServer":
        import time

        import requests

        assert self.process is None or self.process.poll() is not None, "this server is running already"

        args, extra = self.options()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.folder / 'server.db'}", "--workers", "1",
             "--artifacts-destination", str(self.folder / "server-artifacts"), *args],
            env=env(extra), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self.uri}/health", timeout=1).ok:
                    return self
            except requests.RequestException:
                time.sleep(0.3)
        raise AssertionError("mlflow server did not start")

    def stop(self) -> None:
        """Kill it as a lost server goes: the whole group, and any descendant that left the group."""
        import psutil

        family = psutil.Process(self.process.pid).children(recursive=True)
        os.killpg(self.process.pid, 9)
        self.process.wait()
        for survivor in psutil.wait_procs(family, timeout=15)[1]:
            survivor.kill()

    def __enter__(self) -> "MlflowServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class AuthServer(MlflowServer):
    """`mlflow server --app-name basic-auth` as the README's team setup runs it: accounts, an admin
    whose password comes from MLFLOW_AUTH_ADMIN_PASSWORD, READ as the default permission; its auth
    database under `folder`. The admin's REST calls create users and grant permissions."""
    ADMIN, ADMIN_PASSWORD = "admin", "admin-password-for-tests"

    def options(self) -> tuple[list[str], dict]:
        self.folder.mkdir(parents=True, exist_ok=True)
        ini = self.folder / "basic_auth.ini"
        ini.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{self.folder / 'auth.db'}\n"
                       f"admin_username = {self.ADMIN}\nadmin_password = unused-see-environment\n"
                       "auth_cache_ttl_seconds = 60\n")
        return ["--app-name", "basic-auth"], {
            "MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_PASSWORD": self.ADMIN_PASSWORD,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": "tests-only-secret", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}

    def admin(self, method: str, endpoint: str, **json) -> dict:
        import requests

        r = requests.request(method, f"{self.uri}/api/{endpoint}", json=json or None, timeout=30,
                             auth=(self.ADMIN, self.ADMIN_PASSWORD))
        r.raise_for_status()
        return r.json()

    def create_experiment(self, name: str) -> str:
        return self.admin("POST", "2.0/mlflow/experiments/create", name=name)["experiment_id"]

    def add_user(self, name: str, password: str, experiment_id: str, permission: str) -> None:
        self.admin("POST", "2.0/mlflow/users/create", username=name, password=password)
        self.admin("POST", "3.0/mlflow/users/permissions/grant", username=name, resource_type="experiment",
                   resource_id=experiment_id, permission=permission)


def committed_project(dest: Path, overrides: dict | None = None, files: dict[str, str] | None = None) -> Path:
    """A project copy with `files` (relative path → text) added, all committed (studies and verify
    need a clean commit)."""
    project = make_project(dest, overrides)
    for name, text in (files or {}).items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(text)
    (project / ".gitignore").write_text((REPO / ".gitignore").read_text())
    commit(project, "base")
    return project


def commit(project: Path, message: str) -> None:
    run(project, "git", "add", "-A")
    run(project, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message)


def survivors(folder: Path, timeout_s: float = 60) -> list[str]:
    """Processes still running in or on `folder` (cwd or an argument under it) once `timeout_s`
    has passed without all of them ending; [] as soon as none is left."""
    import time

    import psutil

    def running() -> list[str]:
        found = []
        for p in psutil.process_iter(["pid", "cmdline", "cwd", "status"]):
            info = p.info
            if info["status"] == psutil.STATUS_ZOMBIE or p.pid == os.getpid():
                continue
            where = [info["cwd"] or "", *(info["cmdline"] or [])]
            if any(str(folder) in w for w in where):
                found.append(f"{p.pid} {' '.join(info['cmdline'] or [])[:160]}")
        return found

    deadline = time.monotonic() + timeout_s
    while (left := running()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def ctrl_c(proc: subprocess.Popen) -> list:
    """Ctrl-C as a terminal sends it (to the whole process group of a process started with
    start_new_session=True); the processes of its family still alive a minute later, killed."""
    import psutil

    family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=60)
    _, alive = psutil.wait_procs(family, timeout=60)
    for p in alive:
        p.kill()
    return alive
