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
from collections import Counter
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
from prefect import task

from tasks.adapter import adapter_meta, build_prompt, generate, load_finetuned
from tasks.base_model import load_tokenizer
from tasks.cache import CACHE, map_cached
from tasks.files import atomic_write, read_jsonl, write_json, write_jsonl
from tasks.hashing import content_hash, dir_hash
from tasks.log import PipelineError, logger
from tasks.multiple_choice import build_items, chosen, option_scores
from tasks.params import EvaluateParams, MLflowParams, Paths, QAParams
from tasks.runner import run_stage
from tasks.scores import CHOICE, CI_METRICS, HELD_OUT, METRICS, by_kind, ci95, per_answer, summarise
from tasks.teacher import complete, endpoint, strip_fence
from tasks.tracking import log_evaluation, md5_file

PLOTTED = [*METRICS, "f1", "exact_match"]  # the bars of rouge.png and the columns of the DVC plot CSV
READ = "read_documents"  # the eval.json key saying which documents the adapter's training read


# ---------------------------------------------------------------------------------------------- models


def question_text(row: dict, mode: str, template: str) -> str:
    if mode == "open_book":
        return template.format(context=row["context"], question=row["question"])
    return row["question"]


_NOT_KEYS = CACHE["cache_policy"] - "adapter_hash" - "adapter_dir" - "base_dir"  # which files: not what they hold


@contextmanager
def loaded(model: str, adapter_hash: str, adapter_dir: str, base_dir: str):
    """(model, tokenizer) as `model` ("base": the adapter disabled, or "finetuned"), held alone: disable_adapter()
    flips the shared copy's state, so one batch at a time per loaded model."""
    peft_model, tokenizer, _, lock = load_finetuned(adapter_dir, base_dir, adapter_hash)
    with lock, (peft_model.disable_adapter() if model == "base" else nullcontext()):
        yield peft_model, tokenizer


@task(**{**CACHE, "cache_policy": _NOT_KEYS}, name="evaluate-batch")
def answer_batch(prompts: list[str], model: str, model_hash: str, max_new_tokens: int, adapter_hash: str,
                 adapter_dir: str, base_dir: str) -> list[str]:
    """One model's greedy answers to a batch of prompts. Keyed on the prompts, the model ("base" or "finetuned") and
    its content: base answers are shared by every adapter trained on the same quantised base."""
    with loaded(model, adapter_hash, adapter_dir, base_dir) as (peft_model, tokenizer):
        return generate(peft_model, tokenizer, prompts, max_new_tokens, len(prompts))


@task(**{**CACHE, "cache_policy": _NOT_KEYS}, name="evaluate-choices")
def choice_batch(items: list[tuple[str, list[str]]], model: str, model_hash: str, batch_size: int, adapter_hash: str,
                 adapter_dir: str, base_dir: str) -> list[list[float]]:
    """One model's length-normalised log-likelihood of each option of a batch of multiple-choice items."""
    with loaded(model, adapter_hash, adapter_dir, base_dir) as (peft_model, tokenizer):
        return option_scores(peft_model, tokenizer, [p for p, _ in items], [o for _, o in items], batch_size)


def model_hashes(paths: Paths, meta: dict) -> dict[str, str]:
    """What each model's answers depend on: the adapter's files, or the base model quantised as it was trained."""
    return {"finetuned": dir_hash(paths.adapter),
            "base": content_hash([meta["base_model"], meta["quantization"], meta["compute_dtype"]])}


def by_length(prompts: list[str], tokenizer, size: int) -> tuple[list[list[str]], list[int]]:
    """Batches of prompts of similar token length (little padding, and a batch stops when its longest answer does);
    returns (batches, order): the i-th answer of the concatenated batches belongs to prompts[order[i]]."""
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(prompts)), key=lengths.__getitem__)
    return [[prompts[i] for i in order[k:k + size]] for k in range(0, len(order), size)], order


