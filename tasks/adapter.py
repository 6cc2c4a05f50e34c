"""The adapter contract: how a trained adapter is described, prompted, loaded and asked.

Train writes it (META next to the adapter weights); evaluate, ask and the benchmarks read it through this module
only, so none of them imports the training code.

Check an adapter:  python -m tasks.adapter [--params params.yaml]   (prints its META)

One prompt format serves training and generation: `build_prompt` (the tokenizer's chat template when it has one,
else `train.prompt_template`). Greedy generation stops at EOS, which training puts after every answer.
"""

from __future__ import annotations

import json
import threading
from functools import lru_cache
from pathlib import Path

from tqdm.auto import tqdm

from tasks.files import read_json
from tasks.log import PipelineError
from tasks.text import bare_section

META = "papertune.json"  # how the adapter was made and how to prompt it (written by train, read by everyone else)


def build_prompt(tokenizer, question: str, prompt_template: str, system_prompt: str) -> str:
    """The text a question becomes before the answer, in training and at inference alike."""
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": question}
        ]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt_template.format(question=question)


def reading_section(section: str, part: int) -> str:
    """How a question names a chunk's section: without its number ("3.2 Method" → "Method"), as readers and the QA
    stage's questions name it; the second and later chunks of a section are its parts ("Method, part 2")."""
    name = bare_section(section) or section
    return name if part <= 1 else f"{name}, part {part}"


def reading_prompt(tokenizer, chunk: dict, reading_question: str, prompt_template: str, system_prompt: str,
                   part: int = 1) -> str:
    """The prompt a passage is read under: one of `train.reading_questions` about its paper's title and section, in
    the same prompt format as every QA pair (tokenised apart from the passage, like a question from its answer). A
    model that learned the passage as the answer to "what does <paper> say in <section>?" recalls it when asked about
    that paper at evaluation, in the format it was trained and is asked in."""
    question = reading_question.format(title=chunk["title"], section=reading_section(chunk["section"], part))
    return build_prompt(tokenizer, question, prompt_template, system_prompt)


def adapter_meta(adapter_dir: str | Path) -> dict:
    """How the adapter was made and how to prompt it; a one-line error when there is no adapter yet."""
    path = Path(adapter_dir) / META
    if not path.exists():
        raise PipelineError(f"no adapter in {adapter_dir}: train one first (dvc repro train)")
    return read_json(path)


def load_finetuned(adapter_dir: str, base_dir: str, adapter_hash: str):
    """(PeftModel, tokenizer, meta, lock) — one copy per process; base answers come from disable_adapter().
    `adapter_hash` is only part of the cache key: a retrained adapter in the same folder is loaded afresh."""
    with _load_lock:  # evaluation batches run in threads: one load (and peft's lazy imports) at a time
        return _load(adapter_dir, base_dir, adapter_hash)


_load_lock = threading.Lock()


@lru_cache(maxsize=2)
def _load(adapter_dir: str, base_dir: str, adapter_hash: str):
    from peft import PeftModel
    from transformers import AutoTokenizer

    from tasks.base_model import load_model

    meta = adapter_meta(adapter_dir)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    tokenizer.padding_side = "left"  # decoder-only batched generation: prompts end where generation starts
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    base = load_model(base_dir, meta["quantization"], meta["compute_dtype"])
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    if not getattr(tokenizer, "chat_template", None) and (marker := next_question(meta["prompt_template"])):
        model.generation_config.stop_strings = [marker]  # the template's end: a new question begins
    return model, tokenizer, meta, threading.Lock()


def next_question(prompt_template: str) -> str | None:
    """Where a plain-template answer ends if EOS does not come: the start of a next prompt ("\nQuestion:")."""
    head = prompt_template.split("{question}")[0].strip()
    return f"\n{head}" if head else None


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
             progress: bool = False) -> list[str]:
    """Greedy answers, batched with left padding; each stops at EOS (the end of every trained answer) or at the
    model's stop strings (the prompt template's next question), which are cut off."""
    import torch  # here, not at the top: importing tasks.adapter stays cheap (train's prompts)

    answers: list[str] = []
    with torch.inference_mode():
        limit = getattr(model.config, "max_position_embeddings", 2048) - max_new_tokens
        stops = getattr(model.generation_config, "stop_strings", None) or []
        for i in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress):
            batch = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            batch = {k: v[:, -limit:].to(model.device) for k, v in batch.items()}  # keep each prompt's end
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, tokenizer=tokenizer,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            new = out[:, batch["input_ids"].shape[1]:]
            answers += [_cut(a, stops).strip() for a in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return answers


def _cut(answer: str, stops: list[str]) -> str:
    for stop in stops:
        answer = answer.split(stop)[0]
    return answer


if __name__ == "__main__":
    from tasks.params import params_arg

    p = params_arg(__doc__.splitlines()[0])
    try:
        print(json.dumps(adapter_meta(p.paths.adapter), indent=2))
    except PipelineError as e:
        raise SystemExit(f"error: {e}") from None
