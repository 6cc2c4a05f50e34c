"""Run the pipeline on its schedule on this machine, without a work pool (the `nightly` deployment of
prefect.yaml, served by this process).

Run:  make serve    (python -m flows.serve; Ctrl-C stops it)
"""

from __future__ import annotations

from pathlib import Path

import yaml

from flows.pipeline import pipeline


def nightly(prefect_yaml: str | Path = "prefect.yaml") -> dict:
    """The deployment declared in prefect.yaml: one place for the cron and the parameters."""
    spec = yaml.safe_load(Path(prefect_yaml).read_text())
    return next(d for d in spec["deployments"] if d["name"] == "nightly")


if __name__ == "__main__":
    d = nightly()
    schedule = d["schedules"][0]
    pipeline.serve(name=d["name"], cron=schedule["cron"], parameters=d["parameters"], description=d["description"])
