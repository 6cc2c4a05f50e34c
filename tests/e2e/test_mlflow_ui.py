"""What a person reads in the real MLflow UI (headless Chromium, Debian's package; `make test` installs it) about a
real training and its evaluations (the `mlflow_history` fixture), and two runs compared side by side."""

import html
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from tasks import tracking
from tasks.params import flatten
from tests.helpers import free_port, start, stop, wait_http

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Headless as root, and quiet: without the background-networking flags Chromium keeps trying hosts it cannot reach.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1600,6000", "--virtual-time-budget=25000"]


def visible_lines(dom: str) -> list[str]:
    """The page's text as a person sees it, one element's text per line."""
    text = re.sub(r"<script.*?</script>|<style.*?</style>", "", dom, flags=re.S)
    return [line.strip() for line in html.unescape(re.sub(r"<[^>]+>", "\n", text)).splitlines() if line.strip()]


def after(lines: list[str], label: str, n: int = 1, section: str | None = None) -> list[str]:
    """The n lines following the first line that reads `label` (how the run page lays out label: value), in the
    part of the page that starts at the line `section` if given."""
    if section is not None:
        assert section in lines, f"{section!r} is not on the page"
        lines = lines[lines.index(section):]
    assert label in lines, f"{label!r} is not on the page"
    i = lines.index(label)
    return lines[i + 1:i + 1 + n]


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it as root)")
def test_ui_shows_training_and_evaluation_runs_with_data_model_and_decision(mlflow_history, tmp_path, monkeypatch):
    p, client, exp_id, train_run, _, _ = mlflow_history
    store = p.mlflow.tracking_uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    # Two more runs, in an experiment of their own, to compare side by side: all params, ROUGE per mode and model.
    cfg = p.mlflow.model_copy(update={"experiment_name": "compare", "artifact_location": str(tmp_path / "art")})
    compared = []
    for lr, rouge_l in ((0.003, 0.2134), (0.0007, 0.1571)):
        params = p.model_copy(update={"train": p.train.model_copy(update={"learning_rate": lr})})
        with tracking.start_run(cfg, "train", f"papertune lr={lr}") as (mlflow, run):
            mlflow.log_params(flatten(params))
            mlflow.log_metrics({"closed_book.base.rougeL": 0.0123, "closed_book.finetuned.rougeL": rouge_l})
            compared.append(run)
    eval_run = client.search_runs([exp_id], "tags.`papertune.kind` = 'evaluate'",
                                  order_by=["attributes.start_time ASC"])[0]

    port = free_port()
    server = start([os.path.join(os.path.dirname(sys.executable), "mlflow"), "server", "--host", "127.0.0.1",
                    "--port", str(port), "--backend-store-uri", store, "--workers", "1"],
                   tmp_path / "mlflow.log", cwd=tmp_path)
    ui = f"http://127.0.0.1:{port}/#"
    profile = ["--user-data-dir=" + str(tmp_path / "chromium")]

    def page(url: str) -> list[str]:
        return visible_lines(subprocess.run([CHROMIUM, *FLAGS, *profile, "--dump-dom", url], capture_output=True,
                                            text=True, timeout=120).stdout)

    try:
        wait_http(f"http://127.0.0.1:{port}/health", 120, server)
        trained = page(f"{ui}/experiments/{exp_id}/runs/{train_run.info.run_id}")
        evaluated = page(f"{ui}/experiments/{exp_id}/runs/{eval_run.info.run_id}")
        ids = json.dumps([r.info.run_id for r in compared])
        compare_url = f"{ui}/compare-runs?runs={ids}&experiments={json.dumps([compared[0].info.experiment_id])}"
        compare = page(compare_url.replace(" ", ""))
    finally:
        stop(server)

    # The training run: what it trained on, the model it made, its decision, its evaluations.
    train_md5, eval_md5 = tracking.md5_file(p.paths.train_split), tracking.md5_file(p.paths.eval_split)
    assert after(trained, "Status", section="About this run") == ["Finished"]
    assert after(trained, f"train ({train_md5})", 2) == ["training", "+1"]  # "+1": the eval split, one click away
    assert "Logged models (1)" in trained and "adapter" in trained
    assert after(trained, "Registered models", 2, section="About this run") == [p.mlflow.registered_model, "v1"]
    assert after(trained, "papertune.train_decision") == [": trained"]
    assert after(trained, "Child runs", 3) == ["evaluate", ",", "evaluate"]  # both evaluations, as children
    # An evaluation run: its parent, its data, its scores, the model it evaluated and the promotion decision.
    assert after(evaluated, "Parent run") == ["train"]
    assert after(evaluated, f"heldout ({eval_md5})") == ["evaluation"]
    assert "closed_book.finetuned.rougeL" in evaluated and "Logged models (1)" in evaluated
    assert after(evaluated, "papertune.promotion")[0].startswith(": champion: ROUGE-L")
    # Two runs side by side: names, the param that differs, the scores (the UI shows 3 decimals).
    assert "papertune lr=0.003" in compare and "papertune lr=0.0007" in compare
    assert "train.learning_rate" in compare and "0.003" in compare and "0.0007" in compare
    assert "closed_book.finetuned.rougeL" in compare and "0.213" in compare and "0.157" in compare
