"""MLflow tracking: one run per thing that happened, datasets as run inputs, the adapter as a registered model.

Open the UI:  make ui   → http://127.0.0.1:5000   (`mlflow ui` on the store of `mlflow.tracking_uri`)

What a person finds there, per experiment (`mlflow.experiment_name`):
- a **train** run per training (tag `papertune.kind=train`): params, live loss curves, the train/eval splits as
  dataset inputs (digest = DVC's md5 of the file), the adapter as a logged model (`tasks/mlflow_model.py`, a
  pyfunc that loads the recorded base model and applies the adapter) registered as a new version of
  `mlflow.registered_model`. It is written once and closed when training ends; nothing reopens it.
- an **evaluate** run per evaluation, a child of the train run that made the adapter (found by the adapter's
  content hash, so no MLflow id is written into DVC-tracked files), with ROUGE, the eval sets as inputs and the
  promotion decision. With another or an empty store it is a top-level run linked by the same hash tags.
- a **train-skipped** run when a flow run kept the adapter: why, and which train run made it.
Every run records the pid that writes it; a run a killed process left RUNNING is closed as KILLED by the next
process that opens the store, and SIGTERM closes it at once.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

from tasks.files import sqlite_problem
from tasks.hashing import dir_hash, file_digest
from tasks.log import PipelineError, logger
from tasks.params import EvaluateParams, MLflowParams, Paths
from tasks.scores import CHOICE, HELD_OUT, METRICS

KIND = "papertune.kind"  # train | train-skipped | evaluate
END = "papertune.end"  # how a run that did not finish ended: interrupted: SIGTERM, failed: <error>, killed
DECISION = "papertune.train_decision"  # trained | skipped: <why>; a train run that did not finish says how it ended
ADAPTER_HASH = "papertune.adapter_hash"
CHAMPION = "champion"


# ---------------------------------------------------------------------------------------------- the store


def tracking_uri(cfg: MLflowParams) -> str:
    # MLFLOW_TRACKING_URI in the environment wins, as everywhere in MLflow (a team server, a test's own store).
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri


def sqlite_file(uri: str) -> Path | None:
    """The database file of a local `sqlite:///path` store (relative paths are relative to the working dir)."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def check_store(uri: str) -> None:
    """A corrupt SQLite store makes MLflow fail deep inside SQLAlchemy; say which file and what to do instead."""
    db = sqlite_file(uri)
    if db is None or not db.exists() or db.stat().st_size == 0:  # an empty file is a new store to MLflow
        return
    if problem := sqlite_problem(db):
        raise PipelineError(f"MLflow store {db} is corrupt ({problem}): move it away (mv {db} {db}.corrupt) to start "
                            "a new store, or point MLFLOW_TRACKING_URI at another one")


def open_store(cfg: MLflowParams):
    """(mlflow, client, experiment id): the experiment exists, writes artifacts under the project, and no run of
    a dead process is left RUNNING."""
    import mlflow

    uri = tracking_uri(cfg)
    check_store(uri)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    artifacts = Path(cfg.artifact_location).resolve()  # relative to the project, like every path in params
    exp = client.get_experiment_by_name(cfg.experiment_name)
    if exp is None:
        exp_id = client.create_experiment(cfg.experiment_name, artifact_location=str(artifacts))
    else:
        exp_id = exp.experiment_id
        if sqlite_file(uri) and exp.artifact_location != str(artifacts):
            use_project_artifacts(sqlite_file(uri), exp_id, exp.artifact_location, artifacts)
    close_stale_runs(client, exp_id)
    return mlflow, client, exp_id


def use_project_artifacts(db: Path, exp_id: str, old: str, new: Path) -> None:
    """MLflow stores an experiment's artifact root as an absolute path; a moved or copied project would keep
    writing into the old folder. Point the experiment (and, when the old folder is gone, its runs and logged
    models) at the project's own folder. MLflow has no API for this, the SQLite schema has had these columns
    since MLflow 1."""
    moved = not Path(old.removeprefix("file://")).exists()
    with sqlite3.connect(db) as con:
        con.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?", (str(new), int(exp_id)))
        if moved:
            for table, col in (("runs", "artifact_uri"), ("logged_models", "artifact_location")):
                con.execute(f"UPDATE {table} SET {col} = ? || substr({col}, ?) WHERE experiment_id = ? AND "
                            f"substr({col}, 1, ?) = ?", (str(new), len(old) + 1, int(exp_id), len(old), old))
    logger().info(f"mlflow: experiment {exp_id} now keeps its artifacts in {new} (was {old})")


