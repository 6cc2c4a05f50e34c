"""The data half on the sample corpus: base model → chunks → QA → split, and incremental re-runs."""

import json
import shutil

import pytest

from tasks import base_model, chunk, ingest, qa, split
from tasks.common import PipelineError, read_json, read_jsonl
from tests.conftest import SAMPLE_PDFS, data_half, in_flow, make_params


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The sample corpus through ingest, base_model, chunk, qa and split, once for this module."""
    return data_half(make_params(tmp_path_factory.mktemp("data")))


def test_builtin_model_loads_with_from_pretrained_and_fits_bitsandbytes(data):
    from transformers import AutoModelForCausalLM

    info = base_model.describe(data.paths.base_model)
    model = AutoModelForCausalLM.from_pretrained(info["load_from"])
    tokenizer = base_model.load_tokenizer(data.paths.base_model)
    assert model.config.vocab_size >= len(tokenizer)
    assert all(m.out_features % 32 == 0 for m in model.modules() if type(m).__name__ == "Linear")
    # A byte-level BPE trained on the papers encodes their vocabulary compactly and round-trips any text.
    text = "LoRA freezes the pre-trained weights; ﬁne-tuning Δ ≈ 0.5%"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert len(tokenizer("low-rank adaptation")["input_ids"]) <= 5


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


def test_long_paragraph_is_cut_at_sentences_with_overlap(data):
    tokenizer = base_model.load_tokenizer(data.paths.base_model)
    sentences = [f"Sentence number {i} explains one more detail of low-rank adaptation." for i in range(60)]
    doc = {"doc_id": "d" * 64, "title": "T", "file": "t.pdf",
           "pages": [{"page": 1, "blocks": [{"kind": "heading", "level": 1, "text": "1 Intro"},
                                            {"kind": "text", "text": " ".join(sentences)}]}]}
    out = chunk.chunk_document.fn(doc, "", data.chunk, str(data.paths.base_model))
    assert len(out) > 2
    for a, b in zip(out, out[1:]):
        assert len(tokenizer(a["text"])["input_ids"]) <= data.chunk.max_tokens
        assert a["text"].endswith(".") and b["text"].startswith("Sentence")  # whole sentences only
        assert b["text"].startswith(chunk.split_sentences(a["text"])[-1])  # the last sentence is repeated (overlap)


def test_qa_pairs_are_grounded_varied_and_deduplicated(data):
    pairs = read_jsonl(data.paths.qa)
    report = read_json(data.paths.qa_report)
    chunks = {c["chunk_id"]: c for c in read_jsonl(data.paths.chunks)}
    assert report["kept"] == len(pairs) >= 100
    assert report["documents"] == len(read_jsonl(data.paths.documents))
    # Not one template repeated: several kinds of question, each a real share of the data.
    kinds = report["kept_by_kind"]
    assert {"proposal", "definition", "method", "result", "section"} <= set(kinds)
    assert max(kinds.values()) < 0.75 * len(pairs)
    for p in pairs:
        assert p["chunk_id"] in chunks and p["doc_id"] == chunks[p["chunk_id"]]["doc_id"]
        assert qa.grounding(p["answer"], chunks[p["chunk_id"]]["text"]) >= data.qa.min_grounding
        assert data.qa.min_answer_chars <= len(p["answer"]) <= data.qa.max_answer_chars
    assert len({qa.normalise(p["question"]) for p in pairs}) == len(pairs)
    # What the LoRA paper proposes is asked, and answered from the paper.
    lora = [p for p in pairs if p["title"].startswith("LoRA") and p["kind"] == "proposal"]
    assert lora and "low-rank" in lora[0]["answer"].lower()


def test_qa_filters_drop_and_count(data):
    chunk_ = {"chunk_id": "c1", "text": "Adapters add few parameters. LoRA freezes the weights and trains A and B."}
    pairs = [
        {"chunk_id": "c1", "question": "What does LoRA freeze?", "answer": "LoRA freezes the weights and trains A and B."},
        {"chunk_id": "c1", "question": "what does LoRA freeze", "answer": "LoRA freezes the weights and trains A and B."},
        {"chunk_id": "c1", "question": "What is DoRA's magnitude?", "answer": "The magnitude vector is learned per column."},
        {"chunk_id": "c1", "question": "Why?", "answer": "LoRA freezes the weights and trains A and B."},
    ]
    kept, dropped = qa.keep_pairs(pairs, {"c1": chunk_}, data.qa)
    assert [p["question"] for p in kept] == ["What does LoRA freeze?"]
    assert dropped == {"duplicate_question": 1, "not_grounded": 1, "question_length": 1}


def test_split_is_by_document_and_leak_free(data):
    train, eval_ = read_jsonl(data.paths.train_split), read_jsonl(data.paths.eval_split)
    assert train and eval_
    assert not {p["doc_id"] for p in train} & {p["doc_id"] for p in eval_}
    assert not {qa.normalise(p["question"]) for p in train} & {qa.normalise(p["question"]) for p in eval_}
    assert all(p["context"] for p in eval_)  # open-book evaluation needs the source chunk
    assert read_json(data.paths.split_report)["leakage_check"] == "passed"


def test_leakage_check_fails_loudly():
    train = [{"doc_id": "a", "question": "What is LoRA?"}]
    with pytest.raises(PipelineError, match="leakage: 1 eval document"):
        split.check_leakage(train, [{"doc_id": "a", "question": "Other?"}])
    with pytest.raises(PipelineError, match="1 eval question"):
        split.check_leakage(train, [{"doc_id": "b", "question": "what is LoRA"}])


def test_split_is_stable_when_documents_are_added(data):
    docs = [f"{i:064x}" for i in range(40)]
    before = split.assign(docs[:20], data.split)
    after = split.assign(docs, data.split)
    assert before == after & set(docs[:20])  # no old document changed side
    assert 0.1 < len(after) / len(docs) < 0.45
    with pytest.raises(PipelineError, match="at least 2"):
        split.assign(docs[:1], data.split)


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
    assert second["qa (extractive)"] == f"{len(new_chunks)} computed, {n_chunks - len(new_chunks)} from cache"
    assert json.loads(p.paths.qa_report.read_text())["documents"] == 4
