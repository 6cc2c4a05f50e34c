"""What tests import: the project's paths, params for a test, stage runs inside a Prefect flow, simulated crashes,
and starting and stopping local servers. Fixtures live in the conftest files; nothing is imported from them."""

from pathlib import Path

from tasks.params import Params, load_params

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_PDFS = ROOT / "data" / "sample" / "pdfs"


# Plumbing tests run on the random tiny Llama (seconds to build and train); the default model, SmolLM2, is run end to
# end by tests/e2e/test_pipeline.py. Its embeddings are random, so they train too, at the rate that makes it learn.
TINY = {"model": {"name": "builtin:tiny-llama"},
        "train": {"lora_layers": 0, "lora_r": 64, "lora_alpha": 64, "modules_to_save": ["embed_tokens", "lm_head"],
                  "learning_rate": 5e-3}}


def make_params(tmp: Path, pdf_dir: Path = SAMPLE_PDFS, **sections: dict) -> Params:
    """params.yaml with every output path moved under `tmp`, the tiny test model (TINY) unless `model` says
    otherwise, and some sections' fields overridden."""
    base = load_params(ROOT / "params.yaml")
    paths = {}
    for name, value in base.paths.model_dump().items():
        keep = name in ("pdf_dir", "tokenizer_corpus")
        paths[name] = (ROOT / value) if keep else tmp / value
    paths["pdf_dir"] = pdf_dir
    raw = base.model_dump()
    raw["paths"] = paths
    for section in {**TINY, **sections}:
        raw[section] = {**raw[section], **TINY.get(section, {}), **sections.get(section, {})}
    return Params.model_validate(raw)


def write_params(p: Params, path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(p.model_dump(mode="json"), sort_keys=False))
    return path


def with_base_model(p: Params, seed: int | None = None) -> Params:
    """`p` once its base model (the builtin tiny Llama unless `p.model` says otherwise) is built, in this process
    and without a flow: the base_model stage's recipe called directly (a fraction of a second for the tiny one).
    `seed`: the tiny model initialised with another seed (same name, revision and tokenizer; other weights)."""
    from tasks import base_model

    model = p.model if seed is None else p.model.model_copy(
        update={"tiny": p.model.tiny.model_copy(update={"seed": seed})})
    base_model.run(model, p.paths)
    return p


def hf_teacher(p: Params) -> Params:
    """`p` with the builtin tiny model built and made the `hf` QA teacher (loaded from its local folder by
    transformers; plumbing: its replies are noise)."""
    with_base_model(p)
    hf = p.qa.hf.model_copy(update={"model": str(p.paths.base_model), "batch_size": 3})
    teach = p.qa.teacher.model_copy(update={"max_new_tokens": 12, "temperature": 0.0})
    return p.model_copy(update={"qa": p.qa.model_copy(update={"backend": "hf", "hf": hf, "teacher": teach})})


# ---------------------------------------------------------------------------------------------- Prefect flows

DATA_STAGES = ("ingest", "base_model", "chunk", "qa", "split")


def data_half(p: Params, through: str = "split") -> Params:
    """The stages from ingest through `through`, in one Prefect flow on the task runner chosen in `p.runner`."""
    from prefect import flow

    from tasks.runner import call, task_runner
    from tasks.stages import stage

    def stages() -> None:
        for name in DATA_STAGES[: DATA_STAGES.index(through) + 1]:
            call(stage(name), p)

    flow(name="test-data-half", task_runner=task_runner(p.runner))(stages)()
    return p


def in_flow(fn, *args, **kwargs):
    """Run a stage function inside a Prefect flow (stages fan out with task.submit, which needs one)."""
    from prefect import flow

    return flow(name="test-stage")(fn)(*args, **kwargs)


def crash_training_at(monkeypatch, step: int) -> None:
    """Training raises RuntimeError("simulated crash") at the end of optimizer step `step`, after the checkpoints
    of the steps before it are saved (as a crash or a kill would leave them); the test's end restores it."""
    from tasks import tracking

    original = tracking.loss_callback

    def crashing(mlflow):
        callback = original(mlflow)

        def on_step_end(args, state, control, **kwargs):
            if state.global_step == step:
                raise RuntimeError("simulated crash")

        callback.on_step_end = on_step_end
        return callback

    monkeypatch.setattr(tracking, "loss_callback", crashing)


# ---------------------------------------------------------------------------------------------- local servers


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc=None) -> None:
    """Poll a local URL until it answers 200 (servers here take 5-15 s to start)."""
    import time
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def start(cmd: list[str], log: Path, **kwargs):
    """Start a server in its own process group (stopped by `stop`), logging to a file."""
    import subprocess

    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True, **kwargs)


def stop(proc) -> None:
    import os
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # `serve` and some servers ignore SIGTERM while shutting down
        proc.wait(timeout=30)
