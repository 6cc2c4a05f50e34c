"""What every stage shares: atomic file writes, JSONL, content hashes, the Prefect cache policy (inputs + the
source of every project module a task imports), fan-out with a progress bar, the project lock, and the entry
point that runs one stage alone (`python -m tasks.<stage> --params FILE`).

Print the code deps dvc.yaml must declare for each stage, or write them into dvc.yaml (tests/test_faults.py checks):
    python -m tasks.common --dvc-deps [--write]
"""

from __future__ import annotations

import ast
import errno
import fcntl
import gc
import hashlib
import inspect
import json
import logging
import os
import re
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from functools import lru_cache
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import INPUTS, NO_CACHE, CachePolicy
from prefect.context import TaskRunContext
from tqdm.auto import tqdm

from tasks.params import Params, Paths, RunnerParams, params_arg
from tasks.prefect_server import local_server


class PipelineError(Exception):
    """A failure the user can fix (bad input, missing file): shown as one line, not a traceback."""


class _OneLinePipelineErrors(logging.Filter):
    """Prefect logs a failed flow or task run with its traceback; for a PipelineError the message is the news."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], PipelineError):
            record.exc_info, record.exc_text = None, None
        return True


_SECTION_NUMBER = re.compile(r"^(?:[A-Z]|\d+)(?:\.\d+)*\.?\s+")


def bare_section(section: str) -> str:
    """A heading without its number, as a reader names it: "3.2 Method" → "Method", "A.1 Proofs" → "Proofs"."""
    return _SECTION_NUMBER.sub("", section).strip()


def shown(text: object) -> str:
    """Text from the inputs (a file name, a title) as it may appear in a log line or an error: control characters
    (newlines, ANSI escapes) are shown escaped, so a crafted name cannot forge log lines or recolour a terminal."""
    text = str(text)
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class _EscapeControlChars(logging.Filter):
    """Every pipeline log line is one line of data: file names and titles reach log messages verbatim."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.isprintable():
            record.msg, record.args = shown(message), None
        return True


for _name in ("prefect.flow_runs", "prefect.task_runs", "papertune"):
    logging.getLogger(_name).addFilter(_OneLinePipelineErrors())
    logging.getLogger(_name).addFilter(_EscapeControlChars())


# ---------------------------------------------------------------------------------------------- files


# mkstemp/mkdtemp create 0600/0700 entries; outputs get the permissions any other file here would (the umask).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextmanager
def _writable(path: Path) -> Iterator[None]:
    """An OS error while writing an output is the user's to fix (permissions, full disk): say which path."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR,
                           errno.EEXIST):
            raise
        raise PipelineError(f"cannot write {shown(path)}: {e.strerror} (make its folder writable, free space, "
                            "or point paths.* in params.yaml elsewhere)") from None


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write to a temp file beside `path`, then rename: a crash leaves the previous file intact."""
    path = Path(path)
    with _writable(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data.encode() if isinstance(data, str) else data)
            os.chmod(tmp, 0o666 & ~_UMASK)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


@contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Fill a staging folder beside `out`, then swap it in whole: a crash leaves the previous folder intact."""
    out = Path(out)
    with _writable(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        os.chmod(staging, 0o777 & ~_UMASK)
    try:
        yield staging
        follow_umask(staging)
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if out.exists():
            out.rename(old)
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def follow_umask(folder: str | Path) -> None:
    """Give everything under `folder` the mode a new file or folder gets from the umask: libraries write 0600 files
    (safetensors 0.8 does), and an output, a checkpoint too, gets the permissions any other file here would."""
    for entry in Path(folder).rglob("*"):
        if not entry.is_symlink():
            os.chmod(entry, (0o777 if entry.is_dir() else 0o666) & ~_UMASK)


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    """Stream rows (any iterable, a generator too) into a temp file, then rename; returns how many were written."""
    path = Path(path)
    n = 0
    with _writable(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                    n += 1
            os.chmod(tmp, 0o666 & ~_UMASK)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return n


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSONL file; a line that is not a JSON object stops the run naming the file and line."""
    return list(iter_jsonl(path))


