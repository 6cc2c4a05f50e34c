"""The `hf` teacher backend on the builtin tiny model (plumbing: its replies are noise), and the request cache.
The QA stage on its replies: tests/integration/test_qa_hf.py."""

import pytest

from tasks import qa, teacher
from tests.helpers import hf_teacher, make_params


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Params whose QA teacher is the builtin tiny model, loaded from its local folder by transformers."""
    return hf_teacher(make_params(tmp_path_factory.mktemp("hf")))


@pytest.mark.slow  # generates with a model
def test_batched_left_padded_generation_matches_one_by_one(tiny, tmp_path):
    prompts = [f"Question {i}: " + "what does LoRA freeze? " * (i * 3 + 1) for i in range(4)]  # unequal lengths
    batched = teacher.complete(teacher.endpoint(tiny.qa, "teacher"), prompts, tmp_path / "a")
    one = tiny.qa.model_copy(update={"hf": tiny.qa.hf.model_copy(update={"batch_size": 1})})
    single = teacher.complete(teacher.endpoint(one, "teacher"), prompts, tmp_path / "b")
    assert batched == single and all(isinstance(r, str) and r for r in batched)
    # Every reply is now cached: asking again generates nothing.
    stats = teacher.Counter()
    assert teacher.complete(teacher.endpoint(tiny.qa, "teacher"), prompts, tmp_path / "a", stats=stats) == batched
    assert stats == {"cache_hits": 4}


def test_pairs_asked_in_proportion_to_chunk_length(tmp_path):
    cfg = make_params(tmp_path).qa
    cfg = cfg.model_copy(update={"max_pairs_per_chunk": 3,
                                 "teacher": cfg.teacher.model_copy(update={"tokens_per_pair": 40})})
    # 10 / 40 tokens: at least one pair; 50 / 40 = 1.25 → 1 and 70 / 40 = 1.75 → 2 (rounded, neither floor nor
    # ceiling); 110 / 40 → 3; 150 / 40 = 3.75 → 3, the cap.
    assert [qa.pairs_wanted({"n_tokens": n}, cfg) for n in (10, 50, 70, 110, 150)] == [1, 1, 2, 3, 3]
    prompt = cfg.teacher.prompt_template.format(title="LoRA", section="2 Method", text="T", n=3)
    assert "Write 3 question-answer pairs" in prompt and '"LoRA"' in prompt and "Table 3" in prompt


def test_request_key_covers_model_prompt_and_sampling(tiny, tmp_path):
    ep = teacher.endpoint(tiny.qa, "teacher")
    rev = teacher.model_revision(ep)
    key = teacher.request_key(ep, rev, "prompt")
    assert key == teacher.request_key(ep, rev, "prompt")
    hotter = teacher.Endpoint(ep.backend, ep.settings, 0.7, ep.max_new_tokens)
    assert len({key, teacher.request_key(ep, rev, "prompt!"), teacher.request_key(hotter, rev, "prompt"),
                teacher.request_key(ep, "other-revision", "prompt")}) == 4
    # A rebuilt local model is another model: its folder's fingerprint changes, so no reply of the old one is reused.
    (tiny.paths.base_model / "config.json").touch()
    assert teacher.model_revision(ep) != rev
