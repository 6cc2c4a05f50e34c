"""Print the scores of the last evaluation (ROUGE, token F1, exact match, by question kind) and where to look next.

Run:  python -m flows.report [--params params.yaml]     (`make run` ends with it)
"""

from __future__ import annotations

import sys

from tasks.files import read_json
from tasks.params import params_arg

READ = "read_documents"  # tasks.evaluate.READ (not imported: the report must not pay evaluate's imports)
CHOICE = "multiple_choice"  # tasks.evaluate.CHOICE


def _ci(r: dict, key: str, digits: int = 3) -> str:
    return f"[{r[key + '_ci95'][0]:.{digits}f}, {r[key + '_ci95'][1]:.{digits}f}]"


def blocks(report: dict) -> list[tuple[str, dict]]:
    """(name, {"base": ..., "finetuned": ...}) for the held-out modes first, then each gold set's modes."""
    out = [(mode, res) for mode, res in report.items() if mode not in (READ, CHOICE) and "base" in res]
    out += [(f"{name}/{mode}", res) for name, modes in report.items()
            if name not in (READ, CHOICE) and "base" not in modes for mode, res in modes.items()]
    return out


def table(report: dict) -> str:
    """ROUGE-L and token F1 with their CIs, exact match, and the judge's mean rating (1-5) when evaluate.judge ran."""
    judged = any("judge" in res[m] for _, res in blocks(report) for m in ("base", "finetuned"))
    rows = [f"{'eval':<24}{'model':<11}{'ROUGE-L':>9}{'95% CI':>17}{'F1':>8}{'95% CI':>17}{'EM':>7}{'n':>6}"
            + (f"{'judge':>7}{'95% CI':>15}" if judged else "")]
    for name, res in blocks(report):
        for model in ("base", "finetuned"):
            r = res[model]
            rows.append(f"{name:<24}{model:<11}{r['rougeL']:>9.3f}{_ci(r, 'rougeL'):>17}{r['f1']:>8.3f}"
                        f"{_ci(r, 'f1'):>17}{r['exact_match']:>7.3f}{r['n']:>6}"
                        + ((f"{r['judge']:>7.2f}{_ci(r, 'judge', 2):>15}" if "judge" in r else f"{'-':>7}{'':>15}")
                           if judged else ""))
    return "\n".join(rows)


def apart_table(report: dict) -> str:
    """Token F1 without the section questions, and the multiple-choice accuracy: what the headline is not carried by."""
    rows = []
    for name, res in blocks(report):
        if res["base"].get("without_section"):
            b, t = res["base"]["without_section"], res["finetuned"]["without_section"]
            rows.append(f"{name + ', without section questions':<44}token F1 {b['f1']:.3f} {_ci(b, 'f1')} → "
                        f"{t['f1']:.3f} {_ci(t, 'f1')}  (n={t['n']})")
    if choice := report.get(CHOICE):
        b, t = choice["base"], choice["finetuned"]
        rows.append(f"{'multiple choice, closed book':<44}accuracy {b['accuracy']:.3f} {_ci(b, 'accuracy')} → "
                    f"{t['accuracy']:.3f} {_ci(t, 'accuracy')}  (n={t['n']}, chance {t['chance']:.2f})")
    return "\n".join(rows)


def kind_table(report: dict) -> str:
    """Token F1 per question kind, base → fine-tuned, for each evaluation."""
    rows = [f"{'eval':<24}{'kind':<14}{'n':>5}{'F1 base':>10}{'F1 tuned':>10}{'ROUGE-L tuned':>15}"]
    for name, res in blocks(report):
        for kind, tuned in res["finetuned"]["by_kind"].items():
            base = res["base"]["by_kind"][kind]
            rows.append(f"{name:<24}{kind:<14}{tuned['n']:>5}{base['f1']:>10.3f}{tuned['f1']:>10.3f}"
                        f"{tuned['rougeL']:>15.3f}")
    return "\n".join(rows)


def reading(report: dict) -> str:
    read = report.get(READ)
    if not read:
        return ""
    held = read["held_out_documents"]
    return (f"training read {len(read['documents'])} document(s) (train.read_documents={read['setting']}); "
            f"{len(held)} of them held out (their text read, none of their QA pairs trained on)")


if __name__ == "__main__":
    p = params_arg(__doc__.splitlines()[0])
    if not p.paths.eval_metrics.exists():
        sys.exit(f"error: {p.paths.eval_metrics} not found: run the pipeline first (make run / dvc repro)")
    metrics = read_json(p.paths.eval_metrics)
    print(table(metrics))
    if apart := apart_table(metrics):
        print(f"\n{apart}")
    print()
    print(kind_table(metrics))
    if line := reading(metrics):
        print(f"\n{line}")
    print(f"\nplots: {p.paths.plots_dir}/   predictions: {p.paths.predictions}   (python -m flows.ask \"...\" --base)")
    print("compare runs: make ui (MLflow at http://127.0.0.1:5000)   metrics: dvc metrics show   plots: dvc plots show")
