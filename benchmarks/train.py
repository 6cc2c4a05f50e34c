"""Training benchmarks, measured side by side in one run (figures and ratios, never pass/fail).

Run:  python benchmarks/train.py [--params params.yaml] [--steps 20] [--skip-memory] [--skip-throughput]
                                 [--memory-steps 20]

1. Throughput: the pipeline's default recipe (padding-free packed batches, loss on answer tokens only, LoRA on the
   top `train.lora_layers` layers) against plain LoRA (every example padded to max_seq_length, loss on every
   token, LoRA on every layer), same 4-bit base model (params.yaml's: SmolLM2 by default), same QA examples, same
   steps, so the same real tokens. Reported as real (non-pad) tokens per second, and each run's answer-only loss
   on the held-out QA pairs afterwards (what the faster recipe learned at equal tokens).
2. Memory: LoRA training of a 0.5B-parameter-shaped random Llama (Qwen2.5-0.5B's shape; built here,
   nothing downloaded) with the base in 4-bit NF4 vs in bf16 (both with bf16 compute), each in its own
   process: the weights' footprint, the peak RSS while loading, the peak RSS while training, tokens/s and the
   loss at the last step (20 by default: both runs start from the same weights and see the same batch, so their
   losses should agree to within quantisation noise); both with the pipeline's loss (tasks/loss.py: the head
   applied only where the next token is learned, a chunk of rows at a time; frozen embedding and norms kept in
   bf16), and 4-bit once more as before issue 10 (full logits, fp32 embedding and norms). Both under
   glibc's default malloc and under MALLOC_MMAP_THRESHOLD_=131072: by default glibc raises its mmap threshold
   after the first large free, so each pass's transient activations and (4-bit) dequantised weights (1.6-8.7 MB
   each, every layer, forward and backward) are carved from a heap that fragments: both runs then hold about 2 GB
   of freed memory, reached in the first steps (not a leak: flat from step 21 to 40); a fixed threshold maps and
   unmaps them, at a cost in speed (the kernel zeroes every mapped page). Goal (issue 10): 4-bit train peak ≤ 0.6x
   bf16's.
Needs the pipeline's base model and split: run `dvc repro split` first.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.scale import status_mb  # noqa: E402
from tasks import base_model, train, training_data  # noqa: E402
from tasks.params import load_params  # noqa: E402

# Qwen2.5-0.5B's shape (494M parameters with tied embeddings); every linear output a multiple of 32.
HALF_B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
              num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=2048)


def heldout_loss(model, tokenizer, p) -> float:
    """Mean answer-only cross-entropy of the held-out QA pairs (the training's eval loss), one pair at a time."""
    model.eval()
    losses = []
    with torch.no_grad():
        for row in training_data.load_split(p.paths.eval_split, tokenizer, p.train):
            out = model(input_ids=torch.tensor([row["input_ids"]]), labels=torch.tensor([row["labels"]]))
            losses.append(float(out.loss))
    return sum(losses) / len(losses)


def throughput(p, steps: int, packed: bool) -> dict:
    from transformers import DataCollatorForLanguageModeling, Trainer

    tokenizer = base_model.load_tokenizer(p.paths.base_model)
    # The baseline is plain LoRA: every layer adapted, every example padded.
    cfg = p.train.model_copy(update={"max_steps": steps, "packing": packed,
                                     **({} if packed else {"lora_layers": 0})})
    if packed:  # the pipeline's own path
        ds = training_data.load_split(p.paths.train_split, tokenizer, cfg)
        collate = training_data.collator(tokenizer, True, cfg.max_seq_length)
    else:  # the plain recipe: prompt + answer as one text, padded to max_seq_length, loss everywhere
        from datasets import load_dataset

        ds = load_dataset("json", data_files=str(p.paths.train_split), split="train").map(
            lambda r: tokenizer(train.build_prompt(tokenizer, r["question"], cfg.prompt_template, "") + r["answer"],
                                padding="max_length", truncation=True, max_length=cfg.max_seq_length),
            remove_columns=["question", "answer"])
        ds = ds.select_columns(["input_ids", "attention_mask"])
        collate = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    torch.manual_seed(0)
    model = train.lora_model(p.paths.base_model, cfg)
    args = train.training_arguments(cfg, Path(tempfile.mkdtemp()), cuda=False)
    args.eval_strategy, args.save_strategy, args.disable_tqdm, args.eval_on_start = "no", "no", True, False
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collate)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    batches = [collate([ds[i] for i in range(j, min(j + cfg.per_device_train_batch_size, len(ds)))])
               for j in range(0, len(ds), cfg.per_device_train_batch_size)]
    # Real tokens = prompt + answer tokens fed to the model (packed rows end in padding too: not counted).
    per_step = sum(len(ds[i]["input_ids"]) for i in range(len(ds))) if packed else sum(
        int(b["attention_mask"].sum()) for b in batches)
    real_tokens = per_step / len(batches) * steps
    return {"seconds": seconds, "real_tokens_per_s": real_tokens / seconds, "real_tokens": real_tokens,
            "heldout_loss": heldout_loss(model, tokenizer, p)}


