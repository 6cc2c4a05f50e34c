"""Evaluate: ROUGE of the base model and of base + adapter on held-out questions (and any gold sets).

Run alone:  python -m tasks.evaluate [--params params.yaml]

Both models answer every question with batched greedy generation (left padding) in each mode of
`evaluate.modes`: `closed_book` (the question alone) or `open_book` (the question plus its source chunk).
Scores are ROUGE-1/2/L/Lsum F1 with stemming (rouge-score; `evaluate.load("rouge")` needs the Hub), the
mean and a 95% bootstrap interval. Batches are cached Prefect tasks that fan out over the task runner.
Results go to the DVC metrics/plots files and (log_evaluation) into an MLflow run of their own, a child of the
training's run, which also decides whether the adapter's registered version becomes the `champion`. Models,
prompts and generation come from tasks.adapter, the contract train writes.
"""

from __future__ import annotations

import csv
import io
import json
import string
from collections import Counter
from functools import lru_cache
from pathlib import Path

import numpy as np
from prefect import task

from tasks.adapter import adapter_meta, build_prompt, generate, load_finetuned
from tasks.base_model import describe
from tasks.common import (CACHE, PipelineError, atomic_write, dir_hash, logger, map_cached, read_jsonl, run_stage,
                          write_json, write_jsonl)
from tasks.params import EvaluateParams, MLflowParams, Paths, QAParams
from tasks.teacher import complete, endpoint, strip_fence
from tasks.tracking import (ADAPTER_HASH, champion, find_training_run, fmt, log_dataset, md5_file, model_id_of,
                            open_store, promote, score_tag, start_run, version_of)

METRICS = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
CI_METRICS = ["rougeL", "f1", "exact_match"]  # reported with a 95% bootstrap interval
PLOTTED = [*METRICS, "f1", "exact_match"]  # the bars of rouge.png and the columns of the DVC plot CSV
_PUNCTUATION = set(string.punctuation)
HELD_OUT = "heldout"
READ = "read_documents"  # the eval.json key saying which documents the adapter's training read


# ---------------------------------------------------------------------------------------------- models


def question_text(row: dict, mode: str, template: str) -> str:
    if mode == "open_book":
        return template.format(context=row["context"], question=row["question"])
    return row["question"]


@task(**{**CACHE, "cache_policy": CACHE["cache_policy"] - "adapter_dir" - "base_dir"}, name="evaluate-batch")
def answer_batch(questions: list[str], adapter_hash: str, base_hash: str, max_new_tokens: int,
                 adapter_dir: str, base_dir: str) -> dict:
    """Base and fine-tuned answers to one batch, keyed on the questions, the adapter and the base model."""
    model, tokenizer, meta, lock = load_finetuned(adapter_dir, base_dir, adapter_hash)
    prompts = [build_prompt(tokenizer, q, meta["prompt_template"], meta["system_prompt"]) for q in questions]
    with lock:  # disable_adapter() flips shared state: one generation at a time per loaded model
        with model.disable_adapter():
            base = generate(model, tokenizer, prompts, max_new_tokens, len(prompts))
        finetuned = generate(model, tokenizer, prompts, max_new_tokens, len(prompts))
    return {"base": base, "finetuned": finetuned}


# ---------------------------------------------------------------------------------------------- scores

@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer  # 1.2 s (nltk): imported when answers are scored, not with the stage

    return rouge_scorer.RougeScorer(METRICS, use_stemmer=True)


def normalise_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1: overlap of the normalised answers' word multisets."""
    pred, ref = normalise_answer(prediction).split(), normalise_answer(reference).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if not pred or not ref:
        return float(pred == ref)
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def ci95(values: np.ndarray, samples: int, seed: int) -> list[float]:
    """95% percentile bootstrap interval of the mean."""
    idx = np.random.default_rng(seed).integers(0, len(values), size=(samples, len(values)))
    boot = values[idx].mean(axis=1)
    return [round(float(np.percentile(boot, 2.5)), 4), round(float(np.percentile(boot, 97.5)), 4)]


