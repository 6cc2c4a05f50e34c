"""Shared fixtures. Every test runs offline, with its own Prefect home and result cache under a temp folder."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# Before anything imports prefect: an isolated Prefect home for the whole session, no telemetry, no Hub.
_SESSION_TMP = Path(tempfile.mkdtemp(prefix="papertune-tests-"))
os.environ.update(
    PREFECT_HOME=str(_SESSION_TMP / "prefect"),
    PREFECT_RESULTS_LOCAL_STORAGE_PATH=str(_SESSION_TMP / "prefect" / "results"),
    PREFECT_RESULTS_PERSIST_BY_DEFAULT="true",
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
    PREFECT_SERVER_LOGGING_LEVEL="CRITICAL",
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="90",
    DVC_NO_ANALYTICS="1",
    HF_HUB_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    TOKENIZERS_PARALLELISM="false",
    MLFLOW_TRACKING_URI=f"sqlite:///{_SESSION_TMP / 'mlflow.db'}",
)
os.environ.pop("PREFECT_API_URL", None)

# One Prefect server for the whole session, on 127.0.0.1 at a free port (tasks.prefect_server: killed by its pid at
# the end, and by the kernel if pytest dies). Every flow the tests run, here or in a subprocess, uses it through
# PREFECT_API_URL: a temporary server per process costs 6 s, and 13-22 s on a new database (Prefect's migrations).
# It starts now, in the background, while pytest collects; tests that need their own server say so.
# Its database starts as a copy of a migrated, empty one kept per Prefect version in the user's cache
# (tasks.prefect_server.migrated_template): the server is ready in ~5 s instead of ~14 s; a fresh machine, like CI's,
# pays the migrations once.
from tasks.prefect_server import copy_database, save_template, start_server, stop_server, wait_ready  # noqa: E402

_SERVER = start_server(log=_SESSION_TMP / "prefect-server.log")
os.environ["PREFECT_API_URL"] = _SERVER.url


def _end_session() -> None:
    stop_server(_SERVER)
    shutil.rmtree(_SESSION_TMP, ignore_errors=True)


# Stopped at interpreter exit, after Prefect's log and event workers have sent what they hold (they drain in
# threading's exit hooks, which run before atexit's): stopped earlier, they retry an absent server for a minute.
atexit.register(_end_session)

import pytest  # noqa: E402
from prefect import flow  # noqa: E402
from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings  # noqa: E402

from tasks.params import Params, load_params  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_PDFS = ROOT / "data" / "sample" / "pdfs"


# Plumbing tests run on the random tiny Llama (seconds to build and train); the default model, SmolLM2, is run end to
# end by tests/test_pipeline.py. Its embeddings are random, so they train too, at the rate that makes it learn.
TINY = {"model": {"name": "builtin:tiny-llama"},
        "train": {"lora_layers": 0, "lora_r": 64, "lora_alpha": 64, "modules_to_save": ["embed_tokens", "lm_head"],
                  "learning_rate": 5e-3}}


def make_params(tmp: Path, pdf_dir: Path = SAMPLE_PDFS, **sections: dict) -> Params:
    """params.yaml with every output path moved under `tmp`, the tiny test model (TINY) unless `model` says
    otherwise, and some sections' fields overridden."""
    base = load_params(ROOT / "params.yaml")
    paths = {}
    for name, value in base.paths.model_dump().items():
        keep = name in ("pdf_dir", "tokenizer_corpus")
        paths[name] = (ROOT / value) if keep else tmp / value
    paths["pdf_dir"] = pdf_dir
    raw = base.model_dump()
    raw["paths"] = paths
    for section in {**TINY, **sections}:
        raw[section] = {**raw[section], **TINY.get(section, {}), **sections.get(section, {})}
    return Params.model_validate(raw)


_EMPTY_DB = _SESSION_TMP / "prefect-migrated-empty.db"


@pytest.fixture(scope="session", autouse=True)
def prefect_server() -> str:
    """The session's Prefect API, once it answers. Its database is migrated by then and holds no runs yet: a copy
    is kept for tests that need a server of their own (prefect_home)."""
    wait_ready(_SERVER.url, 120, _SERVER.process)
    db = _SESSION_TMP / "prefect" / "prefect.db"
    save_template(db)  # when there was none: the server has migrated this one and holds no runs yet
    copy_database(db, _EMPTY_DB)
    return _SERVER.url


def prefect_home(home: Path) -> Path:
    """A Prefect home for a test's own server, with a migrated database holding nothing (a server on a new
    database spends 13-22 s migrating it; the session server's database holds other tests' runs)."""
    home.mkdir(parents=True, exist_ok=True)
    shutil.copy(_EMPTY_DB, home / "prefect.db")
    return home


@pytest.fixture
def params(tmp_path) -> Params:
    return make_params(tmp_path)


@pytest.fixture
def fresh_cache(tmp_path):
    """A Prefect result cache of the test's own, so 'computed vs cached' counts do not depend on other tests."""
    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: tmp_path / "prefect-results"}):
        yield tmp_path / "prefect-results"


DATA_STAGES = ("ingest", "base_model", "chunk", "qa", "split")


def data_half(p: Params, through: str = "split") -> Params:
    """The stages from ingest through `through`, in one Prefect flow on the task runner chosen in `p.runner`."""
    from tasks.runner import call, task_runner
    from tasks.stages import stage

    def stages() -> None:
        for name in DATA_STAGES[: DATA_STAGES.index(through) + 1]:
            call(stage(name), p)

    flow(name="test-data-half", task_runner=task_runner(p.runner))(stages)()
    return p


def in_flow(fn, *args, **kwargs):
    """Run a stage function inside a Prefect flow (stages fan out with task.submit, which needs one)."""
    return flow(name="test-stage")(fn)(*args, **kwargs)


def crash_training_at(monkeypatch, step: int) -> None:
    """Training raises RuntimeError("simulated crash") at the end of optimizer step `step`, after the checkpoints
    of the steps before it are saved (as a crash or a kill would leave them); the test's end restores it."""
    from tasks import tracking

    original = tracking.loss_callback

    def crashing(mlflow):
        callback = original(mlflow)

        def on_step_end(args, state, control, **kwargs):
            if state.global_step == step:
                raise RuntimeError("simulated crash")

        callback.on_step_end = on_step_end
        return callback

    monkeypatch.setattr(tracking, "loss_callback", crashing)


def write_params(p: Params, path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(p.model_dump(mode="json"), sort_keys=False))
    return path


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc=None) -> None:
    """Poll a local URL until it answers 200 (servers here take 5-15 s to start)."""
    import time
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def start(cmd: list[str], log: Path, **kwargs):
    """Start a server in its own process group (stopped by `stop`), logging to a file."""
    import subprocess

    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True, **kwargs)


def stop(proc) -> None:
    import os
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # `serve` and some servers ignore SIGTERM while shutting down
        proc.wait(timeout=30)


def pytest_unconfigure(config):
    # Prefect stops its temporary server at interpreter exit and logs it to a stream pytest has closed by then.
    import logging

    logging.getLogger("prefect").setLevel(logging.WARNING)  # the server logger is prefect's root logger