def iter_jsonl(path: str | Path) -> Iterator[dict]:
    """`read_jsonl` one row at a time (a corpus of any size in flat memory); a missing file fails at once."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{shown(path)} does not exist: run the stage that writes it first (dvc repro)")
    return _rows(path)


def _rows(path: Path) -> Iterator[dict]:
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8").rstrip("\r\n"))
            except UnicodeDecodeError as e:
                raise PipelineError(f"{shown(path)}:{number}: not UTF-8 text (byte {e.start + 1}); "
                                    "fix or delete that line, or rerun the stage that writes the file") from None
            except json.JSONDecodeError as e:
                raise PipelineError(f"{shown(path)}:{number}: not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno}); "
                                    "fix or delete that line, or rerun the stage that writes the file") from None
            if not isinstance(row, dict):
                raise PipelineError(f"{shown(path)}:{number}: expected a JSON object, got {type(row).__name__}; "
                                    "fix or delete that line, or rerun the stage that writes the file")
            yield row


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


def dir_hash(path: str | Path, exclude: frozenset[str] = frozenset()) -> str:
    """Hash of every file's relative name and bytes under a folder (but the relative names in `exclude`)."""
    path = Path(path)
    files = (p for p in sorted(path.rglob("*")) if p.is_file() and str(p.relative_to(path)) not in exclude)
    return content_hash({str(p.relative_to(path)): sha256_file(p) for p in files})


# ---------------------------------------------------------------------------------------------- Prefect caching


ROOT = Path(__file__).resolve().parents[1]


def _module_file(name: str, root: Path = ROOT) -> Path | None:
    """The source file of a module of the project (a package under `root`: tasks, flows, tests); None for a library."""
    parts = name.split(".")
    if not (root / parts[0] / "__init__.py").is_file():
        return None
    base = root.joinpath(*parts)
    return next((f for f in (base.with_suffix(".py"), base / "__init__.py") if f.is_file()), None)


def _direct_imports(name: str, root: Path) -> set[str]:
    """Project modules `name` imports anywhere in its file (inside functions too: a lazy import still runs),
    with their parent packages (importing tasks.chunk runs tasks/__init__.py first)."""
    file = _module_file(name, root)
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(file.read_bytes(), filename=str(file))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(x for x in (base, node.module) if x)
            names = [module] + [f"{module}.{a.name}" for a in node.names]  # `from tasks import chunk` is a module
        else:
            continue
        for dotted in names:
            parts = dotted.split(".")
            found.update(m for i in range(1, len(parts) + 1) if _module_file(m := ".".join(parts[:i]), root))
    return found


def project_modules(name: str, root: Path = ROOT) -> list[str]:
    """`name`, its parent packages and every project module it imports, transitively (sorted)."""
    parts = name.split(".")
    todo = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    seen: set[str] = set()
    while todo:
        module = todo.pop()
        if module in seen or _module_file(module, root) is None:
            continue
        seen.add(module)
        todo |= _direct_imports(module, root) - seen
    if name not in seen:
        raise ValueError(f"{name} is not a module of this project (no source file under {root})")
    return sorted(seen)


def module_files(name: str, root: Path = ROOT) -> list[str]:
    """The source files of project_modules(name), relative to the project root (what dvc.yaml lists as deps)."""
    return sorted(str(_module_file(m, root).relative_to(root)) for m in project_modules(name, root))


def source_hash(module_name: str, root: Path = ROOT) -> str:
    """Hash of the source of `module_name` and of every project module it imports, transitively."""
    return content_hash({f: sha256_file(root / f) for f in module_files(module_name, root)})


@lru_cache(maxsize=None)
def code_hash(module_name: str) -> str:
    """source_hash of a module of this project, once per process (a running process's code does not change under
    it): a cached result (Prefect task, training skip) made by that code is stale as soon as any of it changes."""
    return source_hash(module_name)


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
# such as chunk.split_sentences, used by qa, would otherwise keep serving stale results).
CACHE = dict(cache_policy=INPUTS + CachePolicy.from_cache_key_fn(_code_key), persist_result=True)


def logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except Exception:  # outside a flow run (a plain function call in a test or notebook)
        return logging.getLogger("papertune")


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


