"""Train: QLoRA fine-tuning of the base model on the training split (transformers + peft + bitsandbytes).

Run alone:  python -m tasks.train [--params params.yaml]
Multi-GPU:  accelerate launch --num_processes 2 -m tasks.train   (DDP; each GPU holds its own 4-bit copy)

The base model is loaded quantised (`train.quantization`: NF4 with double quantisation, 8-bit, or none),
prepared with `prepare_model_for_kbit_training` and wrapped in LoRA. Prompts use the tokenizer's chat template
when it has one, else `train.prompt_template`; the loss covers answer tokens only. With `train.packing` the
examples of a batch are flattened into one padding-free row (position ids restart per example, and
transformers masks attention across examples). The adapter (safetensors), tokenizer and resolved params are
saved together; an interrupted run resumes from its last checkpoint; the MLflow run's id is stored with the
adapter so that evaluation logs into the same run. Training is skipped when neither the data nor the
training params changed (or fewer than `train.min_changed_fraction` of the training pairs did).
"""

from __future__ import annotations

import csv
import io
import os
import shutil
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml
from datasets import load_dataset
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from prefect import task
from transformers import (DataCollatorForSeq2Seq, DataCollatorWithFlattening, Trainer, TrainerCallback,
                          TrainingArguments)
from transformers.trainer_utils import get_last_checkpoint

from tasks.base_model import describe, load_model, load_tokenizer
from tasks.common import (PipelineError, atomic_dir, atomic_write, content_hash, logger, read_json, read_jsonl,
                          run_stage, write_json)
from tasks.params import MLflowParams, Params, Paths, TrainParams, flatten
from tasks.tracking import start_run

META = "papertune.json"  # how the adapter was made and how to prompt it (read by evaluate and ask)


# ---------------------------------------------------------------------------------------------- data


def build_prompt(tokenizer, question: str, prompt_template: str, system_prompt: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": question}
        ]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt_template.format(question=question)


def tokenize_pair(tokenizer, prompt: str, answer: str, max_len: int) -> dict:
    """input_ids = prompt + answer + EOS; labels = -100 over the prompt, so only answer tokens are learned."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    prompt_ids = prompt_ids[-(max_len // 2):]  # an overlong prompt keeps its end, next to the answer
    ids = (prompt_ids + answer_ids)[:max_len]
    labels = ([-100] * len(prompt_ids) + answer_ids)[:max_len]
    return {"input_ids": ids, "labels": labels}


def encode(row: dict, tokenizer, cfg: TrainParams) -> dict:
    prompt = build_prompt(tokenizer, row["question"], cfg.prompt_template, cfg.system_prompt)
    return tokenize_pair(tokenizer, prompt, row["answer"], cfg.max_seq_length)


def load_split(path: Path, tokenizer, cfg: TrainParams):
    ds = load_dataset("json", data_files=str(path), split="train")
    return ds.map(encode, fn_kwargs={"tokenizer": tokenizer, "cfg": cfg}, remove_columns=ds.column_names,
                  desc=f"tokenize {path.name}")


def collator(tokenizer, packing: bool):
    if packing:
        return DataCollatorWithFlattening()
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)


# ---------------------------------------------------------------------------------------------- model


def lora_model(base_dir: Path, cfg: TrainParams):
    model = load_model(base_dir, cfg.quantization, cfg.compute_dtype)
    # No KV cache while training: with one, transformers skips the packed-sequence mask, and the eval loss on a
    # flattened batch would let examples attend to each other.
    model.config.use_cache = False
    gc_kwargs = {"use_reentrant": False}
    if cfg.quantization != "none":
        model = prepare_model_for_kbit_training(model, cfg.gradient_checkpointing, gc_kwargs)
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
        model.enable_input_require_grads()
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def training_arguments(cfg: TrainParams, output_dir: Path, cuda: bool):
    return TrainingArguments(**training_kwargs(cfg, output_dir, cuda))


def training_kwargs(cfg: TrainParams, output_dir: Path, cuda: bool) -> dict:
    return dict(
        output_dir=str(output_dir),
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=cfg.logging_steps,
        eval_strategy="steps",
        eval_steps=cfg.eval_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to="none",  # MLflow logging is ours (MLflowCallback below), into the run evaluation reopens
        remove_unused_columns=False,
        # The usual QLoRA settings on a GPU: paged 8-bit AdamW and bf16 autocast. On CPU: plain AdamW in fp32.
        use_cpu=not cuda,
        optim="paged_adamw_8bit" if cuda and cfg.quantization != "none" else "adamw_torch",
        bf16=cuda and cfg.compute_dtype == "bfloat16",
        fp16=cuda and cfg.compute_dtype == "float16",
        ddp_find_unused_parameters=False,
        include_num_input_tokens_seen=True,
    )


def make_callback(mlflow):
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


# ---------------------------------------------------------------------------------------------- stage


def run_key(cfg: TrainParams, paths: Paths) -> dict:
    """What an adapter depends on: the base model, the training params and the split's content."""
    split = read_json(paths.split_report)
    base = describe(paths.base_model)
    return {
        "key": content_hash([base["name"], base["revision"], base["tokenizer_hash"], cfg.model_dump(mode="json"),
                             split["train_hash"], split["eval_hash"]]),
        "train_hash": split["train_hash"],
        "base_model": {k: base[k] for k in ("name", "revision", "tokenizer_hash")},
    }


