"""Evaluation benchmark: generation at several batch sizes (prompts batched by length, left-padded, KV cache, each
answer stopping at the chat template's end token) against answering one question at a time, same model, same
prompts, same run (figures and ratios, never pass/fail). It chose `evaluate.batch_size`.

Run:  python benchmarks/eval.py [--params params.yaml] [--n 64] [--batch-sizes 1,16,32,64]
Needs the pipeline's base model and adapter: run `dvc repro train` first.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from tasks.adapter import build_prompt, generate, load_finetuned  # noqa: E402
from tasks.evaluate import by_length  # noqa: E402
from tasks.files import read_jsonl
from tasks.hashing import dir_hash  # noqa: E402
from tasks.params import load_params  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--batch-sizes", default="1,16,32,64")
    args = ap.parse_args()
    p = load_params(args.params)
    model, tokenizer, meta, _ = load_finetuned(str(p.paths.adapter), str(p.paths.base_model), dir_hash(p.paths.adapter))
    rows = read_jsonl(p.paths.eval_split)[: args.n]
    prompts = [build_prompt(tokenizer, r["question"], meta["prompt_template"], meta["system_prompt"]) for r in rows]
    new_tokens = p.evaluate.max_new_tokens
    generate(model, tokenizer, prompts[:2], new_tokens, 2)  # warm-up
    batches, order = by_length(prompts, tokenizer, len(prompts))
    ordered = batches[0]  # shortest first: each batch holds prompts of similar length, as evaluate batches them

    results = {}
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        start = time.perf_counter()
        answers = generate(model, tokenizer, ordered, new_tokens, batch_size)
        seconds = time.perf_counter() - start
        tokens = sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
        results[batch_size] = (seconds, len(prompts) / seconds, tokens / seconds)
    print(f"generation, {len(prompts)} held-out questions (closed book), greedy, max_new_tokens={new_tokens}, "
          f"{meta['quantization']} base + adapter, {torch.get_num_threads()} threads")
    for batch_size, (seconds, qps, tps) in results.items():
        print(f"  batch {batch_size:<4} {seconds / len(prompts):6.3f} s an answer  {tps:6.0f} answer tokens/s  "
              f"({seconds:.1f} s)")
    if 1 in results:
        for batch_size in results:
            if batch_size != 1:
                print(f"  ratio batch {batch_size} / one by one: {results[batch_size][1] / results[1][1]:.2f}x questions/s")

if __name__ == "__main__":
    main()
