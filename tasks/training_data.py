"""Training data: what the model learns from. QA pairs become prompt + answer examples (loss on the answer only),
chunks of the documents become reading examples (the text as the answer to a question about its paper and section,
loss on every token), mixed or QA first; a collator packs them into rows (or pads them).

Used by tasks/train.py (setup_data, collator). Prompts come from tasks/adapter.py, the contract evaluate and
ask share.
"""

from __future__ import annotations

import random
from collections import Counter
from functools import partial
from pathlib import Path

from tasks.adapter import build_prompt, reading_prompt
from tasks.base_model import load_tokenizer
from tasks.files import read_jsonl
from tasks.params import Paths, TrainParams
from tasks.text import split_sentences


def tokenize_pair(tokenizer, prompt: str, answer: str, max_len: int) -> dict:
    """input_ids = prompt + answer + EOS; labels = -100 over the prompt, so only answer tokens are learned."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    prompt_ids = prompt_ids[-(max_len // 2):]  # an overlong prompt keeps its end, next to the answer
    ids = (prompt_ids + answer_ids)[:max_len]
    labels = ([-100] * len(prompt_ids) + answer_ids)[:max_len]
    return {"input_ids": ids, "labels": labels}


def encode(row: dict, tokenizer, cfg: TrainParams) -> dict:
    prompt = build_prompt(tokenizer, row["question"], cfg.prompt_template, cfg.system_prompt)
    return tokenize_pair(tokenizer, prompt, row["answer"], cfg.max_seq_length)


def load_split(path: Path, tokenizer, cfg: TrainParams):
    from datasets import load_dataset

    ds = load_dataset("json", data_files=str(path), split="train")
    return ds.map(encode, fn_kwargs={"tokenizer": tokenizer, "cfg": cfg}, remove_columns=ds.column_names,
                  desc=f"tokenize {path.name}")


def documents_to_read(cfg: TrainParams, chunks: list[dict], pairs: list[dict]) -> list[dict]:
    """[{doc_id, title}] of the documents whose text training reads (`train.read_documents`)."""
    titles = {c["doc_id"]: c["title"] for c in chunks}
    chosen = {"all": set(titles), "train": {p["doc_id"] for p in pairs} & set(titles), "none": set()}
    return [{"doc_id": d, "title": titles[d]} for d in sorted(chosen[cfg.read_documents], key=titles.get)]


def reading_passages(chunk: dict, cfg: TrainParams, rng: random.Random) -> list[str]:
    """The texts one chunk is read as: the chunk itself; optionally each of its sentences alone
    (`train.reading_sentences`) and sentence-shuffled copies (`train.reading_shuffles`), augmentations that show a
    fact in several contexts (Allen-Zhu & Li, Physics of LMs 3.1). Tables are read as they are."""
    passages = [chunk["text"]]
    sentences = split_sentences(chunk["text"].replace("\n\n", " ")) if chunk.get("kind", "text") == "text" else []
    if cfg.reading_sentences and len(sentences) > 1:
        passages += sentences
    for _ in range(cfg.reading_shuffles if len(sentences) > 2 else 0):
        passages.append(" ".join(rng.sample(sentences, len(sentences))))
    return passages


def read_examples(chunk: dict, part: int, cfg: TrainParams, tokenizer, rng: random.Random) -> list[dict]:
    """A chunk's reading examples: each passage as the answer to `train.reading_repeats` of the
    `train.reading_questions`, drawn at random (tasks.adapter.reading_prompt), the loss on every token of the passage.
    Several phrasings of the question teach the model to find the paper and section in a question, not to recite
    after one fixed string; drawing them keeps the cost of a pass independent of how many phrasings there are."""
    questions = rng.sample(cfg.reading_questions, min(cfg.reading_repeats, len(cfg.reading_questions)))
    prompts = [reading_prompt(tokenizer, chunk, q, cfg.prompt_template, cfg.system_prompt, part) for q in questions]
    return [tokenize_pair(tokenizer, prompt, text, cfg.max_seq_length)
            for text in reading_passages(chunk, cfg, rng) for prompt in prompts]


def training_examples(cfg: TrainParams, tokenizer, pairs: list[dict], chunks: list[dict],
                      read: list[dict]) -> tuple[list[dict], dict]:
    """QA examples (answer-only loss, repeated `train.qa_repeats` times) and reading examples (every token), in
    `train.data_order`: "mixed" (shuffled together) or "qa_first" (QA, then reading; each part shuffled).
    Returns (examples, counts)."""
    rng = random.Random(cfg.seed)
    read_ids = {d["doc_id"] for d in read}
    qa = [encode(p, tokenizer, cfg) for p in pairs] * cfg.qa_repeats
    parts = Counter()  # chunks come in document order: the n-th chunk of a section is its part n
    reading = []
    for c in chunks:
        if c["doc_id"] in read_ids:
            parts[c["doc_id"], c["section"]] += 1
            reading += read_examples(c, parts[c["doc_id"], c["section"]], cfg, tokenizer, rng)
    if cfg.data_order == "mixed":
        examples = qa + reading
        rng.shuffle(examples)
    else:
        examples = rng.sample(qa, len(qa)) + rng.sample(reading, len(reading))
    return examples, {"qa_examples": len(qa), "reading_examples": len(reading)}


def collator(tokenizer, packing: bool, max_len: int):
    """Packed rows (`train.packing`), or one padded row per example."""
    from transformers import DataCollatorForSeq2Seq

    if packing:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return partial(pack_rows, max_len=max_len, pad_id=pad_id)
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)


def pack_rows(examples: list[dict], max_len: int, pad_id: int) -> dict:
    """Examples packed first-fit-decreasing into rows of at most `max_len` tokens; position ids restart at every
    example, and transformers turns that into a block-diagonal causal mask (no attention across examples).
    Written here because transformers' DataCollatorWithFlattening makes one row of the whole batch: attention then
    costs (batch tokens)^2 (sdpa on CPU has no variable-length kernel), 3.8 s against 1.1 s per step of the builtin
    model at batch 64, while rows of `max_len` keep it at max_len^2 per row. Each example's first label is -100
    (the token before it belongs to another example), as in the flattening collator. The tail of a row is padding:
    a segment of its own (positions from 0, labels -100) that nothing attends to."""
    import torch

    rows: list[list[dict]] = []
    room: list[int] = []
    for ex in sorted(examples, key=lambda e: -len(e["input_ids"])):
        n = len(ex["input_ids"])
        i = next((i for i, r in enumerate(room) if r >= n), None)
        if i is None:  # no row has room: open a new one
            i = len(rows)
            rows.append([])
            room.append(max_len)
        rows[i].append(ex)
        room[i] -= n
    width = max(max_len - r for r in room)
    ids, labels, positions = [], [], []
    for row, free in zip(rows, room):
        pad = width - (max_len - free)
        ids.append([t for ex in row for t in ex["input_ids"]] + [pad_id] * pad)
        labels.append([l for ex in row for l in [-100, *ex["labels"][1:]]] + [-100] * pad)
        positions.append([i for ex in row for i in range(len(ex["input_ids"]))] + list(range(pad)))
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "position_ids": torch.tensor(positions)}


def setup_data(cfg: TrainParams, paths: Paths):
    """(tokenizer, training examples, held-out QA for the eval loss, documents read, example counts)."""
    from datasets import Dataset

    tokenizer = load_tokenizer(paths.base_model)
    pairs = read_jsonl(paths.train_split)
    chunks = read_jsonl(paths.chunks)
    read = documents_to_read(cfg, chunks, pairs)
    examples, counts = training_examples(cfg, tokenizer, pairs, chunks, read)
    eval_ds = load_split(Path(paths.eval_split), tokenizer, cfg)
    if cfg.max_eval_samples is not None and cfg.max_eval_samples < len(eval_ds):
        eval_ds = eval_ds.select(range(cfg.max_eval_samples))
    return tokenizer, Dataset.from_list(examples), eval_ds, read, counts
