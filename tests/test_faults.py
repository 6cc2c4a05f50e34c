"""The fault suite: stale caches, lost outputs, unclear errors and stray processes (issue 11), each reproduced
and checked for the fixed behaviour: what is kept, the one-line message, what process remains."""

import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from prefect import flow, task

from tasks import cache, files, log, runner
from tasks.cache import CACHE
from tasks.files import atomic_dir, atomic_write, read_jsonl
from tasks.hashing import module_files, project_modules, source_hash
from tasks.log import PipelineError, shown
from tasks.params import load_params
from tasks.prefect_server import check_database
from tasks.runner import project_lock
from tests.helpers import ROOT, make_params, write_params

BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}

# ---------------------------------------------------------------------------------------------- one cache rule


def test_code_hash_follows_every_project_import(tmp_path):
    pkg = tmp_path / "tasks"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "stage.py").write_text("import json\nfrom tasks.log import logger\n\n"
                                  "def run():\n    from tasks.helper import f  # lazy\n    return f()\n")
    (pkg / "helper.py").write_text("from . import deep\n\ndef f():\n    return deep.x\n")
    (pkg / "deep.py").write_text("x = 1\n")
    (pkg / "other.py").write_text("y = 2\n")
    (pkg / "log.py").write_text("from tasks import other\n")  # infrastructure: neither listed nor followed
    assert project_modules("tasks.stage", tmp_path) == ["tasks.deep", "tasks.helper", "tasks.stage"]

    before = source_hash("tasks.stage", tmp_path)
    (pkg / "other.py").write_text("y = 3\n")  # not imported: same key
    assert source_hash("tasks.stage", tmp_path) == before
    (pkg / "log.py").write_text("# a new log line\nfrom tasks import other\n")  # logging computes no result
    (pkg / "__init__.py").write_text("import logging\n")
    assert source_hash("tasks.stage", tmp_path) == before
    (pkg / "deep.py").write_text("x = 2\n")  # imported two levels down, through a lazy and a relative import
    assert source_hash("tasks.stage", tmp_path) != before

    # The cases of the issue: qa uses chunk's sentence splitter; evaluate builds prompts with the adapter module.
    assert "tasks/text.py" in module_files("tasks.qa")
    assert {"tasks/adapter.py", "tasks/base_model.py"} <= set(module_files("tasks.evaluate"))
    assert "tasks/params.py" in module_files("tasks.base_model") and "tasks/files.py" in module_files("tasks.split")


@task(**CACHE)
def _double(x: int) -> int:
    return 2 * x


def test_prefect_cache_key_includes_the_imported_code(fresh_cache, monkeypatch):
    @flow
    def twice() -> list[str]:
        return [_double(21, return_state=True).name for _ in range(2)]

    assert twice() == ["Completed", "Cached"]
    assert twice() == ["Cached", "Cached"]
    # Any edit to a module the task's module imports changes code_hash, hence the key.
    monkeypatch.setattr(cache, "code_hash", lambda name: "edited " + name)
    assert twice() == ["Completed", "Cached"]

    # Run as `python -m tasks.chunk`, a stage's tasks live in __main__: the key still uses the stage's module.
    from tasks import chunk

    tasks_in_chunk = [v for v in vars(chunk).values() if hasattr(v, "fn") and hasattr(v, "cache_policy")]
    assert tasks_in_chunk and {cache._module_name(t.fn) for t in tasks_in_chunk} == {"tasks.chunk"}


@task(**CACHE, name="word-set")
def _word_set(text: str) -> set[str]:
    return set(text.split())


def test_a_result_the_cache_cannot_hold_is_named_not_silently_recomputed(fresh_cache, caplog):
    @flow
    def words() -> list[set[str]]:
        return list(cache.map_cached_iter(_word_set, ["a b", "c"], desc="words"))

    with caplog.at_level("INFO"):
        assert words() == words() == [{"a", "b"}, {"c"}]  # right both times, computed both times
    assert [m for m in caplog.messages if m.startswith("words:")] == ["words: 2 computed, 0 from cache"] * 2
    assert any(m.startswith("_word_set: a result is not JSON (Object of type set is not JSON serializable)")
               for m in caplog.messages)


