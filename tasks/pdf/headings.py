"""Section headings, marked on the lines (`line["heading"] = (level, text)`) before lines become blocks.

From the PDF outline when there is one (LaTeX's hyperref writes it: levels and the page and position of each
heading): each entry is matched to the printed line at its position, so the text is cut at the right place.
Otherwise from the layout, read in reading order: a numbered line ("3.2 Method", "1 INTRODUCTION", "A.1 Proofs",
"Appendix B") set apart from the body by size, weight, font or capitals, whose number continues the sequence
so far; a usual name ("Abstract", "References", ...); and, once some headings are known, an unnumbered line set
exactly in a known heading style. Used by tasks/pdf/extract.py.
"""

from __future__ import annotations

import re
from difflib import SequenceMatcher

from tasks.pdf.layout import caps, clean
from tasks.pdf.text import CAPTION_RE

NUMBERED_RE = re.compile(r"(?:(Appendix|APPENDIX)\s+)?((?:\d{1,2}|[A-Z])(?:\.\d{1,2}){0,3})(\.?):?\s+(\S.*)")
NAMED_HEADINGS = {
    "abstract", "introduction", "related work", "related works", "background", "method", "methods", "approach",
    "experiments", "results", "discussion", "conclusion", "conclusions", "limitations", "acknowledgements",
    "acknowledgments", "acknowledgement", "acknowledgment", "references", "bibliography", "appendix",
    "appendices", "supplementary material", "broader impact", "broader impacts", "ethics statement",
    "ethical considerations", "impact statement", "reproducibility statement", "author contributions",
    "conclusion and future work", "discussion and future work", "future work", "preliminaries",
}
MONOSPACE_RE = re.compile(r"mono|courier|typewriter|cmtt|inconsolata|consola|menlo", re.I)
REFERENCE_HEADINGS = {"references", "bibliography", "references and notes", "literature cited"}


def key(text: str) -> str:
    """Matching key of a heading: numbering, case, spaces and punctuation ignored ("3.2 SETUP:" ~ "Setup")."""
    m = NUMBERED_RE.fullmatch(text)
    body = m.group(4) if m and not (m.group(2).isalpha() and len(m.group(4).split()) < 2) else text
    return re.sub(r"[^a-z0-9]", "", body.lower())


def number_of(text: str) -> str:
    m = NUMBERED_RE.fullmatch(text)
    return m.group(2) if m else ""


def is_reference_heading(text: str) -> bool:
    return re.sub(r"^(?:\d{1,2}|[A-Z])\.?\s+", "", text).lower().strip(" .:") in REFERENCE_HEADINGS


# ---------------------------------------------------------------------------------------------- outline


def read_outline(doc) -> list[tuple[int, str, int, float | None]]:
    """Usable outline entries (level, title, 0-based page, y of the target from the top or None); [] when the
    PDF has no real outline (none, or a lone "Untitled" entry). (Walking `doc.outline` items by hand would save
    the named-destination lookups, but PyMuPDF's outline objects can outlive their document and crash.)"""
    entries = []
    for level, title, page, dest in doc.get_toc(simple=False):
        title = clean(title)
        if page < 1 or page > doc.page_count or not re.search("[A-Za-z]{2}", title):
            continue
        to = dest.get("to") if isinstance(dest, dict) else None
        height = doc[page - 1].rect.height
        entries.append((level, title, page - 1, height - to.y if to is not None and 0 < to.y <= height else None))
    return entries if len(entries) >= 2 else []


def similar(a: str, b: str) -> bool:
    """Fuzzy equality of two heading keys: tolerant of a ligature or a letter the text layer got wrong."""
    if a == b:
        return True
    if min(len(a), len(b)) < 6 or abs(len(a) - len(b)) > 0.25 * max(len(a), len(b)):
        return False  # the cheap tests first: called for every line of the outline entry's page
    matcher = SequenceMatcher(None, a, b, autojunk=False)
    return matcher.real_quick_ratio() >= 0.88 and matcher.quick_ratio() >= 0.88 and matcher.ratio() >= 0.88


