"""Teacher models: one chat-completion call for any stage, through an OpenAI-compatible endpoint or a local
transformers model, with every reply cached on disk.

Used by the QA stage (teacher and judge) and by anything else that needs an LLM's answer:

    from tasks.teacher import complete, endpoint
    replies = complete(endpoint(p.qa, "judge"), prompts, p.paths.qa_cache, valid=lambda r: parse(r) is not None)

`complete` returns one reply per prompt, in order; None where the reply failed `valid` (malformed). A reply is
cached under a hash of backend, model, revision, the full prompt and the sampling params, and only when it is
valid: a malformed reply is asked again on the next run, a good one never. An endpoint that keeps failing stops
the run with one line naming it (base_url, status, attempts) after the replies already received are cached.
torch and transformers are imported only when the `hf` backend really has to generate (stages import fast).
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from tasks.files import atomic_write
from tasks.hashing import content_hash
from tasks.log import PipelineError, logger
from tasks.params import HFParams, OpenAIParams, QAParams


@dataclass(frozen=True)
class Endpoint:
    """Which model answers and how it samples."""

    backend: str  # a key of GENERATORS: "openai" | "hf"
    settings: OpenAIParams | HFParams
    temperature: float
    max_new_tokens: int


def endpoint(qa: QAParams, role: str) -> Endpoint:
    """The QA teacher (role "teacher", backend qa.backend) or the judge (role "judge", backend qa.judge.backend)."""
    cfg = qa.teacher if role == "teacher" else qa.judge
    backend = qa.backend if role == "teacher" else qa.judge.backend
    return Endpoint(backend, getattr(qa, backend), cfg.temperature, cfg.max_new_tokens)


def strip_fence(content: str) -> str:
    """A JSON reply without the Markdown code fence chat models like to put around it."""
    text = content.strip()
    return re.sub(r"^```(?:json)?\s*|\s*```$", "", text) if text.startswith("```") else text


# ---------------------------------------------------------------------------------------------- request cache


def model_revision(ep: Endpoint) -> str:
    """What pins the model's weights: the Hub revision, or for a local folder a fingerprint of its files
    (re-saving a model changes it, so a rebuilt model is never answered from another model's replies)."""
    if ep.backend == "hf" and Path(ep.settings.model).is_dir():
        files = sorted(p for p in Path(ep.settings.model).rglob("*") if p.is_file())
        return content_hash([[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files])
    return getattr(ep.settings, "revision", "")


def request_key(ep: Endpoint, revision: str, prompt: str) -> str:
    return content_hash({"backend": ep.backend, "model": ep.settings.model, "revision": revision, "prompt": prompt,
                         "temperature": ep.temperature, "max_new_tokens": ep.max_new_tokens})


def _cache_file(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / key[:2] / f"{key}.json"


def _cached(cache_dir: Path, key: str) -> str | None:
    try:
        return json.loads(_cache_file(cache_dir, key).read_text())["reply"]
    except (OSError, ValueError, KeyError, TypeError):  # absent, or a torn/foreign file: ask again
        return None


def complete(ep: Endpoint, prompts: list[str], cache_dir: str | Path, valid: Callable[[str], bool] | None = None,
             stats: Counter | None = None) -> list[str | None]:
    """One reply per prompt (None where `valid` rejects it). Counts go to `stats`: cache_hits, sent, malformed."""
    stats = Counter() if stats is None else stats
    valid = valid or (lambda reply: True)
    revision = model_revision(ep)
    keys = [request_key(ep, revision, p) for p in prompts]
    replies: list[str | None] = [_cached(cache_dir, k) for k in keys]
    todo = [i for i, r in enumerate(replies) if r is None or not valid(r)]
    stats["cache_hits"] += len(prompts) - len(todo)
    for i in todo:
        replies[i] = None

    def store(i: int, reply: str) -> None:  # called as each reply arrives: a crash later loses nothing
        stats["sent"] += 1
        if valid(reply):
            atomic_write(_cache_file(cache_dir, keys[i]), json.dumps({"reply": reply, "model": ep.settings.model}))
            replies[i] = reply
        else:
            stats["malformed"] += 1

    if todo:
        GENERATORS[ep.backend](ep, [prompts[i] for i in todo], lambda j, reply: store(todo[j], reply))
    logger().debug(f"{ep.backend} {ep.settings.model}: {len(prompts) - len(todo)} cached, {len(todo)} sent")
    return replies


# ---------------------------------------------------------------------------------------------- openai


_SLOTS: dict[int, threading.BoundedSemaphore] = {}


def _slot(limit: int) -> threading.BoundedSemaphore:
    # Bounds requests in flight across the threads of this process (the task runner may run several documents).
    return _SLOTS.setdefault(limit, threading.BoundedSemaphore(limit))


def _ask_openai(client, ep: Endpoint, prompt: str) -> str:
    """One chat completion with retries: 429, 5xx, connection errors, timeouts and non-JSON bodies (an HTML
    error page from a proxy) are retried with exponential backoff; any other status fails at once."""
    import openai

    cfg: OpenAIParams = ep.settings
    problem = ""
    for attempt in range(1, cfg.max_retries + 2):
        try:
            with _slot(cfg.max_concurrency):
                reply = client.chat.completions.create(
                    model=cfg.model, temperature=ep.temperature, max_tokens=ep.max_new_tokens,
                    messages=[{"role": "user", "content": prompt}])
            if getattr(reply, "choices", None):
                return reply.choices[0].message.content or ""
            problem = "HTTP 200 with a body that is not a chat completion (HTML or plain text?)"
        except openai.APIStatusError as e:
            problem = f"HTTP {e.status_code}"
            if e.status_code != 429 and e.status_code < 500:
                break  # a wrong key, model name or URL does not get better by asking again
        except openai.APITimeoutError:
            problem = f"no answer within {cfg.timeout_s} s"
        except openai.APIConnectionError:
            problem = "connection failed"
        except (openai.APIResponseValidationError, ValueError):
            problem = "HTTP 200 with a body that is not valid JSON"
        if attempt <= cfg.max_retries:
            time.sleep(min(0.5 * 2 ** (attempt - 1), 8.0))
    raise PipelineError(f"teacher endpoint {cfg.base_url} (model {cfg.model}) failed after {attempt} attempt(s): "
                        f"{problem}")


def _openai(ep: Endpoint, prompts: list[str], on_reply: Callable[[int, str], None]) -> None:
    from openai import OpenAI

    cfg: OpenAIParams = ep.settings
    key = os.environ.get(cfg.api_key_env)
    if not key:
        raise PipelineError(f"the openai backend needs the API key in the environment variable {cfg.api_key_env}")
    client = OpenAI(base_url=cfg.base_url, api_key=key, max_retries=0, timeout=cfg.timeout_s)  # retries: ours
    error = None
    with ThreadPoolExecutor(max_workers=cfg.max_concurrency) as pool:
        futures = {pool.submit(_ask_openai, client, ep, p): i for i, p in enumerate(prompts)}
        for f in as_completed(futures):  # replies are handed over (and cached) in this thread as they arrive
            if f.cancelled():
                continue
            if f.exception() is not None:
                if error is None:  # stop asking a broken endpoint; replies already received are kept
                    error = f.exception()
                    for g in futures:
                        g.cancel()
                continue
            on_reply(futures[f], f.result())
    if error is not None:
        raise error


# ---------------------------------------------------------------------------------------------- hf (transformers)


_LOAD = threading.Lock()  # one import/load at a time: transformers' lazy imports race in threads


@lru_cache(maxsize=2)
def _hf_model(model: str, revision: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model, revision=revision)
    tokenizer.padding_side = "left"  # decoder-only batches: the prompts must end where generation starts
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    gpu = torch.cuda.is_available()
    net = AutoModelForCausalLM.from_pretrained(model, revision=revision,
                                               dtype=torch.bfloat16 if gpu else torch.float32,
                                               device_map="auto" if gpu else None)
    return tokenizer, net.eval(), threading.Lock()


def _hf(ep: Endpoint, prompts: list[str], on_reply: Callable[[int, str], None]) -> None:
    import torch

    cfg: HFParams = ep.settings
    with _LOAD:
        try:
            tokenizer, net, busy = _hf_model(cfg.model, cfg.revision)
        except OSError as e:
            raise PipelineError(f"qa hf model {cfg.model!r} cannot be loaded ({str(e).splitlines()[0][:160]}); "
                                "download it first or point qa.hf.model at a local folder") from None
    if tokenizer.chat_template:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts]
    else:  # a base model without a chat template still gets a clear place to answer
        texts = [cfg.fallback_template.format(prompt=p) for p in prompts]
    sampling = {"do_sample": True, "temperature": ep.temperature} if ep.temperature > 0 else {"do_sample": False}
    for start in range(0, len(texts), cfg.batch_size):
        batch = tokenizer(texts[start:start + cfg.batch_size], return_tensors="pt", padding=True,
                          add_special_tokens=not tokenizer.chat_template).to(net.device)
        with busy, torch.inference_mode():  # one generate at a time on the shared model
            out = net.generate(**batch, max_new_tokens=ep.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                               **sampling)
        for j, seq in enumerate(out[:, batch["input_ids"].shape[1]:]):
            on_reply(start + j, tokenizer.decode(seq, skip_special_tokens=True))


GENERATORS = {"openai": _openai, "hf": _hf}
