"""One PDF → its document record (plain function; the ingest stage wraps it in a cached Prefect task).

Try one PDF and read what comes out:  python -m tasks.pdf.extract paper.pdf [--no-outline] [--blocks N]
(prints the title, the sections, the fidelity record and the first N blocks).
"""

from __future__ import annotations

import re

import pymupdf

from tasks.params import IngestParams
from tasks.pdf.cleanup import TABLE_CAPTION_RE, cut_references, drop_figure_text, drop_toc, mark_tables
from tasks.pdf.headings import mark_layout, mark_named, mark_outline, read_outline
from tasks.pdf.layout import (drop_running_lines, footnotes_last, metadata_title, order_blocks, read_lines,
                              take_title)
from tasks.pdf.text import join_continuations, mend_title, page_blocks, spellings_of

ARXIV_RE = re.compile(r"arXiv:\s*(\d{4}\.\d{4,5}|[a-z][a-z.-]*/\d{7})(?:v\d+)?", re.I)
APPENDIX_RE = re.compile(r"(?:Appendix|APPENDIX|Appendices|APPENDICES|Supplementary)\b|[A-Z](?:\.\d{1,2})*\.?\s+\S")


def extract(doc: pymupdf.Document, doc_id: str, cfg: IngestParams) -> dict:
    """The document record, without `file` (set by the caller: the cached result must not depend on the path),
    plus a "fidelity" entry for the ingest report (the caller moves it there)."""
    lines, rotated, rotated_chars, body = read_lines(doc)
    raw = sum(len(ln["text"]) for page in lines for ln in page) + rotated_chars
    page1 = " ".join(rotated + [ln["text"] for ln in lines[0]]) if lines else ""
    arxiv = ARXIV_RE.search(page1)
    lines, running = drop_running_lines(lines, cfg.header_footer_margin, cfg.header_footer_min_pages)
    title_lines, lines[0] = take_title(lines[0], body)
    spellings = spellings_of(lines)
    title = mend_title([ln["text"] for ln in title_lines], spellings)

    toc = figures = 0
    for p, page in enumerate(lines):
        lines[p], dropped = drop_toc(page)
        toc += dropped
        # Tables are looked for only next to a "Table N" caption: cheap, and no cell soup from figures.
        if any(TABLE_CAPTION_RE.match(ln["text"]) for ln in lines[p]):
            lines[p], _ = mark_tables(lines[p])
        if cfg.drop_figure_text:
            lines[p], dropped = drop_figure_text(lines[p], body)
            figures += dropped
    pages = [footnotes_last(order_blocks(page), body) for page in lines]
    outline = read_outline(doc) if cfg.use_outline else []
    matched = 0
    if outline:
        matched = mark_outline(outline, pages)
        mark_named(pages, body)
    else:
        mark_layout(pages, body)
    blocks = [page_blocks(page, spellings) for page in pages]
    join_continuations(blocks, spellings)
    references = looking = 0
    if cfg.drop_references:
        references, looking = cut_references(blocks, cfg.reference_stop_chars, cfg.reference_min_run_chars)

    headings = [b for page in blocks for b in page if b["kind"] == "heading"]
    kept = len(title) + sum(len(b["text"]) for page in blocks for b in page)
    return {
        "doc_id": doc_id,
        "file": None,
        "title": title or metadata_title(doc),
        "arxiv_id": arxiv.group(1) if arxiv else None,
        "page_count": doc.page_count,
        "sections": [b["text"] for b in headings],
        "outline_used": bool(outline),
        "appendix_found": any(APPENDIX_RE.match(b["text"]) and b["level"] == 1 for b in headings),
        "pages": [{"page": i + 1, "blocks": page} for i, page in enumerate(blocks)],
        "fidelity": {
            "raw_chars": raw,
            "kept_share": round(kept / raw, 4) if raw else 0.0,
            "dropped_chars": {"references": references, "running_headers_footers": running,
                              "table_of_contents": toc, "figure_text": figures,
                              "rotated_text": rotated_chars},
            "sections": len(headings),
            "tables": sum(b["kind"] == "table" for page in blocks for b in page),
            # A cut far below the reference-looking text means the list (or part of it) was not found and its
            # entries are still in the text: the report flags the document instead of passing it in silence.
            "reference_like_chars": looking,
            "references_implausible": cfg.drop_references and looking >= cfg.reference_min_run_chars
            and references < cfg.reference_min_cut_share * looking,
            # outline entries found on their printed line (the others got a heading line at their target)
            "outline_entries": len(outline), "outline_matched": matched,
        },
    }


if __name__ == "__main__":
    import argparse
    import json

    from tasks.params import load_params

    parser = argparse.ArgumentParser(description="Extract one PDF and show the record.")
    parser.add_argument("pdf")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--no-outline", action="store_true", help="ignore the PDF outline (layout headings only)")
    parser.add_argument("--blocks", type=int, default=40, help="blocks to print")
    args = parser.parse_args()
    cfg = load_params(args.params).ingest
    cfg = cfg.model_copy(update={"use_outline": cfg.use_outline and not args.no_outline})
    with pymupdf.open(args.pdf) as pdf:
        rec = extract(pdf, "-", cfg)
    print(f"title: {rec['title']}\narXiv: {rec['arxiv_id']}  outline used: {rec['outline_used']}  "
          f"appendix: {rec['appendix_found']}\nfidelity: {json.dumps(rec['fidelity'])}")
    print("sections:\n  " + "\n  ".join(rec["sections"]))
    shown = [(p["page"], b) for p in rec["pages"] for b in p["blocks"]][: args.blocks]
    for page, b in shown:
        print(f"p{page} {b['kind'][:4]:4} {b.get('level', '')} {b['text'][:160]!r}")
