"""The adapter as an MLflow model: a pyfunc that loads the recorded base model and applies the LoRA adapter.

Use it:  mlflow.pyfunc.load_model("models:/papertune-adapter@champion").predict(["What does LoRA freeze?"])
         python -m flows.ask --model models:/papertune-adapter@champion "What does LoRA freeze?"

The model's artifacts hold only the adapter folder (LoRA weights, tokenizer, papertune.json): base weights are
never copied into MLflow. The base model is found where training recorded it (the project's `paths.base_model`)
and checked against the content hash recorded at training time; pass
`model_config={"base_model_dir": "/other/folder"}` to `load_model` to point at another copy.
"""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import mlflow.pyfunc

from tasks.hashing import dir_hash
from tasks.log import PipelineError

# Logged explicitly: inferring them would load the model in a subprocess at every training.
REQUIREMENTS = ["torch", "transformers", "peft", "bitsandbytes", "accelerate", "tokenizers", "safetensors",
                "mlflow"]


def base_model_dir(config: dict) -> Path:
    """The recorded base folder: as given (an override or an absolute path), under the project that trained,
    or under the working directory (a moved project run from its root)."""
    given = Path(config["base_model_dir"])
    candidates = [given] if given.is_absolute() else [Path(config["project_dir"]) / given, Path.cwd() / given]
    for path in candidates:
        if path.exists():
            return path
    raise PipelineError(f"base model folder {given} not found (looked in {', '.join(map(str, candidates))}): "
                        "rebuild it (dvc repro base_model) or pass model_config={'base_model_dir': ...}")


class AdapterModel(mlflow.pyfunc.PythonModel):
    """predict(list of questions) → list of answers, greedy, as evaluate answers them."""

    def load_context(self, context):
        from tasks.adapter import load_finetuned

        config = context.model_config
        base_dir = base_model_dir(config)
        if dir_hash(base_dir) != config["base_model_hash"]:
            raise PipelineError(f"base model in {base_dir} is not the one this adapter was trained on (content hash "
                                "differs): rebuild it with the recorded params (params.yaml in the adapter)")
        adapter_dir = context.artifacts["adapter"]
        self.model, self.tokenizer, self.meta, self.lock = load_finetuned(adapter_dir, str(base_dir),
                                                                          dir_hash(adapter_dir))
        self.max_new_tokens = config["max_new_tokens"]

    def predict(self, model_input: list[str], params: dict | None = None) -> list[str]:
        from tasks.adapter import build_prompt, generate

        prompts = [build_prompt(self.tokenizer, q, self.meta["prompt_template"], self.meta["system_prompt"])
                   for q in model_input]
        with self.lock:
            return generate(self.model, self.tokenizer, prompts, self.max_new_tokens, len(prompts) or 1)


def log_adapter_model(mlflow, adapter_dir: str | Path, base_dir: str | Path, max_new_tokens: int,
                      params: dict[str, str]):
    """Log the adapter folder as a pyfunc LoggedModel of the active run, its params linked. Returns ModelInfo."""
    config = {"base_model_dir": str(base_dir), "project_dir": str(Path.cwd()),
              "base_model_hash": dir_hash(base_dir), "max_new_tokens": max_new_tokens}
    return mlflow.pyfunc.log_model(
        name="adapter", python_model=AdapterModel(), artifacts={"adapter": str(adapter_dir)}, model_config=config,
        pip_requirements=[f"{p}=={version(p)}" for p in REQUIREMENTS], params=params,
    )