def mark_outline(outline: list, pages: list[list[list[dict]]]) -> int:
    """Mark each outline entry on the line printing it: on its page, the line whose text matches the title
    (fuzzily, numbering aside), nearest below the entry's target position. A title wrapped over two lines
    takes the next lines of its block. An entry whose line is not found gets a heading line of its own at the
    target position (the cut stays right). Returns how many entries were matched to a printed line."""
    matched = 0
    for level, title, p_no, y in outline:
        want = key(title)
        lines = [ln for block in pages[p_no] for ln in block if "heading" not in ln and not ln.get("table")]
        best = None
        for ln in lines:
            k = key(ln["text"])
            if not k or len(ln["text"]) > 2 * len(title) + 12:
                continue
            wrapped = len(k) >= 8 and want.startswith(k) and len(k) < len(want)
            if similar(k, want) or wrapped:
                # nearest to the target, and below it: the target sits at or just above the printed heading
                dist = ln["y0"] if y is None else abs(ln["y0"] - y) + (1000 if ln["y1"] < y - 4 else 0)
                if best is None or dist < best[0]:
                    best = (dist, ln, wrapped)
        number = ""
        if best:
            ln = best[1]
            matched += 1
            number = number_of(ln["text"])
            if best[2]:  # wrapped: following lines of the block continue the title
                block = next(b for b in pages[p_no] if any(x is ln for x in b))
                got = key(ln["text"])
                for nxt in block[next(i for i, x in enumerate(block) if x is ln) + 1:]:
                    if not want.startswith(got + key(nxt["text"])) or not key(nxt["text"]):
                        break
                    got += key(nxt["text"])
                    nxt["continues"] = True
        else:  # not found in the text layer: a line of its own where the outline points
            top = y if y is not None else 0.0
            ln = dict(text=title, block=-1 - matched - len(pages[p_no]), x0=0.0, x1=1.0, y0=top, y1=top,
                      page=p_no, size=0.0, font="", bold=False, synthetic=True)
            insert_at(pages[p_no], ln)
        text = title if number_of(title) or not number else f"{number} {title}"
        ln["heading"] = (level, text)
    return matched


def insert_at(blocks: list[list[dict]], ln: dict) -> None:
    """Insert a one-line block before the first block that starts below it (reading order kept)."""
    i = next((i for i, b in enumerate(blocks) if b[0].get("y0", 0) > ln["y0"]), len(blocks))
    blocks.insert(i, [ln])


# ---------------------------------------------------------------------------------------------- layout


def styled(ln: dict, body: dict, text: str) -> bool:
    """Set apart from body text: larger, bold, in capitals (ICLR's "1 INTRODUCTION"), or in another font."""
    return (ln["size"] >= body["size"] * 1.1 or ln["bold"] or caps(text)
            or (ln["font"] != body["font"] and ln["size"] >= body["size"] * 0.95))


def candidate(ln: dict, block: list[dict], body: dict) -> dict | None:
    """A line that may be a numbered heading: its number, level and text (with the lines that continue it)."""
    if len(ln["text"]) > 110 or CAPTION_RE.match(ln["text"]):
        return None
    text, rest_lines = wrapped(ln, block)
    m = NUMBERED_RE.fullmatch(text)
    if not m or len(text.split()) > 16:
        return None
    word, number, dot, rest = m.groups()
    if (not re.match(r"[A-Z0-9]", rest) or sum(c.isalpha() for c in rest) < 3 or rest.endswith((",", ";", ":"))
            or re.search(r"[={}<>_\\]", rest) or MONOSPACE_RE.search(ln["font"])  # code listings, maths
            or (rest.endswith(".") and not dot and not caps(rest)) or not styled(ln, body, rest)):
        return None
    if number.isalpha() and not word and len(rest.split()) < 2 and not caps(rest):
        return None  # "A Instruction:" in a figure; a lettered appendix heading has a title of two words or more
    parts = number.split(".")
    return dict(line=ln, text=text, continues=rest_lines, top=parts[0], level=len(parts), dot=bool(dot),
                explicit=bool(word))


def chain(tops: list[tuple[int, int]]) -> set[int]:
    """The longest run of section numbers that counts up (by 1, or 2 when one heading was missed), as
    (position, number) pairs in reading order: list items and table rows that look numbered fall outside it."""
    best: list[tuple[float, int]] = []  # per candidate: (score, previous candidate index or -1)
    for i, (_, n) in enumerate(tops):
        options = [(1.0 if n <= 2 else -1.0, -1)]
        options += [(best[j][0] + (1.0 if n - m == 1 else 0.5), j) for j, (_, m) in enumerate(tops[:i])
                    if 1 <= n - m <= 2 and best[j][0] > 0]
        best.append(max(options))
    if not best or max(best)[0] <= 0:
        return set()
    i, out = max(range(len(best)), key=lambda k: best[k][0]), set()
    while i >= 0:
        out.add(tops[i][0])
        i = best[i][1]
    return out


