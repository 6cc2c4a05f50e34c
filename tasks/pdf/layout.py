"""Layout: each page's horizontal lines with their style, running headers/footers, the title, reading order.

Layout comes from PyMuPDF's text dict (blocks, lines, spans with font, size, weight and direction), read once per
page: the text dict is the expensive call. Used by tasks/pdf/extract.py; no Prefect here.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter, defaultdict

import pymupdf

# Text only: image blocks cost time and carry no text. Ligatures are expanded by NFKC in `clean`.
TEXT_FLAGS = pymupdf.TEXTFLAGS_TEXT
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff]")
# A line that is only a section number: LaTeX often sets "1" and "INTRODUCTION" as two lines on one baseline.
SECTION_NUMBER_RE = re.compile(r"(?:\d{1,2}|[A-Z])(?:\.\d{1,2}){0,3}\.?")
PAGE_NUMBER_RE = re.compile(r"(?:page\s*)?\d{1,4}(?:\s*(?:of|/)\s*\d{1,4})?|[ivxlc]{1,6}|[-–] ?\d{1,4} ?[-–]", re.I)
BOLD_FONT_RE = re.compile(r"bold|medi|semibold|black|heavy|demi|-bd|\.b$", re.I)
FOOTNOTE_MARK_RE = re.compile(r"[\d∗*†‡§¶]{1,2}")  # "1Unless otherwise specified ...", "∗Equal contribution"


# TeX sets an accent as a glyph of its own before its letter ("Sch¨utze"); NFKC makes that spacing "¨" a space and
# a combining mark, which would stand alone in the text ("Sch ̈utze"): the mark goes back onto its letter, a vowel
# or one of the consonants TeX accents in names (ń, š, č, ź). Before another letter the "´" was an apostrophe in a
# model's output ("you´re") and is left as it was.
LOOSE_ACCENT_RE = re.compile(r" ([\u0300-\u036f])([AEIOUYaeiouyNnSsCcZz])")


def clean(text: str) -> str:
    """NFKC turns ligatures (ﬁ ﬂ ﬀ ﬃ ﬄ) and compatibility spaces into plain letters and spaces; control and
    zero-width characters go (they are never text a reader sees, and in a title they would reach prompts);
    TeX's loose accents are put back on their letters ("Schütze")."""
    text = unicodedata.normalize("NFKC", text)
    if "\u0300" <= max(text, default=" "):  # the cheap test first: called for every line
        text = unicodedata.normalize("NFC", LOOSE_ACCENT_RE.sub(r"\2\1", text))
    return " ".join(CONTROL_RE.sub(" ", text).split())


def caps(text: str) -> bool:
    """All letters upper case, and enough of them to tell: "1 INTRODUCTION", small caps in the text layer."""
    letters = [c for c in text if c.isalpha()]
    return len(letters) >= 4 and all(c.isupper() for c in letters)


