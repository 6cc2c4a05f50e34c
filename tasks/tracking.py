"""MLflow tracking shared by train and evaluate: one MLflow run per trained adapter.

Train starts the run and records its id in the adapter folder; evaluate (a separate DVC stage, maybe a
separate process) reopens that run, so ROUGE lands next to the training that produced the adapter.
Open the UI:  make ui   (mlflow ui --host 127.0.0.1 --backend-store-uri sqlite:///mlflow.db)
"""

from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager

from tasks.params import MLflowParams


def tracking_uri(cfg: MLflowParams) -> str:
    # MLFLOW_TRACKING_URI in the environment wins, as everywhere in MLflow (a team server, a test's own store).
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri


def _client_setup(cfg: MLflowParams):
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(cfg))
    if mlflow.get_experiment_by_name(cfg.experiment_name) is None:
        mlflow.create_experiment(cfg.experiment_name, artifact_location=os.path.abspath(cfg.artifact_location))
    mlflow.set_experiment(cfg.experiment_name)
    return mlflow


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def prefect_flow_run_id() -> str | None:
    try:
        from prefect.runtime import flow_run

        return flow_run.id
    except Exception:
        return None


@contextmanager
def start_run(cfg: MLflowParams, run_id: str | None = None, run_name: str | None = None, tags: dict | None = None):
    """Start a new run (run_id None) or reopen an existing one; tags every run with the code and orchestration."""
    mlflow = _client_setup(cfg)
    with mlflow.start_run(run_id=run_id, run_name=run_name) as run:
        base_tags = {"git_commit": git_commit()}
        if flow_run_id := prefect_flow_run_id():
            base_tags["prefect_flow_run_id"] = flow_run_id
        mlflow.set_tags({**base_tags, **(tags or {})})
        yield mlflow, run