_LOCK_ENV = "PAPERTUNE_LOCK_PID"  # set by a lock holder for its children (a stage run by a locked `make run`)
_held: dict[Path, int] = {}  # lock file -> depth: a stage inside the flow shares its flow's lock


def _lock_holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


@contextmanager
def project_lock(path: str | Path) -> Iterator[None]:
    """One pipeline per project at a time: an exclusive flock on `paths.lock` (released by the OS however the
    holder ends, even on SIGKILL), holding the pid of the process that took it. Re-entrant in one process, and
    inherited by child processes of the holder (a stage that `make run` or the flow starts)."""
    path = Path(path).resolve()
    holder = _lock_holder(path) if path.exists() else ""
    if path in _held or (holder and holder == os.environ.get(_LOCK_ENV)):
        _held[path] = _held.get(path, 0) + 1
        try:
            yield
        finally:
            _held[path] -= 1
            if not _held[path]:
                del _held[path]
        return
    with _writable(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _lock_holder(path)
            raise PipelineError(f"another papertune run (pid {pid}) is using this project ({path} is locked): "
                                f"wait for it to finish, or stop it (kill {pid})") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        _held[path], previous = 1, os.environ.get(_LOCK_ENV)
        os.environ[_LOCK_ENV] = str(os.getpid())
        try:
            yield
        finally:
            del _held[path]
            if previous is None:
                os.environ.pop(_LOCK_ENV, None)
            else:
                os.environ[_LOCK_ENV] = previous
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing releases the flock


def stage_outputs(paths: Paths, stages: Iterable[str] | None = None) -> list[Path]:
    """The outputs (outs, metrics, plots) dvc.yaml declares for `stages` (every stage when None), `${paths.x}`
    resolved from params: dvc.yaml is where a stage says what it writes."""
    import yaml

    declared = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    outputs = []
    for name in declared if stages is None else stages:
        for entry in (e for kind in ("outs", "metrics", "plots") for e in declared[name].get(kind, [])):
            text = entry if isinstance(entry, str) else next(iter(entry))
            field = re.fullmatch(r"\$\{paths\.(\w+)\}", text)
            outputs.append(Path(getattr(paths, field[1])) if field else Path(text))
    return outputs


def remove_stale_temporaries(paths: Paths, stages: Iterable[str] | None = None) -> list[Path]:
    """Remove what a killed write of these stages' outputs left beside them (SIGKILL skips atomic_write's cleanup):
    mkstemp's `.qa.jsonl.k2j4x9ab.tmp`, mkdtemp's staging folder `.adapter.k2j4x9ab`. Only while this process
    holds the project lock (or shares its holder's): otherwise another run may be writing them right now."""
    if Path(paths.lock).resolve() not in _held:
        return []
    removed = []
    for out in stage_outputs(paths, stages):
        stale = re.compile(re.escape(f".{out.name}.") + r"[a-z0-9_]{8}(\.tmp)?")  # tempfile's 8 random characters
        for entry in out.parent.iterdir() if out.parent.is_dir() else []:
            if stale.fullmatch(entry.name):
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
                removed.append(entry)
    if removed:
        logger().info(f"removed {len(removed)} temporary file(s) of a killed run: {', '.join(map(shown, removed))}")
    return removed


def check_prefect_db(db: str | Path | None = None) -> None:
    """Fail in one line on a corrupt local Prefect database (`db`, by default the one Prefect's settings name),
    before a flow starts a server on it (which otherwise hangs for a minute, then prints a long traceback)."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if db is None:
        url = settings.server.database.connection_url.get_secret_value()
        if settings.api.url or not url.startswith("sqlite"):
            return  # a server of its own owns its database
        db = url.split(":///", 1)[-1]
    db = Path(db)
    if not db.is_file():
        return  # created on first use
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as con:
            result = con.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.DatabaseError as e:
        result = str(e)
    if result != "ok":
        results = shown(settings.results.local_storage_path)
        raise PipelineError(f"{shown(db)} is corrupt ({shown(result)}): it holds only Prefect's run history; delete "
                            f"it (rm {shown(db)}*) and rerun; the cached results in {results} are kept")


def run_stage(stage: Callable, name: str) -> None:
    """Entry point of `python -m tasks.<name>`: load params, take the project lock, run the stage inside a Prefect
    flow, and turn a PipelineError into one line on stderr and exit code 1."""
    params = params_arg(f"papertune stage: {name}")
    work: list[float] = []

    def timed_stage() -> None:  # returns nothing: the stage's outputs are its files, not a persisted flow result
        work.append(time.time())
        try:
            call_stage(stage, params)
        finally:
            work.append(time.time())

    stage_flow = flow(name=f"papertune-{name}", task_runner=task_runner(params.runner), persist_result=False)(
        timed_stage)
    try:
        # Under `accelerate launch` every rank runs this module: rank 0 stands for the run.
        with project_lock(params.paths.lock) if int(os.environ.get("RANK", 0)) == 0 else nullcontext():
            check_prefect_db()
            remove_stale_temporaries(params.paths, [name])
            # The server `make run` shares between stages (PREFECT_API_URL), or one of our own that cannot outlive
            # this process (Prefect's temporary server survives a SIGTERM or SIGKILL of the stage).
            with local_server():
                stage_flow()
    except PipelineError as e:
        sys.exit(f"error: {name}: {shown(e)}")
    if len(work) == 2 and (born := _process_start_time()):
        # What `benchmarks/pipeline.py` reads: the fixed cost is everything before the work starts.
        print(f"papertune stage {name}: {work[1] - work[0]:.2f} s of work, {work[0] - born:.2f} s from process "
              f"start to work", file=sys.stderr)
    skip_final_collection()


def skip_final_collection() -> None:
    """Call last in a command's main: the interpreter's final garbage collections walk every object Prefect,
    pydantic, MLflow and transformers created, 1-2 s per process (1.8 s of a cached `python -m flows.pipeline`).
    gc.freeze() takes them out of the collector's view; atexit hooks still run, and objects are still freed by
    reference counting, so files close and Prefect and MLflow flush as before."""
    import gc

    gc.freeze()


def _process_start_time() -> float | None:
    """When this process started (Linux /proc), so start-up cost counts interpreter and imports too."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # since boot
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))


