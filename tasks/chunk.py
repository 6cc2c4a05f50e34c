"""Chunk: cut each document into chunks of at most `chunk.max_tokens` base-model tokens.

Run alone:  python -m tasks.chunk [--params params.yaml]

Chunks follow the paper's structure: a heading always starts a new chunk, paragraphs are packed whole while
they fit, and only a paragraph longer than a chunk is cut, at sentence ends (a sentence longer than a chunk is
cut on token boundaries). A new chunk in the same section repeats the previous chunk's last sentences, up to
`chunk.overlap_tokens`. A table (with the caption printed above it) is a chunk of its own, of kind "table",
cut between rows when long; a figure caption is a chunk of its own too: neither is ever mixed into prose, and
readers that want prose skip `"kind": "table"`. Chunks never mix documents. Each document is one cached Prefect task keyed on its
content, the tokenizer's hash and the chunk params, so adding a PDF chunks only that PDF.
"""

from __future__ import annotations

from dataclasses import dataclass

from prefect import task

from tasks.base_model import describe, load_backend_tokenizer
from tasks.cache import CACHE, map_cached_iter
from tasks.files import iter_jsonl, write_jsonl
from tasks.hashing import content_hash
from tasks.params import ChunkParams, Paths
from tasks.runner import run_stage
from tasks.text import split_sentences


@dataclass
class Piece:
    """A run of text that stays whole inside a chunk (a paragraph, or a sentence of a long paragraph)."""

    text: str
    section: str
    page: int
    n_tokens: int
    starts_section: bool = False
    kind: str = "text"  # "text" (prose, packed), "table" or "caption" (each a chunk of its own)


def pieces(doc: dict, count, max_tokens: int) -> list[Piece]:
    """Flatten pages → paragraphs (under their section), cutting paragraphs that cannot fit in one chunk. A caption
    directly above a table goes with the table."""
    out: list[Piece] = []
    section, new_section = "", True
    for page in doc["pages"]:
        blocks = page["blocks"]
        for i, block in enumerate(blocks):
            kind = block["kind"]
            if kind == "heading":
                section, new_section = block["text"], True
                continue
            if kind == "caption" and i + 1 < len(blocks) and blocks[i + 1]["kind"] == "table":
                continue  # read with the table below
            text = block["text"]
            if kind == "table" and i > 0 and blocks[i - 1]["kind"] == "caption":
                text = blocks[i - 1]["text"] + "\n" + text
            n = count(text)
            if n <= max_tokens:
                units = [(text, n)]
            else:
                units = _cut_rows(text, count, max_tokens) if kind == "table" else _cut(text, count, max_tokens)
            for unit, n_tok in units:
                out.append(Piece(unit, section, page["page"], n_tok, starts_section=new_section,
                                 kind=kind if kind in ("table", "caption") else "text"))
                new_section = False
    return out


def _cut_rows(table: str, count, max_tokens: int) -> list[tuple[str, int]]:
    """A long table cut between rows (a row longer than a chunk is cut by words)."""
    units: list[tuple[str, int]] = []
    rows: list[str] = []
    for row in table.split("\n"):
        if rows and count("\n".join(rows + [row])) > max_tokens:
            units.append(("\n".join(rows), count("\n".join(rows))))
            rows = []
        if count(row) > max_tokens:
            units += _cut(row, count, max_tokens)
        else:
            rows.append(row)
    if rows:
        units.append(("\n".join(rows), count("\n".join(rows))))
    return units


def _cut(paragraph: str, count, max_tokens: int) -> list[tuple[str, int]]:
    units = []
    for sentence in split_sentences(paragraph):
        n = count(sentence)
        if n <= max_tokens:
            units.append((sentence, n))
            continue
        words, current = sentence.split(), []  # a run-on "sentence" (a table, a formula dump): cut by words
        for word in words:
            if current and count(" ".join(current + [word])) > max_tokens:
                units.append((" ".join(current), count(" ".join(current))))
                current = []
            current.append(word)
        if current:
            units.append((" ".join(current), count(" ".join(current))))
    return units


