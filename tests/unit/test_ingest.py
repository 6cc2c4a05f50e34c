"""Ingest's extraction, unit layer: PDFs built here with PyMuPDF for layouts and bad inputs whose every detail is
known, single sample papers, and the text helpers. The stage on the whole sample corpus (checked against
data/sample/manifest.json), bad inputs, caching across renames and the CLI: tests/integration/test_ingest.py."""

import re
from pathlib import Path

import pymupdf
import pytest

from tasks import ingest
from tasks.hashing import sha256_file
from tasks.pdf import cleanup
from tasks.pdf import text as pdf_text
from tasks.pdf.layout import clean
from tests.helpers import SAMPLE_PDFS, make_params
from tests.pdfs import MANIFEST, blocks, full_text, plain_page_pdf, source_paragraphs, write_lines


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


def test_sample_corpus_has_each_trait():
    """The traits the tests above rely on are really in the sample corpus."""
    assert any(m["template"] == "iclr" for m in MANIFEST) and any(m["outline"] for m in MANIFEST)
    assert any(m["appendix_toc"] and m["appendix_sections"] for m in MANIFEST)
    assert sum(len(m["tables"]) for m in MANIFEST) >= 4


def test_title_mending_and_control_characters():
    spell = {"language", "parameter-efficient"}
    assert pdf_text.mend_title(["LARGE LAN-", "GUAGE MODELS"], spell) == "LARGE LANGUAGE MODELS"
    assert pdf_text.mend_title(["LARGE LAN- GUAGE MODELS"], spell) == "LARGE LANGUAGE MODELS"
    assert pdf_text.mend_title(["PARAMETER-", "EFFICIENT TUNING"], spell) == "PARAMETER-EFFICIENT TUNING"
    assert clean("A\x1b[31m Title\nwith\x00 escapes\u200b") == "A [31m Title with escapes"
    assert clean("Sch\u00a8utze and Rockt\u00a8aschel") == "Schütze and Rocktäschel"  # TeX's loose accents


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
