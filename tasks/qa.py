"""QA: question–answer pairs from each document's chunks, rated, filtered and de-duplicated.

Run alone:  python -m tasks.qa [--params params.yaml]

Generators (`qa.backend`, looked up in GENERATORS):
- `extractive`: offline and deterministic (tasks/extractive.py): questions from the paper's structure and
  sentences, answers copied from its text.
- `openai` / `hf`: a teacher model (any OpenAI-compatible endpoint, or any instruct model through transformers)
  asked for `n_tokens / qa.teacher.tokens_per_pair` self-contained pairs per chunk, as JSON.
Optional judge (`qa.judge`, same backends): it sees the chunk and the pair and rates faithfulness,
self-containedness and usefulness 1–5; the verdict is stored with the pair and the keep rule is in params.
Filters, in order: question/answer length, what a careful reader rejects (`reader_problem`: the paper's first
person in a question, a figure part asked about, an answer whose pointer or symbol it does not explain, broken
word order or a footnote run into it, a worked example's dialogue), grounding (ROUGE-L recall of the answer in its
chunk), the judge, then across the whole dataset MinHash near-duplicate questions, at most `max_pairs_per_chunk`
per chunk and section questions at most `max_section_share` of a document's pairs; every drop is counted in the QA
report. Each document is one Prefect task (the offline backend's cached whole); each teacher/judge request is
cached on disk (tasks/teacher.py), so a crash loses no reply and changing a filter never asks the model again. A
run that keeps no pair writes nothing (the previous qa.jsonl stays).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from functools import lru_cache
from itertools import groupby
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.cache import CACHE, map_cached_iter
from tasks.dedup import NearDuplicates, minhash, minhash_from_json, minhash_to_json, question_key
from tasks.extractive import extractive_document
from tasks.files import iter_jsonl, write_json, write_jsonl
from tasks.hashing import content_hash
from tasks.log import PipelineError, logger
from tasks.params import JudgeParams, Paths, QAParams
from tasks.runner import run_stage
from tasks.teacher import complete, endpoint, strip_fence
from tasks.text import split_sentences

KINDS = {"fact", "definition", "method", "result", "comparison"}
PROVENANCE = ("doc_id", "chunk_id", "title", "section", "page_start", "page_end")

# ---------------------------------------------------------------------------------------------- teacher


def pairs_wanted(chunk: dict, qa: QAParams) -> int:
    """In proportion to the chunk's length: a short tail is asked for one pair, a full chunk for several."""
    return max(1, min(qa.max_pairs_per_chunk, round(chunk["n_tokens"] / qa.teacher.tokens_per_pair)))


def parse_pairs(content: str) -> list[dict] | None:
    """Strict: a JSON object {"pairs": [{"question": str, "answer": str[, "kind": str]}, ...]}, else None."""
    try:
        data = json.loads(strip_fence(content))
    except json.JSONDecodeError:
        return None
    pairs = data.get("pairs") if isinstance(data, dict) else None
    if not isinstance(pairs, list) or not all(
        isinstance(p, dict) and isinstance(p.get("question"), str) and isinstance(p.get("answer"), str) for p in pairs
    ):
        return None
    return [{"kind": p["kind"] if p.get("kind") in KINDS else "llm", "question": p["question"].strip(),
             "answer": p["answer"].strip()} for p in pairs]


def teacher_pairs(chunks: list[dict], qa: QAParams, cache_dir: Path, stats: Counter) -> list[dict]:
    chunks = [c for c in chunks if c.get("kind", "text") == "text"]
    prompts = [qa.teacher.prompt_template.format(title=c["title"], section=c["section"], text=c["text"],
                                                 n=pairs_wanted(c, qa)) for c in chunks]
    replies = complete(endpoint(qa, "teacher"), prompts, cache_dir, valid=lambda r: parse_pairs(r) is not None,
                       stats=stats)
    return [{**p, "chunk_id": c["chunk_id"]} for c, r in zip(chunks, replies) if r for p in parse_pairs(r)]


GENERATORS = {
    "extractive": lambda chunks, qa, cache_dir, stats: extractive_document(chunks),
    "openai": teacher_pairs,
    "hf": teacher_pairs,
}

# ---------------------------------------------------------------------------------------------- judge

CRITERIA = ("faithfulness", "self_contained", "usefulness")


def parse_verdict(content: str) -> dict | None:
    """Strict: {"faithfulness": 1-5, "self_contained": 1-5, "usefulness": 1-5}, else None."""
    try:
        data = json.loads(strip_fence(content))
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict) or not all(type(data.get(k)) is int and 1 <= data[k] <= 5 for k in CRITERIA):
        return None
    return {k: data[k] for k in CRITERIA}


