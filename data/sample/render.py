"""Render the sample corpus: python data/sample/render.py

Reads every ``data/sample/src/<slug>.md`` and writes
``data/sample/pdfs/<slug>.pdf`` (reportlab, deterministic output) plus the
ground-truth file ``data/sample/manifest.json``.

The PDFs deliberately imitate arXiv/LaTeX output so that the ingest stage can
be tested against realistic quirks:

* a rotated (90 degree) arXiv stamp in the left margin of page 1, set in
  20 pt Times-Roman -- larger than the 17 pt title;
* running headers (short title, optional venue line) on pages >= 2 and a
  centred page-number footer on every page;
* one- and two-column layouts (two-column papers have a full-width
  title/abstract block on page 1);
* automatic hyphenation at line ends (pyphen, en_US);
* fi/fl ligature characters (U+FB01/U+FB02) in body text;
* inline maths with Greek letters from the Symbol font, sub/superscripts;
* a "References" section in a smaller font, optionally followed by
  appendix sections, optionally opened by their own table of contents
  (``toc: yes``: a "Contents" line, entries with dot leaders and page
  numbers, as LaTeX's \\tableofcontents sets them);
* ``template: iclr``: the ICLR look -- title in capitals broken at a hyphen
  (``title_break: LAN-GUAGE`` marks where), section headings in capitals at
  about body size, not bold, emulated small caps, the number set apart from
  the title on the same baseline ("1    INTRODUCTION");
* ``outline: yes``: a PDF outline (bookmarks, as hyperref writes them): one
  entry per heading, title without its number, pointing at the heading.

Source markup (``src/*.md``)
----------------------------
Front matter between ``---`` lines with ``key: value`` pairs (title,
short_title, authors, affiliation, email, arxiv, category, date, layout,
venue, reference_marker).  Then ``# Abstract``, numbered headings
(``# 1 Introduction``, ``## 3.2 Training Objective``), paragraphs separated by
blank lines, ``- `` bullet lists, ``$$ expr (n)`` display equations, pipe
tables preceded by a ``Table N: caption`` paragraph, ``# References`` with
``[n] ...`` entries, and appendix headings (``# A Additional Results``) after
the references.  Inline: ``**bold**``, ``*italic*``, ```code```, ``$math$``
(``\\alpha`` etc. for Greek, ``_{..}``/``^{..}`` for sub/superscripts).

Requires reportlab, pyphen (hyphenation) and pymupdf (used only to record the
words that actually got hyphenated in the manifest).
"""

from __future__ import annotations

import json
import re
import sys
import time
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC_DIR = HERE / "src"
PDF_DIR = HERE / "pdfs"
MANIFEST = HERE / "manifest.json"

try:
    import reportlab
    from reportlab import rl_config
except ImportError:  # pragma: no cover
    sys.exit("render.py needs reportlab: pip install reportlab pyphen")
try:
    import pyphen  # noqa: F401  (reportlab imports it itself for hyphenation)
except ImportError:  # pragma: no cover
    sys.exit("render.py needs pyphen for hyphenation: pip install pyphen")

rl_config.invariant = 1  # byte-identical output on re-runs
rl_config.hyphenationMinWordLength = 5

from reportlab.lib import colors  # noqa: E402
from reportlab.lib.enums import TA_CENTER, TA_JUSTIFY, TA_LEFT, TA_RIGHT  # noqa: E402
from reportlab.lib.pagesizes import letter  # noqa: E402
from reportlab.lib.styles import ParagraphStyle  # noqa: E402
from reportlab.pdfbase import pdfmetrics  # noqa: E402
from reportlab.pdfbase.pdfmetrics import registerFontFamily, stringWidth  # noqa: E402
from reportlab.pdfbase.ttfonts import TTFont  # noqa: E402
from reportlab.platypus import paragraph as _rl_paragraph  # noqa: E402
from reportlab.platypus import (  # noqa: E402
    BaseDocTemplate,
    Frame,
    FrameBreak,
    CondPageBreak,
    KeepTogether,
    NextPageTemplate,
    PageTemplate,
    Paragraph,
    Spacer,
    Table,
    TableStyle,
)

# reportlab only hyphenates words made of the letters in _hy_letters; add the
# ligature characters U+FB00-U+FB06 so that words such as "e\ufb03cient" or
# "parameter-e\ufb03cient" can still be broken (otherwise justified lines get
# very loose next to them).
_rl_paragraph._hy_letters += "\ufb00-\ufb06"
_rl_paragraph._hy_letters_pat = re.compile("^[" + _rl_paragraph._hy_letters + "]+$")
_rl_paragraph._hy_shy_letters_pat = re.compile(
    "^[" + _rl_paragraph._hy_shy + _rl_paragraph._hy_letters + "]+$"
)

