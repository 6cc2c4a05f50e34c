"""The papertune pipeline: PDFs → documents → base model → chunks → QA pairs → split → QLoRA adapter → scores.

Run:  python -m flows.pipeline [--params params.yaml]     (or `dvc repro`, which runs the same stages one by one)
Deployed: prefect.yaml (`prefect deploy`), or `make serve` for the same cron schedule without a work pool.

This file only wires: it walks the stages tasks/stages.py declares, in order, each called with its declared params
sections and paths; each stage's logic, caching and outputs live in tasks/<stage>.py.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from tasks.log import PipelineError
from tasks.params import Params, ParamsError, load_params
from tasks.runner import call, entered, main, project_lock, remove_stale_temporaries, task_runner
from tasks.stages import STAGES


@flow(name="papertune-stages")
def stages(p: Params) -> dict:
    """Every stage in order; the flow's result is evaluate's (the scores)."""
    results = {stage.name: call(stage, p) for stage in STAGES}
    return results["evaluate"]


@flow(name="papertune")
def pipeline(params_file: str = "params.yaml", pdf_dir: str | None = None) -> dict:
    """Load params (a deployment may point at another corpus folder), then run the stages on the task runner
    chosen in `runner` (threads, processes or Dask)."""
    try:
        p = load_params(params_file)
    except ParamsError as e:  # in a deployment's run: a failed run with the one-line reason, not a crash
        raise PipelineError(str(e).removeprefix("error: ")) from None
    if pdf_dir:
        p = p.model_copy(update={"paths": p.paths.model_copy(update={"pdf_dir": Path(pdf_dir)})})
    with project_lock(p.paths.lock):  # one pipeline per project: a second one would train over the first's adapter
        remove_stale_temporaries(p.paths)  # of every stage's outputs: a killed run's
        return stages.with_options(task_runner=task_runner(p.runner))(p)


if __name__ == "__main__":
    import argparse

    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--params", default="params.yaml")
    params_file = args.parse_args().params
    params = load_params(params_file)  # a bad params file stops here, before any work

    def run() -> None:
        # Lock and check before Prefect starts its server: a busy project or a corrupt database fails in a second,
        # in one line (the flow takes the same lock again, re-entrantly, as it does when a deployment runs it).
        with entered(params.paths):
            pipeline(params_file)

    main(run)
