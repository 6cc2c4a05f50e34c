"""A local Prefect server for one run: started on 127.0.0.1 at a free port, stopped by its pid, never left behind.

Run a command with one server shared by all its stages:  python -m tasks.prefect_server dvc repro
(`make run` does this; every `python -m tasks.<stage>` inside then reuses the server instead of starting its own.)

- An already configured `PREFECT_API_URL` (environment or Prefect profile) wins: nothing is started.
- The server is Prefect's own app under uvicorn (what Prefect's temporary server runs), on the project's
  `PREFECT_HOME` database, so runs and cached results are the same as with Prefect's temporary server.
- It dies with the process that started it, whatever ends that process (SIGTERM, SIGKILL, a crash): the kernel
  sends it SIGKILL when its parent dies (Linux PR_SET_PDEATHSIG). Start it from the main thread: the signal
  follows the *thread* that forked it.
- `services=False` (stages, tests): no scheduler or other background services, like Prefect's temporary server.
  `services=True` (`make serve`): the scheduler runs, so deployments' cron schedules create runs.
This module imports no Prefect at load time, so the wrapper costs almost nothing when `dvc repro` has no work.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tasks.files import sqlite_problem
from tasks.log import PipelineError, shown

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@dataclass
class Server:
    url: str  # the API root, e.g. http://127.0.0.1:41234/api
    process: subprocess.Popen

    @property
    def pid(self) -> int:
        return self.process.pid


def configured_api_url() -> str | None:
    """PREFECT_API_URL as Prefect resolves it (environment, prefect.toml, pyproject.toml, active profile)."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    if "prefect" in sys.modules:  # already paid for: ask Prefect itself
        from prefect.settings import get_current_settings

        return get_current_settings().api.url
    return _configured_api_url_without_prefect()


def _configured_api_url_without_prefect() -> str | None:
    # `import prefect` takes 1.5-2.5 s; the wrapper of a no-op `dvc repro` must not pay it. Same sources, same order.
    import tomllib

    def toml(path: Path) -> dict:
        try:
            return tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError):
            return {}

    project = toml(Path("prefect.toml")) or toml(Path("pyproject.toml")).get("tool", {}).get("prefect", {})
    if url := project.get("api", {}).get("url"):
        return url
    home = Path(os.environ.get("PREFECT_HOME") or project.get("home") or "~/.prefect").expanduser()
    profiles = toml(Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml"))
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active", "ephemeral")
    return profiles.get("profiles", {}).get(active, {}).get("PREFECT_API_URL") or None


def _database_path() -> Path | None:
    """The SQLite file the server opens (PREFECT_HOME/prefect.db unless a database URL is set); None if not SQLite."""
    import tomllib

    url = os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL") or os.environ.get(
        "PREFECT_SERVER_DATABASE_CONNECTION_URL")
    if url:
        return Path(url.split(":///", 1)[-1]) if url.startswith("sqlite") else None
    try:
        home = tomllib.loads(Path("pyproject.toml").read_text()).get("tool", {}).get("prefect", {}).get("home")
    except (OSError, tomllib.TOMLDecodeError):
        home = None
    return Path(os.environ.get("PREFECT_HOME") or home or "~/.prefect").expanduser() / "prefect.db"


def _local_database() -> Path | None:
    """The server's SQLite file, if it exists."""
    db = _database_path()
    return db if db and db.is_file() else None


def migrated_template() -> Path:
    """A migrated Prefect database holding no runs, kept per Prefect version in the user's cache. A new database
    starts as a copy of it: Prefect's migrations of a new one take 6-15 s before the server answers."""
    from importlib.metadata import version

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "papertune"
    return cache / f"prefect-{version('prefect')}-migrated.db"


def seed_database(db: Path | None) -> bool:
    """Start a missing database as a copy of the template; False when there is nothing to seed (it exists, it is
    not SQLite, or no template has been saved yet: the server then migrates it, and `save_template` keeps it)."""
    template = migrated_template()
    if db is None or db.exists() or not template.is_file():
        return False
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        partial = db.with_name(f"{db.name}.{os.getpid()}.tmp")  # temp file, then rename
        shutil.copy(template, partial)
        partial.replace(db)
    except OSError:  # an optimisation only: the server migrates a new database itself
        return False
    return True


def save_template(db: Path) -> None:
    """Keep a consistent copy of a database the server has just migrated, before any run is written to it."""
    import sqlite3

    template = migrated_template()
    if template.is_file() or not db.is_file():
        return
    try:
        copy_database(db, template)
    except (OSError, sqlite3.Error):  # an optimisation only (a read-only cache, a full disk): nothing is lost
        pass


def copy_database(db: Path, dest: Path) -> None:
    """A consistent copy of a SQLite database the server may have open (sqlite3's backup), written to a temp file
    and renamed: a concurrent reader never sees half of it."""
    import sqlite3

    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f"{dest.name}.{os.getpid()}.tmp")
    try:
        src, dst = sqlite3.connect(db), sqlite3.connect(partial)
        try:
            src.backup(dst)
        finally:
            src.close()
            dst.close()
        partial.replace(dest)
    finally:
        partial.unlink(missing_ok=True)


def _migrates_new_database(db: Path | None) -> bool:
    """True when the server about to start creates and migrates a database and no template exists to seed it."""
    return db is not None and not db.exists() and not migrated_template().is_file()