# --------------------------------------------------------------------------
# Fonts: Bitstream Vera ships inside the reportlab package and has the
# U+FB01/U+FB02 ligature glyphs.  Greek letters come from base-14 Symbol.
# --------------------------------------------------------------------------
FONT_DIR = Path(reportlab.__file__).resolve().parent / "fonts"
FONT_FILES = {
    "Vera": "Vera.ttf",
    "VeraBd": "VeraBd.ttf",
    "VeraIt": "VeraIt.ttf",
    "VeraBI": "VeraBI.ttf",
}


VERA_CHARS: set[int] = set()


def check_glyphs(text: str, where: str) -> None:
    """Fail loudly if a character has no glyph in Vera (it would render as a box)."""
    bad = sorted({c for c in text if ord(c) not in VERA_CHARS and c not in "\n\t" and ord(c) >= 32})
    if bad:
        raise ValueError(f"{where}: characters without a glyph in Vera: {bad!r} (use $\\name$ maths or ASCII)")


def register_fonts() -> None:
    for name, fn in FONT_FILES.items():
        path = FONT_DIR / fn
        if not path.exists():
            sys.exit(
                f"render.py: font {path} not found. The Bitstream Vera fonts are "
                "normally bundled with reportlab (reportlab/fonts); reinstall reportlab."
            )
        font = TTFont(name, str(path))
        if 0xFB01 not in font.face.charToGlyph or 0xFB02 not in font.face.charToGlyph:
            sys.exit(f"render.py: font {path} lacks the fi/fl ligature glyphs")
        pdfmetrics.registerFont(font)
        if name == "Vera":  # glyph 0 is .notdef (renders as a box)
            VERA_CHARS.update(c for c, g in font.face.charToGlyph.items() if g)
    registerFontFamily("Vera", normal="Vera", bold="VeraBd", italic="VeraIt", boldItalic="VeraBI")


# --------------------------------------------------------------------------
# Geometry and type sizes
# --------------------------------------------------------------------------
PAGE_W, PAGE_H = letter  # 612 x 792 pt, like most arXiv PDFs

TITLE_SIZE = 17
STAMP_SIZE = 20
SECTION_SIZE = 12
SUBSECTION_SIZE = 10.5
REF_SIZE = 8.5
HEADER_SIZE = 8.5
FOOTER_SIZE = 9

LAYOUTS = {
    # NeurIPS/ICLR-like single column
    "one_column": dict(margin_x=108, top=72, bottom=72, gap=0, body_size=9.5, body_leading=11.8),
    # ICML/ACL-like two columns
    "two_column": dict(margin_x=54, top=66, bottom=66, gap=18, body_size=9.5, body_leading=11.6),
}


def make_styles(layout: str) -> dict:
    g = LAYOUTS[layout]
    two = layout == "two_column"
    hy = dict(hyphenationLang="en_US", embeddedHyphenation=1, uriWasteReduce=0.3)
    body = ParagraphStyle(
        "body",
        fontName="Vera",
        fontSize=g["body_size"],
        leading=g["body_leading"],
        alignment=TA_JUSTIFY,
        spaceAfter=0 if two else 5,
        firstLineIndent=0,
        **hy,
    )
    s = {
        "title": ParagraphStyle(
            "title", fontName="VeraBd", fontSize=TITLE_SIZE, leading=TITLE_SIZE * 1.22,
            alignment=TA_CENTER, spaceAfter=12,
        ),
        "authors": ParagraphStyle(
            "authors", fontName="Vera", fontSize=10.5, leading=13, alignment=TA_CENTER, spaceAfter=2
        ),
        "affil": ParagraphStyle(
            "affil", fontName="VeraIt", fontSize=9, leading=11, alignment=TA_CENTER, spaceAfter=1
        ),
        "email": ParagraphStyle(
            "email", fontName="Courier", fontSize=8.5, leading=10.5, alignment=TA_CENTER, spaceAfter=14
        ),
        "abs_head": ParagraphStyle(
            "abs_head", fontName="VeraBd", fontSize=SECTION_SIZE, leading=15, alignment=TA_CENTER,
            spaceAfter=5,
        ),
        "abstract": ParagraphStyle(
            "abstract", parent=body, leftIndent=36, rightIndent=36, spaceAfter=4,
            fontSize=g["body_size"] - 0.5, leading=g["body_leading"] - 0.6,
        ),
        "body": body,
        "body_indent": ParagraphStyle("body_indent", parent=body, firstLineIndent=10 if two else 0),
        "bullet": ParagraphStyle(
            "bullet", parent=body, leftIndent=14, bulletIndent=4, spaceAfter=2,
        ),
        "h1": ParagraphStyle(
            "h1", fontName="VeraBd", fontSize=SECTION_SIZE, leading=15, alignment=TA_LEFT,
            spaceBefore=12, spaceAfter=6,
        ),
        "h2": ParagraphStyle(
            "h2", fontName="VeraBd", fontSize=SUBSECTION_SIZE, leading=13, alignment=TA_LEFT,
            spaceBefore=8, spaceAfter=4,
        ),
        "ref": ParagraphStyle(
            "ref", fontName="Vera", fontSize=REF_SIZE, leading=REF_SIZE * 1.22, alignment=TA_JUSTIFY,
            leftIndent=18, bulletIndent=0, bulletFontName="Vera", bulletFontSize=REF_SIZE,
            spaceAfter=3, **hy,
        ),
        "caption": ParagraphStyle(
            "caption", parent=body, fontSize=g["body_size"] - 1, leading=g["body_leading"] - 1.2,
            spaceBefore=6, spaceAfter=4, firstLineIndent=0,
        ),
        "eq": ParagraphStyle(
            "eq", fontName="Vera", fontSize=g["body_size"], leading=g["body_leading"] + 2,
            alignment=TA_CENTER,
        ),
        "eqno": ParagraphStyle(
            "eqno", fontName="Vera", fontSize=g["body_size"], leading=g["body_leading"] + 2,
            alignment=TA_RIGHT,
        ),
        "cell": ParagraphStyle("cell", fontName="Vera", fontSize=7.8, leading=9.4),
        "cellb": ParagraphStyle("cellb", fontName="VeraBd", fontSize=7.8, leading=9.4),
    }
    return s


