"""The fault suite, end to end: `make serve`'s scheduled runs on a Prefect server of their own, and nothing left
behind when it stops (issue 11; the rest: tests/unit/test_faults.py, tests/integration/test_faults.py)."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import ROOT


def _group_alive(pgid: int) -> list[str]:
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(stat.parent.name)
    return alive


@pytest.mark.slow  # starts a Prefect server
def test_serve_schedules_runs_and_leaves_nothing_behind(tmp_path, prefect_home):
    # The deployment from prefect.yaml, its cron swapped for a 5 s interval so that a run fires during the test;
    # the folder has no params.yaml, so each run stops at once instead of running the pipeline.
    shutil.copy(ROOT / "prefect.yaml", tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(prefect_home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_RUNNER_POLL_FREQUENCY="1", PYTHONPATH=str(ROOT))  # a due run starts within 1 s, not 10
    serve = subprocess.Popen([sys.executable, "-c", "from flows.serve import serve; serve(interval_s=5)"],
                             cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    try:
        first = serve.stdout.readline()
        assert "serving deployment 'nightly' (every 5 s) on the Prefect API http://127.0.0.1:" in first, first
        api = first.split("Prefect API ")[1].split(";")[0]
        deadline, states = time.time() + 150, set()
        while time.time() < deadline and not states & {"COMPLETED", "FAILED", "CRASHED"}:
            runs = httpx.post(f"{api}/flow_runs/filter", json={"sort": "EXPECTED_START_TIME_ASC", "limit": 20}).json()
            states = {r["state_type"] for r in runs if r["deployment_id"]}
            time.sleep(0.5)
        # Scheduled runs appear, and one fired: it failed (no params.yaml in that folder) with the one-line reason.
        assert "SCHEDULED" in states and "FAILED" in states, states
        failed = httpx.post(f"{api}/flow_runs/filter", json={"flow_runs": {"state": {"type": {"any_": ["FAILED"]}}}})
        assert "params.yaml: no such params file" in failed.json()[0]["state"]["message"]
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=30)
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait()
    time.sleep(1)
    assert _group_alive(serve.pid) == []  # no server, no flow-run process left
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{api}/health", timeout=2)
