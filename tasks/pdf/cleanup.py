"""What is not running prose: tables (made blocks of their own), tables of contents and the reference list (cut).

Tables come from the layout, not from PyMuPDF's `page.find_tables()`: on the real-paper corpus that call costs
~0.9 s per page that carries a "Table N" caption (109 such pages took 96 s; the whole ingest of the 16 papers
takes a few seconds), and on booktabs tables without vertical rules it splits cells oddly anyway. A table here
is the run of rows next to its "Table N" caption in which lines sit side by side on one baseline.

The reference list ends where its entries end (author lists, years, venues, "arXiv preprint", "et al.", URLs),
judged block by block, not at the next heading: appendices after it are kept. Used by tasks/pdf/extract.py.
"""

from __future__ import annotations

import re

from tasks.pdf.headings import is_reference_heading

FIGURE_CAPTION_RE = re.compile(r"(?:Figure|Fig\.)\s+(?:[A-Z]\.?)?\d{1,3}(?:\.\d{1,2})?\s*[:.|]")
TABLE_CAPTION_RE = re.compile(r"Table\s+(?:[A-Z]\.?)?\d{1,3}(?:\.\d{1,2})?\s*[:.|]")
# TOC lines: "B.1 Pretraining Data . . . . . . 18", "2 Related Work 4" (in a run), "Contents" above them.
DOT_LEADER_RE = re.compile(r"(?:\.\s?){5,}\s*\d{0,4}$")
NUMBER_END_RE = re.compile(r"\s[-+±]?\d[\d.,]*\s?%?$")
PAGE_NO_RE = re.compile(r"\d{1,4}")
TOC_ENTRY_RE = re.compile(r"(?:\d{1,2}|[A-Z])(?:\.\d{1,2})*\.?\s+\S.*?\s\d{1,4}$")
SECTION_START_RE = re.compile(r"(?:\d{1,2}|[A-Z])(?:\.\d{1,2})*\.?\s+[A-Z]")
TOC_HEADING_RE = re.compile(r"(?:table of )?contents", re.I)
YEAR_RE = re.compile(r"\b(?:19[5-9]\d|20[0-4]\d)[a-z]?\b")
CUE_RE = re.compile(
    r"et al\.|arXiv|[Pp]roceedings|\bIn (?:Proc|Advances|International|Annual|The \d|Findings|Conference|[A-Z]{3,})"
    r"|[Cc]onference|[Jj]ournal|[Pp]reprint|https?://|\bdoi\b|\bpp\. ?\d|\b[Vv]ol\. ?\d|Transactions|Workshop"
    r"|Computational Linguistics|\babs/\d|OpenReview|\bURL\b|[Uu]niversity [Pp]ress")
# Author lists: "Amanda Askell, Anna Chen, ..." (two capitalised words and a comma).
NAME_RE = re.compile(r"\b[A-Z][\w'’.-]* [A-Z][\w'’-]+,")
ENTRY_START_RE = re.compile(r"\[\d{1,3}\]\s")
# How a reference entry begins: "[9] ", "Bai, Y., Jones, A.," or "Tom Brown, Benjamin Mann," (author-year styles),
# "[BZB+19] Yonatan Bisk," (alphanumeric keys).
ENTRY_HEAD_RE = re.compile(r"\[[\w+]{1,10}\]\s|[A-Z][\w'’-]+(?: [A-Z][\w'’-]+)?, (?:[A-Z]\.[ -]?){1,3}[,.]"
                           r"|(?:[A-Z][\w'’.-]* ){1,3}[A-Z][\w'’-]+, (?:and )?[A-Z]")
PROSE_RE = re.compile(r"\b(?:we|our|is|are|was|were|this|these|which|can|will|has|have|it|its|such|than|they)\b")


# ---------------------------------------------------------------------------------------------- tables