# --------------------------------------------------------------------------
# Text conversion: ligatures, inline markup, maths
# --------------------------------------------------------------------------
LIG = {"fi": "\ufb01", "fl": "\ufb02"}
WORD_RE = re.compile(r"[A-Za-z][A-Za-z\-]*")


def ligate(text: str) -> str:
    """Replace fi/fl by ligature characters in a deterministic subset of words.

    Every word containing "fine-tun"/"finetun" (fine-tuning, finetuned, ...) is always
    ligated; other fi/fl words are ligated for roughly two thirds of the
    distinct spellings (chosen by CRC32 so the choice is stable).
    """

    def repl(m: re.Match) -> str:
        w = m.group(0)
        if "fi" not in w and "fl" not in w:
            return w
        if re.search(r"fine-?tun", w.lower()) or zlib.crc32(w.lower().encode()) % 3 != 0:
            return w.replace("fi", LIG["fi"]).replace("fl", LIG["fl"])
        return w

    return WORD_RE.sub(repl, text)


GREEK = {
    "alpha": "α", "beta": "β", "gamma": "γ", "delta": "δ", "Delta": "Δ", "epsilon": "ε",
    "eta": "η", "Theta": "Θ", "Lambda": "Λ", "Gamma": "Γ", "Sigma": "Σ", "Omega": "Ω", "Psi": "Ψ",
    "chi": "χ", "rho": "ρ", "kappa": "κ", "xi": "ξ", "zeta": "ζ", "nu": "ν", "theta": "θ", "lambda": "λ", "mu": "μ", "pi": "π", "sigma": "σ", "tau": "τ",
    "phi": "φ", "Phi": "Φ", "psi": "ψ", "omega": "ω", "in": "∈", "nabla": "∇", "partial": "∂",
    "odot": "∗", "otimes": "⊗", "sim": "∼", "ll": "<<",
}
# symbols available in Vera itself
MATHSYM = {
    "times": "×", "cdot": "·", "approx": "≈", "leq": "≤", "geq": "≥",
    "norm": "||", "sum": "∑", "minus": "−", "neq": "≠", "infty": "∞", "ldots": "…",
}


def _esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def math_to_markup(s: str) -> str:
    """Convert a tiny LaTeX-like maths dialect to reportlab paragraph markup."""
    out: list[tuple[str, str]] = []  # (kind, text); kind in i/r/g/raw

    def push(kind: str, text: str) -> None:
        if out and out[-1][0] == kind and kind != "raw":
            out[-1] = (kind, out[-1][1] + text)
        else:
            out.append((kind, text))

    i = 0
    while i < len(s):
        c = s[i]
        if c == "\\":
            m = re.match(r"\\([A-Za-z]+)", s[i:])
            if m:
                name = m.group(1)
                i += len(m.group(0))
                if name in GREEK:
                    push("g", GREEK[name])
                    if s[i:i + 1] == " " and s[i + 1 : i + 2].isalpha():
                        i += 1  # "\Delta W" -> "ΔW", as TeX would typeset it
                elif name in MATHSYM:
                    push("r", MATHSYM[name])
                elif name in ("text", "mathrm", "operatorname"):
                    arg, i = _brace_arg(s, i)
                    push("r", arg)
                elif name == "sqrt":
                    arg, i = _brace_arg(s, i)
                    inner = math_to_markup(arg)
                    push("r", "\u221a")
                    push("raw", inner if len(arg) <= 1 or re.fullmatch(r"\w(_\{\w+\})?", arg) else f"({inner})")
                else:
                    push("r", name)
                continue
            push("r", s[i + 1 : i + 2])
            i += 2
            continue
        if c in "_^":
            arg, i = _brace_arg(s, i + 1)
            # explicit rise/size: reportlab's defaults drop subscripts too far
            tag = '<sub rise="1.8" size="7">' if c == "_" else '<super rise="3.6" size="7">'
            end = "</sub>" if c == "_" else "</super>"
            push("raw", f"{tag}{math_to_markup(arg)}{end}")
            continue
        if c.isalpha():
            push("i", c)
        elif c == "-":
            push("r", "\u2212")  # real minus sign, as TeX would set it
        else:
            push("r", c)
        i += 1
    parts = []
    for kind, text in out:
        if kind == "i":
            parts.append(f"<i>{_esc(text)}</i>")
        elif kind == "g":
            parts.append(f'<font name="Symbol">{_esc(text)}</font>')
        elif kind == "r":
            parts.append(_esc(text))
        else:
            parts.append(text)
    return "".join(parts)