def judge_reason(verdict: dict | None, judge: JudgeParams) -> str | None:
    """Why the keep rule drops a judged pair, or None to keep it."""
    if verdict is None:
        return "judge_malformed"  # an unrated pair is not vouched for
    for criterion in CRITERIA:
        if verdict[criterion] < getattr(judge, f"min_{criterion}"):
            return f"judge_{criterion}"
    return None


def judge_pairs(pairs: list[dict], chunks: dict[str, dict], qa: QAParams, cache_dir: Path, stats: Counter) -> None:
    """Store each pair's verdict under "judge" (None when the judge's reply was malformed)."""
    prompts = [qa.judge.prompt_template.format(title=p["title"], section=p["section"], question=p["question"],
                                               answer=p["answer"], text=chunks[p["chunk_id"]]["text"]) for p in pairs]
    replies = complete(endpoint(qa, "judge"), prompts, cache_dir, valid=lambda r: parse_verdict(r) is not None,
                       stats=stats)
    for p, reply in zip(pairs, replies):
        p["judge"] = parse_verdict(reply) if reply else None


# ---------------------------------------------------------------------------------------------- filters

@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer  # 2.6 s of imports (nltk): only when pairs are scored, not for split

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def grounding(answer: str, context: str) -> float:
    """ROUGE-L recall of the answer against its chunk: how much of the answer the chunk contains in order."""
    # rouge-score's score(target, prediction): recall = LCS / len(target), so the answer is the target here.
    return _scorer().score(answer, context)["rougeL"].recall


# What a careful reader rejects in a pair, from any backend (tests/unit/test_data.py has a sentence of each class).
# The paper's first person in a question ("What do the authors set for our data type?"): "us" only in lower case
# (US is a country), "I" not inside a name ("RoBERTa-I", "Phase-I").
_FIRST_PERSON = re.compile(r"(?<![\w-])(?:[Ww]e|[Oo]urs?|us|[Mm]y|me|I)(?![\w-])")
# A part of a figure as the thing asked about ("What is the solid line?").
_FIGURE_PART = re.compile(r"\b(?:the|a|an)\s+(?:\w+\s+){0,2}?(?:line|curve|bar|marker|arrow|panel|subplot|legend|"
                          r"axis|x-axis|y-axis|shaded (?:area|region)|dot|circle|colou?r)s?\?$", re.I)
# Words that point back to text the answer does not carry: "these limitations", "the above approach", "this
# benchmark", "The two models are ..."; "this paper/work/section" is the paper the question names.
_BACK_REFERENCE = re.compile(
    r"\b(?:these|those)\s+(?!are\b|were\b|include\b|of\b)[a-z]+|\b(?:the above|above-mentioned|aforementioned|"
    r"the former|the latter|of this nature|(?:the|these) (?:other )?(?:two|three|four) (?!of\b)[a-z]+)\b|"
    r"\bthis (?!paper|work|study|section|article|end\b|way\b)[a-z]+|"
    r"\b(?:a|the) (?:value|score) of [-+]?\d", re.I)  # "a correlation with a value of 0.83": of what?
# A formula's symbol is never explained by the sentence that uses it: "λ", "DL = ∅", "W0 and BA are in R d×k".
# A variable is a letter on its own: "model M", "with R", "the context x" (not "A", "I", or "top-k"); "×" is one
# between letters ("R d×k"), a ratio after a number ("1.5× longer").
_SYMBOL = re.compile(r"[α-ωΑ-Ω∆∅∈∉≤≥≈∑∏∫→←⊂⊆∀∃∇∂]|(?<!\d)×|(?<![\w-])[A-Z]\(\w{1,3}\)|[A-Za-z]\s?=\s?[A-Za-z]|"
                     r"(?<![\w\-.’'])(?:[B-HJ-Z]|[xyzkntdpq])(?=[\s,;:)]|\s?\.$)")
# Dialogue from a worked example: the second person, or an "I" speaking.
_SPEAKER = re.compile(r"(?<![\w-])(?:[Yy]ou|[Yy]ours?|I|[Mm]e|[Mm]y)(?![\w(-])")
# Broken word order: a footnote mark glued to a word ("model.5 For", "HH-RLHFChatGPT,3 released", "tuning2"), a
# sentence start inside a sentence ("answers Arkansas The best time"), a letter from a font without Unicode map
# (a math italic read as Hangul), an accent set loose, an unresolved citation ("2020; ?;"), a cut sentence; a
# footnote run into the sentence ("building models that 1Unless otherwise specified", "and ∗Equal Contribution.",
# "ORPO [40]7 introduces"), or its text left after the mark ("methods listed in Table 3. ranking losses.").
_GARBLED = re.compile(r"[a-z]{2,}\.\d{1,2}\s+[A-Z][a-z]|[A-Za-z]{2,} (?:The|We|Our|They|These|Those|It) [a-z]{2,}|"
                      r"(?<![\w.])\d{1,2}[A-Z][a-z]{2,}|[∗†‡][A-Z][a-z]|\]\d{1,2}\b|\d\.\s[a-z]{3,}|"
                      r"[A-Za-z],\d{1,2}\s|\b[a-z]{4,}\d{1,2}\b|[\u1100-\u11ff\u3130-\u318f\uac00-\ud7af]|"
                      r"\s[\u0300-\u036f]|[;(]\s?\?\s?[;)]|(?:\bi\.e|\be\.g|\bet al|\bcf)\.$")


