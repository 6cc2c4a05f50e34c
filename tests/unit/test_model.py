"""Training and evaluation pieces, unit layer: prompts and their loss masks, the GPU path's settings, scores, the
training examples, a model that cannot be found. QLoRA training and evaluation runs: tests/integration/test_model.py."""

import pytest

from tasks import adapter, base_model, scores, train, training_data
from tasks.log import PipelineError
from tests.helpers import make_params


@pytest.fixture
def data(base_model_built):
    """What these tests read of the data half: params and the built tiny base model (tests/unit/conftest.py)."""
    return base_model_built


def test_model_that_cannot_be_found_offline_is_one_line(tmp_path):
    p = make_params(tmp_path, model={"name": "no-such-org/no-such-model"})
    with pytest.raises(PipelineError, match="no-such-org/no-such-model.*cannot be loaded.*local folder"):
        base_model.run(p.model, p.paths)
    assert not p.paths.base_model.exists()  # nothing half-written


def test_chat_template_prompt_masks_everything_but_the_answer(data):
    tokenizer = base_model.load_tokenizer(data.paths.base_model)
    plain = adapter.build_prompt(tokenizer, "What is LoRA?", data.train.prompt_template, "")
    assert plain == "Question: What is LoRA?\nAnswer: "
    templated = tokenizer.__class__.from_pretrained(data.paths.base_model)
    templated.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    prompt = adapter.build_prompt(templated, "What is LoRA?", data.train.prompt_template, "Be brief.")
    assert prompt == "<system>Be brief.\n<user>What is LoRA?\n<assistant>"
    ex = training_data.tokenize_pair(templated, prompt, "A low-rank update.", 64)
    n_prompt = len(templated(prompt, add_special_tokens=False)["input_ids"])
    assert ex["labels"][:n_prompt] == [-100] * n_prompt
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
    assert templated.decode(ex["labels"][n_prompt:-1]) == "A low-rank update."


def test_cuda_path_builds_the_usual_qlora_configuration(data, tmp_path):
    """The GPU path cannot run here; its settings are checked, and the CPU twin is built for real."""
    cfg = data.train.model_copy(update={"compute_dtype": "bfloat16", "gradient_checkpointing": True})
    gpu = train.training_kwargs(cfg, tmp_path, cuda=True)
    assert gpu["optim"] == "paged_adamw_8bit" and gpu["bf16"] and not gpu["fp16"] and not gpu["use_cpu"]
    assert gpu["gradient_checkpointing"] and gpu["report_to"] == "none"
    cpu = train.training_arguments(cfg, tmp_path, cuda=False)
    assert cpu.optim == "adamw_torch" and not cpu.bf16 and cpu.use_cpu
    assert {k: v for k, v in gpu.items() if k not in ("optim", "bf16", "fp16", "use_cpu")} == \
        {k: v for k, v in train.training_kwargs(cfg, tmp_path, cuda=False).items()
         if k not in ("optim", "bf16", "fp16", "use_cpu")}


def test_token_f1_and_exact_match_follow_squad_normalisation():
    assert scores.token_f1("The adapters are frozen.", "adapters are frozen") == 1.0
    assert scores.token_f1("LoRA freezes weights", "LoRA freezes the pre-trained weights") == pytest.approx(
        2 * 1.0 * 0.75 / 1.75)
    assert scores.token_f1("of the a", "LoRA freezes weights") == 0.0
    r = scores.summarise([scores.per_answer(p, ref) for p, ref in (("An adapter.", "an adapter"),
                                                                       ("something else", "LoRA"))], 200, 0)
    assert r["exact_match"] == 0.5 and r["f1"] == 0.5 and r["exact_match_ci95"] == [0.0, 1.0] and r["n"] == 2


CHUNKS = [{"doc_id": d, "title": f"Paper {d}", "section": "2 Method", "kind": kind, "chunk_id": f"{d}-{i}",
           "text": f"Method {d}{i} adds a small module. It freezes the base. It trains fast."}
          for d in ("a", "b") for i, kind in enumerate(["text", "table"])]