def _build_base(p, seed: int):
    from tasks import base_model

    base_model.run(p.model.model_copy(update={"tiny": p.model.tiny.model_copy(update={"seed": seed})}), p.paths)


def test_training_key_covers_base_model_content_and_code(tmp_path, monkeypatch):
    from tasks.adapter import META
    from tasks.train import read_chunk_ids, run_key, skip_reason

    p = make_params(tmp_path, train={"min_changed_fraction": 1.0})  # data-wise, any change would be skipped
    _build_base(p, seed=0)
    files.write_json(p.paths.split_report, {"train_hash": "t", "eval_hash": "e"})
    chunks = [{"chunk_id": f"c{i}", "doc_id": "d", "title": "LoRA", "section": "Method", "text": f"Text {i}."}
              for i in range(2)]
    files.write_jsonl(p.paths.chunks, chunks)
    key = run_key(p.train, p.paths)
    files.write_json(p.paths.adapter / META, {
        "run_key": key["key"], "base_model": key["base_model"], "train_params": p.train.model_dump(mode="json"),
        "code_hash": key["code_hash"], "train_pair_ids": ["a", "b"]})
    assert skip_reason(p.train, p.paths, key, ["a", "b"]).startswith("QA dataset and training params unchanged")

    # Training reads the documents' text (train.read_documents: all): one edited chunk, same QA pairs, retrains
    # (at the default threshold: any change of the training data).
    assert p.train.read_documents == "all"
    files.write_jsonl(p.paths.chunks, [chunks[0], {**chunks[1], "text": "Text 1, corrected."}])
    reread = run_key(p.train, p.paths)
    assert reread["key"] != key["key"]
    for threshold, decision in ((0.0, None), (0.5, "only 40.0% of the training data changed")):  # 2 of 5 ids
        cfg = p.train.model_copy(update={"min_changed_fraction": threshold})
        files.write_jsonl(p.paths.chunks, chunks)
        files.write_json(p.paths.adapter / META, {
            "run_key": key["key"], "base_model": key["base_model"], "train_params": cfg.model_dump(mode="json"),
            "code_hash": key["code_hash"], "train_pair_ids": ["a", "b"],
            "read_chunk_ids": read_chunk_ids(cfg, p.paths)})
        files.write_jsonl(p.paths.chunks, [chunks[0], {**chunks[1], "text": "Text 1, corrected."}])
        reason = skip_reason(cfg, p.paths, reread, ["a", "b", *read_chunk_ids(cfg, p.paths)])
        assert reason == decision or reason.startswith(decision), (threshold, reason)
    files.write_jsonl(p.paths.chunks, chunks)
    files.write_json(p.paths.adapter / META, {
        "run_key": key["key"], "base_model": key["base_model"], "train_params": p.train.model_dump(mode="json"),
        "code_hash": key["code_hash"], "train_pair_ids": ["a", "b"],
        "read_chunk_ids": read_chunk_ids(p.train, p.paths)})

    _build_base(p, seed=1)  # same name, revision and tokenizer: other weights
    rebuilt = run_key(p.train, p.paths)
    assert rebuilt["key"] != key["key"] and skip_reason(p.train, p.paths, rebuilt, ["a", "b"]) is None

    _build_base(p, seed=0)
    assert run_key(p.train, p.paths) == key
    monkeypatch.setattr("tasks.train.code_hash", lambda name: "tasks/train.py edited")
    edited = run_key(p.train, p.paths)
    assert edited["key"] != key["key"] and skip_reason(p.train, p.paths, edited, ["a", "b"]) is None


def test_dvc_yaml_is_the_one_the_stage_declarations_make():
    from tasks.stages import dvc_yaml

    assert (ROOT / "dvc.yaml").read_text() == dvc_yaml(), "dvc.yaml is stale: python -m tasks.stages --write"
    stages = yaml.safe_load(dvc_yaml())["stages"]
    for name, stage in stages.items():
        code = {d for d in stage["deps"] if d.endswith(".py")}
        assert f"tasks/{name}.py" in code and "tasks/params.py" in code, name
        # Infrastructure computes no result: editing it must not make DVC rerun anything.
        assert not code & {"tasks/log.py", "tasks/cache.py", "tasks/runner.py", "tasks/prefect_server.py",
                           "tasks/tracking.py", "tasks/__init__.py"}, name
        if name != "params":
            assert "${paths.params_check}" in stage["deps"], name  # a bad params file stops DVC first
        outs = [o for kind in ("outs", "metrics", "plots") for o in stage.get(kind, [])]
        # DVC deletes outputs before running a stage unless they persist; stages replace them on success.
        assert outs and all(isinstance(o, dict) and next(iter(o.values())).get("persist") for o in outs), name
    assert "${paths.chunks}" in stages["train"]["deps"]  # training reads the documents' text
    assert "tasks/text.py" in stages["qa"]["deps"]  # editing split_sentences recomputes QA


