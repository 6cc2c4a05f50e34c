"""Compare two runs in the real MLflow UI, in headless Chromium (Debian's package; `make test` installs it)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tasks.params import flatten
from tasks.tracking import start_run
from tests.conftest import free_port, make_params, start, stop, wait_http

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Headless as root, and quiet: without the background-networking flags Chromium keeps trying hosts it cannot reach.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1600,6000", "--virtual-time-budget=25000"]


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it as root)")
def test_run_comparison_shows_both_runs_the_differing_param_and_rouge(tmp_path, monkeypatch):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    p = make_params(tmp_path)
    cfg = p.mlflow.model_copy(update={"artifact_location": str(tmp_path / "mlartifacts")})
    run_ids = []
    # Two finished runs as the pipeline records them: all params flattened, ROUGE per mode and model.
    for lr, rouge_l in ((0.003, 0.2134), (0.0007, 0.1571)):
        params = p.model_copy(update={"train": p.train.model_copy(update={"learning_rate": lr})})
        with start_run(cfg, run_name=f"papertune lr={lr}") as (mlflow, run):
            mlflow.log_params(flatten(params))
            mlflow.log_metrics({"closed_book.base.rougeL": 0.0123, "closed_book.finetuned.rougeL": rouge_l})
            run_ids.append(run.info.run_id)
            experiment_id = run.info.experiment_id

    port = free_port()
    server = start([os.path.join(os.path.dirname(sys.executable), "mlflow"), "server", "--host", "127.0.0.1",
                    "--port", str(port), "--backend-store-uri", store, "--workers", "1"],
                   tmp_path / "mlflow.log", cwd=tmp_path)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 120, server)
        url = (f"http://127.0.0.1:{port}/#/compare-runs?runs={json.dumps(run_ids)}"
               f"&experiments={json.dumps([experiment_id])}").replace(" ", "")
        profile = ["--user-data-dir=" + str(tmp_path / "chromium")]
        dom = subprocess.run([CHROMIUM, *FLAGS, *profile, "--dump-dom", url], capture_output=True, text=True,
                             timeout=120).stdout
        shot = tmp_path / "compare-runs.png"
        subprocess.run([CHROMIUM, *FLAGS, *profile, f"--screenshot={shot}", url], capture_output=True, timeout=120)
    finally:
        stop(server)
    assert "papertune lr=0.003" in dom and "papertune lr=0.0007" in dom
    assert "train.learning_rate" in dom and "0.003" in dom and "0.0007" in dom
    assert "closed_book.finetuned.rougeL" in dom and "0.213" in dom and "0.157" in dom  # the UI shows 3 decimals
    assert shot.exists() and shot.stat().st_size > 20_000