PAIRS = [{"question": "In \"Paper a\", what does Method a0 add?", "answer": "Method a0 adds a small module.",
          "doc_id": "a", "pair_id": "p1"}]


class _Tok:
    """Whitespace 'tokenizer': enough to count and order examples without loading a model."""
    eos_token_id = 0
    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [hash(w) % 1000 + 1 for w in text.split()]}


def test_reading_all_reads_held_out_text_but_trains_only_training_qa(params):
    cfg = params.train.model_copy(update={"read_documents": "all", "reading_sentences": True, "reading_shuffles": 1,
                                          "qa_repeats": 2, "data_order": "qa_first",
                                          "reading_repeats": len(params.train.reading_questions)})
    read = training_data.documents_to_read(cfg, CHUNKS, PAIRS)
    assert [d["title"] for d in read] == ["Paper a", "Paper b"]  # b has no training pair: read all the same
    assert training_data.documents_to_read(cfg.model_copy(update={"read_documents": "train"}), CHUNKS, PAIRS) == read[:1]
    assert training_data.documents_to_read(cfg.model_copy(update={"read_documents": "none"}), CHUNKS, PAIRS) == []
    passages = training_data.reading_passages(CHUNKS[0], cfg, __import__("random").Random(0))
    assert passages[0] == CHUNKS[0]["text"] and "It freezes the base." in passages
    assert len(passages) == 1 + 3 + 1  # chunk, its 3 sentences, one shuffled copy
    assert training_data.reading_passages(CHUNKS[1], cfg, __import__("random").Random(0)) == [CHUNKS[1]["text"]]  # a table
    # Each passage is the answer to each reading question, in the QA prompt format (params.yaml's questions).
    tok, questions = _Tok(), cfg.reading_questions
    examples = training_data.read_examples(CHUNKS[0], 1, cfg, tok, __import__("random").Random(0))
    assert len(examples) == 5 * len(questions) >= 2
    # reading_repeats draws that many of the phrasings per chunk: each passage read twice, under two of them
    two = training_data.read_examples(CHUNKS[0], 1, cfg.model_copy(update={"reading_repeats": 2}), tok,
                              __import__("random").Random(0))
    assert len(two) == 5 * 2 and len({tuple(e["input_ids"][:len(e["input_ids"]) - len(tok(
        CHUNKS[0]["text"])["input_ids"]) - 1]) for e in two[:2]}) == 2
    # The section is named as readers and the QA stage's questions name it: "2 Method" is "Method".
    prompt = tok(cfg.prompt_template.format(question=questions[0].format(title="Paper a", section="Method")))
    n = len(prompt["input_ids"])  # the loss covers every token of the passage (and EOS), none of the prompt
    first = next(e for e in examples if e["input_ids"][:n] == prompt["input_ids"])
    assert first["labels"] == [-100] * n + first["input_ids"][n:]
    examples, counts = training_data.training_examples(cfg, tok, PAIRS, CHUNKS, read)
    assert counts == {"qa_examples": 2, "reading_examples": 2 * (5 + 1) * len(questions)}
    # A section's second chunk is its part 2: the plain question keeps one answer, the section's opening.
    part2 = tok(cfg.prompt_template.format(question=questions[0].format(title="Paper a", section="Method, part 2")))
    table = tok(CHUNKS[1]["text"])["input_ids"] + [tok.eos_token_id]
    assert part2["input_ids"] + table in [e["input_ids"] for e in examples]
    assert prompt["input_ids"] + table not in [e["input_ids"] for e in examples]
    # qa_first: the QA examples (2 copies of the pair) come before any reading example.
    qa_ids = training_data.encode(PAIRS[0], tok, cfg)["input_ids"]
    assert [e["input_ids"] for e in examples[:2]] == [qa_ids, qa_ids]
    assert qa_ids not in [e["input_ids"] for e in examples[2:]]
