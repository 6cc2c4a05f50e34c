"""Ask the base model plus the latest adapter a question from the command line.

Run:  python -m flows.ask "What does LoRA freeze during fine-tuning?" [--params params.yaml] [--base]
      (installed as the console script `papertune-ask`)
"""

from __future__ import annotations

import argparse
import sys

from tasks.common import PipelineError, dir_hash
from tasks.evaluate import generate, load_finetuned
from tasks.params import load_params
from tasks.train import build_prompt


def answer(question: str, params_file: str = "params.yaml", base: bool = False) -> str:
    p = load_params(params_file)
    model, tokenizer, meta, _ = load_finetuned(str(p.paths.adapter), str(p.paths.base_model), dir_hash(p.paths.adapter))
    prompt = build_prompt(tokenizer, question, meta["prompt_template"], meta["system_prompt"])
    if base:
        with model.disable_adapter():
            return generate(model, tokenizer, [prompt], p.evaluate.max_new_tokens, 1)[0]
    return generate(model, tokenizer, [prompt], p.evaluate.max_new_tokens, 1)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description="Ask the fine-tuned model about the papers.")
    parser.add_argument("question")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--base", action="store_true", help="answer with the base model (adapter disabled)")
    args = parser.parse_args()
    try:
        print(answer(args.question, args.params, args.base))
    except PipelineError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
