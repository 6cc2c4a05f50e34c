"""The fault suite, unit layer: cache keys and code hashes, the stage declarations, atomic writes, one-line errors
for bad files, params and databases, escaped log lines (issue 11). Stages, DVC and processes:
tests/integration/test_faults.py; `serve`: tests/e2e/test_faults.py."""

import os
import re
import sqlite3
import sys
import time
from pathlib import Path

import pytest
import yaml

from tasks import files, log, runner
from tasks.files import atomic_dir, atomic_write, read_jsonl
from tasks.hashing import module_files, project_modules, source_hash
from tasks.log import PipelineError, shown
from tasks.params import load_params
from tasks.prefect_server import check_database
from tests.helpers import ROOT, make_params, with_base_model, write_params


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


def test_training_key_covers_base_model_content_and_code(tmp_path, monkeypatch):
    from tasks.adapter import META
    from tasks.train import read_chunk_ids, run_key, skip_reason

    p = make_params(tmp_path, train={"min_changed_fraction": 1.0})  # data-wise, any change would be skipped
    with_base_model(p, seed=0)
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

    with_base_model(p, seed=1)  # same name, revision and tokenizer: other weights
    rebuilt = run_key(p.train, p.paths)
    assert rebuilt["key"] != key["key"] and skip_reason(p.train, p.paths, rebuilt, ["a", "b"]) is None

    with_base_model(p, seed=0)
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