def read_lines(doc: pymupdf.Document) -> tuple[list[list[dict]], list[str], int, dict]:
    """Each page's horizontal lines (text, bbox, largest span size, all-bold, font, MuPDF block number), the text
    of page 1's rotated lines (where the arXiv stamp is), the characters of all rotated lines (set aside), and the
    body style: the most common size and font by characters. A section number alone on a line is joined to the
    title on its baseline."""
    pages, rotated, rotated_chars, sizes, fonts = [], [], 0, Counter(), Counter()
    for page in doc:
        lines, height, width = [], page.rect.height, page.rect.width
        for b_no, block in enumerate(page.get_text("dict", flags=TEXT_FLAGS)["blocks"]):
            for line in block["lines"]:
                spans = [s for s in line["spans"] if s["text"].strip()]
                if not spans:
                    continue
                text = clean("".join(s["text"] for i, s in enumerate(line["spans"])
                                     if not (i and s["flags"] & pymupdf.TEXT_FONT_SUPERSCRIPT
                                             and note_mark(s, line["spans"][i - 1]))))
                if not text:
                    continue
                if line["dir"][0] < 0.99:  # rotated: the arXiv stamp, axis labels; never body text
                    if page.number == 0:
                        rotated.append(text)
                    rotated_chars += len(text)
                    continue
                for s in spans:
                    sizes[round(s["size"], 1)] += len(s["text"])
                    fonts[s["font"]] += len(s["text"])
                main = max(spans, key=lambda s: len(s["text"]))
                lettered = [s for s in spans if re.search("[A-Za-z0-9]", s["text"])] or spans
                # Bold when most letters are: small caps and symbols often come in a font of their own.
                heavy = sum(len(s["text"]) for s in lettered
                            if s["flags"] & pymupdf.TEXT_FONT_BOLD or BOLD_FONT_RE.search(s["font"]))
                bold = heavy >= 0.6 * sum(len(s["text"]) for s in lettered)
                # A footnote's mark: raised, in a smaller size than the words after it.
                mark = len(spans) > 1 and spans[0]["size"] <= 0.8 * spans[1]["size"] \
                    and FOOTNOTE_MARK_RE.fullmatch(spans[0]["text"].strip()) is not None
                x0, y0, x1, y1 = line["bbox"]
                lines.append(dict(text=text, block=b_no, x0=x0, y0=y0, x1=x1, y1=y1, page=page.number,
                                  size=round(max(s["size"] for s in lettered), 1), font=main["font"], bold=bold,
                                  height=height, width=width, first=line is block["lines"][0], mark=mark))
        pages.append(join_numbers(lines))
    body = dict(size=sizes.most_common(1)[0][0] if sizes else 10.0, font=fonts.most_common(1)[0][0] if fonts else "")
    return pages, rotated, rotated_chars, body


def note_mark(span: dict, before: dict) -> bool:
    """A footnote's mark in running text, dropped from it: 1-2 digits or a dagger set raised and smaller after a
    word or its punctuation ("API11 to collect", "applications.1 P-tuning"); an exponent follows a digit ("10^3")."""
    return span["size"] < 0.9 * before["size"] and before["text"][-1:] in _MARKED \
        and FOOTNOTE_MARK_RE.fullmatch(span["text"].strip()) is not None


_MARKED = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,;:)’'\"”")


def join_numbers(lines: list[dict]) -> list[dict]:
    """"1" + "INTRODUCTION" on one baseline → one line "1 INTRODUCTION" styled like the title part."""
    out = []
    used = set()
    by_row = defaultdict(list)  # lines by rounded baseline: the mate is looked up among a handful, not all
    for j, o in enumerate(lines):
        by_row[round(o["y1"])].append(j)
    for i, ln in enumerate(lines):
        if i in used:
            continue
        if SECTION_NUMBER_RE.fullmatch(ln["text"]):
            near = [j for r in (-1, 0, 1) for j in by_row.get(round(ln["y1"]) + r, ())]
            mate = next((j for j in near if j not in used and j != i and abs(lines[j]["y1"] - ln["y1"]) < 2
                         and 0 <= lines[j]["x0"] - ln["x1"] < 4 * ln["size"]
                         and re.match("[A-Za-z]", lines[j]["text"])), None)
            if mate is not None:
                used.add(mate)
                o = lines[mate]
                out.append({**o, "text": f"{ln['text']} {o['text']}", "x0": ln["x0"], "first": True})
                continue
        out.append(ln)
    return out


def drop_running_lines(pages: list[list[dict]], margin: float, min_pages: int) -> tuple[list[list[dict]], int]:
    """Remove running headers/footers: margin lines whose text (digits masked, so "Page 3" matches "Page 4")
    repeats on enough pages, and bare page numbers in the margin. Returns the pages and the characters dropped."""

    def in_margin(ln: dict) -> bool:
        m = margin * ln["height"]
        return ln["y1"] <= m or ln["y0"] >= ln["height"] - m

    def key(ln: dict) -> str:
        return re.sub(r"\d+", "#", ln["text"].lower())

    seen = defaultdict(set)
    for p_no, lines in enumerate(pages):
        for ln in lines:
            if in_margin(ln):
                seen[key(ln)].add(p_no)

    # A short paper cannot repeat a header on more pages than it has after page 1 (often set differently).
    need = max(2, min(min_pages, len(pages) - 1))

    def running(ln: dict) -> bool:
        return in_margin(ln) and (len(seen[key(ln)]) >= need or PAGE_NUMBER_RE.fullmatch(ln["text"]) is not None)

    kept = [[ln for ln in lines if not running(ln)] for lines in pages]
    return kept, sum(len(ln["text"]) for lines in pages for ln in lines if running(ln))


