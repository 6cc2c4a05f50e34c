"""Evaluate: ROUGE of the base model and of base + adapter on held-out questions (and any gold sets).

Run alone:  python -m tasks.evaluate [--params params.yaml]

Both models answer every question with batched greedy generation (left padding) in each mode of
`evaluate.modes`: `closed_book` (the question alone) or `open_book` (the question plus its source chunk).
Scores are ROUGE-1/2/L/Lsum F1 with stemming (rouge-score; `evaluate.load("rouge")` needs the Hub), the
mean and a 95% bootstrap interval. Batches are cached Prefect tasks that fan out over the task runner.
Results go to the DVC metrics/plots files and into the MLflow run of the training that made the adapter.
"""

from __future__ import annotations

import csv
import io
import threading
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel
from prefect import task
from rouge_score import rouge_scorer
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from tasks.base_model import describe, load_model
from tasks.common import (CACHE, PipelineError, atomic_write, dir_hash, logger, map_cached, read_json, read_jsonl,
                          run_stage, write_json, write_jsonl)
from tasks.params import EvaluateParams, MLflowParams, Paths
from tasks.tracking import start_run
from tasks.train import META, build_prompt

METRICS = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
HELD_OUT = "heldout"


# ---------------------------------------------------------------------------------------------- models


def adapter_meta(adapter_dir: str | Path) -> dict:
    """How the adapter was made and how to prompt it; a one-line error when there is no adapter yet."""
    path = Path(adapter_dir) / META
    if not path.exists():
        raise PipelineError(f"no adapter in {adapter_dir}: train one first (dvc repro train)")
    return read_json(path)


@lru_cache(maxsize=2)
def load_finetuned(adapter_dir: str, base_dir: str, adapter_hash: str):
    """(PeftModel, tokenizer, meta, lock) — one copy per process; base answers come from disable_adapter()."""
    meta = adapter_meta(adapter_dir)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    tokenizer.padding_side = "left"  # decoder-only batched generation: prompts end where generation starts
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    base = load_model(base_dir, meta["quantization"], meta["compute_dtype"])
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    return model, tokenizer, meta, threading.Lock()


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
             progress: bool = False) -> list[str]:
    limit = getattr(model.config, "max_position_embeddings", 2048) - max_new_tokens
    answers: list[str] = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress):
        batch = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        batch = {k: v[:, -limit:].to(model.device) for k, v in batch.items()}  # keep each prompt's end
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        new = out[:, batch["input_ids"].shape[1]:]
        answers += [a.strip() for a in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return answers


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

_scorer = rouge_scorer.RougeScorer(METRICS, use_stemmer=True)


def rouge(predictions: list[str], references: list[str], samples: int, seed: int) -> dict:
    per_row = [_scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
    scores = {m: np.array([s[m].fmeasure for s in per_row]) for m in METRICS}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(per_row), size=(samples, len(per_row)))
    boot = scores["rougeL"][idx].mean(axis=1)
    out = {m: round(float(v.mean()), 4) for m, v in scores.items()}
    out["rougeL_ci95"] = [round(float(np.percentile(boot, 2.5)), 4), round(float(np.percentile(boot, 97.5)), 4)]
    out["n"] = len(per_row)
    return out


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
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 3.5), squeeze=False)
    for ax, (name, res) in zip(axes[0], groups):
        x = np.arange(len(METRICS))
        for offset, model in ((-0.2, "base"), (0.2, "finetuned")):
            vals = [res[model][m] for m in METRICS]
            ax.bar(x + offset, vals, width=0.4, label=model)
        ci = res["finetuned"]["rougeL_ci95"]
        ax.errorbar(2.2, res["finetuned"]["rougeL"], yerr=[[res["finetuned"]["rougeL"] - ci[0]],
                                                           [ci[1] - res["finetuned"]["rougeL"]]], color="k", capsize=3)
        top = max(max(res[m][k] for k in METRICS) for m in ("base", "finetuned"))
        ax.set(xticks=x, xticklabels=METRICS, title=name, ylabel="F1", ylim=(0, max(top, ci[1]) * 1.3 + 1e-6))
        ax.legend(loc="upper right", ncols=2)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, png.getvalue())


