"""Evaluation benchmark: batched (left-padded) generation against answering one question at a time, same
model, same prompts, same run (figures and a ratio, never pass/fail).

Run:  python benchmarks/eval.py [--params params.yaml] [--n 48] [--batch-size 16]
Needs the pipeline's base model and adapter: run `dvc repro train` first.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.adapter import build_prompt, generate, load_finetuned  # noqa: E402
from tasks.common import dir_hash, read_jsonl  # noqa: E402
from tasks.params import load_params  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    p = load_params(args.params)
    model, tokenizer, meta, _ = load_finetuned(str(p.paths.adapter), str(p.paths.base_model), dir_hash(p.paths.adapter))
    rows = read_jsonl(p.paths.eval_split)[: args.n]
    prompts = [build_prompt(tokenizer, r["question"], meta["prompt_template"], meta["system_prompt"]) for r in rows]
    new_tokens = p.evaluate.max_new_tokens
    generate(model, tokenizer, prompts[:2], new_tokens, 2)  # warm-up

    results = {}
    for label, batch_size in (("batched", args.batch_size), ("one by one", 1)):
        start = time.perf_counter()
        answers = generate(model, tokenizer, prompts, new_tokens, batch_size)
        seconds = time.perf_counter() - start
        tokens = sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
        results[label] = (seconds, len(prompts) / seconds, tokens / seconds)
    print(f"generation, {len(prompts)} held-out questions, greedy, max_new_tokens={new_tokens}, "
          f"{meta['quantization']} base + adapter")
    for label, (seconds, qps, tps) in results.items():
        print(f"  {label:<11} {qps:7.2f} questions/s  {tps:8.0f} answer tokens/s  ({seconds:.1f} s)")
    print(f"  ratio batched / one by one: {results['batched'][1] / results['one by one'][1]:.2f}x questions/s")


if __name__ == "__main__":
    main()
