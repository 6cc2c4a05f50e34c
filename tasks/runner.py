"""How a stage, the pipeline flow and the scheduled deployment run: one entry path (the project lock, the Prefect
database check, a killed run's temporaries removed, a local Prefect server, a PipelineError as one line and exit 1),
and a stage called with exactly what tasks/stages.py declares.

Infrastructure: editing this module recomputes nothing (tasks/hashing.py: INFRASTRUCTURE).
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from tasks.files import _writable
from tasks.log import PipelineError, logger, shown
from tasks.params import Params, Paths, RunnerParams, params_arg
from tasks.stages import Stage, declared_outputs
from tasks.stages import stage as declared


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
    _dask_pre_spawn_env_to_workers()
    return DaskTaskRunner(
        cluster_kwargs={"n_workers": runner.max_workers, "threads_per_worker": 1, "processes": True,
                        "dashboard_address": None}
    )


def _dask_pre_spawn_env_to_workers() -> None:
    """Dask's pre-spawn variables (OMP_NUM_THREADS=1, ...) become the workers' own environment (its nanny sets
    `distributed.nanny.environ` in the worker). As pre-spawn variables, the nanny writes them into this process's
    os.environ before it spawns a worker and never takes them back: torch imported here afterwards, and every process
    started afterwards (a stage's training), would run on one thread. Idempotent."""
    import dask
    import distributed  # noqa: F401  (its config defaults are loaded with it)

    nanny = dask.config.get("distributed.nanny")
    dask.config.set({"distributed.nanny.environ": {**nanny["pre-spawn-environ"], **nanny["environ"]},
                     "distributed.nanny.pre-spawn-environ": {}})


class DeclaredPaths:
    """The paths a stage declared (tasks/stages.py), and only those: reading another fails at once, so what a stage
    reads cannot drift from what dvc.yaml and the cache keys say it reads."""

    def __init__(self, paths: Paths, stage: Stage):
        self._paths, self._stage = paths, stage

    def __getattr__(self, name: str):
        if name in self._stage.paths or name not in Paths.model_fields:
            return getattr(self._paths, name)
        raise AttributeError(f"stage {self._stage.name} reads paths.{name}, which it does not declare: add it to "
                             f"its deps in tasks/stages.py (then python -m tasks.stages --write)")

    def model_copy(self, update: dict | None = None) -> DeclaredPaths:
        return DeclaredPaths(self._paths.model_copy(update=update), self._stage)


def call(stage: Stage, params: Params):
    """Run a stage's recipe with its declared params sections (by name) and its declared paths."""
    import importlib

    run = importlib.import_module(stage.module).run
    return call_run(run, stage, params)


def call_run(run: Callable, stage: Stage, params: Params):
    kwargs = {name: getattr(params, name) for name in stage.sections}
    kwargs["paths"] = DeclaredPaths(params.paths, stage)
    if stage.record:
        kwargs["record"] = params
    return run(**kwargs)


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



def remove_stale_temporaries(paths: Paths, stages: Iterable[str] | None = None) -> list[Path]:
    """Remove what a killed write of these stages' outputs left beside them (SIGKILL skips atomic_write's cleanup):
    mkstemp's `.qa.jsonl.k2j4x9ab.tmp`, mkdtemp's staging folder `.adapter.k2j4x9ab`. Only while this process
    holds the project lock (or shares its holder's): otherwise another run may be writing them right now."""
    if Path(paths.lock).resolve() not in _held:
        return []
    removed = []
    for out in declared_outputs(paths, stages):
        stale = re.compile(re.escape(f".{out.name}.") + r"[a-z0-9_]{8}(\.tmp)?")  # tempfile's 8 random characters
        for entry in out.parent.iterdir() if out.parent.is_dir() else []:
            if stale.fullmatch(entry.name):
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
                removed.append(entry)
    if removed:
        logger().info(f"removed {len(removed)} temporary file(s) of a killed run: {', '.join(map(shown, removed))}")
    return removed



@contextmanager
def entered(paths: Paths | None, stages: Iterable[str] | None = None, services: bool = False) -> Iterator[str]:
    """What every entry point (a stage alone, the flow, `make serve`) runs inside: the project lock (one run per
    project), a check of the Prefect database (a corrupt one fails in a second, in one line), a killed run's
    temporaries removed, and a Prefect server: the one `make run` shares (PREFECT_API_URL), or one of our own that
    cannot outlive this process. Yields the server's API URL. Without `paths` (`make serve`), no lock: each
    scheduled run takes it, and a `make run` may run between them."""
    from tasks.prefect_server import check_database, local_server

    # Under `accelerate launch` every rank runs the stage: rank 0 stands for the run.
    with project_lock(paths.lock) if paths and int(os.environ.get("RANK", 0)) == 0 else nullcontext():
        check_database()
        if paths:
            remove_stale_temporaries(paths, stages)
        with local_server(services=services) as api:
            yield api


def main(work: Callable[[], object], prefix: str = "") -> None:
    """A command's main: run `work`; a PipelineError becomes one line on stderr and exit status 1."""
    try:
        work()
    except PipelineError as e:
        sys.exit(f"error: {prefix}{shown(e)}")
    skip_final_collection()


def run_stage(run: Callable, name: str) -> None:
    """Entry point of `python -m tasks.<name>`: load params, enter (lock, checks, server), run the stage inside a
    Prefect flow with its declared params and paths, and report its fixed cost (what benchmarks/pipeline.py reads)."""
    from prefect import flow

    stage = declared(name)
    params = params_arg(f"papertune stage: {name}")
    work: list[float] = []

    def timed_stage() -> None:  # returns nothing: the stage's outputs are its files, not a persisted flow result
        work.append(time.time())
        try:
            call_run(run, stage, params)
        finally:
            work.append(time.time())

    def go() -> None:
        with entered(params.paths, [name]):
            flow(name=f"papertune-{name}", task_runner=task_runner(params.runner), persist_result=False)(timed_stage)()

    main(go, prefix=f"{name}: ")
    if len(work) == 2 and (born := _process_start_time()):
        print(f"papertune stage {name}: {work[1] - work[0]:.2f} s of work, {work[0] - born:.2f} s from process "
              f"start to work", file=sys.stderr)


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

