"""The data half on the sample corpus: base model → chunks → QA → split → export, and incremental re-runs. Its
pieces on made-up inputs: tests/unit/test_data.py."""

import json
import shutil

import pytest

from tasks import base_model, chunk, export, ingest, qa, split
from tasks.dedup import NearDuplicates, minhash, question_key
from tasks.files import read_json, read_jsonl
from tasks.text import normalise
from tests.helpers import SAMPLE_PDFS, data_half, in_flow, make_params


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The sample corpus through ingest, base_model, chunk, qa and split, once for this module."""
    return data_half(make_params(tmp_path_factory.mktemp("data")))


def test_the_builtin_model_is_built_once_and_rebuilt_when_damaged_or_changed(data, tmp_path, caplog):
    """A flow run (scheduled or direct) does not rebuild an intact builtin model from the same params, corpus and
    code; a damaged file or another model param rebuilds it, and the build is deterministic."""
    out = tmp_path / "base_model"
    shutil.copytree(data.paths.base_model, out)
    paths = data.paths.model_copy(update={"base_model": out})
    built = base_model.describe(out)
    with caplog.at_level("INFO"):
        assert in_flow(base_model.run, data.model, paths)["files_hash"] == built["files_hash"]
        assert "unchanged (same source and code)" in caplog.text
        caplog.clear()
        with open(out / "model.safetensors", "r+b") as f:  # one flipped byte in the weights
            f.seek(-1, 2)
            last = f.read(1)
            f.seek(-1, 2)
            f.write(bytes([last[0] ^ 1]))
        assert in_flow(base_model.run, data.model, paths)["files_hash"] == built["files_hash"]  # rebuilt, same bytes
        assert "unchanged" not in caplog.text
        other = data.model.model_copy(update={"tiny": data.model.tiny.model_copy(update={"seed": 1})})
        assert in_flow(base_model.run, other, paths)["files_hash"] != built["files_hash"]


def test_tokenizer_does_not_depend_on_the_corpus_folder(data, tmp_path):
    """Adding PDFs never changes the tokenizer (so cached chunks stay valid): it trains on the fixed sources."""
    p = make_params(tmp_path, pdf_dir=tmp_path / "empty")
    in_flow(base_model.run, p.model, p.paths)
    assert base_model.describe(p.paths.base_model)["tokenizer_hash"] == \
        base_model.describe(data.paths.base_model)["tokenizer_hash"]


def test_chunks_are_token_bounded_and_follow_sections(data):
    chunks = read_jsonl(data.paths.chunks)
    tokenizer = base_model.load_tokenizer(data.paths.base_model)
    docs = {d["doc_id"]: d for d in read_jsonl(data.paths.documents)}
    assert len(chunks) > 8 * len(docs)
    for c in chunks:
        assert len(tokenizer(c["text"], add_special_tokens=False)["input_ids"]) <= data.chunk.max_tokens
        assert c["doc_id"] in docs and c["section"] in docs[c["doc_id"]]["sections"] + [""]
        assert 1 <= c["page_start"] <= c["page_end"] <= docs[c["doc_id"]]["page_count"]
    # Most chunks use their budget: paragraphs are packed, not one per chunk.
    sizes = sorted(c["n_tokens"] for c in chunks)
    assert sizes[len(sizes) // 2] > data.chunk.max_tokens // 2
    # Ids are unique and stable: chunking again gives the same ids.
    assert len({c["chunk_id"] for c in chunks}) == len(chunks)
    again = chunk.chunk_document.fn(next(iter(docs.values())), "", data.chunk, str(data.paths.base_model))
    assert [c["chunk_id"] for c in again] == [c["chunk_id"] for c in chunks if c["doc_id"] == again[0]["doc_id"]]


def test_qa_pairs_are_grounded_varied_and_deduplicated(data):
    pairs = read_jsonl(data.paths.qa)
    report = read_json(data.paths.qa_report)
    chunks = {c["chunk_id"]: c for c in read_jsonl(data.paths.chunks)}
    documents = read_jsonl(data.paths.documents)
    # The sample papers are short: many sections of a few sentences each, and section questions are capped at
    # qa.max_section_share of a document's pairs (191 pairs before the cap and the reader filters, 68 after).
    assert report["kept"] == len(pairs) >= 60
    assert report["documents"] == len(documents)
    # Not one template repeated: several kinds of question, each a real share of the data.
    kinds = report["kept_by_kind"]
    assert {"definition", "method", "section", "fact"} <= set(kinds)
    assert max(kinds.values()) < 0.6 * len(pairs)  # short sample papers: many sections, few sentences each
    for p in pairs:
        assert p["chunk_id"] in chunks and p["doc_id"] == chunks[p["chunk_id"]]["doc_id"]
        assert chunks[p["chunk_id"]].get("kind", "text") == "text"
        assert qa.grounding(p["answer"], chunks[p["chunk_id"]]["text"]) >= data.qa.min_grounding
        assert data.qa.min_answer_chars <= len(p["answer"]) <= data.qa.max_answer_chars
    assert len({normalise(p["question"]) for p in pairs}) == len(pairs)
    # One question per section, not one per chunk of it.
    sections = [(p["doc_id"], p["section"]) for p in pairs if p["kind"] == "section"]
    assert len(sections) == len(set(sections)) >= len(documents)
    # What the LoRA paper proposes is asked, and answered from the paper.
    lora = [p for p in pairs if p["title"].startswith("LoRA") and p["kind"] == "proposal"]
    assert lora and "low-rank" in lora[0]["answer"].lower()


def test_near_duplicate_index_on_disk_finds_what_datasketchs_in_memory_lsh_finds(data):
    from datasketch import MinHashLSH

    questions = [question_key(p) for p in read_jsonl(data.paths.qa)]
    questions += [q.replace("the ", "a ", 1) for q in questions[::3]] + questions[::7]  # near and exact copies
    on_disk, lsh, hashes = NearDuplicates(0.8, 128), MinHashLSH(threshold=0.8, num_perm=128), {}
    found = []
    for q in questions:
        m = minhash(q, 128)
        seen = on_disk.seen(m)
        expected = any(hashes[k].jaccard(m) >= 0.8 for k in lsh.query(m))
        found.append((seen, expected))
        if not seen:
            on_disk.add(m)
            hashes[q] = m
            lsh.insert(q, m)
    assert [s for s, _ in found] == [e for _, e in found]
    assert sum(s for s, _ in found) >= len(questions[::7])  # every exact copy at least


def test_split_is_by_document_and_leak_free(data):
    train, eval_ = read_jsonl(data.paths.train_split), read_jsonl(data.paths.eval_split)
    assert train and eval_
    assert not {p["doc_id"] for p in train} & {p["doc_id"] for p in eval_}
    assert not any(split.seen_in(train, eval_, data.split))
    assert all(p["context"] for p in eval_)  # open-book evaluation needs the source chunk
    assert read_json(data.paths.split_report)["leakage_check"] == "passed"


def test_export_writes_every_format_and_a_card(data):
    counts = export.run(data.export, data.qa, data.paths)
    out = data.paths.export_dir
    train, eval_ = read_jsonl(data.paths.train_split), read_jsonl(data.paths.eval_split)
    assert counts == {"train": len(train), "eval": len(eval_)}
    alpaca = read_jsonl(out / "alpaca" / "train.jsonl")
    assert alpaca[0] == {"instruction": train[0]["question"], "input": "", "output": train[0]["answer"],
                         "system": data.export.system_prompt}
    share = read_jsonl(out / "sharegpt" / "eval.jsonl")
    assert [m["from"] for m in share[0]["conversations"]] == ["human", "gpt"] and len(share) == len(eval_)
    chat = read_jsonl(out / "openai" / "train.jsonl")
    assert [m["role"] for m in chat[0]["messages"]] == ["system", "user", "assistant"] and len(chat) == len(train)
    from datasets import load_from_disk

    ds = load_from_disk(str(out / "hf"))
    assert ds["train"].num_rows == len(train) and ds["eval"].num_rows == len(eval_)
    assert ds["eval"][0]["question"] == eval_[0]["question"] and ds["eval"][0]["context"] == eval_[0]["context"]
    card = (out / "README.md").read_text()
    assert f"| train | {len(train)} |" in card and "generator: `extractive`" in card
    assert all(p["title"] in card for p in train + eval_)


def test_adding_a_pdf_recomputes_only_that_pdf(data, tmp_path, fresh_cache, caplog):
    corpus = tmp_path / "pdfs"
    corpus.mkdir()
    pdfs = sorted(SAMPLE_PDFS.glob("*.pdf"))
    for pdf in pdfs[:3]:
        shutil.copy(pdf, corpus)
    p = make_params(tmp_path, pdf_dir=corpus)
    shutil.copytree(data.paths.base_model, p.paths.base_model)

    def data_half() -> dict:
        caplog.clear()
        with caplog.at_level("INFO"):
            for stage, args in ((ingest, (p.ingest, p.paths)), (chunk, (p.chunk, p.paths)), (qa, (p.qa, p.paths))):
                in_flow(stage.run, *args)
        return {m.split(":")[0]: m.split(": ")[1] for m in caplog.messages if "from cache" in m}

    first = data_half()
    assert first["ingest"] == "3 computed, 0 from cache"
    shutil.copy(pdfs[3], corpus)
    second = data_half()
    assert second["ingest"] == "1 computed, 3 from cache"
    assert second["chunk"] == "1 computed, 3 from cache"
    new_chunks = [c for c in read_jsonl(p.paths.chunks) if c["file"] == pdfs[3].name]
    n_chunks = len(read_jsonl(p.paths.chunks))
    assert new_chunks and n_chunks > len(new_chunks)
    assert second["qa (extractive)"] == "1 computed, 3 from cache"  # the offline QA is cached per document
    assert json.loads(p.paths.qa_report.read_text())["documents"] == 4
