"""MLflow overhead per pipeline run: what tracking costs next to the work it records (figures, never pass/fail).

Run:  python benchmarks/tracking.py [--params params.yaml] [--repeats 3]

Builds the builtin tiny base model and an (untrained) LoRA adapter in a temp folder, then times, in a fresh
SQLite store, each MLflow step the pipeline takes: opening the store (first time: creating the database), a
train run's start (tags, stale-run check) with params and both splits as dataset inputs, logging the adapter
as a pyfunc model, registering it, an evaluation run with its metrics and the promotion decision, and loading
the registered model back and answering one question. Uses the project's splits when they exist
(`dvc repro split`), else a 200-row synthetic split.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.params import load_params  # noqa: E402


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--params", default="params.yaml")
    args.add_argument("--repeats", type=int, default=3)
    a = args.parse_args()
    p = load_params(a.params)
    tmp = Path(tempfile.mkdtemp(prefix="bench-mlflow-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"

    from peft import LoraConfig, get_peft_model

    from tasks import base_model, tracking
    from tasks.adapter import META
    from tasks.files import write_json
    from tasks.hashing import dir_hash
    from tasks.mlflow_model import log_adapter_model
    from tasks.params import flatten

    paths = p.paths.model_copy(update={"base_model": tmp / "base", "adapter": tmp / "adapter"})
    base_model.run(p.model.model_copy(update={"name": "builtin:tiny-llama"}), paths)
    model = get_peft_model(base_model.load_model(paths.base_model, "none", "float32"),
                           LoraConfig(r=p.train.lora_r, target_modules=p.train.target_modules, task_type="CAUSAL_LM"))
    model.save_pretrained(paths.adapter)
    base_model.load_tokenizer(paths.base_model).save_pretrained(paths.adapter)
    write_json(paths.adapter / META, {"prompt_template": p.train.prompt_template, "system_prompt": "",
                                      "quantization": "none", "compute_dtype": "float32"})
    splits = [Path(p.paths.train_split), Path(p.paths.eval_split)]
    if not all(s.exists() for s in splits):
        splits = [tmp / "train.jsonl", tmp / "eval.jsonl"]
        for s in splits:
            s.write_text("".join(json.dumps({"question": f"q{i}?", "answer": f"a{i}", "grounding": {"r": 1.0}}) + "\n"
                                 for i in range(200)))
    cfg = p.mlflow.model_copy(update={"artifact_location": str(tmp / "mlartifacts")})

    first_open, _ = timed(lambda: tracking.open_store(cfg))
    rows: dict[str, list[float]] = {}
    score = {"rougeL": 0.2, "rougeL_ci95": [0.15, 0.25], "n": 40}
    for _ in range(a.repeats):
        with tracking.start_run(cfg, "train", "bench") as (mlflow, run):
            t0 = time.perf_counter()
            mlflow.log_params(flatten(p))
            for s, name, ctx in ((splits[0], "train", "training"), (splits[1], "eval", "validation")):
                tracking.log_dataset(mlflow, s, name, ctx)
            t1 = time.perf_counter()
            info = log_adapter_model(mlflow, paths.adapter, paths.base_model, cfg.model_max_new_tokens, {})
            t2 = time.perf_counter()
            version = tracking.register(mlflow, cfg, info.model_uri, dir_hash(paths.adapter) + str(t2))
            t3 = time.perf_counter()
        rows.setdefault("params + 2 dataset inputs", []).append(t1 - t0)
        rows.setdefault("log pyfunc model (adapter)", []).append(t2 - t1)
        rows.setdefault("register version", []).append(t3 - t2)
        t4 = time.perf_counter()
        with tracking.start_run(cfg, "evaluate", "bench-eval") as (mlflow, run):
            t5 = time.perf_counter()
            mlflow.log_metrics({f"m{i}": 0.1 for i in range(20)})
            tracking.promote(mlflow.MlflowClient(), cfg, version, score, "bench")
        rows.setdefault("open a run (tags, stale check)", []).append(t5 - t4)
        rows.setdefault("eval metrics + promotion + close", []).append(time.perf_counter() - t5)
    load, loaded = timed(lambda: tracking.load_logged_model(cfg, f"models:/{cfg.registered_model}/1"))
    answer, _ = timed(lambda: loaded.predict(["What does LoRA freeze?"]))

    print(f"MLflow overhead, SQLite store, median of {a.repeats} (splits: {splits[0]} {splits[0].stat().st_size} B)")
    print(f"{'create store + experiment (first run only)':46s} {first_open:7.2f} s")
    total = 0.0
    for name, values in rows.items():
        total += statistics.median(values)
        print(f"{name:46s} {statistics.median(values):7.2f} s")
    print(f"{'= per train + eval run (after the first)':46s} {total:7.2f} s")
    print(f"{'load models:/…/1 (base + adapter)':46s} {load:7.2f} s")
    print(f"{'predict one question':46s} {answer:7.2f} s")
    models = sum(f.stat().st_size for f in (tmp / "mlartifacts").rglob("models/*/artifacts/**/*") if f.is_file())
    base = sum(f.stat().st_size for f in paths.base_model.rglob("*") if f.is_file())
    print(f"artifacts per logged model: {models // a.repeats // 1024} KiB (the adapter; the base model's "
          f"{base // 1024} KiB stay in the project)")

if __name__ == "__main__":
    main()
