"""Fixed costs of the pipeline: what each DVC stage spends before and after its work, and the cached flow.

Run:  python benchmarks/pipeline.py [--keep]        (several minutes: it runs `make run`'s pipeline once)

In a fresh copy of the project (git-tracked files as they are in the working tree; its own Prefect home, result
cache and MLflow store, so nothing of yours is read or changed):
1. `python -m tasks.prefect_server dvc repro` — what `make run` runs after install: one Prefect server shared by
   every stage. Per stage: the process's wall time (a `python` shim on PATH timestamps each process DVC starts),
   its work (the stage's own line "papertune stage X: W s of work, S s from process start to work"), start-up
   (process start → work) and the rest (flow teardown, interpreter exit). Fixed cost = wall − work.
2. The no-op `dvc repro`, bare and through the shared-server wrapper.
3. A fully cached `python -m flows.pipeline` (nothing to compute, training skipped).
4. One stage run alone (`python -m tasks.split`: its own server) against the same stage in run 1.
Targets (issue 10): cached flow ≤ 15 s; stage start-up ≤ 5 s; fixed costs ≤ 10% of the pipeline; no-op ≤ 2 s.
Issue 23: a small stage (split) ≤ 5 s from process start to exit on a quiet machine, alone and under `make run`.
Figures also go to benchmarks/out/pipeline.json. Run it under `flock /tmp/coord/heavy.lock` on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STAGE_LINE = re.compile(r"papertune stage (\w+): ([\d.]+) s of work, ([\d.]+) s from process start to work")

SHIM = """#!/bin/sh
# Times every `python` process DVC starts (benchmarks/pipeline.py), then runs the real interpreter.
start=$(date +%s.%N)
"{python}" "$@"
code=$?
echo "$start $(date +%s.%N) $*" >> "{log}"
exit $code
"""


def project_copy(dest: Path) -> dict:
    """Tracked files as they are in the working tree, in a git repo of their own; returns the environment."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
    shim_dir = dest.parent / "shim"
    shim_dir.mkdir(exist_ok=True)
    (shim_dir / "python").write_text(SHIM.format(python=sys.executable, log=dest.parent / "processes.log"))
    (shim_dir / "python").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(PATH=f"{shim_dir}:{BIN}:{os.environ['PATH']}", DVC_NO_ANALYTICS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=dest, env=env, check=True, capture_output=True)
    return env


def timed(cmd: list[str], cwd: Path, env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if r.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({r.returncode}):\n{(r.stdout + r.stderr)[-4000:]}")
    return seconds, r.stdout + r.stderr


def stage_rows(output: str, process_log: Path) -> list[dict]:
    """Join the stages' own timing lines with the shim's process wall times, in run order."""
    work = {m[1]: (float(m[2]), float(m[3])) for m in STAGE_LINE.finditer(output)}
    rows = []
    for line in process_log.read_text().splitlines():
        start, end, args = line.split(" ", 2)
        m = re.match(r"-m tasks\.(\w+)", args)
        if m and m[1] in work:
            w, startup = work[m[1]]
            wall = float(end) - float(start)
            rows.append(dict(stage=m[1], wall=wall, work=w, startup=startup, fixed=wall - w))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description="papertune fixed-cost benchmark")
    ap.add_argument("--keep", action="store_true", help="keep the project copy (its path is printed)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="papertune-bench-pipeline-"))
    work = tmp / "project"
    env = project_copy(work)
    log = tmp / "processes.log"
    out: dict = {"load_average_at_start": os.getloadavg()[0]}

    total, output = timed(["python", "-m", "tasks.prefect_server", "dvc", "repro"], work, env)
    rows = stage_rows(output, log)
    out["make_run"] = {"wall": total, "stages": rows, "work": sum(r["work"] for r in rows)}
    log.unlink()
    out["noop_repro"] = timed(["dvc", "repro"], work, env)[0]
    out["noop_repro_wrapped"] = timed(["python", "-m", "tasks.prefect_server", "dvc", "repro"], work, env)[0]
    out["cached_flow"] = timed(["python", "-m", "flows.pipeline"], work, env)[0]
    alone, alone_out = timed(["python", "-m", "tasks.split"], work, env)
    out["split_alone"] = {"wall": alone, "startup": float(STAGE_LINE.search(alone_out)[3])}
    shared = next(r for r in rows if r["stage"] == "split")
    out["load_average_at_end"] = os.getloadavg()[0]

    print(f"make run's pipeline (python -m tasks.prefect_server dvc repro), fresh copy: {total:.1f} s wall")
    print(f"  {'stage':<12}{'wall':>8}{'work':>8}{'start-up':>10}{'fixed':>8}")
    for r in rows:
        print(f"  {r['stage']:<12}{r['wall']:>7.1f}s{r['work']:>7.1f}s{r['startup']:>9.1f}s{r['fixed']:>7.1f}s")
    fixed = total - out["make_run"]["work"]
    print(f"  work {out['make_run']['work']:.1f} s, fixed costs {fixed:.1f} s = {fixed / total:.1%} of the wall "
          f"(target ≤ 10%); worst stage start-up {max(r['startup'] for r in rows):.1f} s (target ≤ 5 s)")
    print(f"no-op dvc repro: {out['noop_repro']:.2f} s bare, {out['noop_repro_wrapped']:.2f} s through the "
          f"shared-server wrapper (target ≤ 2 s)")
    print(f"fully cached python -m flows.pipeline: {out['cached_flow']:.1f} s (target ≤ 15 s)")
    print(f"python -m tasks.split, process start to exit (target ≤ 5 s): alone (its own server) {alone:.1f} s, "
          f"start-up {out['split_alone']['startup']:.1f} s; in the shared-server run above {shared['wall']:.1f} s, "
          f"start-up {shared['startup']:.1f} s")
    print(f"load average (1 min) at start/end: {out['load_average_at_start']:.1f} / {out['load_average_at_end']:.1f}"
          f" on {os.cpu_count()} cores")
    (ROOT / "benchmarks" / "out").mkdir(parents=True, exist_ok=True)
    (ROOT / "benchmarks" / "out" / "pipeline.json").write_text(json.dumps(out, indent=2) + "\n")
    if args.keep:
        print(f"project copy kept in {work}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
