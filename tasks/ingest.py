"""Ingest: every PDF under paths.pdf_dir becomes one document record: title, arXiv id, section headings and the
cleaned text of each page as heading/paragraph blocks in reading order. Bad files are skipped and reported.

Run alone:  python -m tasks.ingest [--params params.yaml]
Writes paths.documents (JSONL, one record per ingested PDF) and paths.ingest_report (JSON, one entry per file).

One cached Prefect task per PDF, keyed on the file's content hash (not its path: a renamed file is a cache hit),
the ingest params and this module's source. Layout comes from PyMuPDF's text dict (blocks, lines, spans with
font size, weight and direction), not from a layout model.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter, defaultdict
from functools import reduce
from itertools import pairwise
from pathlib import Path
from types import SimpleNamespace

import pymupdf
from prefect import task

from tasks.common import CACHE, PipelineError, logger, map_cached, run_stage, sha256_file, write_json, write_jsonl
from tasks.params import IngestParams, Paths

# Text only: image blocks cost time and carry no text. Ligatures are expanded by NFKC in `clean`.
TEXT_FLAGS = pymupdf.TEXTFLAGS_TEXT
# Corrupt files are expected input and get a line in the ingest report; MuPDF's own stderr messages are noise.
pymupdf.TOOLS.mupdf_display_errors(False)

ARXIV_RE = re.compile(r"arXiv:\s*(\d{4}\.\d{4,5}|[a-z][a-z.-]*/\d{7})(?:v\d+)?", re.I)
# "3 Method", "3.2.1 Setup", "A Additional Results", "A.1 Details", "Appendix B: Proofs"
NUMBERED_RE = re.compile(r"(?:Appendix\s+)?(\d{1,2}|[A-Z])((?:\.\d{1,2})*)\.?:?\s+\S")
APPENDIX_RE = re.compile(r"(?:Appendix\b|[A-Z](?:\.\d{1,2})*\.?:?\s)")
NAMED_HEADINGS = {
    "abstract", "introduction", "related work", "background", "method", "methods", "experiments", "results",
    "discussion", "conclusion", "conclusions", "limitations", "acknowledgements", "acknowledgments",
    "references", "bibliography", "appendix", "appendices", "supplementary material", "broader impact",
}
REFERENCE_HEADINGS = {"references", "bibliography", "references and notes"}
PAGE_NUMBER_RE = re.compile(r"(?:page\s*)?\d{1,4}(?:\s*(?:of|/)\s*\d{1,4})?|[ivxlc]{1,6}|[-–] ?\d{1,4} ?[-–]", re.I)
HYPHENS = ("-", "\u00ad", "\u2010")  # hyphen-minus, soft hyphen, hyphen
HYPHEN_END_RE = re.compile(r"([A-Za-z]+)[-\u00ad\u2010]$")
LEADING_WORD_RE = re.compile(r"[A-Za-z]*")
WORD_RE = re.compile(r"[a-z]+")
COMPOUND_RE = re.compile(r"[a-z]+(?:-[a-z]+)+")
# A reference entry: "[12] ..." or "12. ..." with a year in it.
REFERENCE_ENTRY_RE = re.compile(r"(?:\[\d+\]|\d{1,3}\.)\s.*\b(?:19|20)\d{2}")


def clean(text: str) -> str:
    # NFKC turns ligatures (ﬁ ﬂ ﬀ ﬃ ﬄ ﬅ ﬆ) and compatibility spaces into plain letters and spaces.
    return " ".join(unicodedata.normalize("NFKC", text).split())


# ---------------------------------------------------------------------------------------------- layout


def read_lines(doc: pymupdf.Document) -> tuple[list[list[dict]], list[str], float]:
    """Each page's horizontal lines (text, bbox, dominant font size, all-bold, MuPDF block number), the text of
    page 1's rotated lines (where the arXiv stamp is), and the body font size (most common size by characters).
    Each page is extracted once: the text dict is the expensive call."""
    pages, rotated, sizes = [], [], Counter()
    for page in doc:
        lines, height = [], page.rect.height
        for b_no, block in enumerate(page.get_text("dict", flags=TEXT_FLAGS)["blocks"]):
            for line in block["lines"]:
                spans = [s for s in line["spans"] if s["text"].strip()]
                if not spans:
                    continue
                text = clean("".join(s["text"] for s in line["spans"]))
                if line["dir"][0] < 0.99:  # rotated: the arXiv stamp, axis labels; never body text
                    if page.number == 0:
                        rotated.append(text)
                    continue
                for s in spans:
                    sizes[round(s["size"], 1)] += len(s["text"])
                main = max(spans, key=lambda s: len(s["text"]))
                bold = all(s["flags"] & pymupdf.TEXT_FONT_BOLD or "bold" in s["font"].lower() for s in spans)
                x0, y0, x1, y1 = line["bbox"]
                lines.append(dict(text=text, block=b_no, x0=x0, y0=y0, x1=x1, y1=y1,
                                  size=round(main["size"], 1), bold=bold, height=height))
        pages.append(lines)
    body = sizes.most_common(1)[0][0] if sizes else 10.0
    return pages, rotated, body


def drop_running_lines(pages: list[list[dict]], cfg: IngestParams) -> list[list[dict]]:
    """Remove running headers/footers: margin lines whose text (digits masked, so "Page 3" matches "Page 4")
    repeats on enough pages, and bare page numbers in the margin."""

    def in_margin(ln: dict) -> bool:
        m = cfg.header_footer_margin * ln["height"]
        return ln["y1"] <= m or ln["y0"] >= ln["height"] - m

    def key(ln: dict) -> str:
        return re.sub(r"\d+", "#", ln["text"].lower())

    seen = defaultdict(set)
    for p_no, lines in enumerate(pages):
        for ln in lines:
            if in_margin(ln):
                seen[key(ln)].add(p_no)

    # A short paper cannot repeat a header on more pages than it has after page 1 (often set differently).
    min_pages = max(2, min(cfg.header_footer_min_pages, len(pages) - 1))

    def running(ln: dict) -> bool:
        return in_margin(ln) and (len(seen[key(ln)]) >= min_pages or PAGE_NUMBER_RE.fullmatch(ln["text"]) is not None)

    return [[ln for ln in lines if not running(ln)] for lines in pages]


def take_title(first_page: list[dict], body: float) -> tuple[str, list[dict]]:
    """The title is the largest horizontal text in the top half of page 1 (rotated stamps were already set aside),
    merged across the consecutive lines of that size. Returns it and page 1's remaining lines."""
    top = [ln for ln in first_page if ln["y0"] < ln["height"] / 2 and re.search(r"[A-Za-z]{2}", ln["text"])]
    if not top or max(ln["size"] for ln in top) < body * 1.15:
        return "", first_page  # no display-size text: the caller falls back to metadata
    size = max(ln["size"] for ln in top)
    same = sorted((ln for ln in top if abs(ln["size"] - size) <= 0.5), key=lambda ln: ln["y0"])
    title = [same[0]]
    for ln in same[1:]:
        if ln["y0"] - title[-1]["y1"] > size:  # a gap: a second run of big text is not the title
            break
        title.append(ln)
    return " ".join(ln["text"] for ln in title), [ln for ln in first_page if not any(ln is t for t in title)]