def check_database(db: str | Path | None = None) -> None:
    """Fail in one line on a corrupt local Prefect database (`db`, by default the one the server would open), before
    a server starts on it (which otherwise hangs for a minute, then prints a long traceback). A configured server
    owns its database: nothing to check then."""
    if db is None:
        if "prefect" in sys.modules:  # already paid for: ask Prefect's settings (a test may change them in-process)
            from prefect.settings import get_current_settings

            settings = get_current_settings()
            url = settings.server.database.connection_url.get_secret_value()
            if settings.api.url:
                return
            db = url.split(":///", 1)[-1] if url.startswith("sqlite") else None
        elif configured_api_url():
            return
        else:
            db = _database_path()
    db = Path(db) if db else None
    if db is not None and db.is_file() and (problem := sqlite_problem(db)):  # a missing one is created on first use
        raise PipelineError(f"{shown(db)} is corrupt ({shown(problem)}): it holds only Prefect's run history; delete "
                            f"it (rm {shown(db)}*) and rerun; the cached results are kept")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent(parent_pid: int) -> None:
    """Runs in the forked child before exec: ask the kernel for SIGKILL when the parent goes away."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the parent's stop() (atexit, finally) still stops it
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def start_server(services: bool = False, log: str | Path | None = None) -> Server:
    """Start the server and return at once (see `wait_ready`): its ~4 s start overlaps the caller's own work.
    A new database starts as a copy of the migrated template, when there is one (`seed_database`)."""
    seed_database(_database_path())
    port = free_port()
    env = {**os.environ, "PREFECT_UI_ENABLED": "false", "PREFECT__SERVER_FINAL": "1"}
    env.pop("PREFECT_API_URL", None)
    if not services:
        env["PREFECT__SERVER_EPHEMERAL"] = "1"  # Prefect's switch for "no scheduler, no background services"
    out = open(log, "ab") if log else subprocess.DEVNULL
    parent = os.getpid()
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"],
        env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        preexec_fn=lambda: _die_with_parent(parent),
    )
    return Server(f"http://127.0.0.1:{port}/api", process)


def wait_ready(url: str, timeout: float, process: subprocess.Popen | None = None) -> None:
    """Poll `<url>/health` until it answers 200; a clear one-line error if it never does."""
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise _error(f"the local Prefect server exited with code {process.returncode} before answering "
                         f"(is .prefect/prefect.db corrupt? it holds only run history: delete it)")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise _error(f"the Prefect API at {url} did not answer within {timeout:.0f} s (PREFECT_API_URL)")
        time.sleep(0.05)


def _error(message: str) -> Exception:
    return PipelineError(message)  # the user's to fix: one line, not a traceback


def stop_server(server: Server, grace: float = 3.0) -> None:
    """SIGTERM (uvicorn closes the database cleanly), SIGKILL after `grace` seconds."""
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


@contextmanager
def local_server(timeout: float = 90, services: bool = False) -> Iterator[str]:
    """The Prefect API for this process and its children: the configured one (waited for, in case a wrapper has
    just started it), or a server of our own, stopped on exit. Sets PREFECT_API_URL for both."""
    url = configured_api_url()
    if url:
        wait_ready(url, timeout)
        yield url
        return
    db = _database_path()
    new = _migrates_new_database(db)
    server = start_server(services=services)
    try:
        wait_ready(server.url, timeout, server.process)
        if new:
            save_template(db)  # migrated, and no run written yet: the next new database starts from it
        with _api_url(server.url):
            try:
                yield server.url
            finally:
                _flush_to_api()
    finally:
        stop_server(server)


def _flush_to_api() -> None:
    """Send the logs and events Prefect still holds in memory while the server is up (Prefect itself sends them
    at interpreter exit, by which time our server is gone: "Error logging to API")."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=5)


@contextmanager
def _api_url(url: str) -> Iterator[None]:
    # Prefect reads the environment once at import; children (process pools, Dask workers) read it again.
    from prefect.settings import PREFECT_API_URL, temporary_settings

    os.environ["PREFECT_API_URL"] = url
    try:
        with temporary_settings({PREFECT_API_URL: url}):
            yield
    finally:
        os.environ.pop("PREFECT_API_URL", None)


def main(argv: list[str]) -> int:
    """Run a command with a shared server (started in the background: stages wait for it), then stop it."""
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        sys.exit("usage: python -m tasks.prefect_server COMMAND [ARGS...]   e.g. dvc repro")
    if configured_api_url():
        return subprocess.call(argv)
    try:
        check_database()  # fail in one line, not stages waiting on a dead server
    except PipelineError as e:
        sys.exit(f"error: {e}")
    log = tempfile.NamedTemporaryFile(prefix="papertune-prefect-server-", suffix=".log", delete=False)
    db = _database_path()
    new = _migrates_new_database(db)
    server = start_server(log=log.name)
    if new:  # wait for the migrations before any stage writes a run, and keep the migrated database as the template
        wait_ready(server.url, 120, server.process)
        save_template(db)
    child = subprocess.Popen(argv, env={**os.environ, "PREFECT_API_URL": server.url})
    # Ctrl-C reaches the whole foreground group; a SIGTERM sent to us alone is passed on to the command.
    signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGTERM))

    def watch() -> None:  # a server that dies (a corrupt database, a full disk) stops the command with one line
        if server.process.wait() != 0 and child.poll() is None and not stopping:
            print(f"error: the local Prefect server exited with code {server.process.returncode} "
                  f"(its log: {log.name}; a corrupt .prefect/prefect.db can be deleted: it holds only run history)",
                  file=sys.stderr)
            child.terminate()

    stopping = False
    threading.Thread(target=watch, daemon=True).start()
    try:
        code = child.wait()
    except KeyboardInterrupt:
        code = child.wait()
    stopping = True
    stop_server(server, grace=0.5)  # SQLite survives a kill; a no-op `dvc repro` should not wait on uvicorn
    if code == 0:
        Path(log.name).unlink(missing_ok=True)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
