"""Ingest stage: the sample corpus checked against data/sample/manifest.json (its ground truth), PDFs built here
with PyMuPDF for layouts and bad inputs whose every detail is known, caching across renames, and the CLI."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pymupdf
import pytest
import yaml
from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

from tasks import ingest
from tasks.files import read_json, read_jsonl
from tasks.hashing import sha256_file
from tasks.log import PipelineError
from tasks.pdf import cleanup
from tasks.pdf import text as pdf_text
from tasks.pdf.layout import clean
from tests.helpers import ROOT, SAMPLE_PDFS, in_flow, make_params

MANIFEST = json.loads((SAMPLE_PDFS.parent / "manifest.json").read_text())
PAPERS = pytest.mark.parametrize("paper", MANIFEST, ids=lambda m: Path(m["file"]).stem)


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


# ---------------------------------------------------------------------------------------------- sample corpus


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """The stage run once through a flow on the whole sample corpus, with a result cache of its own."""
    tmp = tmp_path_factory.mktemp("ingest-sample")
    p = make_params(tmp)
    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: tmp / "prefect-results"}):
        n = in_flow(ingest.run, p.ingest, p.paths)
    docs = read_jsonl(p.paths.documents)
    return {d["file"]: d for d in docs}, read_json(p.paths.ingest_report), docs, n


def doc_of(sample, paper) -> dict:
    return sample[0][Path(paper["file"]).name]


def test_sample_corpus_all_ingested(sample):
    by_file, report, written, returned = sample
    assert report["ok"] == len(MANIFEST) and report["skipped"] == 0
    assert len(written) == returned  # the stage returns how many records it wrote, in input (sorted path) order:
    assert [d["file"] for d in written] == sorted(Path(m["file"]).name for m in MANIFEST)
    for entry, doc in zip(report["files"], written):
        assert doc["doc_id"] == sha256_file(SAMPLE_PDFS / doc["file"])
        entry = dict(entry)  # the fixture is shared: leave its report whole
        fidelity = entry.pop("fidelity")
        assert entry == dict(file=doc["file"], status="ok", reason=None, doc_id=doc["doc_id"], title=doc["title"],
                             pages=doc["page_count"], sections=len(doc["sections"]))
        assert list(doc) == ["doc_id", "file", "title", "arxiv_id", "page_count", "sections", "outline_used",
                             "appendix_found", "pages"]
        assert fidelity["sections"] == len(doc["sections"]) and fidelity["outline_used"] == doc["outline_used"]
        assert fidelity["appendix_found"] == doc["appendix_found"]
        assert [p["page"] for p in doc["pages"]] == list(range(1, doc["page_count"] + 1))


@PAPERS
def test_title_and_arxiv_id(sample, paper):
    doc = doc_of(sample, paper)
    assert doc["title"] == norm(paper["title"])  # not the larger rotated stamp, not empty metadata
    assert doc["arxiv_id"] == paper["arxiv_id"]
    assert doc["page_count"] == paper["pages"]


@PAPERS
def test_sections_and_levels(sample, paper):
    doc = doc_of(sample, paper)
    expected = paper["sections"] + paper["appendix_sections"]
    found = iter(doc["sections"])
    assert all(s in found for s in expected), (expected, doc["sections"])  # all of them, in order
    assert {s.lower() for s in set(doc["sections"]) - set(expected)} <= {"abstract"}
    levels = {b["text"]: b["level"] for b in blocks(doc) if b["kind"] == "heading"}
    for s in expected:  # "3" → 1, "3.2" → 2, "A.1" → 2
        assert levels[s] == 1 + s.split()[0].count("."), s
    assert any(s.count(".") for s in expected), "the corpus should have subsections"


@PAPERS
def test_references_cut_appendices_kept(sample, paper):
    doc = doc_of(sample, paper)
    assert paper["reference_marker"] not in full_text(doc)
    assert "references" not in [s.lower() for s in doc["sections"]]
    if paper["appendix_sections"]:  # what follows the reference list is still there, text and all
        i = next(i for i, b in enumerate(blocks(doc)) if b["text"] == paper["appendix_sections"][0])
        assert [b["text"] for b in blocks(doc)[i:] if b["kind"] == "heading"] == paper["appendix_sections"]
        assert sum(len(b["text"]) for b in blocks(doc)[i:] if b["kind"] == "text") > 300


@PAPERS
def test_outline_or_layout(sample, paper):
    """A PDF with an outline takes its sections from it (each matched to its printed line: the number comes from
    the page); the others from the layout. The ICLR-like paper has no outline: capitalised headings at about body
    size, not bold, with the number set apart, are found by the layout alone."""
    doc = doc_of(sample, paper)
    assert doc["outline_used"] == paper["outline"]
    if paper["template"] == "iclr":
        assert not paper["outline"] and "1 INTRODUCTION" in doc["sections"]
    assert doc["appendix_found"] == bool(paper["appendix_sections"])
    fidelity = next(f for f in sample[1]["files"] if f["file"] == paper["file"])["fidelity"]
    if paper["outline"]:  # every entry was found on the line that prints it
        assert fidelity["outline_matched"] == fidelity["outline_entries"] == len(paper["sections"] + paper[
            "appendix_sections"])


def test_outline_headings_cut_the_text_where_printed():
    """With the outline ignored, the same sections come out (the layout agrees); with it, each heading block sits
    where the heading is printed: the text before it ends the previous section."""
    [paper] = [m for m in MANIFEST if m["outline"]]
    path = SAMPLE_PDFS / paper["file"]
    cfg = make_params(Path("unused")).ingest
    with_outline = ingest.extract_pdf.fn("id", str(path), cfg)
    without = ingest.extract_pdf.fn("id", str(path), cfg.model_copy(update={"use_outline": False}))
    assert with_outline["outline_used"] and not without["outline_used"]
    assert with_outline["sections"] == without["sections"]
    assert [b for b in blocks(with_outline)] == [b for b in blocks(without)]


@PAPERS
def test_tables_and_captions_are_blocks(sample, paper):
    """Each table of the source is one table block (rows by line, cells by " | "), preceded by its caption block;
    its cells are not also in the prose."""
    doc = doc_of(sample, paper)
    bl = blocks(doc)
    for table in paper["tables"]:
        i = next(i for i, b in enumerate(bl) if b["kind"] == "caption" and b["text"] == norm(table["caption"]))
        assert bl[i + 1]["kind"] == "table", table["caption"]
        rows = bl[i + 1]["text"].split("\n")
        assert rows == [" | ".join(r) for r in table["rows"]]
        prose = " ".join(b["text"] for b in bl if b["kind"] == "text")
        assert rows[1] not in prose and rows[-1] not in prose
    assert sum(b["kind"] == "table" for b in bl) == len(paper["tables"])


def test_sample_corpus_has_each_trait():
    """The traits the tests above rely on are really in the sample corpus."""
    assert any(m["template"] == "iclr" for m in MANIFEST) and any(m["outline"] for m in MANIFEST)
    assert any(m["appendix_toc"] and m["appendix_sections"] for m in MANIFEST)
    assert sum(len(m["tables"]) for m in MANIFEST) >= 4


def test_appendix_table_of_contents_dropped(sample):
    """The appendix's own table of contents ("Contents", entries with dot leaders and page numbers) is gone, and
    its entries are not taken for the appendix headings they list."""
    paper = next(m for m in MANIFEST if m["appendix_toc"])
    doc = doc_of(sample, paper)
    text = full_text(doc)
    assert "Contents" not in text and ". . . ." not in text
    assert [s for s in doc["sections"] if re.match(r"[A-Z](\.\d)* ", s)] == paper["appendix_sections"]
    report = {f["file"]: f for f in sample[1]["files"]}
    assert report[paper["file"]]["fidelity"]["dropped_chars"]["table_of_contents"] > 0


def test_iclr_title_mended_at_the_line_end_hyphen(sample):
    """The capitalised title breaks at "LAN-" / "GUAGE": it comes out whole, as printed otherwise."""
    paper = next(m for m in MANIFEST if m["template"] == "iclr")
    assert doc_of(sample, paper)["title"] == paper["title"] and "LANGUAGE" in paper["title"]
    with pymupdf.open(SAMPLE_PDFS / paper["file"]) as pdf:
        assert "LAN-\n" in pdf[0].get_text()  # the PDF really breaks it there


def test_title_mending_and_control_characters():
    spell = {"language", "parameter-efficient"}
    assert pdf_text.mend_title(["LARGE LAN-", "GUAGE MODELS"], spell) == "LARGE LANGUAGE MODELS"
    assert pdf_text.mend_title(["LARGE LAN- GUAGE MODELS"], spell) == "LARGE LANGUAGE MODELS"
    assert pdf_text.mend_title(["PARAMETER-", "EFFICIENT TUNING"], spell) == "PARAMETER-EFFICIENT TUNING"
    assert clean("A\x1b[31m Title\nwith\x00 escapes\u200b") == "A [31m Title with escapes"
    assert clean("Sch\u00a8utze and Rockt\u00a8aschel") == "Schütze and Rocktäschel"  # TeX's loose accents


def test_fidelity_record(sample):
    """The report says, per document, how much of the raw text was kept and what was dropped for what."""
    for f in sample[1]["files"]:
        fid = f["fidelity"]
        assert 0.7 < fid["kept_share"] < 1.0
        dropped = fid["dropped_chars"]
        assert dropped["references"] > 300 and dropped["running_headers_footers"] > 0 and dropped["rotated_text"] >= 0
        assert fid["tables"] == len(next(m for m in MANIFEST if m["file"] == f["file"])["tables"])


@PAPERS
def test_text_is_clean(sample, paper):
    doc = doc_of(sample, paper)
    text = full_text(doc)
    for word in paper["hyphenated_words"]:
        assert re.search(rf"\b{word}\b", text), word
    assert not re.search("[\ufb00-\ufb06]", text)
    assert paper["abstract_first_sentence"] in text
    running = {paper["short_title"], paper["venue_line"], paper["arxiv_stamp"]} - {None}
    for b in blocks(doc):  # a table keeps its rows apart, each row clean
        assert all(row == norm(row) and row for row in b["text"].split("\n")) if b["kind"] == "table" else (
            b["text"] == norm(b["text"]) and b["text"])
        assert b["text"] not in running and not b["text"].startswith(paper["short_title"] + " ")
        assert not re.fullmatch(r"\d+", b["text"]), "a page number was left in"
        assert "arXiv:" not in b["text"]


@PAPERS
def test_reading_order(sample, paper):
    """Every plain source paragraph comes out whole and in order: columns read left then right, paragraphs split
    by the column break rejoined. Hyphens are ignored here: a compound split at its own hyphen, never written
    whole elsewhere ("low-" + "resource"), cannot be told from a hyphenated word (test_text_is_clean checks those).
    """
    text = full_text(doc_of(sample, paper)).replace("-", "")
    paragraphs = source_paragraphs(paper)
    assert paragraphs and [p for p in paragraphs if p.replace("-", "") not in text] == []
    positions = [text.index(s.replace("-", "")) for s in paper["sections"]]
    assert positions == sorted(positions)


def test_corpus_has_a_paragraph_crossing_columns():
    """test_reading_order means little unless some checked paragraph runs from the bottom of a left column to
    the top of the right one."""
    crossing = []
    for paper in (m for m in MANIFEST if m["layout"] == "two_column"):
        with pymupdf.open(SAMPLE_PDFS / Path(paper["file"]).name) as pdf:
            crossing += [p for p in source_paragraphs(paper) for page in pdf if crosses_columns(page, p)]
    assert crossing


def crosses_columns(page: pymupdf.Page, paragraph: str) -> bool:
    words = paragraph.split()
    flags = pymupdf.TEXT_DEHYPHENATE | pymupdf.TEXT_MEDIABOX_CLIP  # ligatures expanded: "ﬁ" matches "fi"
    head = page.search_for(" ".join(words[:4]), flags=flags)
    tail = page.search_for(" ".join(words[-3:]), flags=flags)
    mid = page.rect.width / 2
    return bool(head and tail) and head[0].x1 < mid < tail[-1].x0


def test_keep_references_when_asked():
    cfg = make_params(Path("unused"), ingest={"drop_references": False}).ingest
    for paper in MANIFEST:
        path = SAMPLE_PDFS / Path(paper["file"]).name
        doc = ingest.extract_pdf.fn(sha256_file(path), str(path), cfg)
        assert paper["reference_marker"] in full_text(doc)
        assert "references" in [s.lower() for s in doc["sections"]]
        assert all(s in doc["sections"] for s in paper["appendix_sections"])


# ---------------------------------------------------------------------------------------------- made-up PDFs


def write_lines(page, x, y, lines, size=10.0, font="helv") -> float:
    for i, text in enumerate(lines):
        page.insert_text((x, y + i * size * 1.25), text, fontsize=size, fontname=font)
    return y + len(lines) * size * 1.25 + size


def two_column_paper(path: Path) -> None:
    """Three pages: a rotated 20 pt stamp, a 16 pt two-line title, a full-width abstract, a sentence running
    from the bottom of the left column to the top of the right one, line-end hyphens (one a real compound),
    running headers and page numbers, references between a subsection and an appendix."""
    doc = pymupdf.open()
    p = doc.new_page(width=612, height=792)
    p.insert_text((40, 560), "arXiv:2401.01234v3 [cs.CL] 2 Jan 2024", fontsize=20, rotate=90)
    write_lines(p, 160, 90, ["A Synthetic Study of", "Column Reading Order"], 16, "hebo")
    write_lines(p, 220, 150, ["Ada Example and Bob Sample"], 11)
    write_lines(p, 280, 180, ["Abstract"], 12, "hebo")
    write_lines(p, 72, 200, ["We build a small two-column paper in the test itself so that every",
                             "layout fact is known: where columns break, which words are hyphenated",
                             "and which lines are running headers or page numbers on the pages."])
    y = write_lines(p, 72, 260, ["1 Introduction"], 12, "hebo")
    write_lines(p, 72, y, ["Reading order matters for two-column", "papers because a sentence often runs from",
                           "the bottom of the left column to the top", "of the right column, and a careless",
                           "reader would jump across the page in the"])
    y = write_lines(p, 320, 260, ["middle of every line instead of reading", "down the column first. We also need a",
                                  "short test of the parame-", "terization of broken words and of the",
                                  "word fine-", "tuning, which keeps its hyphen because",
                                  "fine-tuning appears in running text."])
    y = write_lines(p, 320, y + 6, ["2 Method"], 12, "hebo")
    write_lines(p, 320, y, ["The method section starts in the right", "column and continues on the next page."])
    p.insert_text((303, 770), "1", fontsize=9)
    for n in (2, 3):
        p = doc.new_page(width=612, height=792)
        p.insert_text((220, 40), "Synthetic Study of Column Order", fontsize=8, fontname="heit")
        p.insert_text((303, 770), str(n), fontsize=9)
        if n == 2:
            y = write_lines(p, 72, 80, ["2.1 Details"], 11, "hebo")
            write_lines(p, 72, y, [
                "Details of the method are written here",
                "in the left column of the second page so",
                "that the header above them is removed."])
            y = write_lines(p, 320, 80, ["References"], 12, "hebo")
            write_lines(p, 320, y, [
                "[1] Ada Example. A Unique Reference Marker",
                "Title. In Proceedings of Tests, 2020.",
                "[2] Bob Sample. Another Paper on Layout",
                "Analysis. In Proceedings of Tests, 2021."])
        else:
            y = write_lines(p, 72, 80, ["A Appendix Material"], 12, "hebo")
            write_lines(p, 72, y, [
                "Appendix text is kept after the reference",
                "list, because it is real content of the",
                "paper and not a bibliography entry at all."])
            write_lines(p, 320, 80, [
                "The right column of the last page holds",
                "the end of the appendix in this example",
                "so that both columns carry real prose."])
    doc.save(path)


def plain_page_pdf(path: Path, lines: list[str], metadata_title: str) -> None:
    """One page of body-size text only (no display-size title), with the given metadata title."""
    doc = pymupdf.open()
    write_lines(doc.new_page(), 72, 80, lines)
    doc.set_metadata({"title": metadata_title})
    doc.save(path)


def test_two_column_layout(tmp_path):
    two_column_paper(tmp_path / "two.pdf")
    cfg = make_params(tmp_path).ingest
    doc = ingest.extract_pdf.fn("id", str(tmp_path / "two.pdf"), cfg)
    assert doc["title"] == "A Synthetic Study of Column Reading Order"
    assert doc["arxiv_id"] == "2401.01234"
    assert doc["sections"] == ["Abstract", "1 Introduction", "2 Method", "2.1 Details", "A Appendix Material"]
    assert [b["level"] for b in blocks(doc) if b["kind"] == "heading"] == [1, 1, 1, 2, 1]
    page1 = [b["text"] for b in doc["pages"][0]["blocks"]]
    assert page1[:3] == ["Ada Example and Bob Sample", "Abstract", page1[2]] and page1[2].startswith("We build")
    intro = page1[4]  # one paragraph although it crosses from the left into the right column
    assert "a careless reader would jump across the page in the middle of every line instead of reading" in intro
    assert "the parameterization of broken words" in intro  # hyphenation undone
    assert "word fine-tuning, which keeps" in intro  # a real compound (used in running text) keeps its hyphen
    assert doc["pages"][1]["blocks"][0] == {"kind": "heading", "level": 2, "text": "2.1 Details"}  # header gone
    text = full_text(doc)
    assert "Synthetic Study of Column Order" not in text and "Unique Reference Marker" not in text
    assert "Appendix text is kept" in text and "both columns carry real prose" in text
    assert not any(re.fullmatch(r"\d+", b["text"]) for b in blocks(doc))


NUMBERED = "[{n}] Ada Lovelace{n}, Bob Sample, and Carl Tester. A study of topic {n} in language models. arXiv " \
    "preprint arXiv:2301.{n:05d}, 2022."
AUTHOR_YEAR = "Lovelace{n}, A., Sample, B., and Tester, C. Scaling topic {n} with tests. In Proceedings of the " \
    "Conference on Tests, pp. 1-10, 2021."


def unheaded_references_paper(path: Path, entries: list[str]) -> None:
    """Single column, an outline without a "References" entry, and no reference heading at all: the entries run
    from the last body section over two pages, and an appendix follows them."""
    doc = pymupdf.open()
    p = doc.new_page(width=612, height=792)
    write_lines(p, 100, 80, ["A Study Without a Reference Heading"], 16, "hebo")
    y = write_lines(p, 72, 130, ["1 Introduction"], 12, "hebo")
    y = write_lines(p, 72, y, ["The introduction explains why reference lists must be found by their entries",
                               "when the outline and the layout give no heading for them at all."])
    y = write_lines(p, 72, y + 6, ["2 Method"], 12, "hebo")
    y = write_lines(p, 72, y, ["The method section is the last body section of the outline, so the list of",
                               "references printed after it sits inside it as far as the outline can tell."])
    for i, entry in enumerate(entries):
        if y > 700:
            p, y = doc.new_page(width=612, height=792), 80
        words, rows = entry.split(), [""]
        for w in words:  # wrapped at about 85 characters, like a printed entry
            rows[-1:] = [rows[-1] + " " + w] if len(rows[-1]) + len(w) < 85 else [rows[-1], w]
        y = write_lines(p, 72, y, [r.strip() for r in rows], 9) - 3
    p = doc.new_page(width=612, height=792)
    y = write_lines(p, 72, 80, ["A Appendix Details"], 12, "hebo")
    write_lines(p, 72, y, ["The appendix after the list is real content of the paper and stays in the text,",
                           "with every sentence of it kept where the list ended."])
    doc.set_toc([[1, "Introduction", 1], [1, "Method", 1], [1, "Appendix Details", doc.page_count]])
    doc.save(path)


@pytest.mark.parametrize("style", ["numbered", "author-year", "mixed"])
def test_reference_list_without_a_heading_is_found_by_its_entries(tmp_path, style):
    entries = [(NUMBERED if style == "numbered" or (style == "mixed" and n % 2) else AUTHOR_YEAR).format(n=n)
               for n in range(1, 19)]
    unheaded_references_paper(tmp_path / "p.pdf", entries)
    cfg = make_params(tmp_path).ingest
    doc = ingest.extract_pdf.fn("id", str(tmp_path / "p.pdf"), cfg)
    text = full_text(doc)
    assert not re.search(r"Lovelace\d|topic \d+ (?:in|with)", text), text
    assert "inside it as far as the outline can tell." in text and "where the list ended." in text
    assert doc["sections"] == ["1 Introduction", "2 Method", "A Appendix Details"]
    fidelity = doc["fidelity"]
    assert fidelity["dropped_chars"]["references"] >= sum(map(len, entries)) * 0.95
    assert not fidelity["references_implausible"]


def test_a_reference_list_left_in_the_text_is_flagged(tmp_path):
    """The report flags a document whose cut is far below its reference-looking text: here entries come in
    groups of three between paragraphs of prose, too few together to be taken for a list, so none is cut."""
    prose = ("This paragraph is prose that the authors wrote between the groups of entries, and it is long enough "
             "that the reference cut must not read it as part of a list: it says what the entries are for, why they "
             "are there and how they were chosen, in the words of the paper itself, which is what makes it prose. "
             "It is here so that no run of entries is long enough to be taken for a list of references. It goes "
             "on past the characters of other text that end a list (reference_stop_chars), so each group of "
             "entries is a run of its own.")
    entries = [NUMBERED.format(n=n) if n % 4 else prose for n in range(1, 25)]
    unheaded_references_paper(tmp_path / "p.pdf", entries)
    doc = ingest.extract_pdf.fn("id", str(tmp_path / "p.pdf"), make_params(tmp_path).ingest)
    assert "Ada Lovelace3, Bob Sample" in full_text(doc)
    assert doc["fidelity"]["references_implausible"] and doc["fidelity"]["reference_like_chars"] > 1500


def test_appendix_headings_run_into_text_and_prose_after_a_caption_are_split(tmp_path):
    """An outline without the appendix's entries leaves its capitalised headings (body size, not bold) in the
    paragraph they head; a caption's block also holds the prose set after it in body size. Both are split: the
    headings become headings, the prose a paragraph of its own (it is not the caption's)."""
    doc = pymupdf.open()
    p = doc.new_page(width=612, height=792)
    write_lines(p, 100, 80, ["A Study With an Appendix"], 16, "hebo")
    y = write_lines(p, 72, 130, ["1 Introduction"], 12, "hebo")
    write_lines(p, 72, y, ["The introduction is the only section in the outline of this small paper, so every",
                           "heading of its appendix must be found in the text where it was printed."])
    p = doc.new_page(width=612, height=792)
    write_lines(p, 72, 80, ["D HYPERPARAMETERS USED IN EXPERIMENTS", "D.1 ROBERTA",
                            "We train using AdamW with a linear learning rate decay schedule and a warmup",
                            "of six percent of the steps, for every task of the benchmark."])
    p.insert_text((72, 200), "Figure 4: Accuracy of each model on the tasks. Dashed lines indicate random guessing.",
                  fontsize=8)
    write_lines(p, 72, 211, ["The datasets that follow the figure are described here in the body text size,",
                             "one after the other, with their sizes and their sources."])
    doc.set_toc([[1, "Introduction", 1]])
    doc.save(tmp_path / "p.pdf")
    rec = ingest.extract_pdf.fn("id", str(tmp_path / "p.pdf"), make_params(tmp_path).ingest)
    assert rec["sections"] == ["1 Introduction", "D HYPERPARAMETERS USED IN EXPERIMENTS", "D.1 ROBERTA"]
    assert [b["level"] for b in blocks(rec) if b["kind"] == "heading"] == [1, 1, 2]
    page2 = rec["pages"][1]["blocks"]
    assert [b["kind"] for b in page2] == ["heading", "heading", "text", "caption", "text"], page2
    assert page2[2]["text"].startswith("We train using AdamW") and page2[2]["text"].endswith("of the benchmark.")
    assert page2[3]["text"].endswith("Dashed lines indicate random guessing.")
    assert page2[4]["text"].startswith("The datasets that follow the figure")


def test_a_footnote_between_the_halves_of_a_paragraph_is_read_after_them(tmp_path):
    """A footnote at the foot of the left column (smaller type, a raised "1") sits between a sentence's halves in
    reading order; it goes after the page's text, so the sentence is joined across the columns and the footnote is
    a paragraph of its own, not run into the sentence ("building models that 1Unless otherwise specified ...")."""
    doc = pymupdf.open()
    p = doc.new_page(width=612, height=792)
    write_lines(p, 160, 80, ["A Study With a Footnote"], 16, "hebo")
    y = write_lines(p, 72, 130, ["1 Introduction"], 12, "hebo")
    write_lines(p, 72, y, ["The recent literature has witnessed a great", "amount of activity in building models that"])
    tw = pymupdf.TextWriter(p.rect)
    tw.append((72, 700), "1", fontsize=5)
    tw.append(tw.last_point, "Unless otherwise specified, we compare with", fontsize=8)
    tw.append((72, 710), "the text-davinci-001 engine of the API.", fontsize=8)
    tw.write_text(p)
    write_lines(p, 320, 130, ["can follow natural language instructions, as", "many recent studies of them have shown.",
                              "The right column carries on with more prose.", "It is long enough to be a column."])
    doc.save(tmp_path / "p.pdf")
    rec = ingest.extract_pdf.fn("id", str(tmp_path / "p.pdf"), make_params(tmp_path).ingest)
    texts = [b["text"] for b in rec["pages"][0]["blocks"] if b["kind"] == "text"]
    assert "building models that can follow natural language instructions, as many" in texts[0], texts
    assert texts[-1] == "1Unless otherwise specified, we compare with the text-davinci-001 engine of the API."


def test_a_footnote_mark_in_running_text_is_dropped_an_exponent_kept(tmp_path):
    """A raised, smaller "11" after a word is a footnote's mark: read into the text it glues to the word ("API11 to
    collect"). After a digit it is an exponent ("10" "3"), kept."""
    doc = pymupdf.open()
    p = doc.new_page(width=612, height=792)
    write_lines(p, 160, 80, ["A Study With a Mark"], 16, "hebo")
    tw = pymupdf.TextWriter(p.rect)
    x, baseline = 72, 140
    for text, raised in [("We use the OpenAI API", False), ("11", True), (" to collect about 10", False),
                         ("3", True), (" responses for each of the tasks of the benchmark.", False)]:
        tw.append((x, baseline - 3 if raised else baseline), text, fontsize=7 if raised else 10)
        x = tw.last_point[0]
    tw.write_text(p)
    write_lines(p, 72, 170, ["More prose follows the marked sentence, so that the page holds enough text for",
                             "ingest to take it as a paper rather than a scanned or empty page."])
    doc.save(tmp_path / "p.pdf")
    rec = ingest.extract_pdf.fn("id", str(tmp_path / "p.pdf"), make_params(tmp_path).ingest)
    assert "We use the OpenAI API to collect about 103 responses for each" in full_text(rec)


def test_line_end_hyphens():
    join = pdf_text.join_broken  # the last argument: spellings seen within lines elsewhere in the document
    assert join("the parame-", "terization of", set()) == "the parameterization of"
    assert join("full fine-", "tuning", {"fine-tuning"}) == "full fine-tuning"  # written so elsewhere
    assert join("full fine-", "tuning", {"finetuning"}) == "full finetuning"
    assert join("Low-", "Rank Adaptation", set()) == "Low-Rank Adaptation"  # capitalised: a compound
    assert join("than on LaM-", "DA-PT", {"lamda", "pt"}) == "than on LaMDA-PT"  # unless written whole elsewhere
    assert join("GPT-", "3 175B", set()) == "GPT-3 175B"
    assert join("out-", "-of-domain data", set()) == "out-of-domain data"
    assert join("a sentence.", "Next one", set()) == "a sentence. Next one"
    assert join("an en dash –", "and more", set()) == "an en dash – and more"


def test_paragraph_continued_after_a_column_or_page_break():
    def text(t):
        return {"kind": "text", "text": t}

    pages = [[text("It runs down the left"), text("column into the right one; then parame-")],
             [text("terization, split by the page, is mended."), text("New paragraph.")]]
    pdf_text.join_continuations(pages, set())
    assert pages == [[text("It runs down the left column into the right one; then parameterization,")],
                     [text("split by the page, is mended."), text("New paragraph.")]]  # each half on its page


def test_metadata_title_fallback_and_old_style_arxiv_id(tmp_path):
    cfg = make_params(tmp_path).ingest
    body = ["Preprint arXiv:hep-th/9901001v2 of a note in plain body text only."] + [
        f"Line {i} of a page without any display-size title, long enough to pass min_chars." for i in range(4)]
    plain_page_pdf(tmp_path / "a.pdf", body, "A Sane Metadata Title")
    doc = ingest.extract_pdf.fn("id", str(tmp_path / "a.pdf"), cfg)
    assert doc["title"] == "A Sane Metadata Title" and doc["arxiv_id"] == "hep-th/9901001"
    plain_page_pdf(tmp_path / "b.pdf", body, "https://arxiv.org/pdf/2106.09685v2")
    assert ingest.extract_pdf.fn("id", str(tmp_path / "b.pdf"), cfg)["title"] == ""  # the stage uses the file name


# ---------------------------------------------------------------------------------------------- bad input, caching


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


def test_bad_inputs_are_skipped_and_reported(tmp_path, fresh_cache):
    pdfs = tmp_path / "pdfs"
    (pdfs / "sub").mkdir(parents=True)
    good = [SAMPLE_PDFS / Path(m["file"]).name for m in MANIFEST[:2]]
    shutil.copy(good[0], pdfs / "a.pdf")
    shutil.copy(good[1], pdfs / "sub" / "b.pdf")
    shutil.copy(good[0], pdfs / "sub" / "copy.pdf")
    (pdfs / "readme.txt").write_text("not considered: only *.pdf files are")
    body = [f"Body line {i} of a paper whose metadata title is a URL." for i in range(6)]
    plain_page_pdf(pdfs / "untitled.pdf", body, "https://arxiv.org/pdf/2106.09685v2")
    bad_inputs(pdfs)
    p = make_params(tmp_path, pdf_dir=pdfs)
    assert in_flow(ingest.run, p.ingest, p.paths) == 3
    docs = read_jsonl(p.paths.documents)

    report = read_json(p.paths.ingest_report)
    reasons = {f["file"]: f["reason"] for f in report["files"]}
    assert list(reasons) == ["Locked.PDF", "a.pdf", "half.pdf", "notes.pdf", "scan.pdf", "sub/b.pdf", "sub/copy.pdf",
                             "untitled.pdf"]
    assert reasons["a.pdf"] is None and reasons["sub/b.pdf"] is None and reasons["untitled.pdf"] is None
    assert "encrypted" in reasons["Locked.PDF"]
    assert "truncated" in reasons["half.pdf"]
    assert "not a PDF" in reasons["notes.pdf"]
    assert "no text" in reasons["scan.pdf"]
    assert reasons["sub/copy.pdf"] == "duplicate of a.pdf"
    assert (report["ok"], report["skipped"]) == (3, 5)
    assert all(f["status"] == ("ok" if f["reason"] is None else "skipped") for f in report["files"])
    assert [d["file"] for d in docs] == ["a.pdf", "sub/b.pdf", "untitled.pdf"]
    assert docs[2]["title"] == "untitled"  # metadata title was a URL: the file name stands in


def test_nothing_ingested_fails_with_the_folder_named(tmp_path, fresh_cache):
    bad = tmp_path / "bad"
    bad.mkdir()
    bad_inputs(bad)
    p = make_params(tmp_path, pdf_dir=bad)
    with pytest.raises(PipelineError, match=rf"no document could be ingested from {re.escape(str(bad))}.*skipped"):
        in_flow(ingest.run, p.ingest, p.paths)
    assert read_json(p.paths.ingest_report)["skipped"] == 4
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("only .pdf files count")
    p.paths.documents.parent.mkdir(parents=True, exist_ok=True)
    p.paths.documents.write_text('{"doc_id": "previous good run"}\n')
    before = (p.paths.ingest_report.read_bytes(), p.paths.documents.read_bytes())
    for folder, why in ((tmp_path / "empty", "no .pdf files in it"), (tmp_path / "missing", "does not exist")):
        p = make_params(tmp_path, pdf_dir=folder)
        with pytest.raises(PipelineError, match=rf"{re.escape(str(folder))}: .*{why}"):
            ingest.run(p.ingest, p.paths)  # fails before any fan-out: no flow needed
        # nothing written: the last run's report and documents are still there, byte for byte
        assert (p.paths.ingest_report.read_bytes(), p.paths.documents.read_bytes()) == before


def test_file_names_keep_and_titles_lose_control_characters(tmp_path, fresh_cache):
    """A file name is data: the record names the file on disk; a title made from it is cleaned."""
    pdfs = tmp_path / "pdfs"
    pdfs.mkdir()
    body = [f"Body line {i} of a paper whose metadata title is a URL." for i in range(6)]
    plain_page_pdf(pdfs / "evil\n\x1b[31mname.pdf", body, "https://arxiv.org/pdf/2106.09685v2")
    p = make_params(tmp_path, pdf_dir=pdfs)
    in_flow(ingest.run, p.ingest, p.paths)
    [doc] = read_jsonl(p.paths.documents)
    assert doc["file"] == "evil\n\x1b[31mname.pdf" and (pdfs / doc["file"]).is_file()
    assert read_json(p.paths.ingest_report)["files"][0]["file"] == doc["file"]
    assert doc["title"] == "evil [31mname"  # the file name stands in for the title, cleaned the same way


def test_figure_labels_dropped_prose_and_headings_kept():
    def line(text, y, size=10.0, bold=False, block=0):
        return dict(text=text, x0=100.0, x1=100.0 + 5 * len(text), y0=y, y1=y + size, size=size, bold=bold,
                    block=block, first=True, width=612.0)

    lines = [line("prose above the figure ends here with a long enough sentence of words.", 90, block=1),
             line("3 Results", 110, size=12, bold=True, block=2),
             line("+5.5", 150, size=7, block=3), line("Llama3 Base 8B", 160, size=7, block=4),
             line("Figure 2: Win rates of every model.", 200, block=5)]
    kept, dropped = cleanup.drop_figure_text(lines, {"size": 10.0})
    assert [ln["text"] for ln in kept] == [lines[0]["text"], "3 Results", lines[-1]["text"]]
    assert dropped == len("+5.5") + len("Llama3 Base 8B")


def test_renamed_file_is_a_cache_hit(tmp_path, fresh_cache, monkeypatch):
    calls = []
    extract = ingest.extract
    monkeypatch.setattr(ingest, "extract", lambda *a: calls.append(1) or extract(*a))
    pdfs = tmp_path / "pdfs"
    pdfs.mkdir()
    shutil.copy(SAMPLE_PDFS / Path(MANIFEST[0]["file"]).name, pdfs / "paper.pdf")
    p = make_params(tmp_path, pdf_dir=pdfs)
    in_flow(ingest.run, p.ingest, p.paths)
    first = read_jsonl(p.paths.documents)
    (pdfs / "paper.pdf").rename(pdfs / "renamed.pdf")
    in_flow(ingest.run, p.ingest, p.paths)
    second = read_jsonl(p.paths.documents)
    assert len(calls) == 1  # the second run extracted nothing
    assert second[0]["file"] == "renamed.pdf" and {**second[0], "file": "paper.pdf"} == first[0]
    changed = make_params(tmp_path, pdf_dir=pdfs, ingest={"min_chars": p.ingest.min_chars + 1})
    in_flow(ingest.run, changed.ingest, changed.paths)
    assert len(calls) == 2  # the params are part of the key


# ---------------------------------------------------------------------------------------------- CLI


def test_cli(tmp_path):
    (tmp_path / "pdfs").mkdir()
    for m in MANIFEST[:2]:
        shutil.copy(SAMPLE_PDFS / Path(m["file"]).name, tmp_path / "pdfs")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["paths"] = {k: str(tmp_path / v) for k, v in raw["paths"].items()}
    raw["paths"]["pdf_dir"] = str(tmp_path / "pdfs")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    # A result cache of its own, so the two PDFs are really extracted (the Prefect server is the session's).
    env = {**os.environ, "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp_path / "prefect" / "results")}
    cmd = [sys.executable, "-m", "tasks.ingest", "--params", str(tmp_path / "params.yaml")]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert read_json(raw["paths"]["ingest_report"])["ok"] == 2
    assert len(read_jsonl(raw["paths"]["documents"])) == 2

    raw["ingest"]["bogus"] = 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    [line] = done.stderr.strip().splitlines()  # one line naming the file, the section and the key
    assert line.startswith(f"error: {tmp_path / 'params.yaml'}: ingest") and "bogus" in line and "unknown key" in line