def test_a_stage_reads_only_the_paths_it_declares(tmp_path):
    """What a stage reads is what tasks/stages.py says it reads (hence dvc.yaml and the cache keys): reading another
    path fails at once, naming the declaration to fix."""
    from tasks.params import Paths
    from tasks.runner import call_run
    from tasks.stages import STAGES, stage

    p = make_params(tmp_path)
    with pytest.raises(AttributeError, match=r"stage split reads paths.adapter, which it does not declare"):
        call_run(lambda split, paths: paths.adapter, stage("split"), p)
    assert call_run(lambda split, paths: paths.chunks, stage("split"), p) == p.paths.chunks
    # Statically too: every paths.<field> a stage's module names is declared (all but the lock).
    for s in STAGES:
        used = set(re.findall(r"\bpaths\.(\w+)", (ROOT / "tasks" / f"{s.name}.py").read_text()))
        assert used & set(Paths.model_fields) - {"lock"} <= set(s.paths), s.name


# ---------------------------------------------------------------------------------------------- keep good outputs


def dvc_project(tmp_path: Path, params_text: str) -> Path:
    """This project's code, dvc.yaml and params in a fresh git + DVC repository."""
    work = tmp_path / "project"
    for folder in ("tasks", "flows"):
        shutil.copytree(ROOT / folder, work / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", work)
    (work / "params.yaml").write_text(params_text)
    for cmd in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"]):
        subprocess.run(cmd, cwd=work, check=True, env=ENV)
    return work


def test_bad_params_stop_dvc_repro_before_any_output_is_removed(tmp_path):
    assert "\n  learning_rate:" in (ROOT / "params.yaml").read_text()
    work = dvc_project(tmp_path, (ROOT / "params.yaml").read_text().replace("  learning_rate:", "  learnig_rate:"))
    kept = {"data/adapter/adapter_model.safetensors": "weights", "metrics/train.json": '{"train_loss": 1.0}',
            "metrics/loss.csv": "step,train_loss,eval_loss\n", "data/qa.jsonl": '{"question": "q"}\n',
            "data/params.ok": "params.yaml is valid\n"}  # the params stage's own output too
    for rel, text in kept.items():
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_text(text)
    r = subprocess.run([str(BIN / "dvc"), "repro"], cwd=work, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "error: params.yaml: train: unknown key 'learnig_rate' (did you mean learning_rate?)" in r.stderr
    assert "Running stage 'params'" in r.stdout and r.stdout.count("Running stage") == 1, r.stdout
    assert {rel: (work / rel).read_text() for rel in kept} == kept


@pytest.mark.slow  # a real stage run under DVC (imports, Prefect)
def test_failed_stage_rerun_keeps_its_outputs(tmp_path):
    work = dvc_project(tmp_path, (ROOT / "params.yaml").read_text())
    subprocess.run([str(BIN / "dvc"), "repro", "params"], cwd=work, env=ENV, check=True, capture_output=True)
    (work / "data" / "split").mkdir(parents=True)
    kept = {"data/split/train.jsonl": '{"q": "kept"}\n', "data/split/eval.jsonl": '{"q": "kept"}\n',
            "data/reports/split.json": '{"kept": true}\n'}
    for rel, text in kept.items():
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_text(text)
    (work / "data" / "chunks.jsonl").write_text('{"chunk_id": "c", "text": "t"}\n')
    (work / "data" / "qa.jsonl").write_text('{"question": "q", "answer": "a"}\n{"question": "cut off\n')
    env = {**ENV, "PREFECT_HOME": str(tmp_path / "prefect")}
    r = subprocess.run([str(BIN / "dvc"), "repro", "--single-item", "split"], cwd=work, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    error = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert error == ["error: split: data/qa.jsonl:2: not valid JSON (Unterminated string starting at column 14); "
                     "fix or delete that line, or rerun the stage that writes the file"], r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert {rel: (work / rel).read_text() for rel in kept} == kept


def test_writes_are_atomic_with_normal_permissions(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    atomic_write(tmp_path / "out" / "report.json", "{}")
    assert (tmp_path / "out" / "report.json").stat().st_mode & 0o777 == 0o666 & ~umask
    with atomic_dir(tmp_path / "adapter") as staging:
        (staging / "w").write_text("x")
        os.chmod(staging / "w", 0o600)  # as safetensors writes adapter_model.safetensors
    assert (tmp_path / "adapter").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "adapter" / "w").stat().st_mode & 0o777 == 0o666 & ~umask
    # No staging file or folder is left beside the outputs.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "out"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["report.json"]


@pytest.mark.slow  # trains the builtin model for two steps
def test_checkpoints_get_the_usual_permissions(tmp_path, monkeypatch):
    """safetensors writes 0600 files: a checkpoint's weights were readable by their owner only. A training stopped
    after its first checkpoint leaves it with the umask's modes, and its run says how the training ended."""
    from tasks import tracking, train
    from tests.helpers import crash_training_at, in_flow

    p = make_params(tmp_path, train={"max_steps": 4, "save_steps": 1, "eval_steps": 4, "logging_steps": 1,
                                     "per_device_train_batch_size": 2})
    p = p.model_copy(update={"mlflow": p.mlflow.model_copy(update={
        "experiment_name": "checkpoints", "artifact_location": str(tmp_path / "mlartifacts")})})
    _build_base(p, seed=0)
    text = "LoRA freezes the pretrained weights and trains two low-rank matrices per layer."
    files.write_jsonl(p.paths.chunks, [{"chunk_id": "c", "doc_id": "d", "title": "LoRA", "section": "2 Method",
                                         "kind": "text", "text": text}])
    pairs = [{"pair_id": f"p{i}", "doc_id": "d", "chunk_id": "c", "question": f"What does LoRA freeze? ({i})",
              "answer": "The pretrained weights.", "context": text} for i in range(6)]
    files.write_jsonl(p.paths.train_split, pairs[:4])
    files.write_jsonl(p.paths.eval_split, pairs[4:])
    files.write_json(p.paths.split_report, {"train_hash": "t", "eval_hash": "e"})
    crash_training_at(monkeypatch, 2)  # checkpoint-1 is saved
    with pytest.raises(RuntimeError, match="simulated crash"):
        in_flow(train.run, p.train, p.mlflow, p.paths, p)
    umask = os.umask(0o022)
    os.umask(umask)
    saved = [f for f in (p.paths.checkpoints / "checkpoint-1").rglob("*") if f.is_file()]
    assert "adapter_model.safetensors" in {f.name for f in saved}
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in saved} == {f.name: oct(0o666 & ~umask) for f in saved}

    run_id = files.read_json(p.paths.checkpoints / "papertune_run.json")["mlflow_run_id"]
    _, client, _ = tracking.open_store(p.mlflow)
    run = client.get_run(run_id)
    assert (run.info.status, run.data.tags["papertune.train_decision"]) == ("FAILED", "failed: RuntimeError: simulated crash")


def test_unwritable_output_names_the_path(tmp_path):
    (tmp_path / "metrics").write_text("a file where a folder should be")
    with pytest.raises(PipelineError, match=r"cannot write .*metrics/train.json: .*point paths"):
        atomic_write(tmp_path / "metrics" / "train.json", "{}")
    with pytest.raises(PipelineError, match=r"cannot write .*metrics/adapter"):
        with atomic_dir(tmp_path / "metrics" / "adapter"):
            pass
    if os.geteuid() != 0:  # root writes through permissions
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        with pytest.raises(PipelineError, match=r"cannot write .*ro/x.json: Permission denied"):
            atomic_write(ro / "x.json", "{}")


# ---------------------------------------------------------------------------------------------- one-line errors


def test_bad_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "chunks.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2\n')
    with pytest.raises(PipelineError, match=rf"^{path}:3: not valid JSON .*fix or delete that line"):
        read_jsonl(path)
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(PipelineError, match=rf"^{path}:2: expected a JSON object, got list"):
        read_jsonl(path)
    path.write_bytes(b'{"a": 1}\n{"a": "\xff"}\n')
    with pytest.raises(PipelineError, match=rf"^{path}:2: not UTF-8 text"):
        read_jsonl(path)
    path.write_text('{"a": 1}\n\n{"b": "\\u00e9"}\n')
    assert read_jsonl(path) == [{"a": 1}, {"b": "é"}]


@pytest.mark.parametrize(
    "edit, message",
    [
        (("  learning_rate:", "  learnig_rate:"), "train: unknown key 'learnig_rate' (did you mean learning_rate?)"),
        (("train:", "trian:"), "unknown key 'trian' (did you mean train?)"),
        (("  max_steps:", "  max_stesp: 3\n  max_steps:"), "train: unknown key 'max_stesp' (did you mean max_steps?)"),
        (("  seed: 7\n", ""), "split.seed: missing key"),
        # Every error at once, one line each: unknown keys, then bad values, then missing keys.
        (("  learning_rate:", "  learnig_rate:", "  seed: 7\n", "", "  lora_r:", "  lora_rank:",
          "  max_steps:", "  max_steps: many\n  old_max_steps:"),
         "train: unknown key 'lora_rank' (did you mean lora_r?)\n"
         "train: unknown key 'old_max_steps'\n"
         "train: unknown key 'learnig_rate' (did you mean learning_rate?)\n"
         "train.max_steps: Input should be a valid integer, unable to parse string as an integer, got 'many'\n"
         "split.seed: missing key"),
    ],
)
def test_params_typo_says_unknown_key_first(tmp_path, edit, message):
    text = (ROOT / "params.yaml").read_text()
    for old, new in zip(edit[::2], edit[1::2]):
        assert old in text
        text = text.replace(old, new, 1)
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(SystemExit) as e:
        load_params(tmp_path / "params.yaml")
    assert str(e.value) == "\n".join(f"error: {tmp_path / 'params.yaml'}: {line}" for line in message.splitlines())


def _corrupt_dbs(tmp_path: Path) -> dict[str, Path]:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database" * 500)
    truncated = tmp_path / "truncated.db"
    with sqlite3.connect(truncated) as con:
        con.execute("create table runs (id integer primary key, body text)")
        con.executemany("insert into runs (body) values (?)", [("x" * 500,)] * 2000)
    con.close()
    with open(truncated, "r+b") as f:
        f.truncate(truncated.stat().st_size // 2)
    return {"file is not a database": garbage, "malformed": truncated}


def test_a_new_prefect_database_starts_from_the_migrated_template_and_an_old_one_is_kept(tmp_path, monkeypatch):
    """A new project's first server skips Prefect's 6-15 s of migrations by copying a migrated empty database;
    a database with run history is never replaced, and without a template the server migrates as before."""
    from tasks import prefect_server

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("PREFECT_API_DATABASE_CONNECTION_URL", raising=False)
    monkeypatch.delenv("PREFECT_SERVER_DATABASE_CONNECTION_URL", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "first"))
    migrated = tmp_path / "first" / "prefect.db"
    migrated.parent.mkdir()
    with sqlite3.connect(migrated) as con:  # what the server leaves after migrating: the schema's version
        con.execute("CREATE TABLE alembic_version (version_num TEXT)")
        con.execute("INSERT INTO alembic_version VALUES ('head')")
    con.close()
    assert prefect_server._database_path() == migrated
    assert not prefect_server.seed_database(tmp_path / "none" / "prefect.db")  # no template yet: nothing to copy
    assert not (tmp_path / "none").exists()

    prefect_server.save_template(migrated)
    template = prefect_server.migrated_template()
    assert template.is_file() and not list(template.parent.glob("*.tmp"))
    new = tmp_path / "second" / "prefect.db"
    assert prefect_server.seed_database(new)
    with sqlite3.connect(new) as con:
        assert con.execute("SELECT version_num FROM alembic_version").fetchall() == [("head",)]
    con.close()
    history = tmp_path / "third" / "prefect.db"
    history.parent.mkdir()
    history.write_bytes(b"runs of last week")
    assert not prefect_server.seed_database(history) and history.read_bytes() == b"runs of last week"


def test_corrupt_prefect_db_is_one_line(tmp_path, monkeypatch):
    healthy = tmp_path / "healthy.db"
    sqlite3.connect(healthy).execute("create table t (x)").connection.close()
    check_database(healthy)
    for why, db in _corrupt_dbs(tmp_path).items():
        with pytest.raises(PipelineError, match=rf"{db} is corrupt \(.*{why}.*\).*delete it \(rm {db}\*\)"):
            check_database(db)

    # A stage run alone stops in a second, in one line, before Prefect starts a server on that database.
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL, PREFECT_API_URL, temporary_settings

    from tasks import split

    params = write_params(make_params(tmp_path), tmp_path / "params.yaml")
    monkeypatch.setattr(sys, "argv", ["split", "--params", str(params)])
    db = tmp_path / "garbage.db"
    with temporary_settings({PREFECT_API_URL: None,
                             PREFECT_API_DATABASE_CONNECTION_URL: f"sqlite+aiosqlite:///{db}"}):
        start = time.monotonic()
        with pytest.raises(SystemExit) as e:
            runner.run_stage(split.run, "split")
    assert time.monotonic() - start < 10
    assert str(e.value).startswith(f"error: split: {db} is corrupt") and "\n" not in str(e.value)


def test_an_evaluation_mlflow_could_not_record_fails_the_stage(tmp_path, monkeypatch):
    """With a corrupt mlflow.db, evaluate exited 0 after a warning: DVC recorded an evaluation MLflow never saw.
    Now the stage fails in one line (exit status 1) after writing its metrics."""
    from tasks import evaluate

    db = tmp_path / "mlflow.db"
    db.write_bytes(b"\x00garbage" * 1000)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    p = make_params(tmp_path)
    files.write_jsonl(p.paths.eval_split, [{"question": "What does LoRA freeze?", "answer": "The weights."}])
    p.paths.adapter.mkdir(parents=True)
    with pytest.raises(PipelineError, match=rf"^scores written to {p.paths.eval_metrics}, but not logged to "
                                            rf"MLflow: MLflow store {db} is corrupt"):
        evaluate.log_evaluation(p.mlflow, p.evaluate, {}, {}, p.paths, "an-eval-set")


# ---------------------------------------------------------------------------------------------- processes


def _hold_lock(path: Path) -> subprocess.Popen:
    code = ("import sys, time\nfrom tasks.runner import project_lock\n"
            f"with project_lock({str(path)!r}):\n    print('locked', flush=True)\n    time.sleep(120)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_one_pipeline_per_project(tmp_path, monkeypatch):
    from flows.pipeline import pipeline
    from tasks import split

    p = make_params(tmp_path)
    params = write_params(p, tmp_path / "params.yaml")
    holder = _hold_lock(p.paths.lock)
    try:
        busy = rf"another papertune run \(pid {holder.pid}\) is using this project .*kill {holder.pid}"
        with pytest.raises(PipelineError, match=busy):
            with project_lock(p.paths.lock):
                pass
        # A stage run alone: one line, before any work.
        monkeypatch.setattr(sys, "argv", ["split", "--params", str(params)])
        with pytest.raises(SystemExit, match=f"^error: split: {busy}"):
            runner.run_stage(split.run, "split")
        # The flow (as a deployment runs it): fails before its first stage.
        with pytest.raises(PipelineError, match=busy):
            pipeline(str(params))
        assert not p.paths.documents.exists()
    finally:
        holder.kill()  # SIGKILL: the kernel releases the lock, nothing to clean up
        holder.wait()
    with project_lock(p.paths.lock):
        assert p.paths.lock.read_text().strip() == str(os.getpid())
        with project_lock(p.paths.lock):  # a stage inside the flow shares its lock
            pass
        # A process the holder starts (a stage under a locked `make run`) inherits the lock.
        code = f"from tasks.runner import project_lock\nwith project_lock({str(p.paths.lock)!r}):\n    print('in')"
        child = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert child.stdout.strip() == "in", child.stderr
    assert p.paths.lock.read_text() == ""  # released: no stale pid left behind


def test_temporaries_of_a_killed_stage_are_removed_by_its_next_run(tmp_path, monkeypatch):
    """SIGKILL skips atomic_write's cleanup: `.train.jsonl.<random>.tmp` (0 bytes, 0600) stayed for good. The next
    run of the stage removes its own outputs' temporaries, and only while no other run holds the project lock."""
    from flows.pipeline import pipeline
    from tasks import split

    p = make_params(tmp_path)
    params = write_params(p, tmp_path / "params.yaml")
    split_own = [p.paths.train_split.with_name(f".{p.paths.train_split.name}.k1ll3d_0.tmp"),
                 p.paths.split_report.with_name(f".{p.paths.split_report.name}.x9x9x9x9.tmp")]
    qa_own = p.paths.qa.with_name(f".{p.paths.qa.name}.abcd1234.tmp")
    staging = p.paths.adapter.with_name(f".{p.paths.adapter.name}.s7ag1ng_")  # atomic_dir's, of train
    kept = [p.paths.train_split.with_name("notes.tmp"), p.paths.adapter.with_name(f".{p.paths.adapter.name}.old")]
    for f in [*split_own, qa_own, *kept]:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.touch(mode=0o600)
    (staging / "adapter_model.safetensors").parent.mkdir(parents=True)
    (staging / "adapter_model.safetensors").write_bytes(b"half")
    monkeypatch.setattr(sys, "argv", ["split", "--params", str(params)])

    holder = _hold_lock(p.paths.lock)  # another pipeline runs: its temporaries may be live
    try:
        with pytest.raises(SystemExit, match="^error: split: another papertune run"):
            runner.run_stage(split.run, "split")
    finally:
        holder.kill()
        holder.wait()
    assert all(f.exists() for f in [*split_own, qa_own, staging, *kept])

    with pytest.raises(SystemExit, match=f"^error: split: {p.paths.qa} does not exist"):
        runner.run_stage(split.run, "split")  # fails (no QA pairs), after the cleanup
    assert not any(f.exists() for f in split_own)
    assert all(f.exists() for f in [qa_own, staging, *kept])  # another stage's, or not a temporary

    # The flow runs every stage: every stage's temporaries go, before its first stage (here failing at once).
    with pytest.raises(PipelineError, match="no document could be ingested"):
        pipeline(str(params), pdf_dir=str(tmp_path / "no-pdfs"))
    assert not qa_own.exists() and not staging.exists() and all(f.exists() for f in kept)


def test_a_training_run_that_did_not_finish_says_how_it_ended(tmp_path):
    """Under a Prefect flow SIGTERM arrives as Prefect's TerminationSignal: a killed training's run ended FAILED
    and kept papertune.train_decision=trained. Its tags now say what happened."""
    from prefect.exceptions import TerminationSignal

    from tasks import tracking

    cfg = make_params(tmp_path).mlflow.model_copy(update={"experiment_name": "ended",
                                                           "artifact_location": str(tmp_path / "mlartifacts")})
    tags = {"papertune.train_decision": "trained"}

    def prefect_handler(signum, frame):  # what Prefect's engine installs while a flow runs
        raise TerminationSignal(signum)

    previous = signal.signal(signal.SIGTERM, prefect_handler)
    try:
        with pytest.raises(TerminationSignal):
            with tracking.start_run(cfg, "train", "train", tags=tags) as (_, killed):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(10)  # the signal arrives here
    finally:
        signal.signal(signal.SIGTERM, previous)
    with pytest.raises(RuntimeError):
        with tracking.start_run(cfg, "train", "train", tags=tags) as (_, failed):
            raise RuntimeError("CUDA out of memory\nTried to allocate 2 GiB")
    _, client, _ = tracking.open_store(cfg)
    ended = {r.info.run_id: (r.info.status, r.data.tags["papertune.train_decision"], r.data.tags.get("papertune.end"))
             for r in (client.get_run(killed.info.run_id), client.get_run(failed.info.run_id))}
    assert ended == {killed.info.run_id: ("KILLED", "interrupted: SIGTERM", "interrupted: SIGTERM"),
                     failed.info.run_id: ("FAILED", "failed: RuntimeError: CUDA out of memory",
                                          "failed: RuntimeError: CUDA out of memory")}


def _group_alive(pgid: int) -> list[str]:
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(stat.parent.name)
    return alive


@pytest.mark.slow  # starts a Prefect server
def test_serve_schedules_runs_and_leaves_nothing_behind(tmp_path, prefect_home):
    # The deployment from prefect.yaml, its cron swapped for a 5 s interval so that a run fires during the test;
    # the folder has no params.yaml, so each run stops at once instead of running the pipeline.
    shutil.copy(ROOT / "prefect.yaml", tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(prefect_home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_RUNNER_POLL_FREQUENCY="1", PYTHONPATH=str(ROOT))  # a due run starts within 1 s, not 10
    serve = subprocess.Popen([sys.executable, "-c", "from flows.serve import serve; serve(interval_s=5)"],
                             cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    try:
        first = serve.stdout.readline()
        assert "serving deployment 'nightly' (every 5 s) on the Prefect API http://127.0.0.1:" in first, first
        api = first.split("Prefect API ")[1].split(";")[0]
        deadline, states = time.time() + 150, set()
        while time.time() < deadline and not states & {"COMPLETED", "FAILED", "CRASHED"}:
            runs = httpx.post(f"{api}/flow_runs/filter", json={"sort": "EXPECTED_START_TIME_ASC", "limit": 20}).json()
            states = {r["state_type"] for r in runs if r["deployment_id"]}
            time.sleep(0.5)
        # Scheduled runs appear, and one fired: it failed (no params.yaml in that folder) with the one-line reason.
        assert "SCHEDULED" in states and "FAILED" in states, states
        failed = httpx.post(f"{api}/flow_runs/filter", json={"flow_runs": {"state": {"type": {"any_": ["FAILED"]}}}})
        assert "params.yaml: no such params file" in failed.json()[0]["state"]["message"]
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=30)
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait()
    time.sleep(1)
    assert _group_alive(serve.pid) == []  # no server, no flow-run process left
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{api}/health", timeout=2)


# ---------------------------------------------------------------------------------------------- inputs are data


def test_log_lines_escape_control_characters(caplog):
    name = "paper\n12:00:00.000 | INFO | forged line \x1b[31mred\x1b[0m.pdf"
    assert shown(name) == "paper\\n12:00:00.000 | INFO | forged line \\x1b[31mred\\x1b[0m.pdf"
    assert shown("Éléments — “quoted”") == "Éléments — “quoted”"  # printable text is left alone
    log.logger().warning("ingest: skipped %s", name)
    message = caplog.records[-1].getMessage()
    assert message == f"ingest: skipped {shown(name)}" and "\n" not in message and "\x1b" not in message
    # The same filter guards the loggers of flow and task runs (console and the Prefect API alike).
    import logging

    for name in ("prefect.flow_runs", "prefect.task_runs"):
        assert any(isinstance(f, log._EscapeControlChars) for f in logging.getLogger(name).filters)


def test_file_names_differing_only_in_control_characters_are_two_files(tmp_path, fresh_cache, caplog):
    """`a\\n.pdf` and `a\\t.pdf` used to become one name (control characters replaced), and ingest crashed
    (generator raised StopIteration); records and the report name each file as it is on disk."""
    from tasks import ingest
    from tests.helpers import SAMPLE_PDFS, in_flow

    pdfs = tmp_path / "pdfs"
    pdfs.mkdir()
    sample = sorted(SAMPLE_PDFS.glob("*.pdf"))[0]
    for name in ("a\n.pdf", "a\t.pdf"):
        shutil.copy(sample, pdfs / name)
    p = make_params(tmp_path, pdf_dir=pdfs)
    with caplog.at_level("WARNING"):
        assert in_flow(ingest.run, p.ingest, p.paths) == 1
    [doc] = read_jsonl(p.paths.documents)
    assert doc["file"] == "a\t.pdf" and (pdfs / doc["file"]).is_file()
    report = files.read_json(p.paths.ingest_report)["files"]
    assert [(f["file"], f["reason"]) for f in report] == [("a\t.pdf", None), ("a\n.pdf", "duplicate of a\t.pdf")]
    assert "ingest: skipped a\\n.pdf: duplicate of a\\t.pdf" in caplog.messages  # escaped: one log line
