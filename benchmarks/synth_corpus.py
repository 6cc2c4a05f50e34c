"""A large synthetic corpus for the scale benchmark: N papers of ~10 pages each, rendered like the sample corpus.

Run:  python benchmarks/synth_corpus.py [--papers 1000] [--out benchmarks/out/corpus] [--workers 2]

Each paper is built from the sample sources (data/sample/src/*.md) with data/sample/render.py's own parser and
renderer, so it has every quirk the sample PDFs have (arXiv stamp, running headers, two columns, hyphenation,
ligatures, tables, references followed by appendices). Paper i is varied deterministically from seed i: the
sections of two or three source papers (renumbered), paragraphs and sentences reordered, its own title, arXiv id
and layout, so no two papers share content hashes or questions. Existing PDFs are kept (re-runs only add).
The folder is outside git (benchmarks/out/ is ignored); never copy it into data/.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import re
import sys
import time
from functools import lru_cache
from multiprocessing import Pool
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
TARGET_PAGES = 10
_render = None


def renderer():
    """data/sample/render.py as a module (it is a script, not part of the package)."""
    global _render
    if _render is None:
        spec = importlib.util.spec_from_file_location("sample_render", SAMPLE / "render.py")
        _render = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_render)
        _render.register_fonts()
    return _render


def sections(doc: dict) -> tuple[list, list, list]:
    """(abstract blocks, body sections [(heading kind, name, blocks)], references + appendix blocks)."""
    abstract, body, tail, zone = [], [], [], "front"
    for kind, text in doc["blocks"]:
        if kind in ("h1", "h2") and text == "Abstract":
            zone = "abstract"
        elif kind in ("h1", "h2") and text == "References":
            zone = "tail"
        elif zone == "abstract" and kind in ("h1", "h2"):
            zone = "body"
        if zone == "abstract":
            abstract.append((kind, text))
        elif zone == "body":
            if kind in ("h1", "h2"):
                body.append([kind, text.partition(" ")[2], []])
            else:
                body[-1][2].append((kind, text))
        elif zone == "tail":
            tail.append((kind, text))
    return abstract, body, tail


def shuffled_paragraph(text: str, rng: random.Random) -> str:
    """Rotate a prose paragraph's sentences (tables, lists and equations stay as written)."""
    if text.lstrip().startswith(("|", "-", "$$", "Table ")):
        return text
    sentences = re.split(r"(?<=[.!?])\s+(?=[A-Z])", " ".join(text.split()))
    k = rng.randrange(len(sentences))
    return " ".join(sentences[k:] + sentences[:k])


def synth_paper(i: int, sources: list[dict], pages: dict[str, int], attempt: int = 0) -> dict:
    rng = random.Random(i * 100 + attempt)
    order = rng.sample(range(len(sources)), len(sources))
    picked, total = [], 0
    for j in order:  # whole source papers until ~TARGET_PAGES
        picked.append(sources[j])
        total += pages[sources[j]["slug"]]
        if total >= TARGET_PAGES + 1:  # the references and appendix come from the first only
            break
    first = picked[0]
    abstract, _, tail = sections(first)
    blocks = list(abstract)
    number, sub = 0, 0
    for src in picked:
        for kind, name, body in sections(src)[1]:
            if kind == "h1":
                number, sub = number + 1, 0
                blocks.append(("h1", f"{number} {name}"))
            else:
                sub += 1
                blocks.append(("h2", f"{number}.{sub} {name}"))
            paras = [(k, shuffled_paragraph(t, rng)) for k, t in body]
            tables = any(t.lstrip().startswith(("|", "Table ")) for _, t in paras)  # a caption precedes its table
            if len(paras) > 2 and not tables and rng.random() < 0.5:  # the opening paragraph stays first
                rest = paras[1:]
                rng.shuffle(rest)
                paras = paras[:1] + rest
            blocks.extend(paras)
    blocks.extend(tail)
    meta = dict(first["meta"])
    meta.update(
        title=f"{meta['title']} (Study {i + 1})",
        arxiv=f"{2301 + i // 9000:04d}.{10000 + i % 9000:05d}v{1 + i % 3}",
        layout=rng.choice(["one_column", "two_column"]),
    )
    meta.setdefault("category", "cs.CL")  # a source without an arXiv stamp has neither
    meta.setdefault("date", f"{1 + i % 28} Mar 2024")
    meta.pop("title_break", None)  # the break word may not be in the varied title
    return {"meta": meta, "blocks": blocks, "slug": f"paper-{i + 1:05d}"}


def _render_one(args: tuple) -> tuple[str, int]:
    i, out_dir = args
    r = renderer()
    sources, pages = _sources()
    tmp = Path(out_dir) / f"paper-{i + 1:05d}.pdf.tmp"
    for attempt in range(10):  # reportlab cannot lay out every reordering (a paragraph that will not split)
        doc = synth_paper(i, sources, pages, attempt)
        if attempt % 2:  # a one-column source's wide table does not fit a two-column page
            doc["meta"]["layout"] = "one_column"
        try:
            n, _ = r.render(doc, tmp)
            break
        except Exception:
            if attempt == 9:
                raise
    out = Path(out_dir) / f"{doc['slug']}.pdf"
    tmp.replace(out)
    return out.name, n


@lru_cache(maxsize=1)
def _sources() -> tuple[list[dict], dict[str, int]]:
    sources = [renderer().parse_source(p) for p in sorted((SAMPLE / "src").glob("*.md"))]
    manifest = {m["file"]: m["pages"] for m in json.loads((SAMPLE / "manifest.json").read_text())}
    return sources, {s["slug"]: manifest[f"{s['slug']}.pdf"] for s in sources}


def generate(papers: int, out: Path, workers: int) -> list[Path]:
    """Render papers 1..N into `out` (those already there are kept); returns their paths in order."""
    out.mkdir(parents=True, exist_ok=True)
    todo = [(i, str(out)) for i in range(papers) if not (out / f"paper-{i + 1:05d}.pdf").exists()]
    if todo:
        start = time.time()
        with Pool(workers) as pool:
            n_pages = sum(n for _, n in pool.imap_unordered(_render_one, todo, chunksize=4))
        print(f"rendered {len(todo)} papers, {n_pages} pages, in {time.time() - start:.0f} s → {out}")
    return [out / f"paper-{i + 1:05d}.pdf" for i in range(papers)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--papers", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "corpus")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    generate(args.papers, args.out, args.workers)


if __name__ == "__main__":
    sys.exit(main())
