"""QA: generate question–answer pairs from each chunk, then filter them.

Run alone:  python -m tasks.qa [--params params.yaml]

Backends (chosen by `qa.backend`, looked up in BACKENDS):
- `extractive`: offline and deterministic. Questions come from the paper's own structure and sentences — what
  the paper proposes, what a term is, what a method does or reports, what a section covers — and every answer
  is a sentence of the chunk itself.
- `openai`: any OpenAI-compatible chat endpoint (vLLM, Ollama, llama.cpp server, OpenAI). The key is read from
  the environment variable named in `qa.openai.api_key_env` and never written anywhere.
Each chunk is one cached Prefect task, so a crash half-way loses no finished chunk and adding a PDF only asks
about its chunks. Filters (length bounds, grounding, duplicate questions) are counted in the QA report.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections import Counter

from prefect import task
from rouge_score import rouge_scorer

from tasks.chunk import split_sentences
from tasks.common import CACHE, PipelineError, content_hash, map_cached, read_jsonl, run_stage, write_json, write_jsonl
from tasks.params import OpenAIParams, Paths, QAParams

# ---------------------------------------------------------------------------------------------- extractive backend

_PROPOSE = re.compile(r"\b(?:we|this paper|this work)\s+(?:propose|introduce|present|describe)s?\b", re.I)
_DEFINE = re.compile(
    r"^(?P<term>(?:[A-Z][\w\-()]*)(?:\s+[\w\-()]+){0,5}?)\s+(?:is|are|refers to|denotes)\s+(?:a|an|the)\s", re.U
)
# "<Subject> reduces/improves/... <object>": a claim about what a method does or achieves.
_VERBS = ("reduces improves outperforms matches achieves reaches requires uses adds freezes trains learns "
          "updates inserts prepends keeps removes scales decomposes quantizes introduces enables allows").split()
_CLAIM = re.compile(rf"^(?P<subj>[A-Z][\w\-]*(?:\s+[\w\-]+){{0,4}}?)\s+(?P<verb>{'|'.join(_VERBS)})\s+(?P<rest>.+)")
_RESULT = re.compile(r"\d")
_STOP_SUBJECTS = {"This", "It", "We", "They", "These", "That", "There", "However", "Table", "Figure", "In", "For",
                  "Our", "Its", "Their", "His", "Her", "Such", "Both", "Each", "One", "All", "Most", "Some"}
_DETERMINERS = {"The", "A", "An"}
# "The goal is ...", "The result is ...": subjects too vague to make a question a reader would ask.
_VAGUE = {"goal", "idea", "result", "results", "reason", "answer", "difference", "key", "main", "effect", "first",
          "second", "last", "same", "other", "rest", "problem", "question", "approach", "method", "modification"}


def _subject(phrase: str) -> str | None:
    """A noun phrase fit for a question ("The adapter" → "the adapter"), or None for a vague or long one."""
    words = phrase.split()
    if words[0] in _STOP_SUBJECTS or len(words) > 4 or (len(words) > 1 and words[0].endswith("ing")):
        return None
    if words[0] in _DETERMINERS:
        if len(words) == 1 or words[1].lower() in _VAGUE:
            return None
        words[0] = words[0].lower()
    return " ".join(words)


def _base_verb(verb: str) -> str:
    return verb[:-2] if verb.endswith(("ches", "shes")) else verb[:-1]


def _paper(chunk: dict) -> str:
    return f'"{chunk["title"]}"'


def extractive_pairs(chunk: dict, n: int) -> list[dict]:
    """Questions from the chunk's own structure and sentences; each answer is one of its sentences."""
    sentences = [s for s in split_sentences(chunk["text"].replace("\n\n", " ")) if len(s.split()) >= 5]
    section = re.sub(r"^[A-Z0-9]+(\.\d+)*\.?\s+", "", chunk["section"]).strip()  # "3.2 Method" → "Method"
    pairs: list[dict] = []

    def add(kind: str, question: str, answer: str) -> None:
        if all(p["question"] != question for p in pairs):
            pairs.append({"kind": kind, "question": question, "answer": answer})

    for s in sentences:
        if _PROPOSE.search(s):
            what = "propose" if section.lower() in ("abstract", "introduction", "") else f"present in {section}"
            add("proposal", f"What do the authors of {_paper(chunk)} {what}?", s)
        elif (m := _DEFINE.match(s)) and (term := _subject(m["term"])):
            add("definition", f"In {_paper(chunk)}, what is {term}?", s)
        elif (m := _CLAIM.match(s)) and (subj := _subject(m["subj"])):
            kind = "result" if _RESULT.search(m["rest"]) else "method"
            add(kind, f"According to {_paper(chunk)}, what does {subj} {_base_verb(m['verb'])}?", s)
        elif _RESULT.search(s) and re.search(r"\b(accuracy|score|BLEU|ROUGE|%|percent|times|fewer|memory|GB)\b", s):
            add("result", f"What result does {_paper(chunk)} report in its {section or 'text'} section?", s)
    if sentences and section:  # one summary question per chunk: what the section says
        summary = " ".join(sentences[:2])
        where = "abstract" if section.lower() == "abstract" else f'section "{section}"'
        add("section", f"What does the {where} of {_paper(chunk)} say?", summary)
    return pairs[: max(n, 1) * 2]  # the filters below still drop some; max_pairs_per_chunk caps what is kept


# ---------------------------------------------------------------------------------------------- openai backend