def _brace_arg(s: str, i: int) -> tuple[str, int]:
    if i < len(s) and s[i] == "{":
        depth, j = 0, i
        while j < len(s):
            if s[j] == "{":
                depth += 1
            elif s[j] == "}":
                depth -= 1
                if depth == 0:
                    return s[i + 1 : j], j + 1
            j += 1
        raise ValueError(f"unbalanced braces in maths: {s!r}")
    if i < len(s) and s[i] == "\\":
        m = re.match(r"\\[A-Za-z]+", s[i:])
        if m:
            return m.group(0), i + len(m.group(0))
    return s[i : i + 1], i + 1


def inline(text: str, lig: bool = True) -> str:
    """Convert inline markup of one paragraph to reportlab markup."""
    text = text.replace("\\$", "\x00")
    segs = text.split("$")
    if len(segs) % 2 == 0:
        raise ValueError(f"unbalanced $ in: {text[:80]!r}")
    out = []
    for k, seg in enumerate(segs):
        if k % 2:
            out.append(math_to_markup(seg))
            continue
        if lig:
            seg = ligate(seg)
        seg = _esc(seg).replace("\x00", "$")
        seg = re.sub(r"`([^`]+)`", r'<font name="Courier">\1</font>', seg)
        seg = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", seg)
        seg = re.sub(r"\*(.+?)\*", r"<i>\1</i>", seg)
        out.append(seg)
    return "".join(out)


def plain(text: str) -> str:
    """Plain-text version of inline markup (as a reader would see it, no ligatures)."""
    text = text.replace("\\$", "\x00")
    segs = text.split("$")
    out = []
    for k, seg in enumerate(segs):
        if k % 2:
            seg = re.sub(r"\\([A-Za-z]+)", lambda m: GREEK.get(m.group(1), MATHSYM.get(m.group(1), m.group(1))), seg)
            seg = seg.replace("{", "").replace("}", "").replace("_", "").replace("^", "")
        else:
            seg = seg.replace("`", "").replace("**", "").replace("*", "")
        out.append(seg.replace("\x00", "$"))
    return re.sub(r"\s+", " ", "".join(out)).strip()


# --------------------------------------------------------------------------
# Source parsing
# --------------------------------------------------------------------------
HEAD_RE = re.compile(r"^(#{1,2})\s+(.*)$")


def parse_source(path: Path) -> dict:
    raw = path.read_text(encoding="utf-8")
    check_glyphs(raw, str(path))
    m = re.match(r"^---\n(.*?)\n---\n", raw, re.S)
    if not m:
        raise ValueError(f"{path}: missing front matter")
    meta = {}
    for line in m.group(1).splitlines():
        if line.strip():
            k, _, v = line.partition(":")
            meta[k.strip()] = v.strip()
    body = raw[m.end():]
    # split into blocks: headings are their own blocks
    blocks: list[tuple[str, str]] = []  # (kind, text)
    for chunk in re.split(r"\n\s*\n", body):
        chunk = chunk.strip("\n")
        if not chunk.strip():
            continue
        lines = chunk.splitlines()
        buf: list[str] = []
        for line in lines:
            hm = HEAD_RE.match(line)
            if hm:
                if buf:
                    blocks.append(("text", "\n".join(buf)))
                    buf = []
                blocks.append(("h" + str(len(hm.group(1))), hm.group(2).strip()))
            else:
                buf.append(line)
        if buf:
            blocks.append(("text", "\n".join(buf)))
    meta["layout"] = meta.get("layout", "one_column")
    if meta["layout"] not in LAYOUTS:
        raise ValueError(f"{path}: unknown layout {meta['layout']}")
    return {"meta": meta, "blocks": blocks, "slug": path.stem}