def order_blocks(lines: list[dict]) -> list[list[dict]]:
    """Group a page's lines into MuPDF's blocks and put them in reading order. On a two-column page, blocks that
    span the middle (title, abstract, wide figures) cut the page into bands; each band is read left column top to
    bottom, then right column. Other pages are read top to bottom."""
    groups: dict[int, list[dict]] = defaultdict(list)
    for ln in lines:
        groups[ln["block"]].append(ln)
    blocks = [dict(lines=ls, x0=min(ln["x0"] for ln in ls), x1=max(ln["x1"] for ln in ls),
                   y0=min(ln["y0"] for ln in ls)) for ls in groups.values()]
    if not blocks:
        return []
    left, right = min(b["x0"] for b in blocks), max(b["x1"] for b in blocks)
    mid, wide = (left + right) / 2, 0.3 * (right - left)

    def side(b: dict) -> str:
        return "L" if b["x1"] <= mid else "R" if b["x0"] >= mid else "S"

    # Two columns only when both halves hold prose-width lines: an equation number or a table cell alone on the
    # right must not reorder a one-column page.
    two_columns = all(any(side(b) == s and any(ln["x1"] - ln["x0"] > wide for ln in b["lines"]) for b in blocks)
                      for s in "LR")
    if not two_columns:
        return [b["lines"] for b in sorted(blocks, key=lambda b: (b["y0"], b["x0"]))]
    ordered, rest = [], sorted((b for b in blocks if side(b) != "S"), key=lambda b: b["y0"])
    for spanning in sorted((b for b in blocks if side(b) == "S"), key=lambda b: b["y0"]) + [None]:
        band = [b for b in rest if spanning is None or b["y0"] < spanning["y0"]]
        rest = [b for b in rest if not any(b is x for x in band)]
        ordered += sorted(band, key=lambda b: (side(b) == "R", b["y0"])) + ([spanning] if spanning else [])
    return [b["lines"] for b in ordered]


