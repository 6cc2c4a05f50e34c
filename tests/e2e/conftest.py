"""End-to-end layer: the whole pipeline under `dvc repro`, the scheduled deployment and `make serve`, `mlflow models
serve`, the MLflow UI. Every test has the session's Prefect server as its API (started at the layer's first test)."""

import pytest


@pytest.fixture(scope="session", autouse=True)
def prefect_api(prefect_server) -> str:
    return prefect_server
