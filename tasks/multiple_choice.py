"""Multiple-choice knowledge score: does the model prefer a held-out question's reference answer to three others?

Used by tasks/evaluate.py (closed book, base and fine-tuned). No generation: each option is scored by the model's
mean log-probability per token of the option after the question's prompt (length-normalised, as in InstructLab's
MMLU branch and lm-evaluation-harness's `acc_norm` idea), and the best-scoring option is the model's choice. That
is deterministic and cheap on a CPU (one forward pass per option), and it measures what the model knows without
asking a 135M model to phrase it.

Distractors are answers to other held-out questions, from the same document where it has enough (so the options
share a topic and vocabulary, and a model cannot pick the reference by its subject alone), never a near-duplicate
of the reference (token F1 against it at most `evaluate.multiple_choice.max_distractor_f1`).
"""

from __future__ import annotations

import random
from collections import defaultdict

from tasks.scores import token_f1


def build_items(rows: list[dict], options: int, max_distractor_f1: float, seed: int) -> list[dict]:
    """One item per row that can get `options - 1` distractors: {"row": i, "options": [...], "answer": index}.
    The draw is seeded by the question itself, so an item does not change when other rows come or go."""
    by_doc: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        by_doc[r.get("doc_id", "")].append(i)
    items = []
    for i, row in enumerate(rows):
        rng = random.Random(f"{seed}:{row['question']}")
        same = [j for j in by_doc[row.get("doc_id", "")] if j != i]
        other = [j for j in range(len(rows)) if rows[j].get("doc_id", "") != row.get("doc_id", "")]
        picked: list[str] = []
        for pool in (rng.sample(same, len(same)), rng.sample(other, len(other))):
            for j in pool:
                candidate = rows[j]["answer"]
                if len(picked) == options - 1:
                    break
                if all(token_f1(candidate, kept) <= max_distractor_f1 for kept in [row["answer"], *picked]):
                    picked.append(candidate)
        if len(picked) < options - 1:
            continue
        choices = [row["answer"], *picked]
        rng.shuffle(choices)
        items.append({"row": i, "options": choices, "answer": choices.index(row["answer"])})
    return items


def option_scores(model, tokenizer, prompts: list[str], options: list[list[str]], batch_size: int) -> list[list[float]]:
    """Mean log-probability per token of each option after its prompt, for every (prompt, options) pair.
    The option is tokenised apart from the prompt, as training tokenises an answer apart from its question."""
    import torch

    pairs = [(p, o) for p, opts in zip(prompts, options) for o in opts]
    encoded = [(tokenizer(p, add_special_tokens=False)["input_ids"], tokenizer(o, add_special_tokens=False)["input_ids"])
               for p, o in pairs]
    order = sorted(range(len(encoded)), key=lambda k: len(encoded[k][0]) + len(encoded[k][1]))  # batch by length
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    scores = [0.0] * len(encoded)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            seqs = [encoded[k][0] + encoded[k][1] for k in batch]
            width = max(map(len, seqs))
            ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
            # Logits only where an option token is predicted (the token at t by the logits at t - 1): the head's
            # 49k-wide rows at every prompt position would cost more than the rest of the forward pass.
            keep = torch.zeros_like(ids, dtype=torch.bool)
            for row, k in enumerate(batch):
                start = len(encoded[k][0]) - 1
                keep[row, start:start + len(encoded[k][1])] = True
            logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits  # kept rows, in order
            targets = torch.tensor([t for k in batch for t in encoded[k][1]])
            token_logprobs = torch.log_softmax(logits.reshape(len(targets), -1).float(), -1)[
                torch.arange(len(targets)), targets]
            for k, part in zip(batch, token_logprobs.split([len(encoded[k][1]) for k in batch])):
                scores[k] = float(part.mean())
    out, k = [], 0
    for opts in options:
        out.append(scores[k:k + len(opts)])
        k += len(opts)
    return out


def chosen(scores: list[float]) -> int:
    """The option the model prefers (the first of equals)."""
    return max(range(len(scores)), key=scores.__getitem__)
