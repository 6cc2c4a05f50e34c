"""The papertune pipeline: PDFs → documents → base model → chunks → QA pairs → split → QLoRA adapter → ROUGE.

Run:  python -m flows.pipeline [--params params.yaml]     (or `dvc repro`, which runs the same stages one by one)
Deployed: prefect.yaml (`prefect deploy`), or `make serve` for the same cron schedule without a work pool.

This file only wires stages; each stage's logic, caching and outputs live in tasks/<stage>.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

from prefect import flow

from tasks import base_model, chunk, evaluate, ingest, qa, split, train
from tasks.common import PipelineError, task_runner
from tasks.params import Params, load_params


@flow(name="papertune-stages")
def stages(p: Params) -> dict:
    ingest.run(p.ingest, p.paths)
    base_model.run(p.model, p.paths)
    chunk.run(p.chunk, p.paths)
    qa.run(p.qa, p.paths)
    split.run(p.split, p.paths)
    train.run(p.train, p.mlflow, p.paths, record=p)
    return evaluate.run(p.evaluate, p.mlflow, p.paths)


@flow(name="papertune")
def pipeline(params_file: str = "params.yaml", pdf_dir: str | None = None) -> dict:
    """Load params (a deployment may point at another corpus folder), then run the stages on the task runner
    chosen in `runner` (threads, processes or Dask)."""
    p = load_params(params_file)
    if pdf_dir:
        p = p.model_copy(update={"paths": p.paths.model_copy(update={"pdf_dir": Path(pdf_dir)})})
    return stages.with_options(task_runner=task_runner(p.runner))(p)


if __name__ == "__main__":
    import argparse

    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--params", default="params.yaml")
    params_file = args.parse_args().params
    load_params(params_file)  # a bad params file stops here, before any work
    try:
        pipeline(params_file)
    except PipelineError as e:
        sys.exit(f"error: {e}")
