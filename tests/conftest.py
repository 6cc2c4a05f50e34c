"""Fixtures shared by the three layers (tests/unit, tests/integration, tests/e2e); helpers are in tests/helpers.py.
Every test runs offline, with a Prefect home and result cache under a temp folder of the session."""

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasks.params import Params
from tests.helpers import make_params

_SESSION_TMP = pytest.StashKey[Path]()


def pytest_configure(config):
    # Before anything imports prefect (test modules do, when collected; Prefect reads its environment once, at
    # import): an isolated Prefect home for the whole session, no telemetry, no Hub.
    tmp = Path(tempfile.mkdtemp(prefix="papertune-tests-"))
    config.stash[_SESSION_TMP] = tmp
    os.environ.update(
        PREFECT_HOME=str(tmp / "prefect"),
        PREFECT_RESULTS_LOCAL_STORAGE_PATH=str(tmp / "prefect" / "results"),
        PREFECT_RESULTS_PERSIST_BY_DEFAULT="true",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_LOGGING_LEVEL="CRITICAL",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="90",
        DVC_NO_ANALYTICS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}",
    )
    os.environ.pop("PREFECT_API_URL", None)  # the unit layer has none; prefect_server sets it for the others
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # One of `make test`'s two workers on two cores: torch here, and in what this worker starts, on one thread.
        # Two pools of two threads spin against each other: a 12 s training test took 97 s, and the SmolLM2
        # `dvc repro` with two threads beside the other worker took 476 s.
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    # Prefect configures logging when `prefect.main` is first imported, which replaces the root logger's handlers:
    # here, once, not inside whichever test first runs a flow, where it would remove pytest's capture handlers (that
    # test's caplog would see nothing). Later calls are incremental and keep them.
    from prefect.logging.configuration import setup_logging

    setup_logging()


def pytest_collection_modifyitems(config, items):
    # Under pytest-xdist (`make test` runs two workers, --dist worksteal), the SmolLM2 `dvc repro` starts first: it
    # is the longest test by far (half of the suite's CPU time), so one worker runs it while the other works through
    # the rest, and takes the first one's waiting tests when it runs out. Alone, the layers run fastest first.
    if os.environ.get("PYTEST_XDIST_WORKER"):  # each worker collects and orders; xdist checks they agree
        items.sort(key=lambda item: not item.nodeid.startswith("tests/e2e/test_pipeline.py::"))


def pytest_unconfigure(config):
    # Prefect stops its temporary server at interpreter exit and logs it to a stream pytest has closed by then.
    import logging

    logging.getLogger("prefect").setLevel(logging.WARNING)  # the server logger is prefect's root logger
    shutil.rmtree(config.stash[_SESSION_TMP], ignore_errors=True)


@pytest.fixture(scope="session")
def session_tmp(request) -> Path:
    """The session's temp folder (PREFECT_HOME is its `prefect` folder), removed at the end."""
    return request.config.stash[_SESSION_TMP]


@pytest.fixture(scope="session")
def prefect_server(session_tmp) -> Iterator[str]:
    """One Prefect server for the session, on 127.0.0.1 at a free port (tasks.prefect_server), started at the first
    test that asks for it: the integration and e2e layers do (their conftest.py), the unit layer never. Every flow
    the tests run, in this process or in a subprocess, uses it through PREFECT_API_URL: a temporary server per
    process costs 6 s, and 13-22 s on a new database (Prefect's migrations). Its database starts as a copy of a
    migrated, empty one kept per Prefect version in the user's cache (tasks.prefect_server.migrated_template): the
    server is ready in ~5 s instead of ~14 s; a fresh machine, like CI's, pays the migrations once. Stopped by its
    pid at the end of the session (and by the kernel if pytest dies); tests that need their own server say so."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.prefect_server import copy_database, save_template, start_server, stop_server, wait_ready

    server = start_server(log=session_tmp / "prefect-server.log")
    try:
        wait_ready(server.url, 120, server.process)
        db = session_tmp / "prefect" / "prefect.db"
        save_template(db)  # when there was none: the server has migrated this one and holds no runs yet
        copy_database(db, session_tmp / "prefect-migrated-empty.db")  # for prefect_home
        # Prefect read its environment at import: the setting for this process, the variable for its children.
        os.environ["PREFECT_API_URL"] = server.url
        try:
            with temporary_settings({PREFECT_API_URL: server.url}):
                yield server.url
                _send_what_prefect_holds()
        finally:
            os.environ.pop("PREFECT_API_URL", None)
    finally:
        stop_server(server)


def _send_what_prefect_holds() -> None:
    # Prefect's log and event workers send at interpreter exit what they still hold; by then the server is gone and
    # they would retry it for a minute. Sent now, while it answers.
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=5)


@pytest.fixture
def prefect_home(prefect_server, session_tmp, tmp_path) -> Path:
    """A Prefect home for a test's own server, with a migrated database holding nothing (a server on a new
    database spends 13-22 s migrating it; the session server's database holds other tests' runs)."""
    home = tmp_path / "prefect"
    home.mkdir()
    shutil.copy(session_tmp / "prefect-migrated-empty.db", home / "prefect.db")
    return home


@pytest.fixture
def params(tmp_path) -> Params:
    return make_params(tmp_path)


@pytest.fixture
def fresh_cache(tmp_path):
    """A Prefect result cache of the test's own, so 'computed vs cached' counts do not depend on other tests."""
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: tmp_path / "prefect-results"}):
        yield tmp_path / "prefect-results"


@pytest.fixture(scope="session")
def mlflow_history(tmp_path_factory, prefect_server) -> tuple:
    """A real MLflow history, built once per session (tests/mlflow_history.py): what tests/integration's
    test_mlflow_runs.py finds in the store and tests/e2e's test_mlflow_ui.py in the UI."""
    from tests.mlflow_history import build

    return build(tmp_path_factory.mktemp("mlflow-history"))