def skip_reason(cfg: TrainParams, paths: Paths, key: dict, train_ids: list[str]) -> str | None:
    meta_path = Path(paths.adapter) / META
    if not meta_path.exists():
        return None
    prev = read_json(meta_path)
    if prev["run_key"] == key["key"]:
        return "QA dataset and training params unchanged"
    same_setup = prev["train_params"] == cfg.model_dump(mode="json") and prev["base_model"] == key["base_model"]
    changed = len(set(train_ids) ^ set(prev["train_pair_ids"])) / max(len(set(train_ids) | set(prev["train_pair_ids"])), 1)
    if same_setup and changed < cfg.min_changed_fraction:
        return f"only {changed:.1%} of training pairs changed (< train.min_changed_fraction={cfg.min_changed_fraction})"
    return None


@task(name="train")
def train_adapter(cfg: TrainParams, mlflow_cfg: MLflowParams, paths: Paths, record: dict, key: dict) -> dict:
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(paths.base_model)
    train_ds = load_split(Path(paths.train_split), tokenizer, cfg)
    eval_ds = load_split(Path(paths.eval_split), tokenizer, cfg)

    ckpt_dir = Path(paths.checkpoints)
    ckpt_meta = ckpt_dir / "papertune_run.json"
    resume = None
    if ckpt_meta.exists() and read_json(ckpt_meta)["run_key"] == key["key"]:
        resume = get_last_checkpoint(str(ckpt_dir))
    elif ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)  # checkpoints of another data/params combination must not be resumed
    run_id = read_json(ckpt_meta)["mlflow_run_id"] if resume else None

    cuda = torch.cuda.is_available()
    model = lora_model(Path(paths.base_model), cfg)
    trainable, total = model.get_nb_trainable_parameters()
    tags = {"qa_dataset_hash": record["qa_dataset_hash"], "train_hash": key["train_hash"],
            "base_model": key["base_model"]["name"], "base_model_revision": str(key["base_model"]["revision"])}
    # Under `accelerate launch` every rank runs this; only rank 0 records and saves.
    main = int(os.environ.get("RANK", 0)) == 0
    tracking = start_run(mlflow_cfg, run_id=run_id, run_name="papertune", tags=tags) if main else nullcontext((None, None))
    with tracking as (mlflow, run):
        if main and not resume:
            mlflow.log_params(record["params"])
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            write_json(ckpt_meta, {"run_key": key["key"], "mlflow_run_id": run.info.run_id})
        trainer = Trainer(
            model=model,
            args=training_arguments(cfg, ckpt_dir, cuda),
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            data_collator=collator(tokenizer, cfg.packing),
            callbacks=[make_callback(mlflow)] if main else [],
        )
        if resume:
            logger().info(f"train: resuming from {resume}")
        result = trainer.train(resume_from_checkpoint=resume)
        final_eval = trainer.evaluate()
        if not main:
            return {}
        metrics = {"train_loss": result.training_loss, "eval_loss": final_eval["eval_loss"],
                   "steps": trainer.state.global_step, "trainable_params": trainable, "total_params": total,
                   "train_examples": len(train_ds), "eval_examples": len(eval_ds)}
        # Throughput goes to MLflow only: DVC metrics stay identical when a run is reproduced.
        mlflow.log_metrics({"final_train_loss": metrics["train_loss"], "final_eval_loss": metrics["eval_loss"],
                            "train_tokens_per_second": trainer.state.num_input_tokens_seen
                            / result.metrics["train_runtime"]})
        mlflow.set_tag("papertune.train_decision", "trained")

        with atomic_dir(paths.adapter) as staging:
            trainer.model.save_pretrained(staging)  # adapter_model.safetensors + adapter_config.json
            tokenizer.save_pretrained(staging)
            atomic_write(staging / "params.yaml", yaml.safe_dump(record["params_nested"], sort_keys=False))
            write_json(staging / META, {
                "run_key": key["key"], "base_model": key["base_model"], "train_params": cfg.model_dump(mode="json"),
                "prompt_template": cfg.prompt_template, "system_prompt": cfg.system_prompt,
                "quantization": cfg.quantization, "compute_dtype": cfg.compute_dtype,
                "mlflow_run_id": run.info.run_id, "train_pair_ids": record["train_pair_ids"],
            })
        mlflow.log_artifacts(str(paths.adapter), artifact_path="adapter")
        history = loss_history(trainer.state.log_history)
        write_outputs(paths, metrics, history)
        mlflow.log_artifacts(str(paths.plots_dir), artifact_path="plots")
        for report in (paths.ingest_report, paths.qa_report, paths.split_report):
            if Path(report).exists():
                mlflow.log_artifact(str(report), artifact_path="reports")
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # finished: the adapter is saved, checkpoints are dead weight
    return metrics


