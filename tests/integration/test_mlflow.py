"""MLflow records that tell the truth: runs closed with the right status, a corrupt or moved store, dataset inputs,
promotion by confidence interval. (Training and evaluation end to end: test_mlflow_runs.py.)"""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from tasks import tracking
from tasks.log import PipelineError
from tests.helpers import ROOT, make_params


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (creating one takes ~5 s); each test gets its own experiment."""
    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    return f"sqlite:///{path}"


@pytest.fixture
def cfg(store, tmp_path, monkeypatch, request):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    p = make_params(tmp_path)
    return p.mlflow.model_copy(update={"artifact_location": str(tmp_path / "mlartifacts"),
                                       "experiment_name": request.node.name,
                                       "registered_model": f"{request.node.name}-adapter"})


WRITER = """
import sys, time
from tasks.params import MLflowParams
from tasks.tracking import start_run
cfg = MLflowParams.model_validate_json(sys.argv[1])
with start_run(cfg, "train", "doomed") as (mlflow, run):
    print(run.info.run_id, flush=True)
    time.sleep(120)
"""


def run_writer(cfg, store):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, cfg.model_dump_json()], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env={**os.environ, "MLFLOW_TRACKING_URI": store})
    run_id = proc.stdout.readline().strip()
    assert run_id, "the writer did not start its run"
    return proc, run_id


def test_sigterm_closes_the_run_as_killed(cfg, store):
    mlflow, client, _ = tracking.open_store(cfg)
    proc, run_id = run_writer(cfg, store)
    assert client.get_run(run_id).info.status == "RUNNING"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert client.get_run(run_id).info.status == "KILLED"


def test_a_sigkilled_run_is_closed_as_killed_by_the_next_process_and_a_live_one_left_alone(cfg, store):
    _, client, exp_id = tracking.open_store(cfg)
    proc, run_id = run_writer(cfg, store)
    assert tracking.close_stale_runs(client, exp_id) == []  # its writer is alive: not ours to close
    proc.kill()
    proc.wait(timeout=30)
    assert client.get_run(run_id).info.status == "RUNNING"  # nobody could close it
    with tracking.start_run(cfg, "evaluate", "next") as (_, run):
        pass
    killed = client.get_run(run_id)
    assert killed.info.status == "KILLED" and killed.info.end_time is not None
    assert f"process {proc.pid} ended without closing the run" in killed.data.tags["papertune.end"]
    assert client.get_run(run.info.run_id).info.status == "FINISHED"


def test_an_exception_fails_the_run_and_tags_are_written_once(cfg):
    with pytest.raises(ValueError):
        with tracking.start_run(cfg, "train", "broken", tags={"papertune.train_decision": "trained"}) as (_, run):
            raise ValueError("boom")
    _, client, _ = tracking.open_store(cfg)
    r = client.get_run(run.info.run_id)
    assert r.info.status == "FAILED"
    assert r.data.tags["papertune.kind"] == "train" and r.data.tags["papertune.pid"] == str(os.getpid())


def test_corrupt_store_is_one_line_naming_the_file(tmp_path, monkeypatch):
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"not a database" * 500)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    p = make_params(tmp_path)
    with pytest.raises(PipelineError, match=f"MLflow store {db} is corrupt .*mv {db} {db}.corrupt"):
        tracking.open_store(p.mlflow)


def test_a_moved_project_writes_artifacts_inside_itself(tmp_path, monkeypatch):
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    monkeypatch.chdir(old)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")  # relative, as in params.yaml
    cfg = make_params(tmp_path).mlflow  # artifact_location: mlartifacts (relative to the project)
    (old / "note.txt").write_text("kept")
    with tracking.start_run(cfg, "train", "before the move") as (mlflow, first):
        mlflow.log_artifact("note.txt")
    assert first.info.artifact_uri.startswith(str(old / "mlartifacts"))

    shutil.move(old, new)
    monkeypatch.chdir(new)
    # As a new process would: MLflow keeps one database connection per URI string in a process.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{new / 'mlflow.db'}")
    with tracking.start_run(cfg, "train", "after the move") as (mlflow, second):
        mlflow.log_artifact("note.txt")
    assert second.info.artifact_uri.startswith(str(new / "mlartifacts"))
    assert (new / "mlartifacts").exists() and not old.exists()
    # The run from before the move still finds its artifacts: they moved with the project.
    assert open(mlflow.artifacts.download_artifacts(run_id=first.info.run_id, artifact_path="note.txt",
                                                    dst_path=str(tmp_path / "dl"))).read() == "kept"


def test_split_files_become_named_dataset_inputs_with_dvc_hash(cfg, tmp_path):
    split = tmp_path / "eval.jsonl"
    rows = [{"question": f"What is {i}?", "answer": str(i), "grounding": {"rougeL_recall": 1.0}} for i in range(5)]
    split.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with tracking.start_run(cfg, "train", "with data") as (mlflow, run):
        digest = tracking.log_dataset(mlflow, split, "eval", "validation").digest
    assert digest == tracking.md5_file(split)
    _, client, _ = tracking.open_store(cfg)
    (inp,) = client.get_run(run.info.run_id).inputs.dataset_inputs
    assert inp.dataset.name == "eval" and inp.dataset.digest == digest
    assert str(split) in inp.dataset.source
    assert json.loads(inp.dataset.profile)["num_rows"] == 5
    assert {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "validation"


def test_champion_moves_only_when_the_ci_lies_above(cfg):
    mlflow, client, _ = tracking.open_store(cfg)
    client.create_registered_model(cfg.registered_model)

    def version(adapter_hash):
        return client.create_model_version(cfg.registered_model, source=f"/tmp/{adapter_hash}",
                                           tags={tracking.ADAPTER_HASH: adapter_hash})

    def score(mean, lo, hi):
        return {"rougeL": mean, "rougeL_ci95": [lo, hi], "n": 40}

    v1, v2, v3, v4 = (version(h) for h in ("a1", "a2", "a3", "a4"))
    first = tracking.promote(client, cfg, v1, score(0.20, 0.15, 0.25), "evalset1")
    assert first["promoted"] and "no champion yet" in first["decision"]
    close = tracking.promote(client, cfg, v2, score(0.24, 0.20, 0.29), "evalset1")  # better mean, CIs overlap
    assert not close["promoted"] and tracking.champion(client, cfg).version == v1.version
    better = tracking.promote(client, cfg, v3, score(0.40, 0.33, 0.47), "evalset1")
    assert better["promoted"] and tracking.champion(client, cfg).version == v3.version
    other_set = tracking.promote(client, cfg, v4, score(0.90, 0.85, 0.95), "evalset2")
    assert not other_set["promoted"] and "no score on eval set evalset2" in other_set["decision"]

    # Both scores and the decision are on the version, for a person reading the registry.
    v2 = client.get_model_version(cfg.registered_model, v2.version)
    assert "not promoted: ROUGE-L 0.2400 [0.2000, 0.2900]" in v2.description
    assert f"champion v{v1.version}'s (ROUGE-L 0.2000 [0.1500, 0.2500]" in v2.description
    assert json.loads(v2.tags["heldout.evalset1"])["rougeL"] == 0.24
    assert tracking.version_of(client, cfg, "a3").version == v3.version


def test_a_truncated_store_is_one_line_and_an_emptied_one_starts_afresh(cfg, store, tmp_path, monkeypatch):
    tracking.open_store(cfg)  # the module's store exists and holds this experiment
    db = tmp_path / "mlflow.db"
    data = tracking.sqlite_file(store).read_bytes()
    db.write_bytes(data[: len(data) // 2])  # a copy cut short (disk full, interrupted copy)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    with pytest.raises(PipelineError, match=f"MLflow store {db} is corrupt"):
        tracking.open_store(cfg)
    db.write_bytes(b"")  # truncated to nothing: MLflow creates a new store in it
    tracking.check_store(f"sqlite:///{db}")