def per_answer(prediction: str, reference: str) -> dict[str, float]:
    """Every score of one answer against its reference."""
    rouge = _scorer().score(reference, prediction)
    return {**{m: rouge[m].fmeasure for m in METRICS}, "f1": token_f1(prediction, reference),
            "exact_match": float(normalise_answer(prediction) == normalise_answer(reference))}


def summarise(rows: list[dict[str, float]], samples: int, seed: int) -> dict:
    """Means of per-answer scores, with 95% bootstrap intervals for the headline ones."""
    cols = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    out = {k: round(float(v.mean()), 4) for k, v in cols.items()}
    for k in CI_METRICS:
        if k in cols:
            out[f"{k}_ci95"] = ci95(cols[k], samples, seed)
    out["n"] = len(rows)
    return out


def by_kind(rows: list[dict], scores: list[dict[str, float]], ratings: list[int | None] | None = None) -> dict:
    """Mean ROUGE-L, token F1 and exact match (and the judge's mean rating, when there are ratings) per question
    kind ("definition", "section", ...; "other" if none), from each answer's `per_answer` scores."""
    groups: dict[str, list[tuple[dict, int | None]]] = {}
    for row, score, rating in zip(rows, scores, ratings or [None] * len(rows)):
        groups.setdefault(row.get("kind") or "other", []).append((score, rating))
    out = {}
    for kind, g in sorted(groups.items()):
        out[kind] = {"n": len(g), **{k: round(float(np.mean([sc[k] for sc, _ in g])), 4) for k in CI_METRICS}}
        if rated := [r for _, r in g if r is not None]:
            out[kind]["judge"] = round(float(np.mean(rated)), 4)
    return out


# ---------------------------------------------------------------------------------------------- judge


def parse_rating(content: str) -> int | None:
    """Strict: {"score": 1-5}, else None."""
    try:
        data = json.loads(strip_fence(content))
    except json.JSONDecodeError:
        return None
    rating = data.get("score") if isinstance(data, dict) else None
    return rating if type(rating) is int and 1 <= rating <= 5 else None


def judge_answers(answered: list[dict], evaluate: EvaluateParams, qa: QAParams, paths: Paths) -> None:
    """With `evaluate.judge.enabled`: the QA stage's judge endpoint rates every answer 1-5 against its reference
    (`evaluate.judge.prompt_template`), stored per entry under "judge" ({"base": [...], "finetuned": [...]}, None
    where the reply stayed malformed). Replies are cached like the QA stage's: a rerun asks nothing again."""
    if not evaluate.judge.enabled:
        return
    judge, stats = endpoint(qa, "judge"), Counter()
    for entry in answered:
        entry["judge"] = {}
        for model in ("base", "finetuned"):
            prompts = [evaluate.judge.prompt_template.format(question=r["question"], reference=r["answer"], answer=a)
                       for r, a in zip(entry["rows"], entry[model])]
            replies = complete(judge, prompts, paths.qa_cache, valid=lambda r: parse_rating(r) is not None,
                               stats=stats)
            entry["judge"][model] = [parse_rating(r) if r is not None else None for r in replies]
    logger().info(f"evaluate: judge {judge.backend} {judge.settings.model}: {stats['cache_hits']} cached, "
                  f"{stats['sent']} asked, {stats['malformed']} malformed")


def judge_summary(ratings: list[int | None], samples: int, seed: int) -> dict:
    """The mean rating with its 95% bootstrap interval, over the answers the judge rated (judge_rated of n)."""
    rated = np.array([r for r in ratings if r is not None], dtype=float)
    if not len(rated):
        return {"judge_rated": 0}
    return {"judge": round(float(rated.mean()), 4), "judge_ci95": ci95(rated, samples, seed),
            "judge_rated": len(rated)}


