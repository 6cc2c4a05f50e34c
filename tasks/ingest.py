"""Ingest: every PDF under paths.pdf_dir becomes one document record: title, arXiv id, sections (from the PDF
outline when there is one, from the layout otherwise) and the cleaned text of each page as heading, text, table
and caption blocks in reading order; the reference list and in-paper tables of contents are cut, appendices kept.
Bad files are skipped and reported.

Run alone:  python -m tasks.ingest [--params params.yaml]
Writes paths.documents (JSONL, one record per ingested PDF) and paths.ingest_report (JSON, one entry per file, with
a fidelity record: share of the raw text kept, characters dropped per reason, sections, outline used, appendix,
and `references_implausible` when far less was cut as references than the paper has reference-like text).
Look at one PDF:  python -m tasks.pdf.extract paper.pdf

One cached Prefect task per PDF, keyed on the file's content hash (not its path: a renamed file is a cache hit),
the ingest params and the project's source. The per-PDF logic is plain functions in tasks/pdf/.
"""

from __future__ import annotations

from pathlib import Path

import pymupdf
from prefect import task

from tasks.cache import CACHE, map_cached_iter
from tasks.files import write_json, write_jsonl
from tasks.hashing import sha256_file
from tasks.log import PipelineError, logger
from tasks.params import IngestParams, Paths
from tasks.pdf.extract import extract
from tasks.pdf.layout import clean
from tasks.runner import run_stage

# Corrupt files are expected input and get a line in the ingest report; MuPDF's own stderr messages are noise.
pymupdf.TOOLS.mupdf_display_errors(False)


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




def run(ingest: IngestParams, paths: Paths) -> int:
    """Streams records out as they are extracted (flat memory at any corpus size); returns how many it wrote."""
    log = logger()
    root = Path(paths.pdf_dir)
    files = [p for p in root.rglob("*") if p.is_file() and p.suffix.lower() == ".pdf"] if root.is_dir() else []
    if not files:  # before anything is written: the last good documents and report stay as they were
        what = "no .pdf files in it" if root.is_dir() else "the folder does not exist"
        raise PipelineError(f"no document could be ingested from {root}: {what}")
    # A record names the file as it is on disk, control characters too (`a\n.pdf` and `a\t.pdf` are two files);
    # log lines show them escaped (log.shown, applied to every pipeline log line).
    names = sorted((p.relative_to(root).as_posix(), p) for p in files)
    hashes = [sha256_file(p) for _, p in names]

    first: dict[str, str] = {}  # content hash → first file with it
    todo = []
    for (name, path), h in zip(names, hashes):
        if h not in first:
            first[h] = name
            todo.append((h, str(path)))
    results = map_cached_iter(extract_pdf, todo, ingest, desc="ingest", star=True)  # in `todo` order
    report, pages = [], 0

    def records():
        nonlocal pages
        for (name, path), h in zip(names, hashes):
            result = next(results) if first[h] == name else {"skip": f"duplicate of {first[h]}"}
            if "skip" in result:
                log.warning(f"ingest: skipped {name}: {result['skip']}")
                report.append(dict(file=name, status="skipped", reason=result["skip"], doc_id=h, title=None,
                                   pages=None, sections=None, fidelity=None))
                continue
            # The cached record knows no path (a renamed file is a cache hit): name it here, title from it last.
            record = {k: v for k, v in result.items() if k != "fidelity"}
            record.update(file=name, title=result["title"] or clean(path.stem))
            fidelity = {**result["fidelity"], "outline_used": record["outline_used"],
                        "appendix_found": record["appendix_found"]}
            if fidelity["references_implausible"]:
                log.warning(f"ingest: {name}: only {fidelity['dropped_chars']['references']} characters of "
                            f"reference list cut, of {fidelity['reference_like_chars']} that read as references: "
                            f"entries are likely left in the text")
            report.append(dict(file=name, status="ok", reason=None, doc_id=h, title=record["title"],
                               pages=record["page_count"], sections=len(record["sections"]), fidelity=fidelity))
            pages += record["page_count"]
            yield record
        next(results, None)  # ends the iterator: its "computed / from cache" log line
        ok = sum(f["status"] == "ok" for f in report)
        write_json(paths.ingest_report, {"files": report, "ok": ok, "skipped": len(report) - ok})
        if not ok:  # raised inside write_jsonl: the last good documents stay
            raise PipelineError(f"no document could be ingested from {root}: all {len(names)} .pdf files were "
                                f"skipped (reasons in {paths.ingest_report})")

    n = write_jsonl(paths.documents, records())
    log.info(f"ingest: {n} documents, {len(report) - n} skipped, {pages} pages → {paths.documents}")
    return n


if __name__ == "__main__":
    run_stage(run, "ingest")
