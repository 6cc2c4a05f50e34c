"""The pipeline, declared once: each stage's params sections, the paths it reads and the paths it writes.

Print the dvc.yaml these declarations make, or write it:   python -m tasks.stages [--write]

From this list come dvc.yaml's stages (generated: tests check the committed file is what this makes), the flow's
wiring (flows/pipeline.py walks STAGES), what a stage's `run` receives (its params sections by name and only its
declared paths: reading an undeclared one fails) and which temporaries of a killed run are removed. Each stage's
code deps are the project modules `tasks.<name>` imports, transitively, less the infrastructure
(tasks/hashing.py: INFRASTRUCTURE); the same files make its Prefect item keys and training's skip key.
Nodes hold logic (tasks/<name>.py: `run`), this file only wires them, as in Kedro's pipeline registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tasks.hashing import ROOT, module_files


@dataclass(frozen=True)
class Stage:
    name: str  # the module tasks.<name>, whose run() does the work; `python -m tasks.<name>` runs it alone
    params: tuple[str, ...]  # params.yaml keys it reads (sections, or keys within one); run() gets each section
    deps: tuple[str, ...]  # paths.* it reads
    outs: tuple[str, ...] = ()  # paths.* it writes, versioned in the DVC cache
    reports: tuple[str, ...] = ()  # paths.* it writes for people to read (git-tracked JSON, not in the DVC cache)
    metrics: tuple[str, ...] = ()  # paths.* of DVC metrics
    plots: tuple[str, ...] = ()  # paths.* of DVC plots
    untracked: tuple[str, ...] = ()  # paths.* it writes that DVC does not version (request caches, checkpoints)
    record: bool = False  # run() also gets all params as `record`, only to record them (MLflow, the adapter)
    comment: str = ""

    @property
    def module(self) -> str:
        return f"tasks.{self.name}"

    @property
    def sections(self) -> list[str]:
        """The params sections run() takes by name (the first part of each declared key), in order."""
        return list(dict.fromkeys(key.split(".")[0] for key in self.params))

    @property
    def writes(self) -> tuple[str, ...]:
        return self.outs + self.reports + self.metrics + self.plots

    @property
    def paths(self) -> tuple[str, ...]:
        """Every paths.* field the stage may touch."""
        return self.deps + self.writes + self.untracked

    def code(self) -> list[str]:
        """The source files its results depend on (its DVC code deps)."""
        return module_files(self.module)


PARAMS = Stage("params", params=(), deps=(), outs=("params_check",),
               comment="a bad params.yaml fails here: `dvc repro` stops before any stage touches its outputs")

STAGES = [
    Stage("ingest", params=("ingest",), deps=("pdf_dir",), outs=("documents",), reports=("ingest_report",)),
    Stage("base_model", params=("model",), deps=("tokenizer_corpus",), outs=("base_model",)),
    Stage("chunk", params=("chunk",), deps=("documents", "base_model"), outs=("chunks",)),
    Stage("qa", params=("qa",), deps=("chunks",), outs=("qa",), reports=("qa_report",), untracked=("qa_cache",)),
    Stage("split", params=("split",), deps=("qa", "chunks"), outs=("train_split", "eval_split"),
          reports=("split_report",)),
    Stage("export", params=("export", "qa"), deps=("train_split", "eval_split", "qa_report"), outs=("export_dir",)),
    Stage("train", params=("train", "mlflow"),
          deps=("base_model", "train_split", "eval_split", "chunks", "split_report", "qa_report", "ingest_report"),
          outs=("adapter",), metrics=("train_metrics",), plots=("loss_curve",),
          untracked=("checkpoints", "plots_dir"), record=True),
    Stage("evaluate",
          params=("evaluate", "qa.judge.backend", "qa.judge.temperature", "qa.judge.max_new_tokens", "qa.openai",
                  "qa.hf", "mlflow"),
          deps=("base_model", "adapter", "eval_split"), outs=("predictions",), metrics=("eval_metrics",),
          plots=("rouge_plot",), untracked=("qa_cache", "plots_dir"),
          comment="evaluate.judge asks the QA stage's judge endpoint; the QA filters are not its params"),
    Stage("promote", params=("mlflow", "evaluate"), deps=("base_model", "adapter", "eval_split", "eval_metrics"),
          reports=("promotion",),
          comment="the registry's champion alias; a champion without a score on this eval set is answered on it"),
]


def stage(name: str) -> Stage:
    return next(s for s in [PARAMS, *STAGES] if s.name == name)


def downstream(name: str) -> list[str]:
    """`name` and every stage that reads, directly or not, what it writes (what a change of its inputs reruns)."""
    found, written = [name], set(stage(name).writes)
    for s in STAGES:
        if s.name not in found and written & set(s.deps):
            found.append(s.name)
            written |= set(s.writes)
    return found


# `dvc plots show` / the VS Code extension: loss per step, and ROUGE-L of base vs fine-tuned per evaluation.
PLOTS = """\
plots:
  - QLoRA training loss:
      template: linear
      x: step
      y:
        ${paths.loss_curve}: [train_loss, eval_loss]
  - ROUGE-L, base vs fine-tuned:
      template: bar_horizontal
      x: rougeL
      y:
        ${paths.rouge_plot}: eval
  - ${paths.plots_dir}
"""


def dvc_yaml() -> str:
    """dvc.yaml, made from the declarations. Every output is `persist: true`: DVC would otherwise delete it before
    running its stage, and a failed rerun would lose it (stages write each output whole, only on success)."""
    lines = ["# Generated from tasks/stages.py by `python -m tasks.stages --write`: edit the declarations there.",
             "# Paths come from params.yaml (`paths:`); a stage's code deps are the project modules it imports,",
             "# less the infrastructure that computes no result (tasks/hashing.py: INFRASTRUCTURE).",
             "stages:"]
    for s in [PARAMS, *STAGES]:
        lines += [f"  {s.name}:"]
        lines += [f"    # {s.comment}"] if s.comment else []
        lines += [f"    cmd: python -m {s.module}", "    deps:"]
        lines += ["      - params.yaml"] if s is PARAMS else ["      - ${paths.params_check}"]
        lines += [f"      - {f}" for f in s.code()]
        lines += [f"      - ${{paths.{d}}}" for d in s.deps]
        if s.params:
            lines += ["    params:"] + [f"      - {key}" for key in s.params]
        outs = [(f, True) for f in s.outs] + [(f, False) for f in s.reports]
        for kind, entries in (("outs", outs), ("metrics", [(f, False) for f in s.metrics]),
                              ("plots", [(f, False) for f in s.plots])):
            lines += [f"    {kind}:"] if entries else []
            for f, cache in entries:
                lines += [f"      - ${{paths.{f}}}:"] + ([] if cache else ["          cache: false"])
                lines += ["          persist: true"]
        lines += [""]
    return "\n".join(lines) + PLOTS


def declared_outputs(paths, names: list[str] | None = None) -> list[Path]:
    """The files and folders the named stages (every stage when None) write, resolved from params."""
    chosen = [s for s in [PARAMS, *STAGES] if names is None or s.name in names]
    return [Path(getattr(paths, f)) for s in chosen for f in s.writes + s.untracked]


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Print (or --write) the dvc.yaml the stage declarations make.")
    parser.add_argument("--write", action="store_true", help="write dvc.yaml")
    text = dvc_yaml()
    if parser.parse_args().write:
        from tasks.files import atomic_write

        atomic_write(ROOT / "dvc.yaml", text)
    else:
        print(text, end="")