def dvc_code_deps(dvc_yaml: str | Path = ROOT / "dvc.yaml") -> dict[str, list[str]]:
    """The code each DVC stage runs: the source files of its `python -m <module>` and of every project module that
    module imports, transitively (tasks/test_faults.py checks dvc.yaml declares exactly these)."""
    import yaml

    stages = yaml.safe_load(Path(dvc_yaml).read_text())["stages"]
    return {name: module_files(stage["cmd"].split("-m", 1)[1].split()[0]) for name, stage in stages.items()}


def write_dvc_code_deps(dvc_yaml: str | Path = ROOT / "dvc.yaml") -> None:
    """Rewrite the code deps of every stage in dvc.yaml from the imports, keeping everything else as written."""
    code = dvc_code_deps(dvc_yaml)
    out, stage, in_deps = [], None, False
    for line in Path(dvc_yaml).read_text().splitlines(keepends=True):
        stripped = line.strip()
        if line.startswith("  ") and not line.startswith("   ") and stripped.endswith(":"):
            stage, in_deps = stripped[:-1], False
        elif line.startswith("    ") and not line.startswith("     ") and stripped:
            in_deps = stripped == "deps:"
        if in_deps and stripped.startswith("- ") and stripped.endswith(".py") and stage in code:
            continue  # regenerated below
        out.append(line)
        if in_deps and stage in code and stripped in ("- ${paths.params_check}", "- params.yaml"):
            out.extend(f"      - {f}\n" for f in code[stage])
    atomic_write(dvc_yaml, "".join(out))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Print (or --write into dvc.yaml) the code deps of each stage.")
    parser.add_argument("--dvc-deps", action="store_true", required=True)
    parser.add_argument("--write", action="store_true", help="rewrite the code deps in dvc.yaml")
    if parser.parse_args().write:
        write_dvc_code_deps()
    for stage, files in dvc_code_deps().items():
        print(f"{stage}:\n" + "".join(f"      - {f}\n" for f in files), end="")