# --------------------------------------------------------------------------
# Flowable construction
# --------------------------------------------------------------------------
class OutlinedParagraph(Paragraph):
    """A heading that also writes a PDF outline entry pointing at itself (as hyperref does)."""

    def __init__(self, text, style, outline_title: str, level: int) -> None:
        super().__init__(text, style)
        self.outline_title, self.level = outline_title, level

    def draw(self) -> None:
        key = f"h{id(self)}"
        self.canv.bookmarkHorizontal(key, 0, self.height + 4)
        self.canv.addOutlineEntry(self.outline_title, key, level=self.level - 1, closed=False)
        super().draw()


def small_caps(text: str, size: float) -> str:
    """Capitals with emulated small caps: each word's first letter at `size`, the rest at 80% of it."""
    out = []
    for word in _esc(text).split(" "):
        out.append(f"{word[:1].upper()}<font size=\"{size * 0.8:.1f}\">{word[1:].upper()}</font>" if word[1:]
                   else word.upper())
    return " ".join(out)


def iclr_heading(number: str, title: str, kind: str, width: float) -> Table:
    """ICLR-style heading: number and capitalised title as two text objects on one baseline."""
    size = 11.4 if kind == "h1" else 9.5
    style = ParagraphStyle(f"iclr_{kind}", fontName="Vera", fontSize=size, leading=size * 1.25)
    t = Table([[Paragraph(number, style), Paragraph(small_caps(title, size), style)]],
              colWidths=[28 if "." in number else 20, width - (28 if "." in number else 20)], hAlign="LEFT")
    t.setStyle(TableStyle([("LEFTPADDING", (0, 0), (-1, -1), 0), ("RIGHTPADDING", (0, 0), (-1, -1), 0),
                           ("TOPPADDING", (0, 0), (-1, -1), 8 if kind == "h1" else 5),
                           ("BOTTOMPADDING", (0, 0), (-1, -1), 4), ("VALIGN", (0, 0), (-1, -1), "TOP")]))
    return t


def contents_table(entries: list[tuple[str, int]], st: dict, width: float) -> list:
    """An appendix table of contents: "Contents", then one row per entry: title (sub-entries with dot
    leaders) and its page number at the right margin."""
    rows = []
    for text, page in entries:
        top = "." not in text.split()[0]
        cell = Paragraph(f"<b>{_esc(text)}</b>" if top else _esc(text) + " " + ". " * 18, st["body"])
        rows.append([cell, Paragraph(str(page), st["eqno"])])
    t = Table(rows, colWidths=[width - 40, 40])
    t.setStyle(TableStyle([("LEFTPADDING", (0, 0), (-1, -1), 0), ("RIGHTPADDING", (0, 0), (-1, -1), 0),
                           ("TOPPADDING", (0, 0), (-1, -1), 1), ("BOTTOMPADDING", (0, 0), (-1, -1), 1)]))
    return [Paragraph("Contents", st["h1"]), t, Spacer(1, 8)]


class Collected:
    def __init__(self) -> None:
        self.sections: list[str] = []
        self.appendix: list[str] = []
        self.abstract: list[str] = []
        self.references: list[str] = []
        self.body_text: list[str] = []
        self.tables: list[dict] = []  # {"caption": plain text, "rows": [[cell, ...], ...]}


def build_table(rows: list[list[str]], st: dict, width: float) -> Table:
    data = []
    for r, row in enumerate(rows):
        style = st["cellb"] if r == 0 else st["cell"]
        data.append([Paragraph(inline(c, lig=False), style) for c in row])
    ncol = len(rows[0])
    # natural column widths
    nat = [0.0] * ncol
    for r, row in enumerate(rows):
        font = "VeraBd" if r == 0 else "Vera"
        for j, c in enumerate(row):
            nat[j] = max(nat[j], stringWidth(plain(c), font, 7.8) + 8)
    total = sum(nat)
    if total > width:
        raise ValueError(f"table too wide ({total:.0f} > {width:.0f} pt): {rows[0]}")
    t = Table(data, colWidths=nat, hAlign="CENTER")
    t.setStyle(
        TableStyle(
            [
                ("LINEABOVE", (0, 0), (-1, 0), 0.8, colors.black),
                ("LINEBELOW", (0, 0), (-1, 0), 0.5, colors.black),
                ("LINEBELOW", (0, -1), (-1, -1), 0.8, colors.black),
                ("LEFTPADDING", (0, 0), (-1, -1), 4),
                ("RIGHTPADDING", (0, 0), (-1, -1), 4),
                ("TOPPADDING", (0, 0), (-1, -1), 1.2),
                ("BOTTOMPADDING", (0, 0), (-1, -1), 1.2),
                ("VALIGN", (0, 0), (-1, -1), "MIDDLE"),
            ]
        )
    )
    return t


