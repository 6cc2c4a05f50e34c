"""The item cache every fan-out stage uses: each item's result (a document's chunks, its QA pairs) is cached under
the task's inputs plus the code hash of its module (tasks/hashing.py), computed on the flow's task runner, with a
progress bar.

Infrastructure: editing this module recomputes nothing (a change of key layout only misses the old entries).
"""

from __future__ import annotations

import gc
import inspect
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from prefect import task
from prefect.cache_policies import INPUTS, NO_CACHE, CachePolicy
from prefect.context import TaskRunContext
from tqdm.auto import tqdm

from tasks.files import atomic_write
from tasks.hashing import ROOT, code_hash, content_hash
from tasks.log import logger


def _module_name(fn: Callable) -> str:
    # From the file, not fn.__module__: under `python -m tasks.chunk` (or in a process-pool worker) the
    # module is `__main__`, and the same task must get the same key however the stage was started.
    path = Path(inspect.getsourcefile(fn) or fn.__code__.co_filename).resolve()
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _code_key(context: TaskRunContext, parameters: dict) -> str:
    return code_hash(_module_name(context.task.fn))


# Cache on argument values (pass content hashes and params sections, not paths) plus the source of every project
# module the task's module imports (Prefect's TASK_SOURCE covers only the decorated function: a change in a helper
# such as text.split_sentences, used by qa, would otherwise keep serving stale results).
CACHE = dict(cache_policy=INPUTS + CachePolicy.from_cache_key_fn(_code_key), persist_result=True)


def map_cached(task, items: Iterable, *args, desc: str, star: bool = False) -> list:
    """`map_cached_iter` as a list (for stages whose results are small)."""
    return list(map_cached_iter(task, items, *args, desc=desc, star=star))


WINDOW = 64  # items hashed, looked up and computed at a time: memory stays flat however long the corpus is


def map_cached_iter(task, items: Iterable, *args, desc: str, star: bool = False) -> Iterator:
    """Yield `task.fn(item, *args)` (or `task.fn(*item, *args)` with `star`) for every item, in input order, and log
    how many were computed and how many came from the cache.

    Each item's result is cached on its own under CACHE's rule (the task's inputs, less those its cache policy
    excludes, plus the code of its module and every project module that imports), in the Prefect result folder.
    Only the missing items go to Prefect, as one task run per batch on the flow's task runner (processes or Dask
    use every core): a task run costs the Prefect server 10-50 ms even for a cache hit, which at 1,000 documents
    per stage would cost more than the work. Tasks with persist_result=False are computed every time."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    store = (Path(settings.results.local_storage_path) / "items" / task.name) if task.persist_result else None
    refresh = settings.tasks.refresh_cache
    code = code_hash(_module_name(task.fn)) if store else ""
    excluded = _excluded_inputs(task.cache_policy)
    batch_task = _compute_batch.with_options(name=f"{task.name}-batch")
    bar = tqdm(total=len(items) if hasattr(items, "__len__") else None, desc=desc, unit="item")
    counts = {"computed": 0, "cached": 0}

    def submit(window: list) -> tuple[list, list, dict]:
        keys = [_item_key(task, item, args, star, excluded, code) if store else None for item in window]
        missing = [i for i, k in enumerate(keys) if not store or refresh or not (store / f"{k}.json").exists()]
        size = max(1, min(16, -(-len(missing) // 4)))  # ≥ 4 batches a window: every worker gets some
        futures = {}
        for start in range(0, len(missing), size):
            part = missing[start:start + size]
            fut = batch_task.submit(task.fn, [window[i] for i in part], args, star,
                                    [str(store / f"{keys[i]}.json") if store else None for i in part])
            futures[fut] = part
        return window, keys, futures

    def collect(window: list, keys: list, futures: dict) -> Iterator:
        computed = {}
        for fut, part in futures.items():
            computed.update(zip(part, fut.result()))
        for i in range(len(window)):
            if i in computed:
                counts["computed"] += 1
                yield computed[i]
            else:
                counts["cached"] += 1
                yield json.loads((store / f"{keys[i]}.json").read_text())
            bar.update()
        if futures:
            # Prefect's process-pool futures hold each batch's pickled result in a reference cycle (_ChainedFuture
            # and its callbacks), which only a full collection frees: without one, every result of the stage stayed
            # in memory until its end (97 MB at 1,000 papers). 70 ms a window that computed something.
            futures.clear()
            gc.collect()

    pending = None
    window: list = []
    try:
        for item in items:
            window.append(item)
            if len(window) == WINDOW:
                current = submit(window)  # the next window computes while this one is collected
                if pending:
                    yield from collect(*pending)
                pending, window = current, []
        current = submit(window) if window else None
        for batch in (pending, current):
            if batch:
                yield from collect(*batch)
    finally:  # a failed run leaves no bar behind to be printed again at exit
        bar.close()
    logger().info(f"{desc}: {counts['computed']} computed, {counts['cached']} from cache")


def _excluded_inputs(policy) -> set[str]:
    excluded, stack = set(), [policy]
    while stack:
        p = stack.pop()
        stack.extend(getattr(p, "policies", None) or [])
        excluded.update(getattr(p, "exclude", None) or [])
    return excluded


def _item_key(task, item, args: tuple, star: bool, excluded: set[str], code: str) -> str:
    bound = inspect.signature(task.fn).bind(*(item if star else (item,)), *args).arguments
    return content_hash([task.name, code, {k: v for k, v in bound.items() if k not in excluded}])


@task(cache_policy=NO_CACHE, persist_result=False)
def _compute_batch(fn: Callable, items: list, args: tuple, star: bool, store: list[str | None]) -> list:
    """Compute a batch of items; each result is stored as soon as it exists (a crash keeps the finished ones)."""
    results, uncached = [], None
    for item, path in zip(items, store):
        result = fn(*item, *args) if star else fn(item, *args)
        if path:
            try:
                atomic_write(path, json.dumps(result, ensure_ascii=False))
            except (TypeError, ValueError) as e:  # not JSON (a tensor, a set): computed again next time, never wrong
                uncached = e
        results.append(result)
    if uncached:  # never wrong, but slow: say so rather than let every run recompute in silence
        logger().warning(f"{fn.__name__}: a result is not JSON ({uncached}), so it is not cached: it is computed "
                         f"again on every run")
    return results
