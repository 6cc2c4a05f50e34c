"""The QA stage with the `hf` teacher backend on the builtin tiny model (plumbing: its replies are noise; the
backend alone: tests/unit/test_qa_hf.py)."""

import pytest

from tasks import qa
from tasks.files import write_jsonl
from tasks.log import PipelineError
from tests.helpers import hf_teacher, in_flow, make_params


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Params whose QA teacher is the builtin tiny model, loaded from its local folder by transformers."""
    return hf_teacher(make_params(tmp_path_factory.mktemp("hf")))


CHUNKS = [{"chunk_id": f"c{i}", "doc_id": "d", "title": "LoRA", "section": "2 Method", "page_start": 1,
           "page_end": 1, "kind": "text", "n_tokens": 30 + 40 * i,
           "text": "LoRA freezes the pretrained weights and trains two low-rank matrices. " * (i + 1)}
          for i in range(4)]


@pytest.mark.slow  # generates with a model
def test_malformed_replies_are_counted_never_cached_and_nothing_is_written(tiny, tmp_path):
    result = qa.qa_document(CHUNKS, tiny.qa, tmp_path / "cache")
    assert result["pairs"] == [] and result["teacher"] == {"cache_hits": 0, "sent": 4, "malformed": 4}
    assert not list((tmp_path / "cache").rglob("*.json"))  # a malformed reply is asked again next time
    p = tiny.model_copy(update={"paths": tiny.paths.model_copy(update={
        "chunks": tmp_path / "chunks.jsonl", "qa": tmp_path / "qa.jsonl", "qa_cache": tmp_path / "cache"})})
    write_jsonl(p.paths.chunks, CHUNKS)
    p.paths.qa.write_text('{"previous": "run"}\n')
    with pytest.raises(PipelineError, match="no question-answer pair survived.*malformed replies 4"):
        in_flow(qa.run, p.qa, p.paths)
    assert p.paths.qa.read_text() == '{"previous": "run"}\n'  # the previous good output stays
