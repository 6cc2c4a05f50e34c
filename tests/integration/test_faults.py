"""The fault suite: stale caches, lost outputs, unclear errors and stray processes (issue 11), each reproduced
and checked for the fixed behaviour: what is kept, the one-line message, what process remains. Here what runs a
stage in a flow, DVC in a temporary project, an MLflow store or a process; the rest: tests/unit/test_faults.py
and tests/e2e/test_faults.py."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prefect import flow, task

from tasks import cache, files, runner
from tasks.cache import CACHE
from tasks.files import read_jsonl
from tasks.hashing import source_hash
from tasks.log import PipelineError
from tasks.runner import project_lock
from tests.helpers import ROOT, make_params, with_base_model, write_params

BIN = Path(sys.executable).parent


def dvc_env() -> dict:
    """DVC's environment: this process's (the session's Prefect server included), the venv's tools first."""
    return {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}


# ---------------------------------------------------------------------------------------------- one cache rule


@task(**CACHE, name="length")
def _length(text: str) -> int:
    return len(text)


def test_the_item_cache_follows_the_code_a_result_depends_on(fresh_cache, monkeypatch, tmp_path, caplog):
    """The per-item store every fan-out stage uses (cache.map_cached_iter), keyed on the code of the QA stage, read
    from a copy of tasks/ this test edits: a helper QA's results depend on recomputes; infrastructure does not."""
    import shutil

    copy = tmp_path / "src"
    shutil.copytree(ROOT / "tasks", copy / "tasks", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(cache, "code_hash", lambda name: source_hash("tasks.qa", copy))

    @flow
    def lengths() -> list[int]:
        return list(cache.map_cached_iter(_length, ["a b", "c"], desc="lengths"))

    def counts() -> str:
        caplog.clear()
        with caplog.at_level("INFO"):
            assert lengths() == [3, 1]
        return next(m for m in caplog.messages if m.startswith("lengths:")).removeprefix("lengths: ")

    assert counts() == "2 computed, 0 from cache"
    assert counts() == "0 computed, 2 from cache"
    for infrastructure in ("log.py", "runner.py", "cache.py", "prefect_server.py", "tracking.py"):
        (copy / "tasks" / infrastructure).write_text((copy / "tasks" / infrastructure).read_text() + "# edited\n")
    assert counts() == "0 computed, 2 from cache"
    text = copy / "tasks" / "text.py"  # split_sentences: QA's questions come from its sentences
    text.write_text(text.read_text().replace("def split_sentences(text: str) -> list[str]:",
                                             "def split_sentences(text: str) -> list[str]:  # edited"))
    assert counts() == "2 computed, 0 from cache"

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


# ---------------------------------------------------------------------------------------------- keep good outputs


def dvc_project(tmp_path: Path, params_text: str) -> Path:
    """This project's code, dvc.yaml and params in a fresh git + DVC repository."""
    work = tmp_path / "project"
    for folder in ("tasks", "flows"):
        shutil.copytree(ROOT / folder, work / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", work)
    (work / "params.yaml").write_text(params_text)
    for cmd in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"]):
        subprocess.run(cmd, cwd=work, check=True, env=dvc_env())
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
    r = subprocess.run([str(BIN / "dvc"), "repro"], cwd=work, env=dvc_env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0
    assert "error: params.yaml: train: unknown key 'learnig_rate' (did you mean learning_rate?)" in r.stderr
    assert "Running stage 'params'" in r.stdout and r.stdout.count("Running stage") == 1, r.stdout
    assert {rel: (work / rel).read_text() for rel in kept} == kept


@pytest.mark.slow  # a real stage run under DVC (imports, Prefect)
def test_failed_stage_rerun_keeps_its_outputs(tmp_path):
    work = dvc_project(tmp_path, (ROOT / "params.yaml").read_text())
    subprocess.run([str(BIN / "dvc"), "repro", "params"], cwd=work, env=dvc_env(), check=True, capture_output=True)
    (work / "data" / "split").mkdir(parents=True)
    kept = {"data/split/train.jsonl": '{"q": "kept"}\n', "data/split/eval.jsonl": '{"q": "kept"}\n',
            "data/reports/split.json": '{"kept": true}\n'}
    for rel, text in kept.items():
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_text(text)
    (work / "data" / "chunks.jsonl").write_text('{"chunk_id": "c", "text": "t"}\n')
    (work / "data" / "qa.jsonl").write_text('{"question": "q", "answer": "a"}\n{"question": "cut off\n')
    env = {**dvc_env(), "PREFECT_HOME": str(tmp_path / "prefect")}
    r = subprocess.run([str(BIN / "dvc"), "repro", "--single-item", "split"], cwd=work, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    error = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert error == ["error: split: data/qa.jsonl:2: not valid JSON (Unterminated string starting at column 14); "
                     "fix or delete that line, or rerun the stage that writes the file"], r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert {rel: (work / rel).read_text() for rel in kept} == kept


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
    with_base_model(p, seed=0)
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
