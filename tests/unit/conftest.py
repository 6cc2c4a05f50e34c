"""Unit layer, the inner loop (`make test-unit`, well under a minute): pure functions and small in-process objects.
No Prefect server is started for it; a test that runs a Prefect flow or starts one of the project's programs fails,
naming the layer it belongs to."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.params import Params
from tests.helpers import make_params, with_base_model

BIN = Path(sys.executable).parent  # the environment's programs: python, dvc, prefect, mlflow, uvicorn


@pytest.fixture(autouse=True)
def in_process_only(monkeypatch):
    """Fails a unit test that runs a Prefect flow or starts a program of the project's environment (python, dvc,
    prefect, mlflow: a stage, a server, a CLI) or git. Libraries' own helper commands (`platform` runs `file`) pass."""
    from prefect.flows import Flow

    def refuse(what: str):
        raise AssertionError(f"a unit test {what}: it belongs in tests/integration (or tests/e2e)")

    popen = subprocess.Popen.__init__

    def guarded_popen(self, args, *rest, **kwargs):
        first = os.fspath(args if isinstance(args, (str, os.PathLike)) else args[0])
        program = Path(first.split()[0] if isinstance(args, str) else first)
        if program.parent == BIN or program.name.startswith("python") or program.name == "git":
            refuse(f"starts a process ({program.name})")
        popen(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded_popen)
    monkeypatch.setattr(Flow, "__call__", lambda *args, **kwargs: refuse("runs a Prefect flow"))


@pytest.fixture(scope="session")
def base_model_built(tmp_path_factory) -> Params:
    """Params (outputs under a temp folder) with the builtin tiny base model built, once per session, in this
    process and without a flow (a second or two): its tokenizer and config for chunking, prompts, training
    settings. Read it, do not change it."""
    return with_base_model(make_params(tmp_path_factory.mktemp("base-model")))