# ---------------------------------------------------------------------------------------------- text


def heading_level(ln: dict, body: float) -> int | None:
    """Level of a heading line, or None. A heading is short, bold or larger than the body font, and either
    numbered ("3.2 Method" → 2, "A.1 Details" → 2) or a usual section name ("Abstract", "References")."""
    text = ln["text"]
    styled = ln["size"] >= body * 1.15 or (ln["bold"] and ln["size"] >= body * 0.95)
    if not styled or len(text) > 120 or len(text.split()) > 15 or not re.search(r"[A-Za-z]{2}", text):
        return None
    if m := NUMBERED_RE.match(text):
        return 1 + m.group(2).count(".")
    return 1 if text.lower().strip(" .:") in NAMED_HEADINGS or text.startswith("Appendix") else None


def join_broken(a: str, b: str, spellings: set[str]) -> str:
    """Join text split at a line (or column) end, undoing hyphenation: "parame-" + "terization" → "parameterization".
    The document's own spellings decide ("fine-tuning" in running text keeps "fine-" + "tuning" hyphenated,
    "LaMDA" there joins "LaM-" + "DA"); without evidence a capitalised or numeric part keeps its hyphen
    ("Low-" + "Rank", "GPT-" + "3")."""
    m = HYPHEN_END_RE.search(a[-64:]) if a.endswith(HYPHENS) else None  # the cheap test first: called per line
    if m and b.startswith("-"):  # some typesetters repeat a compound's hyphen on the next line: "out-" "-of-domain"
        return a + b[1:]
    if not m or not b[:1].isalnum():
        return f"{a} {b}"
    head, tail = m.group(1), LEADING_WORD_RE.match(b).group()
    keep = not tail or f"{head}-{tail}".lower() in spellings or (
        (head + tail).lower() not in spellings and not tail[0].islower())
    return a[:-1] + ("-" if keep else "") + b


def page_blocks(blocks: list[list[dict]], body: float, spellings: set[str]) -> list[dict]:
    """Lines of each layout block → heading blocks and paragraph blocks (a block is normally one paragraph)."""
    out: list[dict] = []
    for lines in blocks:
        para: list[str] = []
        prev_heading = None  # a heading line just above: a wrapped long heading continues it
        for ln in lines:
            level = heading_level(ln, body)
            if level is None and prev_heading and ln["bold"] and abs(ln["size"] - prev_heading[1]) < 0.5:
                prev_heading[0]["text"] += " " + ln["text"]
                continue
            if level is None:
                para.append(ln["text"])
                prev_heading = None
                continue
            if para:
                out.append({"kind": "text", "text": reduce(lambda a, b: join_broken(a, b, spellings), para)})
                para = []
            out.append({"kind": "heading", "level": level, "text": ln["text"]})
            prev_heading = (out[-1], ln["size"])
        if para:
            out.append({"kind": "text", "text": reduce(lambda a, b: join_broken(a, b, spellings), para)})
    return out


