"""Print the ROUGE table of the last evaluation and where to look next.

Run:  python -m flows.report [--params params.yaml]     (`make run` ends with it)
"""

from __future__ import annotations

import sys

from tasks.common import read_json
from tasks.params import params_arg

METRICS = ["rouge1", "rouge2", "rougeL", "rougeLsum"]


def table(report: dict) -> str:
    rows = [f"{'eval':<28}{'model':<11}" + "".join(f"{m:>10}" for m in METRICS) + f"{'rougeL 95% CI':>18}{'n':>6}"]
    blocks = [(mode, res) for mode, res in report.items() if "base" in res]
    blocks += [(f"{name}/{mode}", res) for name, modes in report.items() if "base" not in modes
               for mode, res in modes.items()]
    for name, res in blocks:
        for model in ("base", "finetuned"):
            r = res[model]
            ci = f"[{r['rougeL_ci95'][0]:.3f}, {r['rougeL_ci95'][1]:.3f}]"
            rows.append(f"{name:<28}{model:<11}" + "".join(f"{r[m]:>10.3f}" for m in METRICS) + f"{ci:>18}{r['n']:>6}")
    return "\n".join(rows)


if __name__ == "__main__":
    p = params_arg(__doc__.splitlines()[0])
    if not p.paths.eval_metrics.exists():
        sys.exit(f"error: {p.paths.eval_metrics} not found: run the pipeline first (make run / dvc repro)")
    print(table(read_json(p.paths.eval_metrics)))
    print(f"\nplots: {p.paths.plots_dir}/   predictions: {p.paths.predictions}")
    print("compare runs: make ui (MLflow at http://127.0.0.1:5000)   metrics: dvc metrics show   plots: dvc plots show")