def peak_memory_child(model_dir: str, quantization: str, loss: str, steps: int) -> None:
    """In a fresh process: load, then LoRA-train `steps` steps; print resident memory after loading, the peak
    while training (the peak is reset after loading through /proc/self/clear_refs), tokens/s and the last loss.
    loss "kept": the pipeline's (tasks/loss.py: the head only where the next token is learned, by chunks; frozen
    embedding and norms in the compute dtype); "full": logits at every position, the embedding and norms left in fp32
    (before issue 10)."""
    from tasks.loss import LinearCrossEntropy, frozen_weights_to, with_loss_positions

    p = load_params()
    # bf16 compute for both, so that only the storage of the frozen base differs.
    # The QLoRA memory recipe, whatever params.yaml's tiny-model recipe says: LoRA r16 on every linear layer, frozen
    # embedding and head (a trained 152k-vocab head would dominate both runs), gradient checkpointing.
    cfg = p.train.model_copy(update={"quantization": quantization, "compute_dtype": "bfloat16", "lora_r": 16,
                                     "lora_alpha": 32, "modules_to_save": [], "gradient_checkpointing": True})
    import bitsandbytes, peft, transformers  # noqa: F401, I001  (lora_model imports them: count them before the model)

    imports = status_mb(os.getpid(), "VmRSS")  # the interpreter with torch, transformers, peft, bitsandbytes
    torch.manual_seed(0)
    model = train.lora_model(Path(model_dir), cfg)
    model.train()  # as the Trainer does: gradient checkpointing (and dropout) act only in training mode
    if loss == "full" and quantization != "none":  # what prepare_model_for_kbit_training leaves: fp32 embedding, norms
        frozen_weights_to(model, torch.float32)
    # Weights as held by the model (RSS after loading would undercount bf16: safetensors stay memory-mapped).
    loaded = model.get_memory_footprint() / 2**20
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so a child would report its parent's RSS.
    load_peak = status_mb(os.getpid(), "VmHWM")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    opt = torch.optim.AdamW([w for w in model.parameters() if w.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, HALF_B["vocab_size"], (4, 256), generator=g)
    labels = ids.clone()
    labels[:, :192] = -100  # QA rows: a 192-token prompt, a 64-token answer (completion-only loss)
    batch = with_loss_positions(lambda _: {"input_ids": ids, "labels": labels})(None)
    loss_func = LinearCrossEntropy() if loss == "kept" else None
    if loss_func:
        loss_func.set_model_output(model)
    start = time.perf_counter()
    for _ in range(steps):
        if loss == "kept":
            out = model(input_ids=ids, logits_to_keep=batch["logits_to_keep"])
            value = loss_func(out, labels)
        else:
            value = model(input_ids=ids, labels=labels).loss
        value.backward()
        opt.step()
        opt.zero_grad()
    seconds = time.perf_counter() - start
    train_peak = status_mb(os.getpid(), "VmHWM")
    print(json.dumps({"loaded_mb": loaded, "load_peak_mb": load_peak, "train_peak_mb": train_peak,
                      "imports_mb": imports,
                      "tokens_per_s": steps * ids.numel() / seconds, "last_loss": float(value)}))


MMAP = {"MALLOC_MMAP_THRESHOLD_": "131072"}  # glibc: allocations of 128 KiB and more are mapped, and unmapped on free
RUNS = (("4bit", "kept", "4bit_nf4", {}), ("none", "kept", "bf16", {}),
        ("4bit", "kept", "4bit_nf4 mmap", MMAP), ("none", "kept", "bf16 mmap", MMAP),
        ("4bit", "full", "4bit_nf4_before", {}))


def peak_memory(steps: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    with tempfile.TemporaryDirectory(prefix="papertune-0.5b-") as tmp:  # 1 GB of weights: gone when done
        folder = Path(tmp)
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**HALF_B)).to(torch.bfloat16)
        n_params = sum(w.numel() for w in model.parameters())
        model.save_pretrained(folder)
        (folder / "base_model.json").write_text(json.dumps({"name_or_path": None, "revision": None}))
        del model
        out = {"params_millions": round(n_params / 1e6)}
        for quantization, loss, label, env in tqdm(RUNS, desc="memory runs (one process each)"):
            r = subprocess.run([sys.executable, __file__, "--child", str(folder), quantization, loss, str(steps)],
                               capture_output=True, text=True, env={**os.environ, **env})
            if r.returncode:
                sys.exit(f"memory run {label} failed:\n{r.stderr[-3000:]}")
            out[label] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description="papertune training benchmarks")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true", help="only the 0.5B memory runs (no pipeline data)")
    ap.add_argument("--memory-steps", type=int, default=20)
    args = ap.parse_args()
    p = load_params(args.params)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    if not args.skip_throughput:
        packed = throughput(p, args.steps, packed=True)
        padded = throughput(p, args.steps, packed=False)
        print(f"training throughput, {p.model.name} in {p.train.quantization}, {args.steps} steps of "
              f"{p.train.per_device_train_batch_size} QA examples ({packed['real_tokens']:.0f} real tokens each run; "
              "pad tokens excluded); held-out loss: answer-only cross-entropy on the eval split afterwards")
        layers = f"top {p.train.lora_layers} layers" if p.train.lora_layers else "all layers"
        for label, r in ((f"pipeline (packed, answer-only loss, {layers})", packed),
                         ("plain LoRA (padded, all layers)", padded)):
            print(f"  {label:<52} {r['real_tokens_per_s']:6.0f} tok/s  ({r['seconds']:5.1f} s)  "
                  f"held-out loss {r['heldout_loss']:.3f}")
        print(f"  ratio pipeline / plain LoRA: {packed['real_tokens_per_s'] / padded['real_tokens_per_s']:.2f}x tokens/s")
    if not args.skip_memory:
        mem = peak_memory(args.memory_steps)
        print(f"memory (RSS), LoRA on a {mem['params_millions']}M-parameter random Llama (Qwen2.5-0.5B's shape), bf16 "
              f"compute, {args.memory_steps} steps of batch 4 x 256 (QA rows: 64 answer tokens of 256)")
        print(f"  {'':18}{'weights':>12}{'load peak':>12}{'train peak':>12}{'above imports':>15}{'tokens/s':>10}"
              f"{'last loss':>11}")
        for _, _, label, _ in RUNS:
            m = mem[label]
            print(f"  {label:<18}{m['loaded_mb']:>9.0f} MB{m['load_peak_mb']:>9.0f} MB{m['train_peak_mb']:>9.0f} MB"
                  f"{m['train_peak_mb'] - m['imports_mb']:>12.0f} MB{m['tokens_per_s']:>10.0f}{m['last_loss']:>11.3f}")
        print("  (4bit_nf4 and bf16: the pipeline's loss, logits only where learned; 4bit_nf4_before: full logits, "
              "fp32 embedding and norms; mmap: MALLOC_MMAP_THRESHOLD_=131072; above imports: train peak minus the "
              "RSS of the interpreter with its libraries imported, before the model)")
        for suffix, malloc in (("", "glibc default"), (" mmap", "MALLOC_MMAP_THRESHOLD_=131072")):
            four, bf16 = mem[f"4bit_nf4{suffix}"], mem[f"bf16{suffix}"]
            print(f"  ratio 4-bit / bf16, {malloc}: weights {four['loaded_mb'] / bf16['loaded_mb']:.2f}x, "
                  f"train peak {four['train_peak_mb'] / bf16['train_peak_mb']:.2f}x, above imports "
                  f"{(four['train_peak_mb'] - four['imports_mb']) / (bf16['train_peak_mb'] - bf16['imports_mb']):.2f}x, "
                  f"tokens/s {four['tokens_per_s'] / bf16['tokens_per_s']:.2f}x")
        before, now, mapped = mem["4bit_nf4_before"], mem["4bit_nf4"], mem["4bit_nf4 mmap"]
        print(f"  4-bit now / before: train peak {now['train_peak_mb'] / before['train_peak_mb']:.2f}x, "
              f"tokens/s {now['tokens_per_s'] / before['tokens_per_s']:.2f}x")
        print(f"  4-bit mmap / default malloc: train peak {mapped['train_peak_mb'] / now['train_peak_mb']:.2f}x, "
              f"tokens/s {mapped['tokens_per_s'] / now['tokens_per_s']:.2f}x")

if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--child":
        peak_memory_child(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    else:
        main()