def eval_sets(evaluate: EvaluateParams, paths: Paths) -> dict[str, list[dict]]:
    sets = {HELD_OUT: read_jsonl(paths.eval_split)}
    for name, path in evaluate.gold_sets.items():
        rows = read_jsonl(path)
        bad = [i for i, r in enumerate(rows) if not isinstance(r.get("question"), str) or "answer" not in r]
        if bad:
            raise PipelineError(f"gold set {name} ({path}): line {bad[0] + 1} needs 'question' and 'answer'")
        sets[name] = rows
    if evaluate.max_examples:
        sets = {k: v[: evaluate.max_examples] for k, v in sets.items()}
    return sets


def plot(flat: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(flat.items())
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 3.5), squeeze=False)
    labels = ["R-1", "R-2", "R-L", "R-Lsum", "F1", "EM"]
    for ax, (name, res) in zip(axes[0], groups):
        x = np.arange(len(PLOTTED))
        for offset, model in ((-0.2, "base"), (0.2, "finetuned")):
            ax.bar(x + offset, [res[model][m] for m in PLOTTED], width=0.4, label=model)
            for m in CI_METRICS:  # 95% bootstrap intervals of the scores that have one
                i, (lo, hi), mean = PLOTTED.index(m), res[model][f"{m}_ci95"], res[model][m]
                ax.errorbar(i + offset, mean, yerr=[[mean - lo], [hi - mean]], color="k", capsize=2, lw=0.8)
        top = max(res[m][f"{k}_ci95"][1] for k in CI_METRICS for m in ("base", "finetuned"))
        top = max(top, *(res[m][k] for k in PLOTTED for m in ("base", "finetuned")))
        ax.set(xticks=x, xticklabels=labels, title=name, ylabel="score", ylim=(0, top * 1.3 + 1e-6))
        ax.legend(loc="upper right", ncols=2)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, png.getvalue())


def answer_sets(sets: dict[str, list[dict]], evaluate: EvaluateParams, paths: Paths, meta: dict) -> list[dict]:
    """Base and fine-tuned answers for every (set, mode): one entry with its rows and both answer lists."""
    adapter_dir, base_dir = str(paths.adapter), str(paths.base_model)
    adapter_hash, base_hash = dir_hash(adapter_dir), describe(base_dir)["tokenizer_hash"] + meta["run_key"]
    answered = []
    for set_name, rows in sets.items():
        for mode in evaluate.modes:
            usable = [r for r in rows if mode == "closed_book" or r.get("context")]
            if not usable:
                continue
            questions = [question_text(r, mode, evaluate.open_book_template) for r in usable]
            batches = [questions[i:i + evaluate.batch_size] for i in range(0, len(questions), evaluate.batch_size)]
            results = map_cached(answer_batch, batches, adapter_hash, base_hash, evaluate.max_new_tokens,
                                 adapter_dir, base_dir, desc=f"evaluate {set_name}/{mode}")
            answered.append({"set": set_name, "mode": mode, "rows": usable,
                             "base": [a for r in results for a in r["base"]],
                             "finetuned": [a for r in results for a in r["finetuned"]]})
    return answered


