"""The sample corpus's ground truth (data/sample/manifest.json) and PDFs built with PyMuPDF whose every detail is
known: what the ingest tests of tests/unit and tests/integration share."""

import json
import re
from pathlib import Path

import pymupdf

from tests.helpers import SAMPLE_PDFS

MANIFEST = json.loads((SAMPLE_PDFS.parent / "manifest.json").read_text())


def norm(text: str) -> str:
    return " ".join(text.split())


def blocks(doc: dict) -> list[dict]:
    return [b for page in doc["pages"] for b in page["blocks"]]


def full_text(doc: dict) -> str:
    return " ".join(b["text"] for b in blocks(doc))


def source_paragraphs(paper: dict) -> list[str]:
    """Plain prose paragraphs of the paper's markdown source (no maths, markup, tables, lists or references)."""
    body = (SAMPLE_PDFS.parent / "src" / f"{Path(paper['file']).stem}.md").read_text().split("---", 2)[2]
    paras = [norm(p) for p in re.split(r"\n\s*\n", body)]
    return [p for p in paras if p[:1].isalpha() and not re.search(r"[$`*|#\[]", p) and not p.startswith("Table")]


def write_lines(page, x, y, lines, size=10.0, font="helv") -> float:
    for i, text in enumerate(lines):
        page.insert_text((x, y + i * size * 1.25), text, fontsize=size, fontname=font)
    return y + len(lines) * size * 1.25 + size


def plain_page_pdf(path: Path, lines: list[str], metadata_title: str) -> None:
    """One page of body-size text only (no display-size title), with the given metadata title."""
    doc = pymupdf.open()
    write_lines(doc.new_page(), 72, 80, lines)
    doc.set_metadata({"title": metadata_title})
    doc.save(path)


def bad_inputs(folder: Path) -> None:
    good = SAMPLE_PDFS / Path(MANIFEST[0]["file"]).name
    (folder / "notes.pdf").write_text("These are plain-text notes, whatever the extension says.\n" * 20)
    (folder / "half.pdf").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    doc = pymupdf.open()
    write_lines(doc.new_page(), 72, 72, ["Confidential text that nobody can read without the password."] * 8)
    doc.save(folder / "Locked.PDF", encryption=pymupdf.PDF_ENCRYPT_AES_256, user_pw="user", owner_pw="owner")
    doc = pymupdf.open()
    doc.new_page().draw_rect(pymupdf.Rect(100, 100, 300, 300), color=(0, 0, 0), fill=(0.5, 0.5, 0.5))
    doc.save(folder / "scan.pdf")
