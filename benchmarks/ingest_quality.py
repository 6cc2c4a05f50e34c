"""Ingest quality on real arXiv papers: what the extraction keeps of what the papers say, per paper and overall.

Run:  python benchmarks/ingest_quality.py [--corpus ../shared/corpus] [--params params.yaml] [--paper NAME]
                                          [--entries-only]
Reads the corpus's manifest.json (title as printed, the outline's top-level headings, the pages of the reference
list and of the appendix after it); prints a skip message and exits 0 when the folder is absent. The PDFs are
third-party papers for development only: they are never copied into the project or used in its tests.

Figures (targets from issues 7 and 24):
  title        the title equals the printed one (case aside: small caps come out as capitals)      100%
  outline      recall of the outline's top-level headings among the sections found                 >= 95%
  layout       the same recall with the outline ignored (ingest.use_outline false: layout alone)   >= 85%
  refs left    lines of the reference list still in the text                                       <= 3%
  appendix     characters of the lines on the appendix pages after the reference list still there  >= 92%
A line counts as present when its letters and digits occur in the document's text (spaces, punctuation and
hyphenation ignored). Running headers (lines repeated on 3+ pages) are not counted as appendix text.
--entries-only: the reference cut is not told where a "References" heading is, so every list must be found by
its entries (what a paper whose heading is run into the first entry, or missing, gets).
Figures also go to benchmarks/out/ingest_quality.json.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import unicodedata
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: `tasks` lives at the project root

import pymupdf  # noqa: E402

from tasks.params import load_params  # noqa: E402
from tasks.pdf.extract import extract  # noqa: E402
from tasks.pdf.headings import is_reference_heading, key, similar  # noqa: E402

YEAR_RE = re.compile(r"\b(?:19[5-9]\d|20[0-4]\d)[a-z]?\b")
APPENDIX_HEAD_RE = re.compile(r"(?:APPENDIX|Appendix|[A-H])(?:\.\d)?\.?\s+[A-Z][A-Za-z]")


def squash(text: str) -> str:
    """Letters and digits only, accents dropped: "Andr´es" in the text layer and "Andrés" in a record match."""
    return re.sub(r"[^a-z0-9]", "", unicodedata.normalize("NFKD", text).lower())


def pages_of(spec: str | None) -> list[int]:
    """"11-17" → [11, ..., 17] (1-based)."""
    if not spec:
        return []
    a, _, b = spec.partition("-")
    return list(range(int(a), int(b or a) + 1))


def document_text(rec: dict) -> str:
    return squash(" ".join([rec["title"]] + [b["text"] for p in rec["pages"] for b in p["blocks"]]))


def recall(wanted: list[str], sections: list[str]) -> float | None:
    if not wanted:
        return None
    keys = [key(s) for s in sections]
    return sum(any(similar(key(w), k) for k in keys) for w in wanted) / len(wanted)


def reference_lines(pdf: pymupdf.Document, paper: dict) -> list[str]:
    """Lines of the reference list (24 letters and digits or more: a shorter piece, "arXiv preprint", "large
    language models", also occurs in the paper's own text): after the "References" line on the first of
    its pages, before the first appendix heading on the last (when the appendix starts there)."""
    pages = pages_of(paper["references_pages"])
    out = []
    for n in pages:
        lines = [ln.strip() for ln in pdf[n - 1].get_text().splitlines() if ln.strip()]
        if n == pages[0]:
            start = next((i for i, ln in enumerate(lines) if is_reference_heading(ln)), None)
            lines = lines[start + 1:] if start is not None else lines
        if n == pages[-1] and paper["appendix_pages_after_references"]:
            headings = {squash(h) for h in paper["outline_level1"]}  # an unlettered appendix heading ends it too
            end = next((i for i, ln in enumerate(lines) if (APPENDIX_HEAD_RE.match(ln) and not YEAR_RE.search(ln))
                        or squash(ln) in headings), len(lines))
            lines = lines[:end]
        out += [ln for ln in lines if len(squash(ln)) >= 24]
    return out


def appendix_lines(pdf: pymupdf.Document, paper: dict) -> list[str]:
    """Lines of the appendix pages that follow the last reference page (the shared page is left out)."""
    last_ref = pages_of(paper["references_pages"])[-1]
    pages = [n for n in pages_of(paper["appendix_pages_after_references"]) if n > last_ref]
    lines = [ln.strip() for n in pages for ln in pdf[n - 1].get_text().splitlines()]
    every = Counter(squash(ln) for page in pdf for ln in page.get_text().splitlines())
    return [ln for ln in lines if len(squash(ln)) >= 4 and every[squash(ln)] < 3]


def measure(path: Path, paper: dict, cfg) -> dict:
    with pymupdf.open(path) as pdf:
        rec = extract(pdf, "-", cfg)
        plain = extract(pdf, "-", cfg.model_copy(update={"use_outline": False}))
        refs, appx = reference_lines(pdf, paper), appendix_lines(pdf, paper)
    text = document_text(rec)
    left = [ln for ln in refs if squash(ln) in text]
    total = sum(len(squash(ln)) for ln in appx)
    kept = sum(len(squash(ln)) for ln in appx if squash(ln) in text)
    return {
        "paper": paper["file"],
        "title_ok": " ".join(rec["title"].casefold().split()) == " ".join(paper["title"].casefold().split()),
        "title": rec["title"],
        "outline_recall": recall(paper["outline_level1"], rec["sections"]),
        "layout_recall": recall(paper["outline_level1"], plain["sections"]),
        "layout_sections": len(plain["sections"]),
        "ref_lines": len(refs), "ref_left": len(left), "ref_left_examples": left[:3],
        "appendix_chars": total, "appendix_kept": kept,
        "kept_share": rec["fidelity"]["kept_share"], "tables": rec["fidelity"]["tables"],
        "outline_entries": rec["fidelity"]["outline_entries"], "outline_matched": rec["fidelity"]["outline_matched"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="Ingest quality on a corpus of real papers with a manifest.")
    parser.add_argument("--corpus", type=Path, default=ROOT.parent / "shared" / "corpus")
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--paper", help="only papers whose file name contains this")
    parser.add_argument("--entries-only", action="store_true", help="the reference cut ignores reference headings")
    args = parser.parse_args()
    if args.entries_only:
        import tasks.pdf.cleanup

        tasks.pdf.cleanup.is_reference_heading = lambda text: False
    manifest = args.corpus / "manifest.json"
    if not manifest.is_file():
        print(f"skipped: no corpus manifest at {manifest} (the real-paper corpus is not part of the project)")
        return
    cfg = load_params(args.params).ingest
    papers = [p for p in json.loads(manifest.read_text())["papers"] if not args.paper or args.paper in p["file"]]
    rows = [measure(args.corpus / p["file"], p, cfg) for p in papers]

    def pct(x):
        return "   -" if x is None else f"{100 * x:4.0f}"

    print(f"{'paper':42} title outline layout  refs-left  appendix  kept  tables")
    for r in rows:
        appx = r["appendix_kept"] / r["appendix_chars"] if r["appendix_chars"] else None
        refs = f"{r['ref_left']:3}/{r['ref_lines']:<4}"
        print(f"{r['paper'][:42]:42} {'ok ' if r['title_ok'] else 'BAD'}   {pct(r['outline_recall'])}%  "
              f"{pct(r['layout_recall'])}%  {refs}    {pct(appx)}%   {pct(r['kept_share'])}%  {r['tables']:4}")
        if not r["title_ok"]:
            print(f"    title: {r['title']!r}")
        for ex in r["ref_left_examples"]:
            print(f"    ref left: {ex[:100]!r}")
    with_outline = [r for r in rows if r["outline_recall"] is not None]
    overall = {
        "papers": len(rows),
        "titles_right": sum(r["title_ok"] for r in rows) / len(rows),
        "outline_recall": sum(r["outline_recall"] for r in with_outline) / max(1, len(with_outline)),
        "layout_recall": sum(r["layout_recall"] for r in with_outline) / max(1, len(with_outline)),
        "reference_entries_left": sum(r["ref_left"] for r in rows) / max(1, sum(r["ref_lines"] for r in rows)),
        "appendix_kept": sum(r["appendix_kept"] for r in rows) / max(1, sum(r["appendix_chars"] for r in rows)),
        "raw_text_kept": sum(r["kept_share"] for r in rows) / len(rows),
        "outline_entries_on_their_line": sum(r["outline_matched"] for r in rows) / max(
            1, sum(r["outline_entries"] for r in rows)),
    }
    print(f"\noverall ({len(rows)} papers; heading recall over the {len(with_outline)} with an outline):")
    targets = {"titles_right": ">= 100%", "outline_recall": ">= 95%", "layout_recall": ">= 85%",
               "reference_entries_left": "<= 3%", "appendix_kept": ">= 92%", "raw_text_kept": "(no target)",
               "outline_entries_on_their_line": "(no target)"}
    for name, target in targets.items():
        print(f"  {name:30} {100 * overall[name]:6.1f}%   target {target}")
    out = ROOT / "benchmarks" / "out" / "ingest_quality.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"overall": overall, "papers": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
