"""What MLflow holds after real training and evaluation runs on the builtin tiny model (a few steps): one run per
thing that happened, datasets as inputs, the adapter as a registered pyfunc that answers, evaluation without the
training's store."""

import json
from pathlib import Path

import pytest

from tasks import evaluate, promote, tracking, train
from tasks.files import read_json
from tasks.hashing import dir_hash
from tasks.log import PipelineError
from tests.helpers import crash_training_at, in_flow


@pytest.fixture(scope="module")
def trained(mlflow_history):
    """Data half, one training, one evaluation, a skipped training and a second evaluation, in a store of its own
    (built once per session: tests/e2e/test_mlflow_ui.py looks at the same runs in the UI)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", mlflow_history[0].mlflow.tracking_uri)
    yield mlflow_history
    mp.undo()


pytestmark = pytest.mark.slow


def runs(client, exp_id, kind):
    return client.search_runs([exp_id], f"tags.`papertune.kind` = '{kind}'", order_by=["attributes.start_time ASC"])


def test_training_run_is_written_once_and_never_rewritten(trained):
    p, client, exp_id, train_run, after_first_eval, skipped = trained
    assert skipped["skipped"].startswith("QA dataset and training params unchanged")
    now = client.get_run(train_run.info.run_id)
    assert now.info.status == "FINISHED"
    # Two evaluations and a skipped training later: same end time, same tags, same metrics.
    assert now.info.end_time == train_run.info.end_time == after_first_eval.info.end_time
    assert now.data.tags == train_run.data.tags
    assert now.data.metrics == train_run.data.metrics
    assert now.data.tags["papertune.train_decision"] == "trained"
    assert len(runs(client, exp_id, "train")) == 1

    (skip,) = runs(client, exp_id, "train-skipped")
    assert skip.data.tags["papertune.train_decision"].startswith("skipped: QA dataset and training params unchanged")
    assert skip.data.tags["papertune.adapter_run_id"] == train_run.info.run_id
    assert skip.info.status == "FINISHED"


def test_each_evaluation_is_a_child_run_of_its_training(trained):
    p, client, exp_id, train_run, *_ = trained
    evals = runs(client, exp_id, "evaluate")
    assert len(evals) == 2 and evals[0].info.run_id != evals[1].info.run_id
    adapter_hash = dir_hash(p.paths.adapter)
    for r in evals:
        assert r.info.status == "FINISHED" and r.info.end_time > r.info.start_time
        assert r.data.tags["mlflow.parentRunId"] == train_run.info.run_id
        assert r.data.tags["papertune.adapter_hash"] == adapter_hash == train_run.data.tags["papertune.adapter_hash"]
        assert r.data.tags["papertune.eval_set_hash"].startswith(tracking.md5_file(p.paths.eval_split))
        assert 0 <= r.data.metrics["closed_book.finetuned.rougeL"] <= 1
    assert evals[1].info.start_time >= evals[0].info.end_time  # each its own start and end


def test_splits_are_dataset_inputs_with_the_dvc_hash(trained):
    p, client, exp_id, train_run, *_ = trained
    inputs = {i.dataset.name: i for i in client.get_run(train_run.info.run_id).inputs.dataset_inputs}
    assert set(inputs) == {"train", "eval"}
    assert inputs["train"].dataset.digest == tracking.md5_file(p.paths.train_split)
    assert str(p.paths.train_split) in inputs["train"].dataset.source
    (held_out,) = client.get_run(runs(client, exp_id, "evaluate")[0].info.run_id).inputs.dataset_inputs
    assert held_out.dataset.name == "heldout" and held_out.dataset.digest == tracking.md5_file(p.paths.eval_split)


def test_the_adapter_is_a_registered_logged_model_that_answers(trained, monkeypatch, capsys):
    import mlflow

    p, client, exp_id, train_run, *_ = trained
    tracking.open_store(p.mlflow)
    (model,) = mlflow.search_logged_models(experiment_ids=[exp_id], output_format="list")
    assert model.source_run_id == train_run.info.run_id
    assert model.params["train.max_steps"] == "8"
    # Training's metrics, and each evaluation's scores on the held-out set, are linked to the model.
    linked = {(m.key, m.dataset_name) for m in model.metrics}
    assert ("final_eval_loss", None) in linked and ("closed_book.finetuned.rougeL", "heldout") in linked
    for r in runs(client, exp_id, "evaluate"):
        assert [i.model_id for i in client.get_run(r.info.run_id).inputs.model_inputs] == [model.model_id]
    # The base weights stay in the project: only the adapter folder is in the model's artifacts.
    files = {f.name for f in Path(model.artifact_location).rglob("*") if f.is_file()}
    assert "adapter_model.safetensors" in files and "MLmodel" in files
    assert "model.safetensors" not in files and "config.json" not in files

    version = tracking.champion(client, p.mlflow)  # the first scored version is the champion
    assert version.tags["papertune.adapter_hash"] == dir_hash(p.paths.adapter)
    assert version.description.startswith("champion: ROUGE-L") and "no champion yet" in version.description

    from flows import ask

    loaded = tracking.load_logged_model(p.mlflow, f"models:/{p.mlflow.registered_model}@champion")
    answers = loaded.predict(["What does LoRA freeze?", "What is QLoRA?"])
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    # The same answer as the project's own adapter folder gives (same base, same adapter, greedy).
    params_file = p.paths.adapter.parent / "ask-params.yaml"
    from tests.helpers import write_params

    write_params(p.model_copy(update={"evaluate": p.evaluate.model_copy(
        update={"max_new_tokens": p.mlflow.model_max_new_tokens})}), params_file)
    assert ask.answer("What does LoRA freeze?", str(params_file)) == answers[0]
    assert ask.answer_with_model("What does LoRA freeze?", f"models:/{p.mlflow.registered_model}@champion",
                                 str(params_file)) == answers[0]
    # The command line: `python -m flows.ask QUESTION --base` prints both models' answers side by side.
    monkeypatch.setattr("sys.argv", ["ask", "What does LoRA freeze?", "--params", str(params_file), "--base"])
    ask.main()
    header, rule, *rows = capsys.readouterr().out.splitlines()
    assert header.startswith("fine-tuned") and header.endswith("| base") and set(rule) == {"-", "+"}
    left = " ".join(row[:60] for row in rows)  # the first column is 60 characters wide
    assert left.split() == answers[0].split()  # the fine-tuned column is the adapter's answer


def test_no_run_id_in_dvc_tracked_outputs(trained):
    p, client, exp_id, train_run, *_ = trained
    run_id = train_run.info.run_id
    for path in [*p.paths.adapter.iterdir(), p.paths.eval_metrics, p.paths.train_metrics]:
        if path.is_file():
            assert run_id not in path.read_text(errors="ignore"), path
    assert "mlflow_run_id" not in read_json(p.paths.adapter / train.META)


def test_evaluate_stands_alone_with_another_store(trained, tmp_path, monkeypatch):
    p, *_ = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'elsewhere.db'}")
    p.paths.eval_metrics.unlink()
    report = in_flow(evaluate.run, p.evaluate, p.qa, p.mlflow, p.paths)
    assert json.loads(p.paths.eval_metrics.read_text()) == report
    in_flow(promote.run, p.mlflow, p.evaluate, p.paths)
    _, client, exp_id = tracking.open_store(p.mlflow)
    (r,) = runs(client, exp_id, "evaluate")
    assert r.data.tags["papertune.adapter_run_id"] == "not in this store"
    assert r.data.tags["papertune.adapter_hash"] == dir_hash(p.paths.adapter)
    assert "mlflow.parentRunId" not in r.data.tags
    assert "no registered version" in r.data.tags["papertune.promotion"]


def test_evaluate_with_a_corrupt_store_keeps_its_metrics_and_fails(trained, tmp_path, monkeypatch):
    p, *_ = trained
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"\x00garbage" * 1000)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    p.paths.eval_metrics.unlink()
    with pytest.raises(PipelineError, match=f"not logged to MLflow: MLflow store {db} is corrupt") as e:
        in_flow(evaluate.run, p.evaluate, p.qa, p.mlflow, p.paths)
    assert "\n" not in str(e.value)
    assert set(p.evaluate.modes) <= set(json.loads(p.paths.eval_metrics.read_text()))  # the scores stand


def test_a_champion_scored_on_another_eval_set_is_rescored_before_comparing(trained, tmp_path):
    """The split changed since the champion was scored: evaluation answers with the champion's registered adapter
    on the new set too, so both CIs come from the same questions."""
    from tasks.mlflow_model import log_adapter_model

    p, client, exp_id, *_ = trained
    tracking.open_store(p.mlflow)  # the history's store (another test may have pointed mlflow elsewhere)
    cfg = p.mlflow.model_copy(update={"experiment_name": "rescoring", "registered_model": "rescoring-adapter"})
    # The history's adapter, logged and registered again as the champion of another registered model (the UI test
    # reads the history's own model, whose registered versions must stay as the pipeline left them).
    with tracking.start_run(cfg, "train", "earlier training") as (mlflow_, _):
        info = log_adapter_model(mlflow_, p.paths.adapter, p.paths.base_model, cfg.model_max_new_tokens, {})
        old = tracking.register(mlflow_, cfg, info.model_uri, dir_hash(p.paths.adapter))
    tracking.promote(client, cfg, old, {"rougeL": 0.01, "rougeL_ci95": [0.0, 0.02], "n": 8}, "an-older-eval-set")

    q = moved_outputs(p, tmp_path, mlflow=cfg, train=p.train.model_copy(update={"seed": 1}))
    in_flow(train.run, q.train, q.mlflow, q.paths, q)
    in_flow(evaluate.run, q.evaluate, q.qa, q.mlflow, q.paths)
    decision = in_flow(promote.run, q.mlflow, q.evaluate, q.paths)

    _, client, rescoring = tracking.open_store(cfg)
    (ev,) = runs(client, rescoring, "evaluate")
    eval_hash = ev.data.tags["papertune.eval_set_hash"]
    assert ev.data.tags["papertune.champion_rescored"].startswith(f"champion v{old.version} re-scored on eval set")
    rescored = json.loads(client.get_model_version(cfg.registered_model, old.version).tags[tracking.score_tag(eval_hash)])
    assert rescored["n"] == 8 and 0 <= rescored["rougeL_ci95"][0] <= rescored["rougeL_ci95"][1] <= 1
    new = tracking.version_of(client, cfg, dir_hash(q.paths.adapter))
    assert f"champion v{old.version}'s ({tracking.fmt(rescored)})" in new.description
    # The promote stage's own record (paths.promotion) says the same as the registry.
    record = json.loads(q.paths.promotion.read_text())
    assert record["decision"] == decision["decision"] == new.tags["papertune.promotion"]
    assert record["papertune.champion_rescored"] == ev.data.tags["papertune.champion_rescored"]


def moved_outputs(p, tmp_path, **updates):
    """p with every path training and evaluation write under tmp_path (the history's inputs are only read)."""
    import shutil

    moved = {k: tmp_path / f"{k}{Path(v).suffix}" for k, v in p.paths.model_dump().items()
             if k in ("adapter", "checkpoints", "train_metrics", "loss_curve", "eval_metrics", "predictions",
                      "rouge_plot", "plots_dir", "eval_split")}
    shutil.copy(p.paths.eval_split, moved["eval_split"])
    return p.model_copy(update={"paths": p.paths.model_copy(update=moved), **updates})


def test_a_crashed_training_is_failed_and_its_resumption_is_a_new_linked_run(trained, tmp_path, monkeypatch):
    p, *_ = trained
    cfg = p.mlflow.model_copy(update={"experiment_name": "resume", "registered_model": "resume-adapter"})
    q = moved_outputs(p, tmp_path, mlflow=cfg, train=p.train.model_copy(update={"seed": 2}))
    original = tracking.loss_callback
    crash_training_at(monkeypatch, 6)
    with pytest.raises(RuntimeError, match="simulated crash"):
        in_flow(train.run, q.train, q.mlflow, q.paths, q)
    monkeypatch.setattr(tracking, "loss_callback", original)
    in_flow(train.run, q.train, q.mlflow, q.paths, q)

    _, client, exp_id = tracking.open_store(cfg)
    crashed, resumed = runs(client, exp_id, "train")
    assert crashed.info.status == "FAILED" and "papertune.adapter_hash" not in crashed.data.tags
    assert resumed.info.status == "FINISHED" and resumed.data.tags["papertune.resumed_from"] == crashed.info.run_id
    assert resumed.data.tags["papertune.adapter_hash"] == dir_hash(q.paths.adapter)
