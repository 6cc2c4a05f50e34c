"""Run the pipeline on its schedule on this machine, without a work pool (the `nightly` deployment of
prefect.yaml, served by this process).

Run:  make serve    (python -m flows.serve; Ctrl-C stops it)

Schedules need a Prefect server with its scheduler (Prefect's temporary server has none: "Cannot schedule flows
on an ephemeral server"). With PREFECT_API_URL set, that server is used; otherwise a local one is started on
127.0.0.1 at a free port, on the project's Prefect database, and stopped with this process (Ctrl-C, SIGTERM or
SIGKILL: see tasks/prefect_server.py).
"""

from __future__ import annotations

import asyncio
import contextvars
import multiprocessing
import signal
import threading
from pathlib import Path

import yaml

from flows.pipeline import pipeline
from tasks.runner import entered, main


def nightly(prefect_yaml: str | Path = "prefect.yaml") -> dict:
    """The deployment declared in prefect.yaml: one place for the cron and the parameters."""
    spec = yaml.safe_load(Path(prefect_yaml).read_text())
    return next(d for d in spec["deployments"] if d["name"] == "nightly")


def serve(interval_s: float | None = None) -> None:
    """Serve the nightly deployment until stopped (Ctrl-C or SIGTERM). `interval_s` replaces its cron with a short
    interval, so a test can watch a scheduled run fire; what `make serve` serves is prefect.yaml's deployment."""
    from prefect.runner import Runner
    from prefect.schedules import Cron, Interval

    d = nightly()
    cron = d["schedules"][0]
    schedule = Interval(interval_s) if interval_s else Cron(cron["cron"], timezone=cron.get("timezone"))
    # The entry path every run takes (database check, server), with the scheduler so cron creates runs; not the
    # project lock: each scheduled run takes it (the flow does), and `make run` may run between them.
    with entered(None, services=True) as api:
        runner = Runner(name=d["name"], pause_on_shutdown=False, limit=1)  # one pipeline at a time (project lock)
        runner.add_flow(pipeline, name=d["name"], schedules=[schedule], parameters=d["parameters"],
                        description=d["description"])
        print(f"serving deployment {d['name']!r} ({f'every {interval_s:g} s' if interval_s else cron['cron']}) "
              f"on the Prefect API {api}; Ctrl-C stops it", flush=True)
        # Prefect's runner, started in the main thread, takes over SIGTERM and then deadlocks stopping itself:
        # it runs in a thread, and SIGTERM ends this process like Ctrl-C (local_server then stops the server).
        signal.signal(signal.SIGTERM, _interrupt)
        # The thread runs in this context: Prefect's settings (the API URL of our server) live in context variables.
        thread = threading.Thread(target=contextvars.copy_context().run, args=(asyncio.run, runner.start()),
                                  name="prefect-runner", daemon=True)
        thread.start()
        try:
            while thread.is_alive():
                thread.join(1)
        finally:
            for child in multiprocessing.active_children():  # a flow run in progress would outlive its server
                child.kill()


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def _serve_until_stopped() -> None:
    try:
        serve()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main(_serve_until_stopped)