def mark_tables(lines: list[dict]) -> tuple[list[dict], int]:
    """Replace the cell lines of each captioned table on the page by one table line (text: rows joined by
    "\\n", cells by " | "). Returns the page's lines and the number of tables found."""
    found = 0
    for cap in [ln for ln in lines if ln["first"] and TABLE_CAPTION_RE.match(ln["text"])]:
        caption = [ln for ln in lines if ln["block"] == cap["block"] and not ln.get("table")]
        cells = [ln for ln in lines if ln["block"] != cap["block"] and not ln.get("table") and overlaps(ln, cap)]
        rows = group_rows(cells)
        best: list[list[dict]] = []
        for direction in (-1, 1):  # the table above its caption, or below it
            run = []
            start = edge = min(c["y0"] for c in caption) if direction < 0 else max(c["y1"] for c in caption)
            for row in sorted(rows, key=lambda r: r[0]["y1"] * direction):
                top, bottom = min(c["y0"] for c in row), max(c["y1"] for c in row)
                if (start - bottom if direction < 0 else top - start) < -2:
                    continue  # on the other side of the caption
                # rows of a table may overlap a little (a label centred on a two-line cell)
                gap = max(0.0, edge - bottom if direction < 0 else top - edge)
                if gap > 3 * cap["size"] + (12 if not run else 0) or not tabular(row):
                    break
                if (run and len(row) == 1 and abs(row[0]["size"] - run[-1][0]["size"]) > 0.6) or any(
                        c["size"] > cap["size"] + 1.5 for c in row):
                    break  # a heading or a paragraph next to the table, not a row of it
                run.append(row)
                edge = min(edge, top) if direction < 0 else max(edge, bottom)
            if len(run) > len(best):
                best = sorted(run, key=lambda r: r[0]["y1"])
        if len(best) < 2:
            continue
        found += 1
        members = {id(c) for row in best for c in row}
        text = "\n".join(" | ".join(c["text"] for c in sorted(row, key=lambda c: c["x0"])) for row in best)
        first = best[0][0]
        table = {**first, "text": text, "table": True, "block": 10_000 + len(lines) + found,
                 "x0": min(c["x0"] for r in best for c in r), "x1": max(c["x1"] for r in best for c in r),
                 "y0": min(c["y0"] for r in best for c in r), "y1": max(c["y1"] for r in best for c in r),
                 "cell_chars": sum(len(c["text"]) for r in best for c in r)}
        lines = [ln for ln in lines if id(ln) not in members] + [table]
    return lines, found


def overlaps(ln: dict, cap: dict) -> bool:
    """In the caption's column: a caption in one half of the page (a two-column layout) has its table in that
    half; a caption across the middle may have a table wider than itself."""
    mid = cap["width"] / 2
    if cap["x1"] <= mid + 10:
        return ln["x1"] <= mid + 10
    if cap["x0"] >= mid - 10:
        return ln["x0"] >= mid - 10
    return True


def group_rows(lines: list[dict]) -> list[list[dict]]:
    rows: list[list[dict]] = []
    for ln in sorted(lines, key=lambda ln: ln["y1"]):
        if rows and abs(rows[-1][-1]["y1"] - ln["y1"]) <= 2.5:
            rows[-1].append(ln)
        else:
            rows.append([ln])
    return rows


def tabular(row: list[dict]) -> bool:
    """A table row: no caption, no line of prose (cells are short: a line of seven words or more is the other
    column's text, not a cell); several cells, or one short cell (a row with empty columns)."""
    if any(TABLE_CAPTION_RE.match(c["text"]) or re.match(r"Figure\s+\d", c["text"]) for c in row):
        return False
    prose = any(len(c["text"].split()) >= 7 and sum(w[:1].islower() for w in c["text"].split()) >= 4
                and not NUMBER_END_RE.search(c["text"]) for c in row)  # "Is the output valid? 58%" is a row
    words = row[0]["text"].split()
    numeric = sum(bool(re.fullmatch(r"[-+±<>]?[\d.,/%]+", w)) for w in words) >= 0.5 * len(words)
    return not prose and (len(row) >= 2 or len(row[0]["text"]) <= 40 or numeric)  # "2k / 32k 4.91 4.76 ..."


def drop_figure_text(lines: list[dict], body: dict) -> tuple[list[dict], int]:
    """Remove the labels drawn inside figures ("+5.5", "Llama3 Base 8B", axis ticks): the short lines between a
    "Figure N:" caption and the text above it, in the caption's column. A line of prose (seven words or more),
    a numbered or known heading, a line in heading style (bold or larger than the body: the end of a wrapped
    heading) or a table above the caption stops the walk. Returns lines, chars dropped."""
    drop: set[int] = set()
    for cap in [ln for ln in lines if ln["first"] and FIGURE_CAPTION_RE.match(ln["text"])]:
        above = sorted((ln for ln in lines if ln["y1"] <= cap["y0"] + 1 and ln["block"] != cap["block"]
                        and overlaps(ln, cap)), key=lambda ln: -ln["y1"])
        for ln in above:
            words = ln["text"].split()
            if (ln.get("table") or len(words) >= 7 or len(ln["text"]) > 45 or ln["text"].endswith(".")
                    or SECTION_START_RE.match(ln["text"]) or ln["text"].lower() in ("abstract", "references")
                    or ln["size"] >= body["size"] * 1.1 or (ln["bold"] and ln["size"] >= body["size"] * 0.95)):
                break
            drop.add(id(ln))
    return [ln for ln in lines if id(ln) not in drop], sum(len(ln["text"]) for ln in lines if id(ln) in drop)


# ---------------------------------------------------------------------------------------------- contents


