"""Export: the train and eval splits in the formats other fine-tuning tools read, with a dataset card.

Run alone:  python -m tasks.export [--params params.yaml]

Writes under `paths.export_dir` (the formats chosen in `export.formats`):
- alpaca/{train,eval}.jsonl     {"instruction", "input", "output"[, "system"]}     LLaMA-Factory, axolotl
- sharegpt/{train,eval}.jsonl   {"conversations": [{"from": "human"|"gpt", ...}][, "system"]}  LLaMA-Factory, axolotl
- openai/{train,eval}.jsonl     {"messages": [{"role": "system"|"user"|"assistant", ...}]}  TRL SFTTrainer, OpenAI
- hf/                           a `datasets.DatasetDict` (train, eval) saved with save_to_disk: load_from_disk()
- README.md                     the dataset card: counts, generator and judge, filters, source documents
The folder is replaced whole (a crash leaves the previous export).
"""

from __future__ import annotations

import json
from pathlib import Path

from tasks.files import atomic_dir, read_json, read_jsonl
from tasks.log import logger
from tasks.params import ExportParams, Paths, QAParams
from tasks.runner import run_stage

METADATA = ("pair_id", "kind", "doc_id", "title", "section", "page_start", "page_end", "grounding")


def _user(p: dict, export: ExportParams) -> str:
    return f"{p['context']}\n\n{p['question']}" if export.include_context else p["question"]


def alpaca(p: dict, export: ExportParams) -> dict:
    row = {"instruction": p["question"], "input": p["context"] if export.include_context else "", "output": p["answer"]}
    return {**row, "system": export.system_prompt} if export.system_prompt else row


def sharegpt(p: dict, export: ExportParams) -> dict:
    row = {"conversations": [{"from": "human", "value": _user(p, export)}, {"from": "gpt", "value": p["answer"]}]}
    return {**row, "system": export.system_prompt} if export.system_prompt else row


def openai_chat(p: dict, export: ExportParams) -> dict:
    system = [{"role": "system", "content": export.system_prompt}] if export.system_prompt else []
    return {"messages": system + [{"role": "user", "content": _user(p, export)},
                                  {"role": "assistant", "content": p["answer"]}]}


FORMATS = {"alpaca": alpaca, "sharegpt": sharegpt, "openai": openai_chat}


def save_datasets(splits: dict[str, list[dict]], export: ExportParams, out: Path) -> None:
    from datasets import Dataset, DatasetDict  # heavy import: only when this format is asked for

    def rows(pairs: list[dict]) -> dict:
        columns = {"question": [], "answer": [], "context": [], "messages": [], **{k: [] for k in METADATA}}
        for p in pairs:
            for k in ("question", "answer", "context", *METADATA):
                columns[k].append(p.get(k))
            columns["messages"].append(openai_chat(p, export)["messages"])
        return columns

    DatasetDict({name: Dataset.from_dict(rows(pairs)) for name, pairs in splits.items()}).save_to_disk(str(out))


def card(splits: dict[str, list[dict]], qa: QAParams, qa_report: dict, export: ExportParams) -> str:
    """A Hugging Face dataset card: what is in the dataset and how it was made."""
    filters = {k: getattr(qa, k) for k in ("min_question_chars", "max_question_chars", "min_answer_chars",
                                            "max_answer_chars", "min_grounding", "near_duplicate_threshold",
                                            "max_pairs_per_chunk")}
    judge = ({k: getattr(qa.judge, k) for k in ("backend", "min_faithfulness", "min_self_contained", "min_usefulness")}
             if qa.judge.enabled else "none")
    lines = ["---", "language: [en]", "task_categories: [question-answering, text-generation]",
             "configs:", "- config_name: default", "  data_files:"]
    lines += [f"  - split: {name}\n    path: openai/{name}.jsonl" for name in splits if "openai" in export.formats]
    lines += ["---", "", "# Question–answer pairs about research papers (papertune)", "",
              "| split | pairs | documents |", "|---|---|---|"]
    lines += [f"| {name} | {len(pairs)} | {len({p['doc_id'] for p in pairs})} |" for name, pairs in splits.items()]
    lines += ["", f"- generator: `{qa_report['backend']}`" + (f", model `{qa_report['model']}`" if qa_report.get("model")
                                                              else ""),
              f"- judge: `{json.dumps(judge)}`" + (f", model `{qa_report['judge_model']}`"
                                                   if qa_report.get("judge_model") else ""),
              f"- filters: `{json.dumps(filters)}`",
              f"- QA funnel: {qa_report['generated']} generated, dropped {json.dumps(qa_report['dropped'])}, "
              f"{qa_report['kept']} kept",
              "- eval holds out whole documents; eval questions near-duplicating a training question are dropped",
              f"- formats: {', '.join(export.formats)}", "", "## Source documents", ""]
    for name, pairs in splits.items():
        lines.append(f"{name}:")
        lines += [f"- {title}" for title in sorted({p["title"] for p in pairs})]
    return "\n".join(lines) + "\n"


def run(export: ExportParams, qa: QAParams, paths: Paths) -> dict:
    splits = {"train": read_jsonl(paths.train_split), "eval": read_jsonl(paths.eval_split)}
    with atomic_dir(paths.export_dir) as staging:
        for fmt in export.formats:
            if fmt == "datasets":
                save_datasets(splits, export, staging / "hf")
                continue
            (staging / fmt).mkdir()
            for name, pairs in splits.items():
                text = "".join(json.dumps(FORMATS[fmt](p, export), ensure_ascii=False) + "\n" for p in pairs)
                (staging / fmt / f"{name}.jsonl").write_text(text)
        (staging / "README.md").write_text(card(splits, qa, read_json(paths.qa_report), export))
    counts = {name: len(pairs) for name, pairs in splits.items()}
    logger().info(f"export: {counts} as {', '.join(export.formats)} → {paths.export_dir}")
    return counts


if __name__ == "__main__":
    run_stage(run, "export")