def loss_history(log_history: list[dict]) -> list[dict]:
    by_step: dict[int, dict] = {}
    for entry in log_history:
        row = by_step.setdefault(entry["step"], {"step": entry["step"], "train_loss": "", "eval_loss": ""})
        if "loss" in entry:
            row["train_loss"] = entry["loss"]
        if "eval_loss" in entry:
            row["eval_loss"] = entry["eval_loss"]
    return [r for _, r in sorted(by_step.items()) if r["train_loss"] != "" or r["eval_loss"] != ""]


def write_outputs(paths: Paths, metrics: dict, history: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    write_json(paths.train_metrics, metrics)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["step", "train_loss", "eval_loss"])
    writer.writeheader()
    writer.writerows(history)
    atomic_write(paths.loss_curve, buf.getvalue())

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for col, style in (("train_loss", "-"), ("eval_loss", "o--")):
        pts = [(r["step"], r[col]) for r in history if r[col] != ""]
        if pts:
            ax.plot(*zip(*pts), style, label=col.replace("_", " "))
    ax.set(xlabel="step", ylabel="loss", title="QLoRA training loss")
    ax.legend()
    fig.tight_layout()
    Path(paths.plots_dir).mkdir(parents=True, exist_ok=True)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    atomic_write(Path(paths.plots_dir) / "loss.png", png.getvalue())


def run(train: TrainParams, mlflow: MLflowParams, paths: Paths, record: Params) -> dict:
    pairs = read_jsonl(paths.train_split)
    if not pairs or not read_jsonl(paths.eval_split):
        raise PipelineError("the split has an empty side: add PDFs or lower split.eval_fraction")
    key = run_key(train, paths)
    train_ids = [p["pair_id"] for p in pairs]
    if reason := skip_reason(train, paths, key, train_ids):
        logger().info(f"train: skipped, {reason}; keeping the adapter in {paths.adapter}")
        meta = read_json(Path(paths.adapter) / META)
        with start_run(mlflow, run_id=meta["mlflow_run_id"]) as (mlflow_, _):
            mlflow_.set_tag("papertune.train_decision", f"skipped: {reason}")
        return {**read_json(paths.train_metrics), "skipped": reason}
    qa_report = read_json(paths.qa_report) if Path(paths.qa_report).exists() else {}
    info = {
        "params": flatten(record),
        "params_nested": record.model_dump(mode="json"),
        "qa_dataset_hash": qa_report.get("dataset_hash", "unknown"),
        "train_pair_ids": train_ids,
    }
    metrics = train_adapter(train, mlflow, paths, info, key)
    logger().info(f"train: loss {metrics['train_loss']:.3f}, eval loss {metrics['eval_loss']:.3f} → {paths.adapter}")
    return metrics


if __name__ == "__main__":
    run_stage(run, "train")