def answer_sets(sets: dict[str, list[dict]], evaluate: EvaluateParams, paths: Paths, meta: dict) -> list[dict]:
    """Base and fine-tuned answers for every (set, mode): one entry with its rows and both answer lists."""
    adapter_dir, base_dir = str(paths.adapter), str(paths.base_model)
    hashes, tokenizer = model_hashes(paths, meta), load_tokenizer(base_dir)
    answered = []
    for set_name, rows in sets.items():
        for mode in evaluate.modes:
            usable = [r for r in rows if mode == "closed_book" or r.get("context")]
            if not usable:
                continue
            prompts = [build_prompt(tokenizer, question_text(r, mode, evaluate.open_book_template),
                                    meta["prompt_template"], meta["system_prompt"]) for r in usable]
            batches, order = by_length(prompts, tokenizer, evaluate.batch_size)
            entry = {"set": set_name, "mode": mode, "rows": usable}
            for model in ("base", "finetuned"):
                results = map_cached(answer_batch, batches, model, hashes[model], evaluate.max_new_tokens,
                                     hashes["finetuned"], adapter_dir, base_dir, desc=f"evaluate {set_name}/{mode} {model}")
                entry[model] = [""] * len(usable)
                for i, answer in zip(order, (a for batch in results for a in batch)):
                    entry[model][i] = answer
            answered.append(entry)
    return answered


def multiple_choice(rows: list[dict], evaluate: EvaluateParams, paths: Paths, meta: dict) -> dict:
    """Closed-book multiple-choice accuracy of both models on the held-out questions (tasks/multiple_choice.py),
    with 95% bootstrap intervals and per kind; {} when `evaluate.multiple_choice.enabled` is false."""
    cfg = evaluate.multiple_choice
    if not cfg.enabled:
        return {}
    items = build_items(rows, cfg.options, cfg.max_distractor_f1, evaluate.seed)
    if not items:
        logger().warning("evaluate: too few held-out answers to build multiple-choice items")
        return {}
    hashes, tokenizer = model_hashes(paths, meta), load_tokenizer(str(paths.base_model))
    asked = [(build_prompt(tokenizer, rows[it["row"]]["question"], meta["prompt_template"], meta["system_prompt"]),
              it["options"]) for it in items]
    batches = [asked[k:k + evaluate.batch_size] for k in range(0, len(asked), evaluate.batch_size)]
    out = {}
    for model in ("base", "finetuned"):
        results = map_cached(choice_batch, batches, model, hashes[model], evaluate.batch_size, hashes["finetuned"],
                             str(paths.adapter), str(paths.base_model), desc=f"multiple choice {model}")
        correct = np.array([float(chosen(s) == it["answer"]) for it, s in
                            zip(items, (s for batch in results for s in batch))])
        kinds: dict[str, list[float]] = {}
        for it, c in zip(items, correct):
            kinds.setdefault(rows[it["row"]].get("kind") or "other", []).append(c)
        out[model] = {"accuracy": round(float(correct.mean()), 4),
                      "accuracy_ci95": ci95(correct, evaluate.bootstrap_samples, evaluate.seed),
                      "chance": round(1 / cfg.options, 4), "n": len(items),
                      "by_kind": {k: {"n": len(v), "accuracy": round(float(np.mean(v)), 4)}
                                  for k, v in sorted(kinds.items())}}
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


