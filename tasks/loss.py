"""The training loss, computed only where it counts, a chunk of rows at a time.

Used by tasks/train.py (the Trainer's collator and `compute_loss_func`) and benchmarks/train.py.

A causal LM's head turns every position into a vocabulary-sized row of logits: for Qwen2.5-0.5B's 152k vocabulary
at batch 4 x 256 that is 1,024 x 152k floats (0.6 GB in fp32, more with its gradient), the largest tensor of a
LoRA step, most of it thrown away under completion-only loss (prompt positions carry label -100). Two steps:
- transformers 5 lets `logits_to_keep` take a boolean (batch, sequence) mask: the model's last hidden states are
  taken only at the kept positions, those whose next token is learned (answer positions for QA pairs, every position
  of a document's text);
- the head itself moves into the loss, explicitly (torchtune's LinearCrossEntropyLoss.set_model_output:
  `loss.set_model_output(model)` makes the model skip its output layer, and the loss applies it):
  `LinearCrossEntropy` projects a chunk of kept rows at a time and recomputes each chunk in backward, so at most
  one chunk of logits (and its gradient) is ever alive, in whatever dtype. `restore_model_output()` gives the
  model its head back (to generate with it).
The loss is the same mean cross-entropy the model's own loss computes, with the same gradients (a test checks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100  # the label of positions that are not learned (prompt, padding, the first token of a packed example)


def loss_positions(labels: torch.Tensor) -> torch.Tensor:
    """(batch, seq) booleans: position t predicts token t+1, so keep t when labels[t+1] is learned."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE
    return keep


def with_loss_positions(collate):
    """Wrap a data collator: each batch also carries `logits_to_keep`, which the model's forward reads."""

    def collate_with_positions(examples):
        batch = collate(examples)
        batch["logits_to_keep"] = loss_positions(batch["labels"])
        return batch

    return collate_with_positions


# Logit elements per chunk: 8M (32 MB in fp32) is 55 rows at a 152k vocabulary; the builtin model's 2k vocabulary
# fits a whole batch in one chunk, which then runs without recomputation.
CHUNK_LOGITS = 2**23


class LinearCrossEntropy:
    """The Trainer's `compute_loss_func` for a model whose head was moved into the loss by `set_model_output`:
    `outputs.logits` then holds the final hidden states of the kept positions, flattened in row order. Written here
    because the libraries that fuse head and loss (Liger, Cut Cross-Entropy) need Triton/CUDA and torchtune's works
    on its own models; this is torch.utils.checkpoint around each chunk."""

    def __init__(self, chunk_logits: int = CHUNK_LOGITS):
        self.chunk_logits = chunk_logits
        self.head = self.project = None

    def set_model_output(self, model) -> None:
        """Move the model's head into this loss: the head's forward returns its input (the instance's forward only:
        weights, state_dict and hooks stay, so the adapter saves as usual), and the loss applies the head's own
        computation (LoRA'd or trained copies included) a chunk at a time."""
        self.head = model.get_output_embeddings()
        self.project = self.head.forward
        self.head.forward = _final_hidden_states
        self.rows = max(1, self.chunk_logits // model.config.get_text_config().vocab_size)

    def restore_model_output(self) -> None:
        """Give the model its head back (generation needs logits)."""
        self.head.forward = self.project

    def __call__(self, outputs, labels: torch.Tensor, num_items_in_batch: int | torch.Tensor | None = None):
        """Cross-entropy of the kept positions against their next tokens; summed and divided by the learned tokens
        of the whole accumulated batch when the Trainer says how many (gradient accumulation), else averaged over
        this batch."""
        targets = labels[:, 1:][labels[:, 1:] != IGNORE]
        hidden = outputs.logits.reshape(-1, outputs.logits.shape[-1])
        targets = targets.to(hidden.device)
        if len(hidden) <= self.rows:
            loss = _cross_entropy_sum(self.project, hidden, targets)
        else:
            loss = sum(checkpoint(_cross_entropy_sum, self.project, h, t, use_reentrant=False)
                       for h, t in zip(hidden.split(self.rows), targets.split(self.rows)))
        if num_items_in_batch is None:
            return loss / max(targets.numel(), 1)
        return loss / num_items_in_batch


def _final_hidden_states(hidden: torch.Tensor) -> torch.Tensor:
    return hidden


def _cross_entropy_sum(project, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(project(hidden).float(), targets, reduction="sum")


def frozen_weights_to(model, dtype: torch.dtype) -> int:
    """`prepare_model_for_kbit_training` upcasts every weight it does not quantise to fp32: the frozen input embedding
    (with a tied head: 270 MB at a 152k vocabulary, doubled) and every norm, whose fp32 outputs then carry fp32
    activations into the next layer (about 70 MB more at the peak of a 0.5B step). They are frozen, so the compute
    dtype, in which a bf16 LoRA run holds them too, loses nothing; returns how many bytes that saves."""
    saved = 0
    for weight in model.parameters():  # a tied weight once
        if weight.requires_grad or not weight.is_floating_point() or weight.dtype == dtype:
            continue  # trained, quantised (bitsandbytes stores integers), or already there
        saved += weight.numel() * (weight.element_size() - torch.finfo(dtype).bits // 8)
        weight.data = weight.data.to(dtype)
    return saved