_SLOTS: dict[int, threading.BoundedSemaphore] = {}


def _slot(limit: int) -> threading.BoundedSemaphore:
    # Bounds requests in flight across the threads of this process (the task runner may run many chunks at once).
    return _SLOTS.setdefault(limit, threading.BoundedSemaphore(limit))


def parse_pairs(content: str) -> list[dict] | None:
    """Strict: a JSON object {"pairs": [{"question": str, "answer": str}, ...]}; anything else is malformed."""
    text = content.strip()
    if text.startswith("```"):  # a fenced reply is still the JSON asked for
        text = re.sub(r"^```(?:json)?\s*|\s*```$", "", text)
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    pairs = data.get("pairs") if isinstance(data, dict) else None
    if not isinstance(pairs, list) or not all(
        isinstance(p, dict) and isinstance(p.get("question"), str) and isinstance(p.get("answer"), str) for p in pairs
    ):
        return None
    return [{"kind": "llm", "question": p["question"].strip(), "answer": p["answer"].strip()} for p in pairs]


def openai_pairs(chunk: dict, cfg: OpenAIParams) -> tuple[list[dict], int]:
    from openai import OpenAI

    key = os.environ.get(cfg.api_key_env)
    if not key:
        raise PipelineError(f"qa.backend=openai needs the API key in the environment variable {cfg.api_key_env}")
    # The client retries 429/5xx/connection errors with exponential backoff, up to max_retries.
    client = OpenAI(base_url=cfg.base_url, api_key=key, max_retries=cfg.max_retries, timeout=cfg.timeout_s)
    prompt = cfg.prompt_template.format(title=chunk["title"], section=chunk["section"], text=chunk["text"],
                                        n=cfg.pairs_per_chunk)
    with _slot(cfg.max_concurrency):
        reply = client.chat.completions.create(
            model=cfg.model, temperature=cfg.temperature, messages=[{"role": "user", "content": prompt}]
        )
    pairs = parse_pairs(reply.choices[0].message.content or "")
    return (pairs, 0) if pairs is not None else ([], 1)


# ---------------------------------------------------------------------------------------------- stage

BACKENDS = {
    "extractive": lambda chunk, qa: (extractive_pairs(chunk, qa.max_pairs_per_chunk), 0),
    "openai": lambda chunk, qa: openai_pairs(chunk, qa.openai),
}


@task(**CACHE, name="qa-chunk")
def generate(chunk: dict, qa: QAParams) -> dict:
    pairs, malformed = BACKENDS[qa.backend](chunk, qa)
    provenance = {k: chunk[k] for k in ("doc_id", "chunk_id", "title", "section", "page_start", "page_end")}
    return {"pairs": [{**p, **provenance} for p in pairs], "malformed": malformed}


def normalise(question: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", question.lower()).split())


_scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def grounding(answer: str, context: str) -> float:
    """ROUGE-L recall of the answer against its chunk: how much of the answer the chunk contains in order."""
    # rouge-score's score(target, prediction): recall = LCS / len(target), so the answer is the target here.
    return _scorer.score(answer, context)["rougeL"].recall


def keep_pairs(pairs: list[dict], chunks: dict[str, dict], qa: QAParams) -> tuple[list[dict], Counter]:
    dropped: Counter = Counter()
    seen: set[str] = set()
    per_chunk: Counter = Counter()
    kept = []
    for p in pairs:
        q, a = p["question"], p["answer"]
        if not qa.min_question_chars <= len(q) <= qa.max_question_chars:
            dropped["question_length"] += 1
        elif not qa.min_answer_chars <= len(a) <= qa.max_answer_chars:
            dropped["answer_length"] += 1
        elif (score := grounding(a, chunks[p["chunk_id"]]["text"])) < qa.min_grounding:
            dropped["not_grounded"] += 1
        elif normalise(q) in seen:
            dropped["duplicate_question"] += 1
        elif per_chunk[p["chunk_id"]] >= qa.max_pairs_per_chunk:
            dropped["over_max_per_chunk"] += 1
        else:
            seen.add(normalise(q))
            per_chunk[p["chunk_id"]] += 1
            kept.append({**p, "grounding": round(score, 4)})
    return kept, dropped


def run(qa: QAParams, paths: Paths) -> list[dict]:
    chunks = read_jsonl(paths.chunks)
    results = map_cached(generate, chunks, qa, desc=f"qa ({qa.backend})")
    generated = [p for r in results for p in r["pairs"]]
    kept, dropped = keep_pairs(generated, {c["chunk_id"]: c for c in chunks}, qa)
    for p in kept:
        p["pair_id"] = content_hash([p["chunk_id"], p["question"], p["answer"]])[:16]
    write_jsonl(paths.qa, kept)
    write_json(paths.qa_report, {
        "backend": qa.backend,
        "chunks": len(chunks),
        "generated": len(generated),
        "malformed_replies": sum(r["malformed"] for r in results),
        "dropped": dict(sorted(dropped.items())),
        "kept": len(kept),
        "kept_by_kind": dict(sorted(Counter(p["kind"] for p in kept).items())),
        "documents": len({p["doc_id"] for p in kept}),
        "dataset_hash": content_hash([p["pair_id"] for p in kept]),
    })
    if not kept:
        raise PipelineError(f"no question-answer pair survived the filters (see {paths.qa_report})")
    return kept


if __name__ == "__main__":
    run_stage(run, "qa")