def _tail_sentences(text: str, count, budget: int) -> str:
    """The last whole sentences of `text` that fit in `budget` tokens (the overlap carried to the next chunk)."""
    tail: list[str] = []
    for sentence in reversed(split_sentences(text)):
        if count(" ".join([sentence] + tail)) > budget:
            break
        tail.insert(0, sentence)
    return " ".join(tail)


def chunk_pieces(parts: list[Piece], cfg: ChunkParams, count) -> list[dict]:
    chunks: list[dict] = []
    current: list[Piece] = []

    def flush() -> None:
        if current:
            text = "\n\n".join(p.text for p in current)
            chunks.append({"section": current[0].section, "page_start": current[0].page,
                           "page_end": current[-1].page, "text": text,
                           "kind": "table" if current[0].kind == "table" else "text",
                           "solo": current[0].kind != "text"})
            current.clear()

    for part in parts:
        if part.kind != "text":  # a table or a caption: a chunk of its own, never packed with prose
            flush()
            current.append(part)
            flush()
            continue
        size = count("\n\n".join([p.text for p in current] + [part.text])) if current else part.n_tokens
        if part.starts_section or size > cfg.max_tokens:
            same_section = current and not part.starts_section
            previous = "\n\n".join(p.text for p in current)
            flush()
            overlap = _tail_sentences(previous, count, cfg.overlap_tokens) if same_section else ""
            if overlap and count(overlap + "\n\n" + part.text) <= cfg.max_tokens:
                current.append(Piece(overlap, part.section, part.page, count(overlap)))
        current.append(part)
    flush()

    # A short prose tail (a one-line section, a dangling sentence) is merged into its predecessor when both fit.
    merged: list[dict] = []
    for c in chunks:
        if merged and not c["solo"] and not merged[-1]["solo"] and count(c["text"]) < cfg.min_tokens:
            joined = merged[-1]["text"] + "\n\n" + c["text"]
            if count(joined) <= cfg.max_tokens:
                merged[-1] = {**merged[-1], "text": joined, "page_end": c["page_end"]}
                continue
        merged.append(c)
    return [{k: v for k, v in c.items() if k != "solo"} for c in merged]


def chunk_one(doc: dict, cfg: ChunkParams, base_dir: str) -> list[dict]:
    """The chunks of one document (the pure function behind the Prefect task)."""
    tokenizer = load_backend_tokenizer(base_dir)  # the same counts as the transformers tokenizer, no torch

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False).ids)

    out = []
    for c in chunk_pieces(pieces(doc, count, cfg.max_tokens), cfg, count):
        out.append({
            # Stable across runs: the same document text and params give the same ids.
            "chunk_id": f"{doc['doc_id'][:12]}-{content_hash([c['section'], c['text']])[:10]}",
            "doc_id": doc["doc_id"],
            "title": doc["title"],
            "file": doc["file"],
            **c,
            "n_tokens": count(c["text"]),
        })
    return out


@task(**{**CACHE, "cache_policy": CACHE["cache_policy"] - "base_dir"}, name="chunk-document")
def chunk_document(doc: dict, tokenizer_hash: str, cfg: ChunkParams, base_dir: str) -> list[dict]:
    return chunk_one(doc, cfg, base_dir)


def run(chunk: ChunkParams, paths: Paths) -> int:
    """Streams documents in and chunks out (flat memory at any corpus size); returns how many chunks it wrote."""
    info = describe(paths.base_model)
    per_doc = map_cached_iter(chunk_document, iter_jsonl(paths.documents), info["tokenizer_hash"], chunk,
                              str(paths.base_model), desc="chunk")
    return write_jsonl(paths.chunks, (c for doc_chunks in per_doc for c in doc_chunks))


if __name__ == "__main__":
    run_stage(run, "chunk")