# ---------------------------------------------------------------------------------------------- runs


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def prefect_flow_run_id() -> str | None:
    try:
        from prefect.runtime import flow_run

        return flow_run.id
    except Exception:
        return None


def process_tags() -> dict[str, str]:
    """Who writes the run: enough for a later process to tell whether the writer is still alive."""
    import psutil

    me = psutil.Process()
    return {"papertune.host": socket.gethostname(), "papertune.pid": str(me.pid),
            "papertune.pid_started": f"{me.create_time():.2f}"}


def writer_alive(tags: dict) -> bool:
    import psutil

    if tags.get("papertune.host") != socket.gethostname() or "papertune.pid" not in tags:
        return True  # another machine's run, or not ours: not ours to judge
    try:
        started = psutil.Process(int(tags["papertune.pid"])).create_time()
    except psutil.NoSuchProcess:
        return False
    return f"{started:.2f}" == tags.get("papertune.pid_started")  # same pid, other process: the writer is gone


def close_stale_runs(client, exp_id: str) -> list[str]:
    """Runs left RUNNING by a process that no longer exists (SIGKILL, power loss) are closed as KILLED."""
    stale = [r for r in client.search_runs([exp_id], "attributes.status = 'RUNNING'", max_results=200)
             if not writer_alive(r.data.tags)]
    for r in stale:
        mark_ended(client, r, f"process {r.data.tags['papertune.pid']} ended without closing the run (killed); "
                   "closed by a later run", "KILLED")
        logger().warning(f"mlflow: run {r.info.run_id} of a killed process (pid {r.data.tags['papertune.pid']}) "
                         "marked KILLED")
    return [r.info.run_id for r in stale]


@contextmanager
def start_run(cfg: MLflowParams, kind: str, run_name: str, tags: dict | None = None,
              parent_run_id: str | None = None):
    """A new run, ended FINISHED, FAILED (an exception) or KILLED (Ctrl-C, SIGTERM). Yields (mlflow, run)."""
    mlflow, client, exp_id = open_store(cfg)
    base = {KIND: kind, "git_commit": git_commit(), **process_tags()}
    if flow_run_id := prefect_flow_run_id():
        base["prefect_flow_run_id"] = flow_run_id
    run = mlflow.start_run(experiment_id=exp_id, run_name=run_name, parent_run_id=parent_run_id,
                           tags={**base, **{k: str(v) for k, v in (tags or {}).items()}}, log_system_metrics=False)
    sigterm = []  # set by the handler: under a Prefect flow, SIGTERM arrives as Prefect's TerminationSignal

    def close_on_sigterm() -> None:  # at once: a SIGKILL often follows before the exception unwinds to here
        sigterm.append(True)
        mark_ended(client, run, "interrupted: SIGTERM", "KILLED")

    restore = on_sigterm(close_on_sigterm)
    try:
        yield mlflow, run
    except BaseException as e:
        why = "interrupted: SIGTERM" if sigterm else how_it_ended(e)
        status = "FAILED" if isinstance(e, Exception) and not sigterm else "KILLED"
        mark_ended(client, run, why, status)
        mlflow.end_run(status)
        raise
    else:
        mlflow.end_run("FINISHED")
    finally:
        restore()


def how_it_ended(e: BaseException) -> str:
    """A run's end as its tags say it: `failed: <error>` for an error, `interrupted: ...` for Ctrl-C or an exit."""
    if isinstance(e, KeyboardInterrupt):
        return "interrupted: SIGINT (Ctrl-C)"
    if isinstance(e, SystemExit):
        return f"interrupted: exit {e.code}"
    if not isinstance(e, Exception):  # Prefect's TerminationSignal and other signals raised as exceptions
        return f"interrupted: {type(e).__name__} {e}".strip()
    return (f"failed: {type(e).__name__}" + (f": {str(e).splitlines()[0]}" if str(e).strip() else ""))[:500]


def mark_ended(client, run, why: str, status: str) -> None:
    """Close a run that did not finish, with tags that say how it ended: a training that was killed or failed
    no longer says `trained`."""
    client.set_tag(run.info.run_id, END, why)
    if run.data.tags.get(DECISION) == "trained":
        client.set_tag(run.info.run_id, DECISION, why)
    client.set_terminated(run.info.run_id, status)