def score(answered: list[dict], evaluate: EvaluateParams) -> tuple[dict, list[dict]]:
    """(scores per "<mode>" for the held-out split and "<gold set>/<mode>" for gold sets, prediction rows)."""
    flat: dict[str, dict] = {}
    predictions: list[dict] = []
    for entry in answered:
        refs = [r["answer"] for r in entry["rows"]]
        name = entry["mode"] if entry["set"] == HELD_OUT else f"{entry['set']}/{entry['mode']}"
        judged = entry.get("judge", {})
        scores = {m: [per_answer(a, ref) for a, ref in zip(entry[m], refs)] for m in ("base", "finetuned")}
        flat[name] = {m: {**summarise(scores[m], evaluate.bootstrap_samples, evaluate.seed),
                          **(judge_summary(judged[m], evaluate.bootstrap_samples, evaluate.seed) if judged else {}),
                          "by_kind": by_kind(entry["rows"], scores[m], judged.get(m))} for m in ("base", "finetuned")}
        for i, (r, b, t) in enumerate(zip(entry["rows"], entry["base"], entry["finetuned"])):
            predictions.append({"set": entry["set"], "mode": entry["mode"], "kind": r.get("kind"),
                                "question": r["question"], "reference": r["answer"], "base_answer": b,
                                "finetuned_answer": t, "base_f1": round(scores["base"][i]["f1"], 4),
                                "finetuned_f1": round(scores["finetuned"][i]["f1"], 4), "doc_id": r.get("doc_id"),
                                **({"base_judge": judged["base"][i], "finetuned_judge": judged["finetuned"][i]}
                                   if judged else {})})
    return flat, predictions


def documents_read(meta: dict, paths: Paths) -> dict:
    """What the adapter's training read (from its META): the setting, the documents, and which of them are held
    out (their text was read, none of their QA pairs trained on)."""
    read = meta.get("documents_read", [])
    held_out = {r["doc_id"] for r in read_jsonl(paths.eval_split)}
    return {"setting": meta.get("read_documents", "none"), "documents": [d["title"] for d in read],
            "held_out_documents": [d["title"] for d in read if d["doc_id"] in held_out]}


def write_evaluation(paths: Paths, flat: dict, predictions: list[dict], read: dict) -> dict:
    """metrics/eval.json (nested: {"<mode>": ..., "<gold set>": {"<mode>": ...}, "read_documents": ...}),
    predictions, ROUGE CSV, plot."""
    report: dict = {}
    for key, scores in flat.items():
        set_name, _, mode = key.rpartition("/")
        (report.setdefault(set_name, {}) if set_name else report)[mode] = scores
    report[READ] = read
    write_json(paths.eval_metrics, report)
    write_jsonl(paths.predictions, predictions)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["eval", "model", *PLOTTED])
    writer.writeheader()
    for name, res in flat.items():
        for model in ("base", "finetuned"):
            writer.writerow({"eval": f"{name} {model}", "model": model, **{m: res[model][m] for m in PLOTTED}})
    atomic_write(paths.rouge_plot, buf.getvalue())
    plot(flat, Path(paths.plots_dir) / "rouge.png")
    return report