def mark_layout(pages: list[list[list[dict]]], body: dict) -> None:
    """Mark headings found by the layout (module docstring), in reading order over the whole document."""
    lines = [(ln, block) for blocks in pages for block in blocks for ln in block if not ln.get("table")]
    cands = [c for ln, block in lines if (c := candidate(ln, block, body))]
    # Top levels: numbers counting up, then letters counting up (appendices), each kept to its own style of
    # numbering ("1 Intro" or "1. Intro"); subsections follow whichever top level is current.
    numeric = [c for c in cands if c["level"] == 1 and c["top"].isdigit()]
    style_dot = max((False, True), key=lambda d: sum(c["dot"] == d for c in numeric)) if numeric else False
    numeric = [c for c in numeric if c["dot"] == style_dot]
    keep = chain([(k, int(c["top"])) for k, c in enumerate(numeric)])
    tops = [c for k, c in enumerate(numeric) if k in keep]
    order = {id(ln): i for i, (ln, _) in enumerate(lines)}
    after = max((order[id(c["line"])] for c in tops), default=-1)  # appendices come after the last section
    letters = [c for c in cands if c["level"] == 1 and c["top"].isalpha() and order[id(c["line"])] > after]
    keep = chain([(k, ord(c["top"]) - ord("A") + 1) for k, c in enumerate(letters)])
    tops += [c for k, c in enumerate(letters) if k in keep]
    current, chosen = None, {id(c["line"]) for c in tops}
    for c in cands:
        if id(c["line"]) in chosen:
            current = c["top"]
        elif c["level"] == 1 or c["top"] != current:
            continue
        c["line"]["heading"] = (c["level"], c["text"])
        for nxt in c["continues"]:
            nxt["continues"] = True
    styles: dict[tuple, int] = {}
    for ln, block in lines:
        if "heading" in ln:
            styles.setdefault(style(ln), ln["heading"][0])
        elif (not ln.get("continues") and ln["text"].lower().strip(" .:") in NAMED_HEADINGS | REFERENCE_HEADINGS
              and (styled(ln, body, ln["text"]) or len(block) == 1)
              and not (ln["text"].endswith(".") and not caps(ln["text"]))):  # "Results." opens a paragraph
            ln["heading"] = (1, ln["text"])
    # Unnumbered headings set exactly like known ones ("Ethics Statement" in the style of "5 Conclusion").
    for ln, block in lines:
        if ("heading" not in ln and not ln.get("continues") and ln is block[0] and len(block) <= 2
                and style(ln) in styles and re.match(r"[A-Z]", ln["text"]) and len(ln["text"].split()) <= 10
                and not ln["text"].endswith((".", ",", ";", ":")) and sum(c.isalpha() for c in ln["text"]) >= 4
                and not CAPTION_RE.match(ln["text"]) and (ln["size"] > body["size"] * 1.05 or ln["bold"]
                                                           or caps(ln["text"]))):
            ln["heading"] = (styles[style(ln)], ln["text"])


def wrapped(ln: dict, block: list[dict]) -> tuple[str, list[dict]]:
    """A heading's text with the lines that continue it in its block (same size and weight, not numbered, at
    most two); a block that goes on in that style is a bold paragraph, not a heading (the text is returned
    too long to be one)."""
    text, more = ln["text"], []
    for nxt in block[next(i for i, x in enumerate(block) if x is ln) + 1:]:
        if (abs(nxt["size"] - ln["size"]) > 0.3 or nxt["bold"] != ln["bold"] or NUMBERED_RE.fullmatch(nxt["text"])
                or nxt["y0"] - ln["y1"] > ln["size"] * 1.5):
            break
        text, ln = f"{text} {nxt['text']}", nxt
        more.append(nxt)
    return text, more


def style(ln: dict) -> tuple:
    return (round(ln["size"] * 2) / 2, ln["bold"], ln["font"], caps(ln["text"]))


def mark_named(pages: list[list[list[dict]]], body: dict) -> None:
    """With an outline: still mark "Abstract" and the reference heading when the outline has none."""
    for blocks in pages:
        for block in blocks:
            for ln in block:
                name = ln["text"].lower().strip(" .:")
                if "heading" not in ln and (name == "abstract" or is_reference_heading(ln["text"])) and (
                        styled(ln, body, ln["text"]) or len(block) == 1):
                    ln["heading"] = (1, ln["text"])