def on_sigterm(close) -> callable:
    """While a run is open, SIGTERM first closes it as KILLED, then does what it did before (the previous
    handler, or exit 143). Returns the function that restores the previous handler."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # signal handlers live in the main thread; the next run closes this one if killed
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
        close()
        signal.signal(signal.SIGTERM, previous)
        if callable(previous):
            previous(signum, frame)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------------------------------------- inputs and links


def md5_file(path: str | Path) -> str:
    """DVC 3's hash of a file (its md5), so a dataset input can be matched with dvc.lock."""
    return file_digest(path, "md5")


def log_dataset(mlflow, path: str | Path, name: str, context: str):
    """Log a JSONL file as a dataset input of the active run; its digest is DVC's md5. Returns the dataset."""
    import pandas as pd
    from mlflow.data.sources import LocalArtifactDatasetSource

    path = Path(path)
    digest = md5_file(path)
    df = pd.read_json(path, lines=True, dtype=False) if path.stat().st_size else pd.DataFrame()
    # Nested fields (grounding, judge) are kept as JSON text: the dataset schema MLflow infers needs flat columns.
    for col in df.columns:
        if df[col].map(lambda v: isinstance(v, (dict, list))).any():
            df[col] = df[col].map(lambda v: v if isinstance(v, str) else json.dumps(v, ensure_ascii=False))
    with warnings.catch_warnings():  # "Hint: Inferred schema contains integer column(s)": ours never miss values
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer", category=UserWarning)
        dataset = mlflow.data.from_pandas(df, source=LocalArtifactDatasetSource(str(path.resolve())), name=name,
                                          digest=digest)
    mlflow.log_input(dataset, context=context, tags={"path": str(path), "dvc_md5": digest, "rows": str(len(df))})
    return dataset


def find_training_run(client, exp_id: str, adapter_hash: str):
    """The train run that wrote the adapter with this content hash (None with another or a fresh store)."""
    runs = client.search_runs([exp_id], f"tags.`{KIND}` = 'train' AND tags.`{ADAPTER_HASH}` = '{adapter_hash}' "
                              "AND attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"],
                              max_results=1)
    return runs[0] if runs else None


# ---------------------------------------------------------------------------------------------- registry


def load_logged_model(cfg: MLflowParams, model_uri: str):
    """The pyfunc behind a models:/ or runs:/ URI of the project's store; a one-line error if there is none."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = tracking_uri(cfg)
    check_store(uri)
    mlflow.set_tracking_uri(uri)
    try:
        return mlflow.pyfunc.load_model(model_uri)
    except MlflowException as e:
        raise PipelineError(f"{model_uri} cannot be loaded from {uri}: {e.message.splitlines()[0]}") from None


def register(mlflow, cfg: MLflowParams, model_uri: str, adapter_hash: str):
    """A new version of the experiment's registered model; the alias moves only by `promote`."""
    return mlflow.register_model(model_uri, cfg.registered_model, tags={ADAPTER_HASH: adapter_hash})


def version_of(client, cfg: MLflowParams, adapter_hash: str):
    """The registered version holding the adapter with this content hash (None if it was never registered)."""
    versions = client.search_model_versions(f"name = '{cfg.registered_model}' AND tags.`{ADAPTER_HASH}` = "
                                            f"'{adapter_hash}'", order_by=["version_number DESC"], max_results=1)
    return versions[0] if versions else None


def model_id_of(version) -> str | None:
    """The LoggedModel behind a registered version (the SQLite registry leaves model_id empty; its source is
    models:/<model id>)."""
    source = version.source or ""
    return version.model_id or (source.removeprefix("models:/") if source.startswith("models:/m-") else None)


def champion(client, cfg: MLflowParams):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(cfg.registered_model, CHAMPION)
    except MlflowException:  # no alias yet (or no registered model)
        return None


def score_tag(eval_hash: str) -> str:
    return f"heldout.{eval_hash[:12]}"  # one score per eval set: scores on different sets are not comparable


def fmt(score: dict) -> str:
    lo, hi = score["rougeL_ci95"]
    return f"ROUGE-L {score['rougeL']:.4f} [{lo:.4f}, {hi:.4f}] (n={score['n']})"


