"""Promote: the registry's `champion` alias moves to this adapter's version when its held-out score's 95% CI lies
wholly above the champion's on the same eval set (`mlflow.promote_on`); the decision is recorded on the version,
on the evaluation's MLflow run and in `paths.promotion`.

Run alone:  python -m tasks.promote [--params params.yaml]

A step of its own after evaluate, which only answers and scores. A champion that has no score on this eval set (the
split changed since it was scored) is first answered on it with its registered adapter, so both CIs come from the
same questions. With an MLflow store that cannot be used the stage fails in one line (exit status 1).
"""

from __future__ import annotations

import json
from pathlib import Path

from tasks.adapter import adapter_meta
from tasks.evaluate import HELD_OUT, answer_sets, eval_set_hash, eval_sets, score
from tasks.files import read_json, write_json
from tasks.hashing import dir_hash
from tasks.log import logger
from tasks.params import EvaluateParams, MLflowParams, Paths
from tasks.runner import run_stage
from tasks.tracking import ADAPTER_HASH, champion, fmt, open_store, promote, score_tag, version_of


def score_champion(client, cfg: MLflowParams, evaluate: EvaluateParams, paths: Paths, current, eval_hash: str) -> str:
    """Answer the held-out questions with the champion's adapter, downloaded from the registry, on the project's base
    model when it is the one the champion was trained on, and record the score on its version."""
    import mlflow as mlflow_module
    import yaml

    local = Path(mlflow_module.artifacts.download_artifacts(f"models:/{cfg.registered_model}/{current.version}"))
    pyfunc = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    if pyfunc["config"]["base_model_hash"] != dir_hash(paths.base_model):
        return f"champion v{current.version} was trained on another base model: not re-scored"
    champ = paths.model_copy(update={"adapter": local / pyfunc["artifacts"]["adapter"]["path"]})
    held_out = evaluate.model_copy(update={"modes": [cfg.promote_on], "gold_sets": {}})
    answered = answer_sets({HELD_OUT: eval_sets(held_out, paths)[HELD_OUT]}, held_out, champ,
                           adapter_meta(champ.adapter))
    result = score(answered, held_out)[0][cfg.promote_on]["finetuned"]
    client.set_model_version_tag(cfg.registered_model, current.version, score_tag(eval_hash), json.dumps(result))
    return f"champion v{current.version} re-scored on eval set {eval_hash[:12]}: {fmt(result)}"


def evaluation_run(client, exp_id: str, adapter_hash: str, eval_hash: str):
    """The latest evaluation of this adapter on this eval set (tasks/evaluate.py logs it), or None."""
    found = client.search_runs([exp_id], filter_string=f"tags.`{ADAPTER_HASH}` = '{adapter_hash}' and "
                                                       f"tags.`papertune.eval_set_hash` = '{eval_hash}'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    return found[0] if found else None


def run(mlflow: MLflowParams, evaluate: EvaluateParams, paths: Paths) -> dict:
    """The recipe: this adapter's version and the champion → the champion re-scored if needed → the decision."""
    scores = read_json(paths.eval_metrics)
    adapter_hash, eval_hash = dir_hash(paths.adapter), eval_set_hash(evaluate, paths)
    _, client, exp_id = open_store(mlflow)
    version, current = version_of(client, mlflow, adapter_hash), champion(client, mlflow)
    tags = {}
    if (version is not None and current is not None and current.version != version.version
            and mlflow.promote_on in scores and score_tag(eval_hash) not in current.tags):
        tags["papertune.champion_rescored"] = score_champion(client, mlflow, evaluate, paths, current, eval_hash)
    if version is None:
        record = {"promoted": False, "decision": "not promoted: this adapter has no registered version in this store "
                                                 "(trained elsewhere)"}
    elif mlflow.promote_on not in scores:
        record = {"promoted": False, "decision": f"not promoted: evaluate.modes has no {mlflow.promote_on} "
                                                 "(mlflow.promote_on)"}
    else:
        record = promote(client, mlflow, version, scores[mlflow.promote_on]["finetuned"], eval_hash)
    tags["papertune.promotion"] = record["decision"]
    if evaluated := evaluation_run(client, exp_id, adapter_hash, eval_hash):
        for key, value in tags.items():
            client.set_tag(evaluated.info.run_id, key, value)
    write_json(paths.promotion, {"registered_model": mlflow.registered_model, "eval_set_hash": eval_hash,
                                 **{k: v for k, v in record.items() if k != "champion_score"}, **tags})
    logger().info(f"promote: {mlflow.registered_model}: {record['decision']}")
    return record


if __name__ == "__main__":
    run_stage(run, "promote")
