"""The scheduled deployment from prefect.yaml against a real Prefect server on 127.0.0.1."""

import os
import shutil
import subprocess
import sys
import time

import httpx
import pytest

from tests.helpers import ROOT, SAMPLE_PDFS, make_params, start, stop, write_params

BIN = os.path.dirname(sys.executable)


def wait_flow_run(api: str, run_id: str, timeout: float) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        run = httpx.get(f"{api}/flow_runs/{run_id}").json()
        if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return run
        time.sleep(0.5)
    raise TimeoutError(f"flow run {run_id} did not finish in {timeout} s")


def logs(api: str, run_id: str) -> str:
    """Messages of a flow run and of its subflow runs (the stages run in a subflow with the chosen task runner)."""
    children = httpx.post(f"{api}/flow_runs/filter",
                          json={"flow_runs": {"parent_flow_run_id": {"any_": [run_id]}}}).json()
    ids = [run_id] + [c["id"] for c in children]
    rows = httpx.post(f"{api}/logs/filter", json={"logs": {"flow_run_id": {"any_": ids}}, "limit": 200}).json()
    return "\n".join(r["message"] for r in rows)


@pytest.mark.slow  # a worker and two pipeline runs
def test_scheduled_deployment_runs_incrementally(tmp_path, prefect_server):
    api = prefect_server  # the session's server: it has the scheduler and the API a worker needs
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    base_env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", PATH=f"{BIN}:{os.environ['PATH']}")
    worker = None
    try:
        env = {**base_env, "PREFECT_API_URL": api, "PREFECT_HOME": str(tmp_path / "client-home"),
               "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp_path / "results"),
               "PREFECT_WORKER_QUERY_SECONDS": "1",  # picks a triggered run up in 1 s, not 10
               "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "HF_HUB_OFFLINE": "1"}

        def cli(*args):
            r = subprocess.run([f"{BIN}/prefect", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                               timeout=120)
            assert r.returncode == 0, r.stdout + r.stderr
            return r.stdout

        r = httpx.post(f"{api}/work_pools/", json={"name": "papertune-local", "type": "process"})  # as the CLI does
        assert r.status_code in (201, 409), r.text  # 409: the session server has it from an earlier run
        cli("--no-prompt", "deploy", "--all")
        deployment = httpx.get(f"{api}/deployments/name/papertune/nightly").json()
        assert deployment["schedules"][0]["schedule"]["cron"] == "0 3 * * *"
        assert deployment["schedules"][0]["active"] and not deployment["paused"]
        assert deployment["parameters"] == {"params_file": "params.yaml", "pdf_dir": None}

        corpus = tmp_path / "corpus"
        corpus.mkdir()
        for pdf in sorted(SAMPLE_PDFS.glob("*.pdf"))[:4]:
            shutil.copy(pdf, corpus)
        # Nightly runs retrain only when half of the training pairs changed (one paper in five does not).
        p = make_params(tmp_path / "out", train={"max_steps": 10, "eval_steps": 5, "save_steps": 5,
                                                 "min_changed_fraction": 0.5},
                        evaluate={"max_examples": 4, "max_new_tokens": 8, "modes": ["closed_book"]})
        params_file = write_params(p, tmp_path / "params.yaml")
        worker = start([f"{BIN}/prefect", "worker", "start", "--pool", "papertune-local"], tmp_path / "worker.log",
                       cwd=ROOT, env=env)

        def trigger() -> dict:
            r = httpx.post(f"{api}/deployments/{deployment['id']}/create_flow_run",
                           json={"parameters": {"params_file": str(params_file), "pdf_dir": str(corpus)}}, timeout=30)
            assert r.status_code == 201, (r.status_code, r.text)
            done = wait_flow_run(api, r.json()["id"], 400)
            assert done["state"]["type"] == "COMPLETED", (tmp_path / "worker.log").read_text()[-3000:]
            return done

        first = trigger()
        assert (p.paths.eval_metrics).exists() and (p.paths.adapter / "adapter_model.safetensors").exists()
        assert "ingest: 4 computed" in logs(api, first["id"])

        # Next scheduled run, one PDF added: only it is ingested; the rest comes from the cache, and too little of
        # the training data changed to retrain.
        shutil.copy(sorted(SAMPLE_PDFS.glob("*.pdf"))[4], corpus)
        second = logs(api, trigger()["id"])
        assert "ingest: 1 computed, 4 from cache" in second and "chunk: 1 computed, 4 from cache" in second
        assert "train: skipped, only" in second and "< train.min_changed_fraction=0.5" in second
        assert "base model: builtin:tiny-llama unchanged" in second  # not rebuilt by every scheduled run

    finally:
        if worker is not None:
            stop(worker)
