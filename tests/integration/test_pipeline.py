"""Killed stages and a killed `make run` wrapper leave no Prefect server behind (the whole pipeline:
tests/e2e/test_pipeline.py)."""

import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT


def _children(pid: int) -> set[int]:
    try:
        return {int(c) for c in open(f"/proc/{pid}/task/{pid}/children").read().split()}
    except OSError:
        return set()


def _alive(pid: int) -> bool:
    try:  # a zombie is dead for our purpose: it holds no port and runs nothing
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _server_child(proc, timeout: float = 60) -> int:
    """The pid of the uvicorn (Prefect server) child of `proc`, once it exists."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        for child in _children(proc.pid):
            if "uvicorn" in open(f"/proc/{child}/cmdline").read():
                return child
        assert proc.poll() is None, "the process ended before starting its Prefect server"
        time.sleep(0.05)
    raise TimeoutError("no Prefect server child appeared")


def _gone(pid: int, timeout: float = 10) -> bool:
    import time

    deadline = time.time() + timeout
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.05)
    return not _alive(pid)


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_a_killed_stage_leaves_no_prefect_server(tmp_path, sig):
    """Prefect's temporary server used to outlive a killed stage (re-parented to PID 1, running for good)."""
    import signal

    from tests.helpers import make_params, write_params

    params = write_params(make_params(tmp_path), tmp_path / "params.yaml")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    stage = subprocess.Popen([sys.executable, "-m", "tasks.ingest", "--params", str(params)], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        server = _server_child(stage)
        stage.send_signal(getattr(signal, sig))
        stage.wait(timeout=30)
        assert _gone(server), f"the Prefect server (pid {server}) outlived the stage killed with {sig}"
    finally:
        stage.kill()


@pytest.mark.slow
def test_make_run_wrapper_killed_leaves_no_prefect_server(tmp_path):
    """`make run` shares one server between stages through `python -m tasks.prefect_server`; SIGKILL of the
    wrapper (no cleanup code runs) still takes its server down."""
    import signal

    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    wrapper = subprocess.Popen([sys.executable, "-m", "tasks.prefect_server", sys.executable, "-c",
                                "import os, time; print(os.environ['PREFECT_API_URL'], flush=True); time.sleep(120)"],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    command = None
    try:
        assert wrapper.stdout.readline().startswith("http://127.0.0.1:")  # the command sees the shared server
        server = _server_child(wrapper)
        command = next(c for c in _children(wrapper.pid) if c != server)
        wrapper.send_signal(signal.SIGKILL)
        wrapper.wait(timeout=30)
        assert _gone(server), f"the shared Prefect server (pid {server}) outlived its wrapper"
    finally:
        wrapper.kill()
        if command and _alive(command):
            os.kill(command, signal.SIGKILL)
