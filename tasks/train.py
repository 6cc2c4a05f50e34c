"""Train: QLoRA fine-tuning of the base model on the training split (transformers + peft + bitsandbytes).

Run alone:  python -m tasks.train [--params params.yaml]
Multi-GPU:  accelerate launch --num_processes 2 -m tasks.train   (DDP; each GPU holds its own 4-bit copy)

The recipe reads top to bottom (`train_adapter`): set up the data (tasks/training_data.py), the checkpoints and the
model, train, save the adapter, write the metrics; every MLflow call lives in tasks/tracking.py (`log_training`,
`log_skipped`). The base model is loaded quantised (`train.quantization`: NF4 with double quantisation, 8-bit, or none),
prepared with `prepare_model_for_kbit_training` and wrapped in LoRA. The adapter (safetensors),
tokenizer and resolved params are saved together; an interrupted run resumes from its last checkpoint. Each
training is an MLflow run of its own (tasks/tracking.py); evaluation finds it by the adapter's content hash and
logs a child run. Training is skipped when neither the data nor the training params changed (or fewer than
`train.min_changed_fraction` of the training pairs did).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path

import yaml
from prefect import task

from tasks.adapter import META
from tasks.base_model import describe, load_model
from tasks.files import atomic_dir, atomic_write, follow_umask, read_json, read_jsonl, write_json
from tasks.hashing import code_hash, content_hash, dir_hash, sha256_file
from tasks.log import PipelineError, logger
from tasks.params import MLflowParams, Params, Paths, TrainParams, flatten
from tasks.runner import run_stage
from tasks.tracking import log_skipped, log_training
from tasks.training_data import collator, setup_data

# torch, peft, datasets, transformers' Trainer, tasks.loss and the MLflow model flavour are imported inside the
# functions that use them: a skipped or cached training never pays their import time (flows.pipeline imports
# every stage; torch and mlflow.pyfunc alone take 2-3 s). train_adapter runs in the flow's main thread (no
# lazy-import race).


# ---------------------------------------------------------------------------------------------- model


def lora_model(base_dir: Path, cfg: TrainParams):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from tasks.loss import frozen_weights_to

    model = load_model(base_dir, cfg.quantization, cfg.compute_dtype)
    # No KV cache while training: with one, transformers skips the packed-sequence mask, and the eval loss on a
    # flattened batch would let examples attend to each other.
    model.config.use_cache = False
    gc_kwargs = {"use_reentrant": False}
    if cfg.quantization != "none":
        model = prepare_model_for_kbit_training(model, cfg.gradient_checkpointing, gc_kwargs)
        frozen_weights_to(model, getattr(torch, cfg.compute_dtype))  # prepare_... upcast them to fp32
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
        model.enable_input_require_grads()
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=target_modules(model, cfg), layers_to_transform=top_layers(model, cfg.lora_layers),
                      modules_to_save=cfg.modules_to_save or None, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def target_modules(model, cfg: TrainParams) -> str | list[str]:
    """`train.target_modules`; "all-linear" with `train.lora_layers` becomes the names of the decoder's linear layers
    (peft takes layers_to_transform only with a list): every Linear (or bitsandbytes' 4/8-bit Linear) but the head."""
    if cfg.target_modules != "all-linear" or top_layers(model, cfg.lora_layers) is None:
        return cfg.target_modules
    import torch

    head = model.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and m is not head})


def top_layers(model, n: int) -> list[int] | None:
    """The indices of the top `n` decoder layers (`train.lora_layers`); None (every layer) for 0 or n >= depth."""
    depth = model.config.get_text_config().num_hidden_layers
    return list(range(depth - n, depth)) if 0 < n < depth else None


def training_arguments(cfg: TrainParams, output_dir: Path, cuda: bool):
    from transformers import TrainingArguments

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
        eval_on_start=True,  # the base model's held-out loss: where the curve starts, what training must beat
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        seed=cfg.seed,
        data_seed=cfg.seed,
        # training_examples already put the examples in `train.data_order` (shuffled when "mixed"): keep it.
        train_sampling_strategy="sequential",
        report_to="none",  # MLflow logging is ours (log_training)
        remove_unused_columns=False,
        # The usual QLoRA settings on a GPU: paged 8-bit AdamW and bf16 autocast. On CPU: plain AdamW in fp32.
        use_cpu=not cuda,
        optim="paged_adamw_8bit" if cuda and cfg.quantization != "none" else "adamw_torch",
        bf16=cuda and cfg.compute_dtype == "bfloat16",
        fp16=cuda and cfg.compute_dtype == "float16",
        ddp_find_unused_parameters=False,
        include_num_input_tokens_seen=True,
    )


def setup_model(cfg: TrainParams, paths: Paths):
    """(LoRA-wrapped quantised model, trainable parameters, all parameters)."""
    model = lora_model(Path(paths.base_model), cfg)
    trainable, total = model.get_nb_trainable_parameters()
    return model, trainable, total


