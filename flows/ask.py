"""Ask the base model plus the latest adapter a question from the command line.

Run:  python -m flows.ask "What does LoRA freeze during fine-tuning?" [--params params.yaml] [--base]
      (--base prints the fine-tuned and the base model's answers side by side)
      python -m flows.ask --model models:/papertune-adapter@champion "What does LoRA freeze?"
      (installed as the console script `papertune-ask`)

--model answers with an adapter from the MLflow registry (any models:/ or runs:/ URI of the store in
`mlflow.tracking_uri`), loaded as the pyfunc training logged (tasks/mlflow_model.py).
"""

from __future__ import annotations

import argparse
import sys

from tasks.adapter import build_prompt, generate, load_finetuned
from tasks.hashing import dir_hash
from tasks.log import PipelineError
from tasks.params import load_params


def answers(question: str, params_file: str = "params.yaml", base: bool = False) -> dict[str, str]:
    """{"finetuned": ...} and, with base, {"base": ...}: one model load, the prompt evaluation uses."""
    p = load_params(params_file)
    model, tokenizer, meta, _ = load_finetuned(str(p.paths.adapter), str(p.paths.base_model), dir_hash(p.paths.adapter))
    prompt = build_prompt(tokenizer, question, meta["prompt_template"], meta["system_prompt"])
    out = {"finetuned": generate(model, tokenizer, [prompt], p.evaluate.max_new_tokens, 1)[0]}
    if base:
        with model.disable_adapter():
            out["base"] = generate(model, tokenizer, [prompt], p.evaluate.max_new_tokens, 1)[0]
    return out


def answer(question: str, params_file: str = "params.yaml", base: bool = False) -> str:
    """One answer: the base model's with base=True, else the fine-tuned one's."""
    return answers(question, params_file, base)["base" if base else "finetuned"]


def side_by_side(replies: dict[str, str], width: int = 60) -> str:
    """The two answers in two columns, wrapped."""
    import textwrap

    cols = [textwrap.wrap(replies[k], width) or [""] for k in ("finetuned", "base")]
    lines = [f"{'fine-tuned':<{width}} | base", f"{'-' * width}-+-{'-' * width}"]
    for i in range(max(map(len, cols))):
        left, right = (c[i] if i < len(c) else "" for c in cols)
        lines.append(f"{left:<{width}} | {right}")
    return "\n".join(lines)


def answer_with_model(question: str, model_uri: str, params_file: str = "params.yaml") -> str:
    from tasks.tracking import load_logged_model

    return load_logged_model(load_params(params_file).mlflow, model_uri).predict([question])[0]


def main() -> None:
    parser = argparse.ArgumentParser(description="Ask the fine-tuned model about the papers.")
    parser.add_argument("question")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--base", action="store_true",
                        help="also answer with the base model (adapter disabled), side by side")
    parser.add_argument("--model", help="an MLflow model URI instead of the project's adapter folder, "
                        "e.g. models:/papertune-adapter@champion")
    args = parser.parse_args()
    if args.model and args.base:
        parser.error("--base answers without any adapter: it does not combine with --model")
    try:
        if args.model:
            print(answer_with_model(args.question, args.model, args.params))
        elif args.base:
            print(side_by_side(answers(args.question, args.params, base=True)))
        else:
            print(answers(args.question, args.params)["finetuned"])
    except PipelineError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