def reader_problem(question: str, answer: str) -> str | None:
    """Why a careful reader would reject the pair although it is grounded, or None."""
    if _FIRST_PERSON.search(question):
        return "first_person_question"
    if _FIGURE_PART.search(question):
        return "figure_part_question"
    if _GARBLED.search(answer) or answer.rstrip()[-1:] not in ".!?)\"”":
        return "garbled_answer"
    if _SPEAKER.search(_SPEAKER_QUOTES.sub("", answer)):
        return "example_answer"
    # Only the first sentence's pointers: a later one may point back to it ("... a benchmark. We train on this data").
    if _BACK_REFERENCE.search(split_sentences(answer)[0]) or _SYMBOL.search(answer):
        return "answer_needs_context"
    return None


_SPEAKER_QUOTES = re.compile(r"[“\"][^”\"]{0,80}[”\"]")  # a quoted title ("Do you need ...?") is not a speaker


def check_pair(p: dict, chunk: dict, qa: QAParams) -> str | None:
    """The first cheap filter a pair fails (sets p["grounding"]), or None."""
    if not qa.min_question_chars <= len(p["question"]) <= qa.max_question_chars:
        return "question_length"
    if not qa.min_answer_chars <= len(p["answer"]) <= qa.max_answer_chars:
        return "answer_length"
    if reason := reader_problem(p["question"], p["answer"]):
        return reason
    p["grounding"] = round(grounding(p["answer"], chunk["text"]), 4)
    return "not_grounded" if p["grounding"] < qa.min_grounding else None


def qa_document(chunks: list[dict], qa: QAParams, cache_dir: Path) -> dict:
    """Candidate pairs of one document, each with provenance, its verdict and `drop` (a reason, or None)."""
    teacher_stats, judge_stats = Counter(), Counter()
    by_id = {c["chunk_id"]: c for c in chunks}
    pairs = [{**p, **{k: by_id[p["chunk_id"]][k] for k in PROVENANCE}}
             for p in GENERATORS[qa.backend](chunks, qa, cache_dir, teacher_stats)]
    for p in pairs:
        p["drop"] = check_pair(p, by_id[p["chunk_id"]], qa)
    if qa.judge.enabled:
        judged = [p for p in pairs if p["drop"] is None]
        judge_pairs(judged, by_id, qa, cache_dir, judge_stats)
        for p in judged:
            p["drop"] = judge_reason(p["judge"], qa.judge)
    for p in pairs:  # what the dataset-wide selection needs, computed here: on both cores, and cached with the rest
        if p["drop"] is None:
            p["pair_id"] = content_hash([p["chunk_id"], p["question"], p["answer"]])[:16]
            p["minhash"] = minhash_to_json(minhash(question_key(p), qa.minhash_permutations))
    return {"pairs": pairs, "teacher": dict(teacher_stats), "judge": dict(judge_stats)}


# A teacher's document is not cached as a whole: its replies are cached per request (tasks/teacher.py), and a
# document with a malformed reply must be asked again. The offline backend's document is cached whole (CACHE:
# its chunks, the qa params and the code): adding one paper to a thousand recomputes only that paper.
@task(name="qa-document", persist_result=False, cache_policy=NO_CACHE)
def qa_document_task(chunks: list[dict], qa: QAParams, cache_dir: str) -> dict:
    return qa_document(chunks, qa, Path(cache_dir))


@task(**{**CACHE, "cache_policy": CACHE["cache_policy"] - "cache_dir"}, name="qa-document-offline")
def qa_document_offline(chunks: list[dict], qa: QAParams, cache_dir: str) -> dict:
    return qa_document(chunks, qa, Path(cache_dir))


