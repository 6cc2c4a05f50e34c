"""Scores of an answer against its reference: ROUGE (rouge-score), SQuAD token F1 and exact match, their means
with 95% bootstrap intervals, per question kind.

Used by tasks/evaluate.py and tasks/multiple_choice.py (a distractor must not be a near-duplicate of the reference).
"""

from __future__ import annotations

import string
from collections import Counter
from functools import lru_cache

import numpy as np

METRICS = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
CI_METRICS = ["rougeL", "f1", "exact_match"]  # reported with a 95% bootstrap interval
_PUNCTUATION = set(string.punctuation)

@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer  # 1.2 s (nltk): imported when answers are scored, not with the stage

    return rouge_scorer.RougeScorer(METRICS, use_stemmer=True)

HELD_OUT = "heldout"  # the eval.json name of the held-out split's scores (other gold sets go by their own names)
CHOICE = "multiple_choice"  # the eval.json key of the multiple-choice knowledge score (closed book, held out)


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
