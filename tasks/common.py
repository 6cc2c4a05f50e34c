"""What every stage shares: atomic file writes, JSONL, content hashes, the Prefect cache policy, fan-out with a
progress bar, and the entry point that runs one stage alone (`python -m tasks.<stage> --params FILE`)."""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.cache_policies import INPUTS, CachePolicy
from prefect.context import TaskRunContext
from prefect.futures import as_completed
from tqdm.auto import tqdm

from tasks.params import Params, RunnerParams, params_arg


class PipelineError(Exception):
    """A failure the user can fix (bad input, missing file): shown as one line, not a traceback."""


class _OneLinePipelineErrors(logging.Filter):
    """Prefect logs a failed flow or task run with its traceback; for a PipelineError the message is the news."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], PipelineError):
            record.exc_info, record.exc_text = None, None
        return True


for _name in ("prefect.flow_runs", "prefect.task_runs"):
    logging.getLogger(_name).addFilter(_OneLinePipelineErrors())


# ---------------------------------------------------------------------------------------------- files


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write to a temp file beside `path`, then rename: a crash leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Fill a staging folder beside `out`, then swap it in whole: a crash leaves the previous folder intact."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield staging
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if out.exists():
            out.rename(old)
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path} does not exist: run the stage that writes it first (dvc repro)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------- hashes


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def content_hash(obj: Any) -> str:
    """Stable hash of JSON-able content (key order does not matter)."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode())


def dir_hash(path: str | Path) -> str:
    """Hash of every file's relative name and bytes under a folder."""
    path = Path(path)
    return content_hash({str(p.relative_to(path)): sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()})


# ---------------------------------------------------------------------------------------------- Prefect caching


def _module_source(context: TaskRunContext, parameters: dict) -> str:
    # Prefect's TASK_SOURCE hashes only the decorated function; the logic lives in the module's helpers,
    # so a change anywhere in the stage module must invalidate its cached results.
    module = sys.modules[context.task.fn.__module__]
    return sha256_bytes(inspect.getsource(module).encode())


# Cache on argument values (pass content hashes and params sections, not paths) plus the stage module's source.
CACHE = dict(cache_policy=INPUTS + CachePolicy.from_cache_key_fn(_module_source), persist_result=True)


def logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except Exception:  # outside a flow run (a plain function call in a test or notebook)
        return logging.getLogger("papertune")


def map_cached(task, items: list, *args, desc: str) -> list:
    """Run `task(item, *args)` for every item on the flow's task runner, with a progress bar, and log how many
    results were computed and how many came from the cache. Returns results in input order."""
    futures = [task.submit(item, *args) for item in items]
    index = {id(f): i for i, f in enumerate(futures)}
    results: list = [None] * len(futures)
    cached = 0
    for fut in tqdm(as_completed(futures), total=len(futures), desc=desc, unit="item", disable=not futures):
        results[index[id(fut)]] = fut.result()
        cached += fut.state.name == "Cached"
    logger().info(f"{desc}: {len(futures) - cached} computed, {cached} from cache")
    return results


# ---------------------------------------------------------------------------------------------- running


def task_runner(runner: RunnerParams):
    """Prefect task runner chosen in params: threads, processes, or Dask (local cluster or a scheduler address)."""
    if runner.kind == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=runner.max_workers)
    if runner.kind == "processes":
        from prefect.task_runners import ProcessPoolTaskRunner

        return ProcessPoolTaskRunner(max_workers=runner.max_workers)
    from prefect_dask import DaskTaskRunner

    if runner.dask_address:
        return DaskTaskRunner(address=runner.dask_address)
    return DaskTaskRunner(
        cluster_kwargs={"n_workers": runner.max_workers, "threads_per_worker": 1, "processes": True,
                        "dashboard_address": None}
    )


RECORD = "record"  # a stage argument that receives all params only to record them (MLflow, the adapter folder)


def stage_sections(stage: Callable) -> list[str]:
    """The params sections a stage reads: its parameter names (dvc.yaml must declare the same, less `paths`)."""
    return [name for name in inspect.signature(stage).parameters if name != RECORD]


def call_stage(stage: Callable, params: Params):
    kwargs = {name: getattr(params, name) for name in stage_sections(stage)}
    if RECORD in inspect.signature(stage).parameters:
        kwargs[RECORD] = params
    return stage(**kwargs)


def run_stage(stage: Callable, name: str) -> None:
    """Entry point of `python -m tasks.<name>`: load params, run the stage inside a Prefect flow, and turn a
    PipelineError into one line on stderr and exit code 1."""
    params = params_arg(f"papertune stage: {name}")
    stage_flow = flow(name=f"papertune-{name}", task_runner=task_runner(params.runner))(
        lambda: call_stage(stage, params)
    )
    try:
        stage_flow()
    except PipelineError as e:
        sys.exit(f"error: {name}: {e}")