def join_continuations(pages: list[list[dict]], spellings: set[str]) -> None:
    """A paragraph broken by a column or page end arrives as two blocks. On the same page they are merged when
    the first ends mid-sentence and the second starts in lower case; across pages only a hyphenated word is
    mended (the page of each half stays right)."""
    prev, prev_page = None, None
    for p_no, blocks in enumerate(pages):
        kept = []
        for blk in blocks:
            if prev and blk["kind"] == "text" and blk["text"][:1].islower() and not prev["text"].endswith(
                    (".", "!", "?", ":")):
                if p_no == prev_page:
                    prev["text"] = join_broken(prev["text"], blk["text"], spellings)
                    continue
                if prev["text"].endswith(HYPHENS):  # "parame-" | "terization, which ..." on the next page
                    word, _, rest = blk["text"].partition(" ")
                    prev["text"] = join_broken(prev["text"], word, spellings)
                    blk["text"] = rest
                    if not rest:
                        continue
            kept.append(blk)
            prev, prev_page = (blk, p_no) if blk["kind"] == "text" else (None, None)
        blocks[:] = kept


def cut_references(pages: list[list[dict]]) -> None:
    """Remove the reference list: from the "References"/"Bibliography" heading to the next heading that starts
    an appendix ("A ...", "Appendix ...") or is not followed by a reference entry. What follows is kept."""
    cutting = False
    for blocks in pages:
        kept = []
        for i, blk in enumerate(blocks):
            if blk["kind"] == "heading":
                name = re.sub(r"^\d+\.?\s+", "", blk["text"]).lower().strip(" .:")
                if name in REFERENCE_HEADINGS:
                    cutting = True
                elif cutting:
                    after = next((b["text"] for b in blocks[i + 1:] if b["kind"] == "text"), "")
                    cutting = not APPENDIX_RE.match(blk["text"]) and REFERENCE_ENTRY_RE.match(after) is not None
            if not cutting:
                kept.append(blk)
        blocks[:] = kept


def metadata_title(doc: pymupdf.Document) -> str:
    # arXiv metadata titles are often empty, a URL or a file name: use one only when it reads like a title.
    title = clean(doc.metadata.get("title") or "")
    bad = "://" in title or "arxiv.org" in title.lower() or re.search(r"\.(pdf|dvi|tex|docx?)$", title, re.I)
    return "" if bad or len(re.findall(r"[A-Za-z]", title)) < 4 else title


def extract(doc: pymupdf.Document, doc_id: str, cfg: IngestParams) -> dict:
    """The document record, without `file` (set by the caller: the cached result must not depend on the path)."""
    lines, rotated, body = read_lines(doc)
    page1 = " ".join(rotated + [ln["text"] for ln in lines[0]]) if lines else ""
    arxiv = ARXIV_RE.search(page1)
    lines = drop_running_lines(lines, cfg)
    title, lines[0] = take_title(lines[0], body)
    # Spellings used within lines: words, and adjacent parts of hyphenated ones ("table-to-text" gives "table-to"
    # and "to-text"); they decide whether a hyphen at a line end is a real one.
    text = " ".join(ln["text"] for page in lines for ln in page).lower()
    spellings = set(WORD_RE.findall(text)) | {
        f"{a}-{b}" for word in COMPOUND_RE.findall(text) for a, b in pairwise(word.split("-"))}
    pages = [page_blocks(order_blocks(page), body, spellings) for page in lines]
    join_continuations(pages, spellings)
    if cfg.drop_references:
        cut_references(pages)
    return {
        "doc_id": doc_id,
        "file": None,
        "title": title or metadata_title(doc),
        "arxiv_id": arxiv.group(1) if arxiv else None,
        "page_count": doc.page_count,
        "sections": [b["text"] for blocks in pages for b in blocks if b["kind"] == "heading"],
        "pages": [{"page": i + 1, "blocks": blocks} for i, blocks in enumerate(pages)],
    }


# ---------------------------------------------------------------------------------------------- stage


