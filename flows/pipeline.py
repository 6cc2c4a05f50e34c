"""The papertune pipeline: PDFs → documents → base model → chunks → QA pairs → split → QLoRA adapter → ROUGE.

Run:  python -m flows.pipeline [--params params.yaml]     (or `dvc repro`, which runs the same stages one by one)

This file only wires stages; each stage's logic, caching and outputs live in tasks/<stage>.py.
"""

from __future__ import annotations

from prefect import flow

from tasks import base_model, chunk, evaluate, ingest, qa, split, train
from tasks.common import PipelineError, task_runner
from tasks.params import load_params


@flow(name="papertune")
def pipeline(params_file: str = "params.yaml") -> dict:
    p = load_params(params_file)
    ingest.run(p.ingest, p.paths)
    base_model.run(p.model, p.paths)
    chunk.run(p.chunk, p.paths)
    qa.run(p.qa, p.paths)
    split.run(p.split, p.paths)
    train.run(p.train, p.mlflow, p.paths, record=p)
    return evaluate.run(p.evaluate, p.mlflow, p.paths)


def run(params_file: str = "params.yaml") -> dict:
    """Run the flow on the task runner chosen in params (threads, processes or Dask)."""
    runner = task_runner(load_params(params_file).runner)
    return pipeline.with_options(task_runner=runner)(params_file)


if __name__ == "__main__":
    import argparse
    import sys

    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--params", default="params.yaml")
    params_file = args.parse_args().params
    load_params(params_file)  # a bad params file stops here, before any work
    try:
        run(params_file)
    except PipelineError as e:
        sys.exit(f"error: {e}")
