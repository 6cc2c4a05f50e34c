"""Text: a page's ordered lines → heading, text, caption and table blocks; words broken at line ends mended.

Headings and tables were marked on the lines before (tasks/pdf/headings.py, tasks/pdf/cleanup.py); here lines
become blocks. Used by tasks/pdf/extract.py.
"""

from __future__ import annotations

import re
from functools import reduce
from itertools import pairwise

HYPHENS = ("-", "\u00ad", "\u2010")  # hyphen-minus, soft hyphen, hyphen
HYPHEN_END_RE = re.compile(r"([A-Za-z]+)[-\u00ad\u2010]$")
LEADING_WORD_RE = re.compile(r"[A-Za-z]*")
WORD_RE = re.compile(r"[a-z]+")
COMPOUND_RE = re.compile(r"[a-z]+(?:-[a-z]+)+")
# "Table 3:", "Figure 2.", "Fig. 4 |", "Table A.1:" at the start of a block: the block is a caption.
CAPTION_RE = re.compile(r"(?:Table|Figure|Fig\.)\s+(?:[A-Z]\.?)?\d{1,3}(?:\.\d{1,2})?\s*[:.|]")
# "D HYPERPARAMETERS USED IN EXPERIMENTS", "D.1 ROBERTA", "4 OUR METHOD": a number, then a title in capitals.
CAPS_HEADING_RE = re.compile(r"((?:\d{1,2}|[A-Z])(?:\.\d{1,2}){0,3})\.?\s+([A-Z][A-Z0-9][A-Z0-9 ,:&()'’/+-]{2,80})")


def spellings_of(pages: list[list[dict]]) -> set[str]:
    """Spellings used within lines: words, and adjacent parts of hyphenated ones ("table-to-text" gives
    "table-to" and "to-text"); they decide whether a hyphen at a line end is a real one."""
    text = " ".join(ln["text"] for page in pages for ln in page).lower()
    return set(WORD_RE.findall(text)) | {
        f"{a}-{b}" for word in COMPOUND_RE.findall(text) for a, b in pairwise(word.split("-"))}


def join_broken(a: str, b: str, spellings: set[str]) -> str:
    """Join text split at a line (or column) end, undoing hyphenation: "parame-" + "terization" → "parameterization".
    The document's own spellings decide ("fine-tuning" in running text keeps "fine-" + "tuning" hyphenated,
    "LaMDA" there joins "LaM-" + "DA", "language" joins "LAN-" + "GUAGE"); without evidence a capitalised or
    numeric part keeps its hyphen ("Low-" + "Rank", "GPT-" + "3")."""
    m = HYPHEN_END_RE.search(a[-64:]) if a.endswith(HYPHENS) else None  # the cheap test first: called per line
    if m and b.startswith("-"):  # some typesetters repeat a compound's hyphen on the next line: "out-" "-of-domain"
        return a + b[1:]
    if not m or not b[:1].isalnum():
        return f"{a} {b}"
    head, tail = m.group(1), LEADING_WORD_RE.match(b).group()
    keep = not tail or f"{head}-{tail}".lower() in spellings or (
        (head + tail).lower() not in spellings and not tail[0].islower())
    return a[:-1] + ("-" if keep else "") + b


def mend_title(lines: list[str], spellings: set[str]) -> str:
    """Title lines joined as printed, hyphens at line ends undone where the paper spells the word whole
    ("LAN-" + "GUAGE" → "LANGUAGE"), also when the text layer already put a space after them ("LAN- GUAGE")."""
    text = reduce(lambda a, b: join_broken(a, b, spellings), lines) if lines else ""
    return re.sub(r"\b([A-Za-z]+-) ([A-Za-z]+)", lambda m: join_broken(m.group(1), m.group(2), spellings), text)


def joined(lines: list[str], spellings: set[str]) -> str:
    return reduce(lambda a, b: join_broken(a, b, spellings), lines)


def run_in_heading(ln: dict, nxt: dict | None) -> tuple[int, str] | None:
    """(level, text) of an unmarked line that is a numbered heading in capitals ("D HYPERPARAMETERS USED IN
    EXPERIMENTS", "D.1 ROBERTA") at the head of a block, when the next line is another such heading or prose:
    an outline without the appendix's entries, or a heading the layout did not find, would otherwise run it
    into the paragraph's first sentence."""
    m = CAPS_HEADING_RE.fullmatch(ln["text"])
    if not m or len(ln["text"].split()) > 12 or nxt is None:
        return None
    if not (CAPS_HEADING_RE.fullmatch(nxt["text"]) or (nxt["text"][:1].isupper() and len(nxt["text"].split()) >= 6)):
        return None
    return m.group(1).count(".") + 1, ln["text"]


def page_blocks(blocks: list[list[dict]], spellings: set[str]) -> list[dict]:
    """Lines of each layout block → blocks: a marked heading line (with the lines that continue a wrapped
    heading), a numbered heading in capitals at the head of a block (see run_in_heading), a table, a caption (a
    block starting "Table 3:" / "Figure 2.", up to a line in another type size: the prose set after it), or a
    paragraph."""
    out: list[dict] = []
    for lines in blocks:
        if lines[0].get("table"):
            out.append({"kind": "table", "text": lines[0]["text"]})
            continue
        para: list[str] = []
        kind = "caption" if CAPTION_RE.match(lines[0]["text"]) else "text"
        head = kind == "text"  # still at the head of the block: run-in headings are looked for here only
        for i, ln in enumerate(lines):
            if ln.get("continues"):  # second line of a wrapped heading: already in the heading's text
                continue
            found = ln.get("heading") or (run_in_heading(ln, lines[i + 1] if i + 1 < len(lines) else None)
                                          if head and not para else None)
            head = head and found is not None
            if kind == "caption" and para and abs(ln["size"] - lines[0]["size"]) >= 0.5:
                out.append({"kind": kind, "text": joined(para, spellings)})  # the caption ends, prose follows
                para, kind = [], "text"
            if not found:
                para.append(ln["text"])
                continue
            if para:
                out.append({"kind": kind, "text": joined(para, spellings)})
                para, kind = [], "text"
            level, text = found
            out.append({"kind": "heading", "level": level, "text": text})
        if para:
            out.append({"kind": kind, "text": joined(para, spellings)})
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