def promote(client, cfg: MLflowParams, version, score: dict, eval_hash: str) -> dict:
    """Move `champion` to `version` only when its held-out ROUGE-L 95% CI lies wholly above the champion's on the
    same eval set. Records both scores and the decision on the version (tags and description); returns them."""
    name, tag = cfg.registered_model, score_tag(eval_hash)
    client.set_model_version_tag(name, version.version, tag, json.dumps(score))
    current = champion(client, cfg)
    theirs = json.loads(current.tags[tag]) if current is not None and tag in current.tags else None
    if current is None:
        promoted, why = True, "first version scored: no champion yet"
    elif current.version == version.version:
        promoted, why = True, "already the champion"
    elif theirs is None:
        promoted, why = False, (f"champion v{current.version} has no score on eval set {eval_hash[:12]} "
                                "(evaluate it on this set to compare); champion kept")
    elif score["rougeL_ci95"][0] > theirs["rougeL_ci95"][1]:
        promoted, why = True, f"CI above champion v{current.version}'s ({fmt(theirs)})"
    else:
        promoted, why = False, f"CI not above champion v{current.version}'s ({fmt(theirs)}); champion kept"
    decision = (f"{'champion' if promoted else 'not promoted'}: {fmt(score)} on {cfg.promote_on} held-out "
                f"eval set {eval_hash[:12]}; {why}")
    if current is not None and current.version == version.version:
        return {"promoted": True, "decision": decision, "version": version.version,
                "champion_version": current.version, "champion_score": theirs}  # the promotion record stands
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    client.set_model_version_tag(name, version.version, "papertune.promotion", decision)
    client.update_model_version(name, version.version, description=decision)
    return {"promoted": promoted, "decision": decision, "version": version.version,
            "champion_version": current.version if current is not None else None, "champion_score": theirs}


# ---------------------------------------------------------------------------------------------- training runs