def log_evaluation(mlflow: MLflowParams, evaluate: EvaluateParams, flat: dict, paths: Paths) -> None:
    """Every MLflow call of evaluation, into a run of its own: a child of the train run that made the adapter (found
    by the adapter's content hash; with another or a new store, a top-level run linked by the same tags). Scores,
    the eval sets as dataset inputs, files, and the promotion decision on the adapter's registered version.
    With a store that cannot be used the metrics files stand and the stage fails in one line (exit status 1), so
    that DVC does not record an evaluation MLflow never saw and a script can tell."""
    from mlflow.entities import LoggedModelInput

    adapter_hash = dir_hash(paths.adapter)
    eval_hash = md5_file(paths.eval_split) + (f"-first{evaluate.max_examples}" if evaluate.max_examples else "")
    try:
        _, client, exp_id = open_store(mlflow)
    except PipelineError as e:
        raise PipelineError(f"scores written to {paths.eval_metrics}, but not logged to MLflow: {e}") from None
    trained = find_training_run(client, exp_id, adapter_hash)
    version = version_of(client, mlflow, adapter_hash)
    model_id = model_id_of(version) if version is not None else None  # the logged model the train run registered
    tags = {ADAPTER_HASH: adapter_hash, "papertune.eval_set_hash": eval_hash,
            "papertune.adapter_run_id": trained.info.run_id if trained else "not in this store"}
    with start_run(mlflow, "evaluate", "evaluate", tags, parent_run_id=trained and trained.info.run_id) as (mlflow_, _):
        if model_id:
            mlflow_.log_input(model=LoggedModelInput(model_id))  # the run page lists the adapter it evaluated
        datasets = {HELD_OUT: log_dataset(mlflow_, paths.eval_split, HELD_OUT, "evaluation")}
        for name, path in evaluate.gold_sets.items():
            datasets[name] = log_dataset(mlflow_, path, name, "evaluation")
        for name, res in flat.items():
            key, set_name = name.replace("/", "."), name.rpartition("/")[0] or HELD_OUT
            metrics = {}
            for model in ("base", "finetuned"):
                for m, v in res[model].items():  # means, and each 95% CI as _low/_high
                    if isinstance(v, list):
                        metrics |= {f"{key}.{model}.{m}_low": v[0], f"{key}.{model}.{m}_high": v[1]}
                    elif isinstance(v, (int, float)):
                        metrics[f"{key}.{model}.{m}"] = v
            metrics |= {f"{key}.delta.{m}": round(res["finetuned"][m] - res["base"][m], 4) for m in METRICS}
            # Linked to the logged model and the eval set: the model's page shows its scores per dataset.
            mlflow_.log_metrics(metrics, model_id=model_id, dataset=datasets[set_name])
        mlflow_.log_artifact(str(paths.eval_metrics), artifact_path="eval")
        mlflow_.log_artifact(str(paths.predictions), artifact_path="eval")
        mlflow_.log_artifact(str(Path(paths.plots_dir) / "rouge.png"), artifact_path="plots")
        current = champion(client, mlflow)
        if (version is not None and current is not None and current.version != version.version
                and mlflow.promote_on in flat and score_tag(eval_hash) not in current.tags):
            mlflow_.set_tag("papertune.champion_rescored", score_champion(client, mlflow, evaluate, paths, current,
                                                                           eval_hash))
        if version is None:
            decision = "not promoted: this adapter has no registered version in this store (trained elsewhere)"
        elif mlflow.promote_on not in flat:
            decision = f"not promoted: evaluate.modes has no {mlflow.promote_on} (mlflow.promote_on)"
        else:
            decision = promote(client, mlflow, version, flat[mlflow.promote_on]["finetuned"], eval_hash)["decision"]
        mlflow_.set_tag("papertune.promotion", decision)
    logger().info(f"evaluate: {mlflow.registered_model}: {decision}")


def score_champion(client, cfg: MLflowParams, evaluate: EvaluateParams, paths: Paths, current, eval_hash: str) -> str:
    """The champion has no score on this eval set (the split changed since it was scored): answer the held-out
    questions with its adapter, downloaded from the registry, on the project's base model when it is the one the
    champion was trained on, and record the score on its version, so that promotion compares on the same set."""
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


def run(evaluate: EvaluateParams, qa: QAParams, mlflow: MLflowParams, paths: Paths) -> dict:
    """The recipe: questions → answers from both models → judge ratings (if enabled) → scores → files → MLflow."""
    meta = adapter_meta(paths.adapter)
    answered = answer_sets(eval_sets(evaluate, paths), evaluate, paths, meta)
    judge_answers(answered, evaluate, qa, paths)
    flat, predictions = score(answered, evaluate)
    report = write_evaluation(paths, flat, predictions, documents_read(meta, paths))
    log_evaluation(mlflow, evaluate, flat, paths)
    for name, res in flat.items():
        judged = (f"; judge {res['base']['judge']:.2f} → {res['finetuned']['judge']:.2f} of 5"
                  if "judge" in res["base"] and "judge" in res["finetuned"] else "")
        logger().info(f"evaluate {name}: ROUGE-L base {res['base']['rougeL']:.3f} → "
                      f"fine-tuned {res['finetuned']['rougeL']:.3f} (n={res['base']['n']}){judged}")
    return report


if __name__ == "__main__":
    run_stage(run, "evaluate")