def drop_toc(lines: list[dict]) -> tuple[list[dict], int]:
    """Remove an in-paper table of contents: lines with dot leaders and a page number, or runs of three or more
    numbered lines ending in a page number, and the "Contents" line above them. Returns lines, chars dropped."""
    # An entry's page number is often a line of its own at the right margin, on the entry's baseline.
    numbers = [o for o in lines if PAGE_NO_RE.fullmatch(o["text"])]
    owners = {id(ln) for ln in lines if numbers and SECTION_START_RE.match(ln["text"]) and any(
        abs(o["y1"] - ln["y1"]) <= 3 and o["x0"] > ln["x1"] + 10 for o in numbers)}
    entry = [bool(id(ln) in owners or DOT_LEADER_RE.search(ln["text"]) or TOC_ENTRY_RE.fullmatch(ln["text"]))
             for ln in lines]
    toc = [False] * len(lines)
    if not any(entry):
        return lines, 0
    for i, ln in enumerate(lines):
        run = sum(entry[max(0, i - 4):i + 5])  # page-number lines may sit between the entries
        toc[i] = entry[i] and (DOT_LEADER_RE.search(ln["text"]) is not None or run >= 3)
    if any(toc):
        first = toc.index(True)
        for i in range(max(0, first - 3), first):
            if TOC_HEADING_RE.fullmatch(lines[i]["text"]):
                toc[i] = True
        # the page numbers that belong to dropped entries go with them
        dropped = [ln for ln, t in zip(lines, toc) if t]
        for i, ln in enumerate(lines):
            if PAGE_NO_RE.fullmatch(ln["text"]) and any(abs(ln["y1"] - d["y1"]) <= 3 for d in dropped):
                toc[i] = True
    return [ln for ln, t in zip(lines, toc) if not t], sum(len(ln["text"]) for ln, t in zip(lines, toc) if t)


# ---------------------------------------------------------------------------------------------- references


def reference_like(text: str) -> bool:
    """A block of the reference list: years and venue cues dense enough, little running prose."""
    cues = len(YEAR_RE.findall(text)) + len(CUE_RE.findall(text)) + len(ENTRY_START_RE.findall(text)) + len(
        NAME_RE.findall(text)) / 2
    words = max(1, len(text.split()))
    return cues >= 1 and cues * 220 >= len(text) and len(PROSE_RE.findall(text.lower())) / words < 0.05


def entry_like(text: str) -> bool:
    """A block that starts a reference entry (or several): an entry's head and reference-like text."""
    return ENTRY_HEAD_RE.match(text) is not None and reference_like(text)


def cut_references(pages: list[list[dict]], stop_chars: int, min_run_chars: int) -> tuple[int, int]:
    """Remove the reference list: from the "References"/"Bibliography" heading through the last block that
    reads as reference entries before `stop_chars` of other text (or a heading followed by other text) show
    that the list is over. A list whose heading was not found (run into the first entry, set in body style, or
    absent; an outline without a "References" entry leaves the list inside the last body section) is found by
    its entries: a run of blocks that each start an entry, at least `min_run_chars` of them, ended the same way
    or by a heading. Returns the characters removed and the characters of the document's blocks that start
    entries, before the cut (the ingest report compares the two)."""
    flat = [(p, i, b) for p, blocks in enumerate(pages) for i, b in enumerate(blocks)]
    like = [b["kind"] == "text" and reference_like(b["text"]) for _, _, b in flat]
    entries = [r and entry_like(b["text"]) for (_, _, b), r in zip(flat, like)]
    looking = sum(len(b["text"]) for (_, _, b), e in zip(flat, entries) if e)
    spans = []
    start = next((k for k, (_, _, b) in enumerate(flat) if b["kind"] == "heading" and is_reference_heading(b["text"])),
                 None)
    if start is not None:
        spans.append((start, list_end(flat, like, start, stop_chars, across_headings=True)))
    k = 0
    while k < len(flat):
        if not entries[k] or any(a <= k <= b for a, b in spans):
            k += 1
            continue
        end = list_end(flat, like, k, stop_chars, across_headings=False)
        if sum(len(flat[j][2]["text"]) for j in range(k, end + 1) if entries[j]) < min_run_chars:
            k += 1  # a paragraph or two that cite papers: not a list
            continue
        before = flat[k - 1][2] if k else None  # the list's heading, when it was read as a line of text
        spans.append((k - 1 if before and before["kind"] == "text" and is_reference_heading(before["text"]) else k,
                      end))
        k = end + 1
    drop = {(flat[j][0], flat[j][1]) for a, b in spans for j in range(a, b + 1)}
    removed = sum(len(b["text"]) for p, i, b in flat if (p, i) in drop)
    for p, blocks in enumerate(pages):
        blocks[:] = [b for i, b in enumerate(blocks) if (p, i) not in drop]
    return removed, looking


def list_end(flat: list[tuple], member: list[bool], start: int, stop_chars: int, across_headings: bool) -> int:
    """Index of the last block of the reference list that begins at `start`: the last member block before
    `stop_chars` of other text. Under a reference heading the list goes on across a heading followed by a member
    (entries set under letter headings); a list found by its entries alone ends at any heading."""
    end, other = start, 0
    for k in range(start + 1, len(flat)):
        b = flat[k][2]
        if b["kind"] == "heading":
            nxt = next((j for j in range(k + 1, len(flat)) if flat[j][2]["kind"] == "text"), None)
            if not across_headings or nxt is None or not member[nxt]:
                break
            continue
        if member[k]:
            end, other = k, 0
            continue
        other += len(b["text"])
        if other >= stop_chars:
            break
    return end
