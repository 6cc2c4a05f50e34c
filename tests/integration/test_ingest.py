"""Ingest stage: the sample corpus checked against data/sample/manifest.json (its ground truth), bad inputs built
here with PyMuPDF, caching across renames, and the CLI. Extraction of single made-up PDFs: tests/unit/test_ingest.py."""

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
from tests.helpers import ROOT, SAMPLE_PDFS, in_flow, make_params
from tests.pdfs import MANIFEST, bad_inputs, blocks, full_text, norm, plain_page_pdf, source_paragraphs

PAPERS = pytest.mark.parametrize("paper", MANIFEST, ids=lambda m: Path(m["file"]).stem)


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