def plot(flat: dict, choice: dict, path: Path) -> None:
    """One panel per (set, mode): every score of both models with 95% intervals; one for multiple choice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(flat.items())
    fig, axes = plt.subplots(1, len(groups) + bool(choice), figsize=(5.5 * len(groups) + 2.5 * bool(choice), 3.5),
                             squeeze=False)
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
    if choice:
        ax = axes[0][-1]
        for i, model in enumerate(("base", "finetuned")):
            mean, (lo, hi) = choice[model]["accuracy"], choice[model]["accuracy_ci95"]
            ax.bar(i, mean, width=0.6, color=f"C{i}")
            ax.errorbar(i, mean, yerr=[[mean - lo], [hi - mean]], color="k", capsize=3, lw=0.8)
        ax.axhline(choice["base"]["chance"], color="grey", ls=":", lw=1, label="chance")
        ax.set(xticks=[0, 1], xticklabels=["base", "finetuned"], ylim=(0, 1), ylabel="accuracy",
               title=f"multiple choice (n={choice['base']['n']})")
        ax.legend(loc="upper right")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, png.getvalue())


def score(answered: list[dict], evaluate: EvaluateParams) -> tuple[dict, list[dict]]:
    """(scores per "<mode>" for the held-out split and "<gold set>/<mode>" for gold sets, prediction rows)."""
    flat: dict[str, dict] = {}
    predictions: list[dict] = []
    for entry in answered:
        refs = [r["answer"] for r in entry["rows"]]
        name = entry["mode"] if entry["set"] == HELD_OUT else f"{entry['set']}/{entry['mode']}"
        judged = entry.get("judge", {})
        scores = {m: [per_answer(a, ref) for a, ref in zip(entry[m], refs)] for m in ("base", "finetuned")}
        # Section questions ("What is the section X of Y about?") are scored apart too: a headline carried by
        # recitation of section openings would say little about what the model knows.
        other = [i for i, r in enumerate(entry["rows"]) if r.get("kind") != "section"]
        flat[name] = {m: {**summarise(scores[m], evaluate.bootstrap_samples, evaluate.seed),
                          **(judge_summary(judged[m], evaluate.bootstrap_samples, evaluate.seed) if judged else {}),
                          "without_section": (summarise([scores[m][i] for i in other], evaluate.bootstrap_samples,
                                                        evaluate.seed) if other else {}),
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


def write_evaluation(paths: Paths, flat: dict, choice: dict, predictions: list[dict], read: dict) -> dict:
    """metrics/eval.json (nested: {"<mode>": ..., "<gold set>": {"<mode>": ...}, "multiple_choice": ...,
    "read_documents": ...}), predictions, ROUGE CSV, plot."""
    report: dict = {}
    for key, scores in flat.items():
        set_name, _, mode = key.rpartition("/")
        (report.setdefault(set_name, {}) if set_name else report)[mode] = scores
    if choice:
        report[CHOICE] = choice
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
    plot(flat, choice, Path(paths.plots_dir) / "rouge.png")
    return report


def eval_set_hash(evaluate: EvaluateParams, paths: Paths) -> str:
    """Which held-out questions the scores are on: scores on different sets are not comparable (promotion)."""
    return md5_file(paths.eval_split) + (f"-first{evaluate.max_examples}" if evaluate.max_examples else "")


def run(evaluate: EvaluateParams, qa: QAParams, mlflow: MLflowParams, paths: Paths) -> dict:
    """The recipe: questions → answers from both models → judge ratings (if enabled) → scores → files → MLflow.
    Promotion is the next stage's (tasks/promote.py)."""
    meta, sets = adapter_meta(paths.adapter), eval_sets(evaluate, paths)
    answered = answer_sets(sets, evaluate, paths, meta)
    judge_answers(answered, evaluate, qa, paths)
    choice = multiple_choice(sets[HELD_OUT], evaluate, paths, meta)
    flat, predictions = score(answered, evaluate)
    report = write_evaluation(paths, flat, choice, predictions, documents_read(meta, paths))
    log_evaluation(mlflow, evaluate, flat, choice, paths, eval_set_hash(evaluate, paths))
    for name, res in flat.items():
        judged = (f"; judge {res['base']['judge']:.2f} → {res['finetuned']['judge']:.2f} of 5"
                  if "judge" in res["base"] and "judge" in res["finetuned"] else "")
        logger().info(f"evaluate {name}: ROUGE-L base {res['base']['rougeL']:.3f} → "
                      f"fine-tuned {res['finetuned']['rougeL']:.3f}, token F1 {res['base']['f1']:.3f} → "
                      f"{res['finetuned']['f1']:.3f} (n={res['base']['n']}){judged}")
    if choice:
        logger().info(f"evaluate multiple choice: accuracy base {choice['base']['accuracy']:.3f} → fine-tuned "
                      f"{choice['finetuned']['accuracy']:.3f} (n={choice['base']['n']}, chance {choice['base']['chance']})")
    return report


if __name__ == "__main__":
    run_stage(run, "evaluate")