def loss_callback(mlflow):
    from transformers import TrainerCallback

    class MLflowLossCallback(TrainerCallback):
        """Log train/eval loss per step into our MLflow run, live (the UI shows a run while it trains)."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            metrics = {k: float(v) for k, v in logs.items() if k in ("loss", "eval_loss", "learning_rate", "grad_norm")}
            if metrics:
                mlflow.log_metrics({("train_loss" if k == "loss" else k): v for k, v in metrics.items()},
                                   step=state.global_step)

    return MLflowLossCallback()


@contextmanager
def log_training(mlflow_cfg: MLflowParams, paths: Paths, record: dict, key: dict, run_id: str | None, main: bool):
    """Every MLflow call of a training, into a run of its own that nothing reopens later. At the start: tags
    (the decision to train), params, the train/eval splits as dataset inputs; while training: the live loss
    callback; once the body has saved the adapter and filled `log.done`: the final metrics, the adapter as a
    logged pyfunc model (tasks/mlflow_model.py) registered as a new version of `mlflow.registered_model`, plots
    and reports. `run_id` is the run of an interrupted training this one resumes: linked by a tag, not reopened."""
    if not main:  # under `accelerate launch` every rank trains; only rank 0 records
        yield SimpleNamespace(run_id=None, callbacks=[], done={})
        return
    tags = {"qa_dataset_hash": record["qa_dataset_hash"], "train_hash": key["train_hash"],
            "base_model": key["base_model"]["name"], "base_model_revision": str(key["base_model"]["revision"]),
            "papertune.train_decision": "trained"}
    if run_id:
        tags["papertune.resumed_from"] = run_id
    with start_run(mlflow_cfg, "train", "train", tags=tags) as (mlflow, run):
        mlflow.log_params(record["params"])
        log_dataset(mlflow, paths.train_split, "train", "training")
        log_dataset(mlflow, paths.eval_split, "eval", "validation")  # the eval loss while training
        if record.get("read_documents") is not None:  # the papers whose text training read, besides the QA pairs
            mlflow.log_dict({"read_documents": record["read_documents"]}, "read_documents.json")
            mlflow.set_tag("papertune.documents_read", str(len(record["read_documents"])))
        log = SimpleNamespace(run_id=run.info.run_id, callbacks=[loss_callback(mlflow)], done={})
        yield log
        if not log.done:
            return
        adapter_hash = dir_hash(paths.adapter)
        mlflow.set_tag(ADAPTER_HASH, adapter_hash)  # how evaluate finds this run: no run id in DVC outputs
        setup = {k: v for k, v in record["params"].items() if k.split(".")[0] in ("model", "train")}
        from tasks.mlflow_model import log_adapter_model

        model = log_adapter_model(mlflow, paths.adapter, paths.base_model, mlflow_cfg.model_max_new_tokens, setup)
        # Throughput goes to MLflow only: DVC metrics stay identical when a run is reproduced.
        mlflow.log_metrics(log.done, model_id=model.model_id)
        version = register(mlflow, mlflow_cfg, model.model_uri, adapter_hash)
        mlflow.set_tag("papertune.registered_version", f"{version.name} v{version.version}")
        mlflow.log_artifacts(str(paths.plots_dir), artifact_path="plots")
        for report in (paths.ingest_report, paths.qa_report, paths.split_report):
            if Path(report).exists():
                mlflow.log_artifact(str(report), artifact_path="reports")


def log_skipped(mlflow_cfg: MLflowParams, paths: Paths, reason: str) -> None:
    """A skipped training records its decision in a small run of its own, linked to the train run that made the
    adapter it kept; that run stays as it was written. A store that cannot be used only costs the record."""
    adapter_hash = dir_hash(paths.adapter)
    tags = {"papertune.train_decision": f"skipped: {reason}", ADAPTER_HASH: adapter_hash}
    try:
        with start_run(mlflow_cfg, "train-skipped", "train skipped", tags=tags) as (mlflow, run):
            trained = find_training_run(mlflow.MlflowClient(), run.info.experiment_id, adapter_hash)
            mlflow.set_tag("papertune.adapter_run_id", trained.info.run_id if trained else "not in this store")
    except PipelineError as e:
        logger().warning(f"train: skip not recorded in MLflow: {e}")


# ---------------------------------------------------------------------------------------------- evaluation runs


def log_evaluation(mlflow: MLflowParams, evaluate: EvaluateParams, flat: dict, choice: dict, paths: Paths,
                   eval_hash: str) -> None:
    """Every MLflow call of evaluation, into a run of its own: a child of the train run that made the adapter (found
    by the adapter's content hash; with another or a new store, a top-level run linked by the same tags). Scores,
    the eval sets as dataset inputs, and files (tasks/promote.py adds the promotion decision).
    With a store that cannot be used the metrics files stand and the stage fails in one line (exit status 1), so
    that DVC does not record an evaluation MLflow never saw and a script can tell."""
    from mlflow.entities import LoggedModelInput

    adapter_hash = dir_hash(paths.adapter)
    try:
        _, client, exp_id = open_store(mlflow)
    except PipelineError as e:
        raise PipelineError(f"scores written to {paths.eval_metrics}, but not logged to MLflow: {e}") from None
    trained = find_training_run(client, exp_id, adapter_hash)
    version = version_of(client, mlflow, adapter_hash)
    model_id = model_id_of(version) if version is not None else None  # the logged model the train run registered
    tags = {ADAPTER_HASH: adapter_hash, "papertune.eval_set_hash": eval_hash,
            "papertune.adapter_run_id": trained.info.run_id if trained else "not in this store"}
    with start_run(mlflow, "evaluate", "evaluate", tags, parent_run_id=trained and trained.info.run_id) as (mlflow_, _):
        if model_id:
            mlflow_.log_input(model=LoggedModelInput(model_id))  # the run page lists the adapter it evaluated
        datasets = {HELD_OUT: log_dataset(mlflow_, paths.eval_split, HELD_OUT, "evaluation")}
        for name, path in evaluate.gold_sets.items():
            datasets[name] = log_dataset(mlflow_, path, name, "evaluation")
        for name, res in flat.items():
            key, set_name = name.replace("/", "."), name.rpartition("/")[0] or HELD_OUT
            metrics = {}
            for model in ("base", "finetuned"):
                metrics |= metric_names(f"{key}.{model}", res[model])
                metrics |= metric_names(f"{key}.{model}.without_section", res[model]["without_section"])
            metrics |= {f"{key}.delta.{m}": round(res["finetuned"][m] - res["base"][m], 4) for m in METRICS}
            # Linked to the logged model and the eval set: the model's page shows its scores per dataset.
            mlflow_.log_metrics(metrics, model_id=model_id, dataset=datasets[set_name])
        if choice:
            mlflow_.log_metrics({k: v for model in ("base", "finetuned")
                                 for k, v in metric_names(f"{CHOICE}.{model}", choice[model]).items()},
                                model_id=model_id, dataset=datasets[HELD_OUT])
        mlflow_.log_artifact(str(paths.eval_metrics), artifact_path="eval")
        mlflow_.log_artifact(str(paths.predictions), artifact_path="eval")
        mlflow_.log_artifact(str(Path(paths.plots_dir) / "rouge.png"), artifact_path="plots")


def metric_names(prefix: str, scores: dict) -> dict[str, float]:
    """MLflow metrics of one score dict: its numbers, and each 95% interval as _low/_high."""
    out = {}
    for m, v in scores.items():
        if isinstance(v, list):
            out |= {f"{prefix}.{m}_low": v[0], f"{prefix}.{m}_high": v[1]}
        elif isinstance(v, (int, float)):
            out[f"{prefix}.{m}"] = v
    return out
