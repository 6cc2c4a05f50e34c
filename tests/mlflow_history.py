"""A real MLflow history: data half, one training of the builtin tiny model (a few steps), one evaluation, a skipped
training and a second evaluation, in a store of its own. Built once per session by the `mlflow_history` fixture
(tests/conftest.py) for tests/integration/test_mlflow_runs.py (what the store holds) and
tests/e2e/test_mlflow_ui.py (what the UI shows of it)."""

from pathlib import Path

import pytest

from tasks import evaluate, promote, tracking, train
from tests.helpers import data_half, in_flow, make_params

FAST = dict(max_steps=8, logging_steps=4, eval_steps=4, save_steps=4, per_device_train_batch_size=4)
EVAL = dict(max_examples=8, max_new_tokens=8, modes=["closed_book"], bootstrap_samples=200)


def build(tmp: Path) -> tuple:
    """(params, client, experiment id, train run, train run after the first evaluation, skipped result); the
    store's URI is params.mlflow.tracking_uri (set MLFLOW_TRACKING_URI to it to read it)."""
    store = f"sqlite:///{tmp / 'mlflow.db'}"
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", store)
    try:
        p = data_half(make_params(tmp, train=FAST, evaluate=EVAL,
                                  mlflow={"tracking_uri": store, "artifact_location": str(tmp / "mlartifacts")}))
        _, client, exp_id = tracking.open_store(p.mlflow)
        in_flow(train.run, p.train, p.mlflow, p.paths, p)
        (train_run,) = client.search_runs([exp_id], "tags.`papertune.kind` = 'train'")
        in_flow(evaluate.run, p.evaluate, p.qa, p.mlflow, p.paths)
        in_flow(promote.run, p.mlflow, p.evaluate, p.paths)
        after_first_eval = client.get_run(train_run.info.run_id)
        skipped = in_flow(train.run, p.train, p.mlflow, p.paths, p)
        in_flow(evaluate.run, p.evaluate, p.qa, p.mlflow, p.paths)
        in_flow(promote.run, p.mlflow, p.evaluate, p.paths)
    finally:
        mp.undo()
    return p, client, exp_id, train_run, after_first_eval, skipped