# ---------------------------------------------------------------------------------------------- checkpoints


def setup_checkpoints(paths: Paths, key: dict) -> tuple[str | None, str | None]:
    """(checkpoint to resume from, its MLflow run id): only a checkpoint of this very data/params combination."""
    from transformers.trainer_utils import get_last_checkpoint

    ckpt_dir = Path(paths.checkpoints)
    ckpt_meta = ckpt_dir / "papertune_run.json"
    if ckpt_meta.exists() and read_json(ckpt_meta)["run_key"] == key["key"]:
        resume = get_last_checkpoint(str(ckpt_dir))
        if resume:
            return resume, read_json(ckpt_meta)["mlflow_run_id"]
    if ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)  # checkpoints of another data/params combination must not be resumed
    return None, None


def checkpoint_modes():
    """A Trainer callback: safetensors writes a checkpoint's weights 0600; they get the umask's mode, like outputs."""
    from transformers import TrainerCallback

    class FollowUmask(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            follow_umask(args.output_dir)

    return FollowUmask()


def remember_run(paths: Paths, key: dict, run_id: str) -> None:
    """The MLflow run writing these checkpoints: a resumed training's run links to it (papertune.resumed_from)."""
    Path(paths.checkpoints).mkdir(parents=True, exist_ok=True)
    write_json(Path(paths.checkpoints) / "papertune_run.json", {"run_key": key["key"], "mlflow_run_id": run_id})


# ---------------------------------------------------------------------------------------------- stage


def run_key(cfg: TrainParams, paths: Paths) -> dict:
    """What an adapter depends on: the base model's content (weights, config, tokenizer and descriptor, not just
    its name: a rebuild with another model.tiny.seed is another model), the training params, the split's content,
    the chunks' content when training reads documents (an edited chunk is another text to learn), and the training
    code (tasks/train.py and every project module it imports, transitively)."""
    split = read_json(paths.split_report)
    chunks = sha256_file(paths.chunks) if cfg.read_documents != "none" else None
    base = describe(paths.base_model)
    content = [dir_hash(paths.base_model)]
    if Path(base["load_from"]).is_dir() and Path(base["load_from"]).resolve() != Path(paths.base_model).resolve():
        content.append(dir_hash(base["load_from"]))  # a local model folder named in model.name
    base_model = {**{k: base[k] for k in ("name", "revision", "tokenizer_hash")}, "content_hash": content_hash(content)}
    code = code_hash("tasks.train")
    return {
        "key": content_hash([base_model, cfg.model_dump(mode="json"), split["train_hash"], split["eval_hash"], chunks,
                             code]),
        "train_hash": split["train_hash"],
        "chunks_hash": chunks,
        "base_model": base_model,
        "code_hash": code,
    }


def read_chunk_ids(cfg: TrainParams, paths: Paths) -> list[str]:
    """One id per chunk of text training reads, from its content (none with `train.read_documents: none`)."""
    if cfg.read_documents == "none":
        return []
    return [f"chunk:{content_hash(c['text'])[:24]}" for c in read_jsonl(paths.chunks)]


def skip_reason(cfg: TrainParams, paths: Paths, key: dict, data_ids: list[str]) -> str | None:
    """Why training can keep the adapter, or None. `data_ids`: the training pairs' ids and the read chunks' ids."""
    meta_path = Path(paths.adapter) / META
    if not meta_path.exists():
        return None
    prev = read_json(meta_path)
    if prev["run_key"] == key["key"]:
        return "QA dataset and training params unchanged (same base model and code)"
    # The retraining threshold compares data only (QA pairs and the text read): another base model, params or code
    # always retrains.
    same_setup = (prev["train_params"] == cfg.model_dump(mode="json") and prev["base_model"] == key["base_model"]
                  and prev.get("code_hash") == key["code_hash"])
    before, now = set(prev["train_pair_ids"]) | set(prev.get("read_chunk_ids", [])), set(data_ids)
    changed = len(now ^ before) / max(len(now | before), 1)
    if same_setup and changed < cfg.min_changed_fraction:
        return (f"only {changed:.1%} of the training data changed (QA pairs and chunks read; "
                f"< train.min_changed_fraction={cfg.min_changed_fraction})")
    return None


@task(name="train")
def train_adapter(cfg: TrainParams, mlflow_cfg: MLflowParams, paths: Paths, record: dict, key: dict) -> dict:
    """The recipe: data → checkpoints → model → train → save → metrics, recorded by log_training."""
    import torch
    from transformers import Trainer

    from tasks.loss import LinearCrossEntropy, with_loss_positions

    torch.manual_seed(cfg.seed)
    tokenizer, train_ds, eval_ds, read, counts = setup_data(cfg, paths)
    record = {**record, "read_documents": read}  # which documents were read: for log_training and META
    resume, run_id = setup_checkpoints(paths, key)
    model, trainable, total = setup_model(cfg, paths)
    main = int(os.environ.get("RANK", 0)) == 0  # under `accelerate launch` only rank 0 records and saves

    with log_training(mlflow_cfg, paths, record, key, run_id, main) as log:
        if main:
            remember_run(paths, key, log.run_id)
        loss = LinearCrossEntropy()
        loss.set_model_output(model)  # the head moves into the loss (torchtune's set_model_output)
        trainer = Trainer(model=model, args=training_arguments(cfg, Path(paths.checkpoints), torch.cuda.is_available()),
                          train_dataset=train_ds, eval_dataset=eval_ds,
                          data_collator=with_loss_positions(collator(tokenizer, cfg.packing, cfg.max_seq_length)),
                          compute_loss_func=loss,  # logits only where learned, by chunks
                          callbacks=[*log.callbacks, checkpoint_modes()])
        if resume:
            logger().info(f"train: resuming from {resume}")
        result = trainer.train(resume_from_checkpoint=resume)
        final_eval = trainer.evaluate()
        if not main:
            return {}
        metrics = {"train_loss": result.training_loss, "eval_loss": final_eval["eval_loss"],
                   "steps": trainer.state.global_step, "trainable_params": trainable, "total_params": total,
                   "train_examples": len(train_ds), **counts, "eval_examples": len(eval_ds),
                   "documents_read": len(read)}
        save_adapter(paths, cfg, trainer.model, tokenizer, record, key)
        write_outputs(paths, metrics, loss_history(trainer.state.log_history))
        log.done = {"final_train_loss": metrics["train_loss"], "final_eval_loss": metrics["eval_loss"],
                    "train_tokens_per_second": trainer.state.num_input_tokens_seen / result.metrics["train_runtime"]}
    shutil.rmtree(paths.checkpoints, ignore_errors=True)  # finished: the adapter is saved, checkpoints are dead weight
    return metrics


# ---------------------------------------------------------------------------------------------- save


def save_adapter(paths: Paths, cfg: TrainParams, model, tokenizer, record: dict, key: dict) -> None:
    """Adapter weights, tokenizer, resolved params and META, swapped in whole."""
    with atomic_dir(paths.adapter) as staging:
        model.save_pretrained(staging)  # adapter_model.safetensors + adapter_config.json
        # peft writes the resolved target modules from a set, in hash order: sorted, dvc.lock stays stable.
        config = read_json(staging / "adapter_config.json")
        if isinstance(config.get("target_modules"), list):
            config["target_modules"] = sorted(config["target_modules"])
        atomic_write(staging / "adapter_config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
        tokenizer.save_pretrained(staging)
        atomic_write(staging / "params.yaml", yaml.safe_dump(record["params_nested"], sort_keys=False))
        write_json(staging / META, {
            "run_key": key["key"], "base_model": key["base_model"], "train_params": cfg.model_dump(mode="json"),
            "prompt_template": cfg.prompt_template, "system_prompt": cfg.system_prompt,
            "quantization": cfg.quantization, "compute_dtype": cfg.compute_dtype,
            "train_pair_ids": record["train_pair_ids"],  # no MLflow run id: DVC tracks this folder
            "read_chunk_ids": record["read_chunk_ids"],
            "code_hash": key["code_hash"], "chunks_hash": key["chunks_hash"],
            # What the model read, and how a passage was shown to it (ask and evaluate use the same prompts).
            "read_documents": cfg.read_documents, "documents_read": record["read_documents"],
            "reading_questions": cfg.reading_questions,
        })


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


# ---------------------------------------------------------------------------------------------- entry


def run(train: TrainParams, mlflow: MLflowParams, paths: Paths, record: Params) -> dict:
    pairs = read_jsonl(paths.train_split)
    if not pairs or not read_jsonl(paths.eval_split):
        raise PipelineError("the split has an empty side: add PDFs or lower split.eval_fraction")
    key = run_key(train, paths)
    train_ids, chunk_ids = [p["pair_id"] for p in pairs], read_chunk_ids(train, paths)
    if reason := skip_reason(train, paths, key, train_ids + chunk_ids):
        logger().info(f"train: skipped, {reason}; keeping the adapter in {paths.adapter}")
        log_skipped(mlflow, paths, reason)
        return {**read_json(paths.train_metrics), "skipped": reason}
    qa_report = read_json(paths.qa_report) if Path(paths.qa_report).exists() else {}
    info = {
        "params": flatten(record),
        "params_nested": record.model_dump(mode="json"),
        "qa_dataset_hash": qa_report.get("dataset_hash", "unknown"),
        "train_pair_ids": train_ids,
        "read_chunk_ids": chunk_ids,
    }
    metrics = train_adapter(train, mlflow, paths, info, key)
    logger().info(f"train: loss {metrics['train_loss']:.3f}, eval loss {metrics['eval_loss']:.3f} → {paths.adapter}")
    return metrics


if __name__ == "__main__":
    run_stage(run, "train")
