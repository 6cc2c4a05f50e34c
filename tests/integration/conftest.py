"""Integration layer: stages run in Prefect flows on tiny inputs, DVC in temporary projects, MLflow stores,
subprocesses. Every test has the session's Prefect server as its API (started at the layer's first test)."""

import pytest


@pytest.fixture(scope="session", autouse=True)
def prefect_api(prefect_server) -> str:
    return prefect_server