def run(evaluate: EvaluateParams, mlflow: MLflowParams, paths: Paths) -> dict:
    adapter_dir, base_dir = str(paths.adapter), str(paths.base_model)
    meta = adapter_meta(adapter_dir)
    adapter_hash, base_hash = dir_hash(adapter_dir), describe(base_dir)["tokenizer_hash"] + meta["run_key"]

    flat: dict[str, dict] = {}  # "closed_book" for the held-out split, "<gold set>/<mode>" for gold sets
    predictions: list[dict] = []
    for set_name, rows in eval_sets(evaluate, paths).items():
        for mode in evaluate.modes:
            usable = [r for r in rows if mode == "closed_book" or r.get("context")]
            if not usable:
                continue
            questions = [question_text(r, mode, evaluate.open_book_template) for r in usable]
            batches = [questions[i:i + evaluate.batch_size] for i in range(0, len(questions), evaluate.batch_size)]
            results = map_cached(answer_batch, batches, adapter_hash, base_hash, evaluate.max_new_tokens,
                                 adapter_dir, base_dir, desc=f"evaluate {set_name}/{mode}")
            base = [a for r in results for a in r["base"]]
            tuned = [a for r in results for a in r["finetuned"]]
            refs = [r["answer"] for r in usable]
            scores = {m: rouge(ans, refs, evaluate.bootstrap_samples, evaluate.seed)
                      for m, ans in (("base", base), ("finetuned", tuned))}
            flat[mode if set_name == HELD_OUT else f"{set_name}/{mode}"] = scores
            predictions += [{"set": set_name, "mode": mode, "question": r["question"], "reference": r["answer"],
                             "base_answer": b, "finetuned_answer": t, "doc_id": r.get("doc_id")}
                            for r, b, t in zip(usable, base, tuned)]

    report: dict = {}  # {"<mode>": {"base": ..., "finetuned": ...}, "<gold set>": {"<mode>": ...}}
    for key, scores in flat.items():
        set_name, _, mode = key.rpartition("/")
        (report.setdefault(set_name, {}) if set_name else report)[mode] = scores
    write_json(paths.eval_metrics, report)
    write_jsonl(paths.predictions, predictions)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["eval", "model", *METRICS])
    writer.writeheader()
    for name, res in flat.items():
        for model in ("base", "finetuned"):
            writer.writerow({"eval": f"{name} {model}", "model": model, **{m: res[model][m] for m in METRICS}})
    atomic_write(paths.rouge_plot, buf.getvalue())
    plot(flat, Path(paths.plots_dir) / "rouge.png")

    with start_run(mlflow, run_id=meta["mlflow_run_id"]) as (mlflow_, _):
        for name, res in flat.items():
            key = name.replace("/", ".")
            for model in ("base", "finetuned"):
                mlflow_.log_metrics({f"{key}.{model}.{m}": res[model][m] for m in METRICS})
            mlflow_.log_metrics({f"{key}.delta.{m}": round(res["finetuned"][m] - res["base"][m], 4) for m in METRICS})
        mlflow_.log_artifact(str(paths.eval_metrics), artifact_path="eval")
        mlflow_.log_artifact(str(paths.predictions), artifact_path="eval")
        mlflow_.log_artifact(str(Path(paths.plots_dir) / "rouge.png"), artifact_path="plots")
    for name, res in flat.items():
        logger().info(f"evaluate {name}: ROUGE-L base {res['base']['rougeL']:.3f} → "
                      f"fine-tuned {res['finetuned']['rougeL']:.3f} (n={res['base']['n']})")
    return report


if __name__ == "__main__":
    run_stage(run, "evaluate")