def select(candidates: Iterable[dict], qa: QAParams, dropped: Counter) -> Iterator[dict]:
    """Across the dataset, in order: drop the reasons found per document, near-duplicate questions, and pairs
    beyond `max_pairs_per_chunk`; section questions ("What is the section X of Y about?") only up to
    `max_section_share` of each document's kept pairs, after its other pairs (they say more). Yields the pairs
    kept and counts the others in `dropped` by reason; the question index (a MinHash per kept question) and one
    document's candidates are all it holds in memory."""
    index = NearDuplicates(qa.near_duplicate_threshold, qa.minhash_permutations)
    per_chunk: Counter = Counter()

    def admit(p: dict) -> bool:
        if p["drop"]:
            dropped[p["drop"]] += 1
            return False
        m = minhash_from_json(p["minhash"])
        if index.seen(m):
            dropped["near_duplicate_question"] += 1
        elif per_chunk[p["chunk_id"]] >= qa.max_pairs_per_chunk:
            dropped["over_max_per_chunk"] += 1
        else:
            index.add(m)
            per_chunk[p["chunk_id"]] += 1
            return True
        return False

    for _, group in groupby(candidates, key=lambda p: p.get("doc_id")):
        group = list(group)
        kept = [p for p in group if p.get("kind") != "section" and admit(p)]
        # sections / (others + sections) <= share  ⇔  sections <= others * share / (1 - share)
        room = int(len(kept) * qa.max_section_share / (1 - qa.max_section_share)) if qa.max_section_share < 1 \
            else len(group)
        for p in (p for p in group if p.get("kind") == "section"):
            if p["drop"] is None and room <= 0:
                dropped["over_section_share"] += 1
            elif admit(p):
                kept.append(p)
                room -= 1
        yield from ({k: v for k, v in p.items() if k not in ("drop", "minhash")} for p in kept)


# ---------------------------------------------------------------------------------------------- stage


def documents(chunks: Iterable[dict]) -> Iterator[list[dict]]:
    """One document's chunks at a time: the chunk stage writes each document's chunks together."""
    for _, group in groupby(chunks, key=lambda c: c["doc_id"]):
        yield list(group)


def run(qa: QAParams, paths: Paths) -> int:
    """Streams chunks in and pairs out: a window of documents, the question index and the counts are all it holds
    in memory at any corpus size. Returns how many pairs it wrote."""
    counts, dropped, kept_by_kind = Counter(), Counter(), Counter()
    requests = {role: Counter() for role in ("teacher", "judge")}
    verdicts: dict[str, Counter] = {c: Counter() for c in CRITERIA}
    doc_ids, pair_ids = set(), []

    def counted(chunks: Iterator[dict]) -> Iterator[dict]:
        for c in chunks:
            counts["chunks"] += 1
            yield c

    def candidates() -> Iterator[dict]:
        offline = qa.backend == "extractive" and not qa.judge.enabled
        for result in map_cached_iter(qa_document_offline if offline else qa_document_task,
                                      documents(counted(iter_jsonl(paths.chunks))), qa, str(paths.qa_cache),
                                      desc=f"qa ({qa.backend})"):
            for role in requests:
                requests[role].update(result[role])
            for p in result["pairs"]:
                counts["generated"] += 1
                for c in CRITERIA if p.get("judge") else ():
                    verdicts[c][p["judge"][c]] += 1
                yield p

    def kept() -> Iterator[dict]:
        for p in select(candidates(), qa, dropped):
            pair_ids.append(p["pair_id"])
            kept_by_kind[p["kind"]] += 1
            doc_ids.add(p["doc_id"])
            yield p
        if not pair_ids:  # raised inside write_jsonl: nothing is replaced, the previous qa.jsonl and report stay
            raise PipelineError(f"no question-answer pair survived the filters: {counts['generated']} generated, "
                                f"dropped {dict(sorted(dropped.items()))}, malformed replies "
                                f"{requests['teacher']['malformed']}")

    n = write_jsonl(paths.qa, kept())
    requests = {role: {k: c[k] for k in ("cache_hits", "sent", "malformed")} for role, c in requests.items()}
    report = {
        "backend": qa.backend,
        "model": getattr(qa, qa.backend).model if qa.backend != "extractive" else None,
        "judge_model": getattr(qa, qa.judge.backend).model if qa.judge.enabled else None,
        "chunks": counts["chunks"],
        "generated": counts["generated"],
        "malformed_replies": requests["teacher"]["malformed"],
        "requests": requests,  # per role: cache_hits, sent, malformed (malformed replies are never cached)
        "judge": {c: dict(sorted(verdicts[c].items())) for c in CRITERIA} if any(verdicts.values()) else {},
        "dropped": dict(sorted(dropped.items())),
        "kept": n,
        "kept_by_kind": dict(sorted(kept_by_kind.items())),
        "documents": len(doc_ids),
        "dataset_hash": content_hash(pair_ids),
    }
    write_json(paths.qa_report, report)
    logger().info(f"qa: {report['generated']} generated, {n} kept; requests {requests}")
    return n


if __name__ == "__main__":
    run_stage(run, "qa")
