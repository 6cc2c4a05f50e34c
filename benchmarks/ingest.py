"""Ingest speed: pages/second of the per-PDF extraction the stage runs (tasks.ingest.extract_pdf without Prefect),
of a bare PyMuPDF `page.get_text()` loop over the same PDFs in the same run, their ratio, and of the whole stage
once through a Prefect flow (hashing, fan-out, result persistence; the temporary server's start not counted).

Run:  python benchmarks/ingest.py [--pdf-dir DIR] [--repeat N] [--params FILE] [--no-flow] [--find-tables]
Target: extraction >= 0.3x the bare loop (FACTS.md: get_text() ~290 pages/s, get_text("dict") ~95 on real papers),
so each page must be extracted only once. Figures also go to benchmarks/out/ingest.json.
--find-tables also times PyMuPDF's `page.find_tables()` on the pages that carry a "Table N" caption (the only pages
where ingest looks for tables), against the whole extraction: why ingest finds tables from the layout instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: `tasks` lives at the project root
# A result cache of this run's own, so the flow measures extraction rather than cache hits.
os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = tempfile.mkdtemp(prefix="papertune-bench-")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # the figures, not a log line per task

import pymupdf  # noqa: E402

from tasks import ingest  # noqa: E402
from tasks.hashing import sha256_file  # noqa: E402
from tasks.params import load_params  # noqa: E402


def bare_loop(files: list[Path]) -> int:
    pages = 0
    for f in files:
        with pymupdf.open(f) as doc:
            for page in doc:
                page.get_text()
                pages += 1
    return pages


def ingest_loop(files: list[Path], hashes: list[str], cfg) -> int:
    pages = 0
    for f, h in zip(files, hashes):
        result = ingest.extract_pdf.fn(h, str(f), cfg)  # the task's body: read, open, extract, clean
        pages += result.get("page_count", 0)
    return pages


def find_tables_cost(files: list[Path]) -> tuple[int, int, float]:
    """Pages with a table caption, tables found there by page.find_tables(), seconds spent in find_tables."""
    from tasks.pdf.cleanup import TABLE_CAPTION_RE

    pages = tables = 0
    spent = 0.0
    for f in files:
        with pymupdf.open(f) as doc:
            for page in doc:
                if not any(TABLE_CAPTION_RE.match(ln.strip()) for ln in page.get_text().splitlines()):
                    continue
                t = time.perf_counter()
                tables += len(page.find_tables().tables)
                spent += time.perf_counter() - t
                pages += 1
    return pages, tables, spent


def timed(fn, *args) -> tuple[int, float]:
    t = time.perf_counter()
    pages = fn(*args)
    return pages, time.perf_counter() - t


def through_flow(params, out: Path) -> tuple[int, float]:
    from prefect import flow

    from tasks.runner import call, task_runner
    from tasks.stages import stage as declared

    paths = params.paths.model_copy(update={"documents": out / "documents.jsonl", "ingest_report": out / "ingest.json"})
    params = params.model_copy(update={"paths": paths})
    flow(name="bench-warmup")(lambda: None)()  # starts the temporary Prefect server outside the timing
    stage = flow(name="bench-ingest", task_runner=task_runner(params.runner))(lambda: call(declared("ingest"), params))
    t = time.perf_counter()
    docs = stage()
    return sum(d["page_count"] for d in docs), time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description="Ingest speed against a bare PyMuPDF loop.")
    parser.add_argument("--pdf-dir", type=Path, help="folder of PDFs (default: paths.pdf_dir of the params)")
    parser.add_argument("--repeat", type=int, default=5, help="passes over the corpus per measurement (default 5)")
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--no-flow", action="store_true", help="skip the run through a Prefect flow")
    parser.add_argument("--find-tables", action="store_true", help="also time page.find_tables() on caption pages")
    args = parser.parse_args()

    params = load_params(args.params)
    pdf_dir = args.pdf_dir or (ROOT / params.paths.pdf_dir)
    files = sorted(p for p in pdf_dir.rglob("*") if p.is_file() and p.suffix.lower() == ".pdf")
    if not files:
        sys.exit(f"error: no .pdf files under {pdf_dir}")
    hashes = [sha256_file(f) for f in files]
    ingest_loop(files, hashes, params.ingest)  # warm-up: imports, font caches

    # Interleaved passes, so a slow moment of the machine hits both sides alike.
    bare_pages = bare_s = ours_pages = ours_s = 0.0
    for _ in range(args.repeat):
        n, s = timed(bare_loop, files)
        bare_pages, bare_s = bare_pages + n, bare_s + s
        n, s = timed(ingest_loop, files, hashes, params.ingest)
        ours_pages, ours_s = ours_pages + n, ours_s + s
    bare_rate, ours_rate = bare_pages / bare_s, ours_pages / ours_s
    figures = {"pdfs": len(files), "pages": int(bare_pages / args.repeat), "repeat": args.repeat,
               "bare_get_text_pages_per_s": round(bare_rate, 1), "ingest_extract_pages_per_s": round(ours_rate, 1),
               "ratio": round(ours_rate / bare_rate, 3)}

    print(f"corpus: {len(files)} PDFs, {figures['pages']} pages ({pdf_dir}), {args.repeat} passes")
    print(f"  bare page.get_text() loop       {bare_rate:8.1f} pages/s")
    print(f"  ingest extraction (per PDF)     {ours_rate:8.1f} pages/s   {ours_rate / bare_rate:.2f}x bare "
          f"(target >= 0.30x)")
    if args.find_tables:
        pages, tables, spent = find_tables_cost(files)
        per_pass = ours_s / args.repeat
        figures.update(find_tables_pages=pages, find_tables_found=tables, find_tables_s=round(spent, 1),
                       find_tables_s_per_page=round(spent / max(1, pages), 3))
        print(f"  page.find_tables() on the {pages} pages with a 'Table N' caption: {spent:.1f} s "
              f"({spent / max(1, pages):.2f} s/page, {tables} tables) = {spent / per_pass:.0f}x the whole "
              f"ingest extraction ({per_pass:.1f} s)")
    if not args.no_flow:
        with tempfile.TemporaryDirectory() as out:
            pages, s = through_flow(params, Path(out))
        figures["stage_in_flow_pages_per_s"] = round(pages / s, 1)
        print(f"  whole stage in a Prefect flow   {pages / s:8.1f} pages/s   (one pass, {params.runner.kind} x"
              f"{params.runner.max_workers}, empty cache; hashing, fan-out and result storage included)")
    out_file = ROOT / "benchmarks" / "out" / "ingest.json"
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