def take_title(first_page: list[dict], body: dict) -> tuple[list[dict], list[dict]]:
    """The title: the largest horizontal text near the top of page 1 (rotated stamps were set aside) that reads
    like a title (a figure's big label does not), merged across consecutive lines of that size. Returns the title
    lines and page 1's other lines; the caller mends the text."""
    top = [ln for ln in first_page if ln["y0"] < ln["height"] * 0.45 and re.search(r"[A-Za-z]{2}", ln["text"])]
    for size in sorted({ln["size"] for ln in top if ln["size"] >= body["size"] * 1.15}, reverse=True):
        same = sorted((ln for ln in top if abs(ln["size"] - size) <= 0.5), key=lambda ln: ln["y0"])
        title = [same[0]]
        for ln in same[1:]:
            if ln["y0"] - title[-1]["y1"] > size:  # a gap: a second run of big text is not the title
                break
            title.append(ln)
        if sum(c.isalpha() for ln in title for c in ln["text"]) >= 10:
            return title, [ln for ln in first_page if not any(ln is t for t in title)]
    return [], first_page  # no display-size text: the caller falls back to metadata


def order_blocks(lines: list[dict]) -> list[list[dict]]:
    """Group a page's lines into MuPDF's blocks and put them in reading order. On a two-column page, blocks that
    span the middle (title, abstract, wide figures and tables) cut the page into bands; each band is read left
    column top to bottom, then right column. Other pages are read top to bottom."""
    groups: dict[int, list[dict]] = defaultdict(list)
    for ln in lines:
        groups[ln["block"]].append(ln)
    blocks = [dict(lines=ls, x0=min(ln["x0"] for ln in ls), x1=max(ln["x1"] for ln in ls),
                   y0=min(ln["y0"] for ln in ls)) for ls in groups.values()]
    if not blocks:
        return []
    left, right = min(b["x0"] for b in blocks), max(b["x1"] for b in blocks)
    # The page's middle, not the text's: a margin note or a stray label must not move the column gutter.
    mid, wide = lines[0]["width"] / 2, 0.3 * (right - left)

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


def footnotes_last(blocks: list[list[dict]], body: dict) -> list[list[dict]]:
    """The page's footnotes after its other blocks. A footnote is a block in the page's lower half, set smaller
    than the body, that opens with a raised mark ("1Unless otherwise specified ...") or a "∗"/"†"; read in
    place, it sits between the halves of a paragraph broken at the column's end and is run into its sentence
    ("building models that 1Unless otherwise specified, ..."), and the halves are not joined."""
    def footnote(lines: list[dict]) -> bool:
        first = lines[0]
        return not first.get("table") and first["y0"] > first["height"] / 2 \
            and first["size"] <= body["size"] - 0.5 and (first.get("mark") or first["text"][:1] in "∗*†‡")

    notes = [b for b in blocks if footnote(b)]
    return [b for b in blocks if not footnote(b)] + notes if notes else blocks


def metadata_title(doc: pymupdf.Document) -> str:
    # arXiv metadata titles are often empty, a URL or a file name: use one only when it reads like a title.
    title = clean(doc.metadata.get("title") or "")
    bad = "://" in title or "arxiv.org" in title.lower() or re.search(r"\.(pdf|dvi|tex|docx?)$", title, re.I)
    return "" if bad or len(re.findall(r"[A-Za-z]", title)) < 4 else title