@task(**{**CACHE, "cache_policy": CACHE["cache_policy"] - "pdf_path"}, name="ingest-pdf")
def extract_pdf(doc_id: str, pdf_path: str, cfg: IngestParams) -> dict:
    """One PDF → its record, or {"skip": reason}. Bad input is reported, never raised: one broken file must not
    stop the run or lose the good documents."""
    data = Path(pdf_path).read_bytes()
    if b"%PDF-" not in data[:1024]:  # content, not extension: the PDF header must be within the first 1 KB
        return {"skip": "not a PDF (no %PDF- header)"}
    try:
        doc = pymupdf.open(stream=data, filetype="pdf")
    except Exception as e:  # MuPDF raises several error types for unreadable files
        return {"skip": f"unreadable PDF: {e}"}
    with doc:
        if doc.needs_pass:
            return {"skip": "encrypted PDF (needs a password)"}
        # MuPDF silently repairs a truncated file and shows what it could recover; a partial paper is worse
        # than none. A repaired file that still ends with %%EOF was merely sloppy and is kept.
        if doc.is_repaired and b"%%EOF" not in data[-2048:]:
            return {"skip": "truncated PDF (repaired, no %%EOF at the end)"}
        if doc.page_count == 0:
            return {"skip": "PDF without pages"}
        try:
            record = extract(doc, doc_id, cfg)
        except Exception as e:
            return {"skip": f"unreadable PDF: {type(e).__name__}: {e}"}
    chars = sum(len(b["text"]) for p in record["pages"] for b in p["blocks"])
    if chars < cfg.min_chars:
        return {"skip": f"no text ({chars} characters < min_chars {cfg.min_chars}): scanned or empty"}
    return record


# map_cached calls task.submit(item, *args); unpack each (doc_id, path) item into extract_pdf's own arguments.
_extract_pairs = SimpleNamespace(submit=lambda pair, cfg: extract_pdf.submit(*pair, cfg))


def run(ingest: IngestParams, paths: Paths) -> list[dict]:
    log = logger()
    root = Path(paths.pdf_dir)
    files = [p for p in root.rglob("*") if p.is_file() and p.suffix.lower() == ".pdf"] if root.is_dir() else []
    names = sorted((p.relative_to(root).as_posix(), p) for p in files)
    hashes = [sha256_file(p) for _, p in names]

    first: dict[str, str] = {}  # content hash → first file with it
    todo = []
    for (name, path), h in zip(names, hashes):
        if h not in first:
            first[h] = name
            todo.append((h, str(path)))
    results = dict(zip((h for h, _ in todo), map_cached(_extract_pairs, todo, ingest, desc="ingest")))

    docs, report = [], []
    for (name, _), h in zip(names, hashes):
        result = results[h] if first[h] == name else {"skip": f"duplicate of {first[h]}"}
        if "skip" in result:
            log.warning(f"ingest: skipped {name}: {result['skip']}")
            report.append(dict(file=name, status="skipped", reason=result["skip"], doc_id=h, title=None,
                               pages=None, sections=None))
            continue
        # The cached record knows no path (a renamed file is a cache hit): name it here, title from it last.
        record = {**result, "file": name, "title": result["title"] or Path(name).stem}
        docs.append(record)
        report.append(dict(file=name, status="ok", reason=None, doc_id=h, title=record["title"],
                           pages=record["page_count"], sections=len(record["sections"])))

    write_json(paths.ingest_report, {"files": report, "ok": len(docs), "skipped": len(report) - len(docs)})
    if not docs:
        what = (f"all {len(names)} .pdf files were skipped (reasons in {paths.ingest_report})" if names
                else "no .pdf files in it" if root.is_dir() else "the folder does not exist")
        raise PipelineError(f"no document could be ingested from {root}: {what}")
    write_jsonl(paths.documents, docs)
    log.info(f"ingest: {len(docs)} documents, {len(report) - len(docs)} skipped, "
             f"{sum(d['page_count'] for d in docs)} pages → {paths.documents}")
    return docs


if __name__ == "__main__":
    run_stage(run, "ingest")
