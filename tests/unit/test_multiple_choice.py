"""The multiple-choice knowledge score: items a reader would accept as a fair test, and scores that are the model's
own length-normalised log-likelihood of each option."""

import pytest

from tasks.multiple_choice import build_items, chosen, option_scores

ROWS = [
    {"doc_id": "lora", "question": "What does LoRA freeze?", "answer": "LoRA freezes the pre-trained weights."},
    {"doc_id": "lora", "question": "What rank does LoRA use?", "answer": "A rank of 4 to 8 suffices for GPT-3."},
    {"doc_id": "lora", "question": "Where is LoRA applied?", "answer": "To the query and value projections."},
    {"doc_id": "lora", "question": "What is merged at inference?", "answer": "BA is added to W0, so no latency."},
    {"doc_id": "lora", "question": "What is frozen in LoRA?", "answer": "LoRA freezes the pre-trained weights!"},
    {"doc_id": "ia3", "question": "What does IA3 learn?", "answer": "Vectors that rescale inner activations."},
    {"doc_id": "ia3", "question": "How many parameters?", "answer": "About 0.01% of the model's parameters."},
]


def test_items_take_distractors_from_the_same_paper_and_never_a_near_duplicate_of_the_answer():
    items = build_items(ROWS, options=4, max_distractor_f1=0.5, seed=0)
    assert len(items) == len(ROWS)
    first = items[0]
    assert first["options"][first["answer"]] == ROWS[0]["answer"] and len(set(first["options"])) == 4
    # the same answer reworded ("... weights!") is never offered as a wrong option
    assert ROWS[4]["answer"] not in first["options"]
    # LoRA has three other distinct answers: all distractors come from LoRA, none from IA3
    assert set(first["options"]) <= {r["answer"] for r in ROWS if r["doc_id"] == "lora"}
    # IA3 has one other answer: the rest are filled in from other papers
    ia3 = items[5]["options"]
    assert ROWS[6]["answer"] in ia3 and sum(o in {r["answer"] for r in ROWS[:5]} for o in ia3) == 2
    assert build_items(ROWS, 4, 0.5, 0) == items  # seeded: the same items on every run


def test_a_question_with_too_few_distinct_answers_is_left_out():
    rows = [{"doc_id": "a", "question": f"q{i}", "answer": "the same answer"} for i in range(5)]
    assert build_items(rows, options=4, max_distractor_f1=0.5, seed=0) == []


@pytest.fixture(scope="module")
def tiny_lm():
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([r["question"] + " " + r["answer"] for r in ROWS] * 3,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    return model.eval(), tokenizer


def test_option_scores_are_each_options_mean_log_probability_whatever_the_batch(tiny_lm):
    """Batched, right-padded and sorted by length, each score equals the option's mean token log-probability
    computed alone: an off-by-one in the positions or padding that leaks into a score fails here."""
    import torch

    model, tokenizer = tiny_lm
    prompts = ["Question: What does LoRA freeze?\nAnswer: ", "Q: IA3?\nA: "]
    options = [[r["answer"] for r in ROWS[:4]], [ROWS[5]["answer"], ROWS[6]["answer"], "Yes."]]
    batched = option_scores(model, tokenizer, prompts, options, batch_size=3)
    for prompt, opts, got in zip(prompts, options, batched):
        for option, score in zip(opts, got):
            p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            o = tokenizer(option, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([p + o])).logits[0].float(), -1)
            alone = float(torch.stack([logp[len(p) - 1 + k, t] for k, t in enumerate(o)]).mean())
            assert score == pytest.approx(alone, abs=1e-4)
    assert chosen([-2.0, -0.5, -0.5, -3.0]) == 1
