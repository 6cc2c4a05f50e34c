"""Split: hold out whole documents for evaluation, and prove nothing leaks into training.

Run alone:  python -m tasks.split [--params params.yaml]

Each document goes to eval when a salted hash of its doc_id falls under `split.eval_fraction`, so a document
keeps its side when others are added (only a corpus too small to have both sides borrows the nearest one).
An eval pair whose question is a near-duplicate of a training question (the QA stage's MinHash test, with
`split.near_duplicate_threshold`) is dropped and counted; then a leakage check fails the run loudly if any eval
document or near-duplicate eval question is still in train. Writes JSONL that the training
stage reads with `datasets`.
"""

from __future__ import annotations

from prefect import task

from tasks.dedup import NearDuplicates, minhash, question_key
from tasks.files import read_jsonl, write_json, write_jsonl
from tasks.hashing import content_hash
from tasks.log import PipelineError, logger
from tasks.params import Paths, SplitParams
from tasks.runner import run_stage


def side_score(doc_id: str, seed: int) -> float:
    """Uniform in [0, 1), fixed per (seed, document): the document's side never depends on the others."""
    return int(content_hash([seed, doc_id])[:12], 16) / 16**12


def assign(doc_ids: list[str], split: SplitParams) -> set[str]:
    """The eval documents."""
    scores = {d: side_score(d, split.seed) for d in sorted(set(doc_ids))}
    if len(scores) < 2:
        raise PipelineError(f"{len(scores)} document(s) with QA pairs: a split by document needs at least 2; add PDFs")
    eval_docs = {d for d, s in scores.items() if s < split.eval_fraction}
    ranked = sorted(scores, key=scores.get)
    if not eval_docs:  # too few documents for the fraction to pick one: the lowest score goes to eval
        eval_docs = {ranked[0]}
    if eval_docs == set(scores):  # ... and the highest always stays in train
        eval_docs.discard(ranked[-1])
    return eval_docs


def seen_in(train: list[dict], pairs: list[dict], split: SplitParams) -> list[bool]:
    """For each pair: is its question a near-duplicate of a training question?"""
    index = NearDuplicates(split.near_duplicate_threshold, split.minhash_permutations)
    for p in train:
        index.add(minhash(question_key(p), split.minhash_permutations))
    return [index.seen(minhash(question_key(p), split.minhash_permutations)) for p in pairs]


def check_leakage(train: list[dict], eval_: list[dict], split: SplitParams) -> None:
    train_docs = {p["doc_id"] for p in train}
    leaked_docs = sorted({p["doc_id"] for p in eval_} & train_docs)
    leaked_questions = [p["question"] for p, seen in zip(eval_, seen_in(train, eval_, split)) if seen]
    if leaked_docs or leaked_questions:
        raise PipelineError(
            f"leakage: {len(leaked_docs)} eval document(s) and {len(leaked_questions)} eval question(s) are also in "
            f"train, e.g. {(leaked_docs + leaked_questions)[0]!r}"
        )


@task(name="split")
def split_pairs(pairs: list[dict], split: SplitParams) -> tuple[list[dict], list[dict], dict]:
    eval_docs = assign([p["doc_id"] for p in pairs], split)
    train = [p for p in pairs if p["doc_id"] not in eval_docs]
    held_out = [p for p in pairs if p["doc_id"] in eval_docs]
    eval_ = [p for p, seen in zip(held_out, seen_in(train, held_out, split)) if not seen]
    check_leakage(train, eval_, split)
    report = {
        "train": {"documents": len({p["doc_id"] for p in train}), "pairs": len(train)},
        "eval": {"documents": len(eval_docs), "pairs": len(eval_)},
        "eval_documents": sorted({p["title"] for p in held_out}),
        "dropped_eval_questions_seen_in_train": len(held_out) - len(eval_),
        "leakage_check": "passed",
        "train_hash": content_hash([p["pair_id"] for p in train]),
        "eval_hash": content_hash([p["pair_id"] for p in eval_]),
    }
    return train, eval_, report


def run(split: SplitParams, paths: Paths) -> dict:
    pairs = read_jsonl(paths.qa)
    chunks = {c["chunk_id"]: c["text"] for c in read_jsonl(paths.chunks)}
    train, eval_, report = split_pairs(pairs, split)
    # Open-book evaluation answers from the source chunk: carry it with each pair.
    for p in train + eval_:
        p["context"] = chunks[p["chunk_id"]]
    write_jsonl(paths.train_split, train)
    write_jsonl(paths.eval_split, eval_)
    write_json(paths.split_report, report)
    logger().info(f"split: {report['train']} train, {report['eval']} eval, leakage check passed")
    return report


if __name__ == "__main__":
    run_stage(run, "split")
