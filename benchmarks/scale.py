"""Scale: ingest → chunk → QA (extractive) on 10, 100 and 1,000 synthetic papers, side by side.

Run:  python benchmarks/scale.py [--papers 10 100 1000] [--runner processes] [--no-add]
      (renders the corpus first with benchmarks/synth_corpus.py into benchmarks/out/corpus; ~2 min per 1,000)

Each size runs in a fresh process with a fresh result cache, against one local Prefect server (tasks.prefect_server)
with a fresh database: wall time, pages/s end to end, peak RSS of the process tree (sampled every 0.2 s: the
process-pool workers count too), and how many task runs Prefect recorded. Then, on the largest size, one more
paper is added and the three stages run again with the same cache: only that paper should be computed.
Targets (issue 10, 2 cores): ≥ 40 pages/s; peak memory flat in the corpus size; adding one paper ≤ 20 s.
Figures also go to benchmarks/out/scale.json. Run it under `flock /tmp/coord/heavy.lock` on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.synth_corpus import generate  # noqa: E402
from tasks.prefect_server import start_server, stop_server, wait_ready  # noqa: E402

CHILD = """
import sys, time
sys.path.insert(0, {root!r})
from prefect import flow
from tasks import base_model, chunk, ingest, qa
from tasks.files import read_json
from tasks.runner import call, task_runner
from tasks.stages import stage
from tasks.params import Params, load_params
from pathlib import Path
raw = load_params({params!r}).model_dump()
out = Path({out!r})
raw["paths"] = {{k: (Path({root!r}) / v if k == "tokenizer_corpus" else out / v) for k, v in raw["paths"].items()}}
raw["paths"]["pdf_dir"] = Path({corpus!r})
raw["runner"] = {{"kind": {runner!r}, "max_workers": 2, "dask_address": None}}
p = Params.model_validate(raw)
if not p.paths.base_model.exists():
    base_model.run(p.model, p.paths)  # built once per size, outside the timed part (it does not depend on the PDFs)
start = time.perf_counter()
flow(name="scale", task_runner=task_runner(p.runner), persist_result=False)(
    lambda: [call(stage(name), p) for name in ("ingest", "chunk", "qa")])()
seconds = time.perf_counter() - start
report = read_json(p.paths.ingest_report)
pages = sum(f["pages"] or 0 for f in report["files"])
print("RESULT", seconds, pages, sum(1 for _ in open(p.paths.chunks)), read_json(p.paths.qa_report)["kept"])
"""


def status_mb(pid: int, field: str) -> float:
    """A memory line of /proc/<pid>/status in MB ("VmRSS": resident now, "VmHWM": its peak so far)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(x for x in status.splitlines() if x.startswith(field)).split()[1]) / 1024


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants (process-pool workers, the tokenizer's threads)."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            total += status_mb(p, "VmRSS")
            for t in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in Path(f"/proc/{p}/task/{t}/children").read_text().split()]
        except (OSError, StopIteration):
            continue
    return total


def task_runs(api: str) -> int:
    req = urllib.request.Request(f"{api}/task_runs/count", data=b"{}", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return int(r.read())


def run_case(corpus: Path, out: Path, runner: str, env: dict, api: str) -> dict:
    code = CHILD.format(root=str(ROOT), out=str(out), corpus=str(corpus), runner=runner,
                        params=str(ROOT / "params.yaml"))
    before = task_runs(api)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    peak = [0.0, 0.0]  # the process tree; the main process alone (its workers are the difference)

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss_mb(proc.pid))
            try:
                peak[1] = status_mb(proc.pid, "VmHWM")
            except (OSError, StopIteration):
                pass
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    sampler.join()
    if proc.returncode:
        sys.exit(f"scale run failed:\n{stderr[-4000:]}")
    line = next(x for x in stdout.splitlines() if x.startswith("RESULT"))
    seconds, pages, chunks, pairs = (float(x) for x in line.split()[1:])
    time.sleep(2)  # the server records the last task runs from their events
    computed = [x for x in stderr.splitlines() if " computed, " in x]
    return dict(seconds=seconds, pages=int(pages), chunks=int(chunks), pairs=int(pairs), pages_per_s=pages / seconds,
                peak_rss_mb=peak[0], main_peak_rss_mb=peak[1], task_runs=task_runs(api) - before,
                computed=[x.split(" - ", 1)[-1] for x in computed])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--papers", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--runner", default="processes", choices=["threads", "processes", "dask"])
    ap.add_argument("--no-add", action="store_true", help="skip the add-one-paper rerun")
    args = ap.parse_args()
    biggest = max(args.papers)
    corpus_dir = ROOT / "benchmarks" / "out" / "corpus"
    files = generate(biggest + 1, corpus_dir, workers=2)
    tmp = Path(tempfile.mkdtemp(prefix="papertune-bench-scale-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false", HF_HUB_OFFLINE="1",
               PREFECT_LOGGING_LEVEL="INFO", TOKENIZERS_PARALLELISM="false")
    os.environ.update({k: v for k, v in env.items() if k.startswith("PREFECT_")})
    server = start_server()
    rows = {}
    try:
        wait_ready(server.url, 120, server.process)
        env["PREFECT_API_URL"] = server.url
        for n in args.papers:
            corpus = tmp / f"corpus-{n}"
            corpus.mkdir()
            for f in files[:n]:
                os.symlink(f, corpus / f.name)
            case_env = {**env, "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp / f"results-{n}")}
            rows[n] = run_case(corpus, tmp / f"out-{n}", args.runner, case_env, server.url)
            print(f"{n} papers: {rows[n]}", flush=True)
            if n == biggest and not args.no_add:
                os.symlink(files[n], corpus / files[n].name)
                rows["add_one"] = run_case(corpus, tmp / f"out-{n}", args.runner, case_env, server.url)
                print(f"+1 paper: {rows['add_one']}", flush=True)
    finally:
        stop_server(server)
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\ningest → chunk → QA (extractive), runner: {args.runner}, {os.cpu_count()} cores, "
          f"load average at end {os.getloadavg()[0]:.1f}")
    print(f"  {'papers':>8}{'pages':>8}{'chunks':>9}{'pairs':>8}{'wall':>9}{'pages/s':>9}{'peak RSS':>10}"
          f"{'main proc':>11}{'task runs':>11}")
    for n, r in rows.items():
        print(f"  {str(n):>8}{r['pages']:>8}{r['chunks']:>9}{r['pairs']:>8}{r['seconds']:>8.1f}s"
              f"{r['pages_per_s']:>9.1f}{r['peak_rss_mb']:>8.0f}MB{r['main_peak_rss_mb']:>9.0f}MB{r['task_runs']:>11}")
    print("  peak RSS: the stage process and its worker processes together; main proc: the stage process alone")
    if "add_one" in rows:
        print("  adding one paper to the largest corpus: " + "; ".join(rows["add_one"]["computed"]))
    (ROOT / "benchmarks" / "out").mkdir(parents=True, exist_ok=True)
    (ROOT / "benchmarks" / "out" / "scale.json").write_text(json.dumps(
        {"runner": args.runner, **{str(k): v for k, v in rows.items()}}, indent=2) + "\n")


if __name__ == "__main__":
    main()