def build_story(doc: dict, col_width: float) -> tuple[list, list, Collected]:
    """Return (title_block, body_story, collected)."""
    meta, blocks = doc["meta"], doc["blocks"]
    st = make_styles(meta["layout"])
    col = Collected()
    iclr = meta.get("template") == "iclr"
    title = meta["title"].upper() if iclr else meta["title"]
    if meta.get("title_break"):  # "LAN-GUAGE": break the title's line after "LAN-", as a narrow title box would
        head, tail = meta["title_break"].split("-")
        if head + tail not in title:
            raise ValueError(f"{doc['slug']}: title_break {meta['title_break']!r} not in the title")
        title = title.replace(head + tail, f"{head}-<br/>{tail}")
    title_block = [
        Paragraph(title if "<br/>" in title else _esc(title), st["title"]),
        Paragraph(_esc(meta["authors"]), st["authors"]),
        Paragraph(_esc(meta["affiliation"]), st["affil"]),
    ]
    if meta.get("email"):
        title_block.append(Paragraph(_esc(meta["email"]), st["email"]))
    else:
        title_block[-1].style = ParagraphStyle("affil2", parent=st["affil"], spaceAfter=14)

    story: list = []
    zone = "front"  # front -> abstract -> body -> refs -> appendix
    first_para = True
    pending_caption, pending_text = None, ""
    for bi, (kind, text) in enumerate(blocks):
        if kind in ("h1", "h2"):
            if text == "Abstract":
                zone = "abstract"
                title_block.append(Paragraph(small_caps("Abstract", SECTION_SIZE) if iclr else "Abstract",
                                             st["abs_head"]))
                continue
            if text == "References":
                zone = "refs"
                story.append(CondPageBreak(80))
                story.append(Paragraph(small_caps("References", SECTION_SIZE) if iclr else "References", st["h1"]))
                continue
            if zone == "abstract":
                zone = "body"
            if zone == "refs":
                zone = "appendix"
                if meta.get("toc") == "yes":  # the appendix opens with its own table of contents
                    story.append(CondPageBreak(200))
                    entries = [(t, 0) for k, t in blocks[bi:] if k in ("h1", "h2")]
                    story.extend(contents_table([(t, 4 + i // 2) for i, (t, _) in enumerate(entries)], st,
                                                col_width))
            number, _, name = text.partition(" ")
            shown = f"{number} {name.upper()}" if iclr else text
            (col.appendix if zone == "appendix" else col.sections).append(shown)
            # Keep a heading with at least ~4 lines of what follows: break to
            # the next frame/column if there is not enough room (a
            # keepWithNext on the heading would drag the whole next paragraph).
            nxt = blocks[bi + 1][0] if bi + 1 < len(blocks) else ""
            need = (80 if kind == "h1" else 66) + (40 if nxt in ("h1", "h2") else 0)
            story.append(CondPageBreak(need))
            if iclr:
                story.append(iclr_heading(number, name, kind, col_width))
            elif meta.get("outline") == "yes":
                story.append(OutlinedParagraph(_esc(text), st[kind], name, 1 if kind == "h1" else 2))
            else:
                story.append(Paragraph(_esc(text), st[kind]))
            first_para = True
            continue
        # text blocks
        if zone == "abstract":
            col.abstract.append(text)
            title_block.append(Paragraph(inline(" ".join(text.split())), st["abstract"]))
            continue
        if zone == "refs":
            for line in text.splitlines():
                line = line.strip()
                m = re.match(r"^\[(\d+)\]\s+(.*)$", line)
                if not m:
                    raise ValueError(f"{doc['slug']}: bad reference line {line!r}")
                col.references.append(line)
                story.append(Paragraph(inline(m.group(2), lig=False), st["ref"], bulletText=f"[{m.group(1)}]"))
            continue
        lines = text.splitlines()
        if lines[0].startswith("|"):
            rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines]
            rows = [r for r in rows if not all(re.fullmatch(r":?-{3,}:?", c) for c in r)]
            items = []
            if pending_caption is not None:
                items.append(pending_caption)
                pending_caption = None
            items.append(build_table(rows, st, col_width))
            col.tables.append({"caption": plain(pending_text), "rows": [[plain(c) for c in r] for r in rows]})
            items.append(Spacer(1, 6))
            story.append(KeepTogether(items))
            col.body_text.extend(" ".join(r) for r in rows)
            continue
        if lines[0].startswith("$$"):
            for ln in lines:
                expr = ln[2:].strip()
                m = re.match(r"^(.*?)\s*\((\d+)\)$", expr)
                num = m.group(2) if m else ""
                expr = m.group(1) if m else expr
                t = Table(
                    [[Paragraph(math_to_markup(expr), st["eq"]), Paragraph(f"({num})" if num else "", st["eqno"])]],
                    colWidths=[col_width - 30, 30],
                )
                t.setStyle(TableStyle([("LEFTPADDING", (0, 0), (-1, -1), 0), ("RIGHTPADDING", (0, 0), (-1, -1), 0),
                                       ("TOPPADDING", (0, 0), (-1, -1), 4), ("BOTTOMPADDING", (0, 0), (-1, -1), 4)]))
                story.append(t)
            first_para = True  # text after a display equation is not indented
            continue
        joined = " ".join(text.split())
        col.body_text.append(joined)
        if re.match(r"^Table \d+:", joined):
            pending_caption = Paragraph(inline(joined), st["caption"])
            pending_text = joined
            continue
        if lines[0].startswith("- "):
            items = re.split(r"\n- ", "\n" + text)[1:]
            for it in items:
                story.append(Paragraph(inline(" ".join(it.split())), st["bullet"], bulletText="•"))
            continue
        style = st["body"] if first_para else st["body_indent"]
        story.append(Paragraph(inline(joined), style))
        first_para = False
    if pending_caption is not None:
        raise ValueError(f"{doc['slug']}: table caption without table")
    return title_block, story, col


# --------------------------------------------------------------------------
# Page decoration
# --------------------------------------------------------------------------
def stamp_text(meta: dict) -> str | None:
    if not meta.get("arxiv") or meta["arxiv"] == "null":
        return None
    return f"arXiv:{meta['arxiv']}  [{meta['category']}]  {meta['date']}"


def make_decorator(meta: dict, geom: dict):
    short = meta["short_title"]
    venue = meta.get("venue", "")
    stamp = stamp_text(meta)
    x0 = geom["margin_x"]
    x1 = PAGE_W - geom["margin_x"]
    head_y = PAGE_H - geom["top"] + 18

    def deco(canv, doc) -> None:
        canv.saveState()
        page = canv.getPageNumber()
        canv.setFillColor(colors.black)
        if page == 1:
            if venue:
                canv.setFont("Vera", HEADER_SIZE)
                canv.drawString(x0, head_y, venue)
            if stamp:
                # arXiv stamp: rotated 90 degrees, reading bottom-to-top, in the
                # left margin, vertically centred on the page.
                canv.saveState()
                canv.setFont("Times-Roman", STAMP_SIZE)
                canv.setFillColor(colors.Color(0.5, 0.5, 0.5))
                w = stringWidth(stamp, "Times-Roman", STAMP_SIZE)
                canv.translate(40, (PAGE_H - w) / 2)
                canv.rotate(90)
                canv.drawString(0, 0, stamp)
                canv.restoreState()
        else:
            canv.setFont("VeraIt", HEADER_SIZE)
            if venue:
                gap = x1 - x0 - stringWidth(short, "VeraIt", HEADER_SIZE) - stringWidth(venue, "Vera", HEADER_SIZE)
                if gap < 24:
                    raise ValueError(f"header too wide: {short!r} + {venue!r}; shorten short_title")
                canv.drawString(x0, head_y, short)
                canv.setFont("Vera", HEADER_SIZE)
                canv.drawRightString(x1, head_y, venue)
            else:
                canv.drawCentredString(PAGE_W / 2, head_y, short)
            canv.setLineWidth(0.4)
            canv.line(x0, head_y - 4, x1, head_y - 4)
        canv.setFont("Vera", FOOTER_SIZE)
        canv.drawCentredString(PAGE_W / 2, geom["bottom"] - 30, str(page))
        canv.restoreState()

    return deco


def render(doc: dict, out: Path) -> tuple[int, Collected]:
    meta = doc["meta"]
    layout = meta["layout"]
    g = LAYOUTS[layout]
    full_w = PAGE_W - 2 * g["margin_x"]
    body_h = PAGE_H - g["top"] - g["bottom"]
    two = layout == "two_column"
    col_w = (full_w - g["gap"]) / 2 if two else full_w
    title_block, story, col = build_story(doc, col_w)
    pad = dict(leftPadding=0, rightPadding=0, topPadding=0, bottomPadding=0)
    x0, y0 = g["margin_x"], g["bottom"]

    pdf = BaseDocTemplate(
        str(out),
        pagesize=letter,
        leftMargin=x0,
        rightMargin=x0,
        topMargin=g["top"],
        bottomMargin=g["bottom"],
        title="",
        author="",
        subject="",
        creator="papertune data/sample/render.py",
        producer="ReportLab PDF Library",
        pageCompression=1,
    )
    deco = make_decorator(meta, g)
    if two:
        # measure the full-width title/abstract block
        h = 0.0
        for i, f in enumerate(title_block):
            _, fh = f.wrap(full_w, body_h)
            h += fh + (f.getSpaceBefore() if i else 0) + f.getSpaceAfter()
        h += 8
        col_h1 = body_h - h
        first = PageTemplate(
            id="first",
            frames=[
                Frame(x0, y0 + col_h1, full_w, h, id="head", **pad),
                Frame(x0, y0, col_w, col_h1 - 6, id="c1", **pad),
                Frame(x0 + col_w + g["gap"], y0, col_w, col_h1 - 6, id="c2", **pad),
            ],
            onPage=deco,
        )
        later = PageTemplate(
            id="later",
            frames=[
                Frame(x0, y0, col_w, body_h, id="c1", **pad),
                Frame(x0 + col_w + g["gap"], y0, col_w, body_h, id="c2", **pad),
            ],
            onPage=deco,
        )
        flow = [NextPageTemplate("later")] + title_block + [FrameBreak()] + story
    else:
        first = PageTemplate(id="first", frames=[Frame(x0, y0, full_w, body_h, id="main", **pad)], onPage=deco)
        later = PageTemplate(id="later", frames=[Frame(x0, y0, full_w, body_h, id="main", **pad)], onPage=deco)
        flow = [NextPageTemplate("later")] + title_block + [Spacer(1, 4)] + story
    pdf.addPageTemplates([first, later])
    pdf.build(flow)
    return pdf.page, col


# --------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------
def find_hyphenated(pdf_path: Path, source_plain: str) -> tuple[list[str], int]:
    """Words split across a line end by the hyphenator (not at an existing hyphen)."""
    import pymupdf

    words_in_src = set(re.findall(r"[A-Za-z]+", source_plain))
    compounds = set(m.lower() for m in re.findall(r"[A-Za-z]+-[A-Za-z]+", source_plain))
    found: list[str] = []
    with pymupdf.open(pdf_path) as d:
        for page in d:
            toks = [w[4] for w in page.get_text("words", sort=False)]
            for a, b in zip(toks, toks[1:]):
                a = a.lstrip("([\"'")
                if not re.fullmatch(r"[A-Za-z]{2,}-", a):
                    continue
                m = re.match(r"[A-Za-z]+", b)
                if not m:
                    continue
                tail = m.group(0)
                word = a[:-1] + tail
                if f"{a[:-1]}-{tail}".lower() in compounds:
                    continue
                if word in words_in_src:
                    found.append(word)
    return found, len(found)


def first_sentence(text: str) -> str:
    t = plain(text)
    m = re.search(r"(?<=[a-z0-9)])\.\s+(?=[A-Z])", t)
    return t[: m.start() + 1] if m else t


def main() -> int:
    t0 = time.time()
    register_fonts()
    PDF_DIR.mkdir(exist_ok=True)
    sources = sorted(SRC_DIR.glob("*.md"))
    if not sources:
        sys.exit(f"no sources in {SRC_DIR}")
    manifest = []
    for src in sources:
        doc = parse_source(src)
        meta = doc["meta"]
        out = PDF_DIR / f"{doc['slug']}.pdf"
        pages, col = render(doc, out)
        marker = meta["reference_marker"]
        refs_plain = " ".join(plain(r) for r in col.references)
        other_plain = " ".join(
            [meta["title"], *col.sections, *col.appendix]
            + [plain(t) for t in col.abstract + col.body_text]
        )
        if marker not in refs_plain or marker.lower() in other_plain.lower():
            raise ValueError(f"{src.name}: reference_marker {marker!r} must occur only in the references")
        source_plain = " ".join(plain(t) for t in col.abstract + col.body_text)
        hy_all, n_hy = find_hyphenated(out, source_plain)
        uniq = sorted(set(hy_all), key=lambda w: (-len(w), w))
        arxiv = meta.get("arxiv")
        has_stamp = bool(arxiv and arxiv != "null")
        manifest.append(
            {
                "file": out.name,  # relative to data/sample/pdfs/
                "title": meta["title"].upper() if meta.get("template") == "iclr" else meta["title"],
                "template": meta.get("template", "plain"),
                "outline": meta.get("outline") == "yes",
                "appendix_toc": meta.get("toc") == "yes",
                "tables": col.tables,
                "short_title": meta["short_title"],
                "arxiv_id": re.sub(r"v\d+$", "", arxiv) if has_stamp else None,
                "arxiv_stamp": stamp_text(meta) if has_stamp else None,
                "pages": pages,
                "layout": meta["layout"],
                "venue_line": meta.get("venue") or None,
                "authors": meta["authors"],
                "sections": col.sections,
                "appendix_sections": col.appendix,
                "n_references": len(col.references),
                "reference_marker": marker,
                "hyphenated_words": sorted(uniq[:6]),
                "abstract_first_sentence": first_sentence(col.abstract[0]),
            }
        )
        size_kb = out.stat().st_size / 1024
        print(f"{out.relative_to(HERE.parent.parent)}: {pages} pages, {meta['layout']}, "
              f"{n_hy} hyphenated line ends, {size_kb:.0f} KB")
    MANIFEST.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {MANIFEST.relative_to(HERE.parent.parent)} ({len(manifest)} papers) in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
