"""Scale-out, unit layer: training is ready for DDP, retraining thresholds, `make serve`'s deployment, the chunked
loss. The data half on a Dask cluster: tests/integration/test_scale.py."""

from tasks import base_model, train
from tests.helpers import make_params


def test_train_stage_is_ready_for_a_multi_gpu_launch(tmp_path, monkeypatch):
    """`accelerate launch --multi_gpu --num_processes 2 -m tasks.train`, checked without starting it."""
    from accelerate.commands.launch import launch_command_parser

    args = launch_command_parser().parse_args(
        ["--multi_gpu", "--num_processes", "2", "-m", "tasks.train", "--params", "params.yaml"])
    assert args.multi_gpu and args.num_processes == 2 and args.module and args.training_script == "tasks.train"
    assert args.training_script_args == ["--params", "params.yaml"]  # the stage's own CLI passes through

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert base_model.device_map() == {"": 1}  # each rank holds its own 4-bit copy on its own GPU
    p = make_params(tmp_path)
    kwargs = train.training_kwargs(p.train, tmp_path, cuda=True)
    # DDP with gradient checkpointing needs non-reentrant checkpointing and no unused-parameter search.
    assert kwargs["ddp_find_unused_parameters"] is False
    assert kwargs["gradient_checkpointing_kwargs"] == {"use_reentrant": False}
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert base_model.device_map() == "auto"


def test_retraining_threshold_on_changed_training_pairs(tmp_path):
    """Scheduled runs retrain only when enough of the training data changed (train.min_changed_fraction)."""
    from tasks.files import write_json

    p = make_params(tmp_path, train={"min_changed_fraction": 0.2})
    base = {"name": "builtin:tiny-llama", "revision": None, "tokenizer_hash": "t"}
    old_ids = [f"pair{i}" for i in range(100)]
    write_json(p.paths.adapter / train.META, {"run_key": "old", "train_params": p.train.model_dump(mode="json"),
                                              "base_model": base, "train_pair_ids": old_ids, "code_hash": "c"})
    key = {"key": "new", "base_model": base, "code_hash": "c"}
    assert train.skip_reason(p.train, p.paths, {**key, "key": "old"}, old_ids).startswith(
        "QA dataset and training params unchanged")
    few_new = old_ids[:95] + [f"new{i}" for i in range(5)]  # 10 of 105 ids differ: 9.5%
    assert train.skip_reason(p.train, p.paths, key, few_new).startswith("only 9.5% of the training data changed")
    many_new = old_ids[:60] + [f"new{i}" for i in range(40)]
    assert train.skip_reason(p.train, p.paths, key, many_new) is None
    other_params = p.train.model_copy(update={"learning_rate": 1e-4, "min_changed_fraction": 0.2})
    assert train.skip_reason(other_params, p.paths, key, few_new) is None  # new params always retrain


def test_make_serve_uses_the_deployment_of_prefect_yaml(tmp_path, monkeypatch):
    """`make serve` serves the name, cron, timezone, parameters and description written in prefect.yaml: here a copy
    with other values, served by a stand-in for Prefect's Runner (the real serving is tests/e2e/test_faults.py's)."""
    from contextlib import contextmanager

    import yaml

    from flows import serve
    from flows.pipeline import pipeline
    from tests.helpers import ROOT

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    [nightly] = [d for d in spec["deployments"] if d["name"] == "nightly"]
    nightly.update(description="Weekly, Paris time.", parameters={"params_file": "other.yaml", "pdf_dir": "corpus"},
                   schedules=[{"cron": "15 4 * * 1", "timezone": "Europe/Paris", "active": True}])
    (tmp_path / "prefect.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.chdir(tmp_path)
    served = {}

    class Runner:  # records what would be served
        def __init__(self, name, **kwargs):
            served["runner"] = name

        def add_flow(self, flow, **kwargs):
            served.update(kwargs, flow=flow)

        async def start(self):
            pass

    @contextmanager
    def no_server(services):
        yield "http://127.0.0.1:1/api"

    monkeypatch.setattr("prefect.runner.Runner", Runner)
    monkeypatch.setattr("tasks.prefect_server.local_server", no_server)
    monkeypatch.setattr("tasks.prefect_server.check_database", lambda: None)
    monkeypatch.setattr(serve.signal, "signal", lambda *args: None)  # pytest's SIGTERM handling stays as it is
    monkeypatch.setattr(serve.multiprocessing, "active_children", lambda: [])  # other tests' pool workers live on
    serve.serve()
    [schedule] = served["schedules"]
    assert (served["runner"], served["name"], served["flow"]) == ("nightly", "nightly", pipeline)
    assert served["parameters"] == {"params_file": "other.yaml", "pdf_dir": "corpus"}
    assert served["description"] == "Weekly, Paris time."
    assert (schedule.cron, schedule.timezone) == ("15 4 * * 1", "Europe/Paris")


def test_loss_on_kept_positions_by_chunks_equals_the_models_own_loss():
    """Training projects only the positions whose next token is learned (answers; all of a document's text), a few
    rows at a time: the same loss and the same gradients as the model's own loss on full logits, packed or padded.
    Packed rows (tasks.training_data.pack_rows) give the same loss as one padded row per example: no example sees another."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tasks.loss import LinearCrossEntropy, with_loss_positions
    from tasks.training_data import pack_rows

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                                         use_cache=False))  # as in training: a KV cache turns the packed mask off
    qa = {"input_ids": list(range(5, 25)), "labels": [-100] * 14 + list(range(19, 25))}  # prompt, then answer
    text = {"input_ids": list(range(30, 42)), "labels": list(range(30, 42))}  # a document: every token learned
    more = {"input_ids": list(range(50, 60)), "labels": list(range(50, 60))}
    packed = pack_rows([qa, text, more], max_len=32, pad_id=0)
    assert packed["input_ids"].shape == (2, 32)  # [qa | text] and [more | padding]: rows of at most 32 tokens
    padded = {"input_ids": torch.tensor([ex["input_ids"] + [0] * (20 - len(ex["input_ids"])) for ex in (qa, text, more)]),
              "labels": torch.tensor([[-100] + ex["labels"][1:] + [-100] * (20 - len(ex["labels"]))
                                      for ex in (qa, text, more)]),
              "attention_mask": torch.tensor([[1] * len(ex["input_ids"]) + [0] * (20 - len(ex["input_ids"]))
                                              for ex in (qa, text, more)])}

    def loss_and_grads(compute):
        model.zero_grad()
        loss = compute()
        loss.backward()
        return loss.detach(), [w.grad.clone() for w in model.parameters()]

    full = [loss_and_grads(lambda: model(**batch).loss) for batch in (packed, padded)]
    loss_func = LinearCrossEntropy(chunk_logits=512 * 4)  # 4 rows a chunk: 25 kept rows make 7 chunks
    loss_func.set_model_output(model)  # the head moves into the loss, explicitly
    for batch, (full_loss, full_grads) in zip((packed, padded), full):
        kept = with_loss_positions(lambda _: dict(batch))(None)
        labels = kept.pop("labels")
        with torch.no_grad():  # the head is in the loss: the model returns the kept positions' hidden states
            assert model(**kept).logits.shape == (int((labels[:, 1:] != -100).sum()), 64)
        loss, grads = loss_and_grads(lambda: loss_func(model(**kept), labels))
        assert torch.allclose(loss, full_loss, atol=1e-5), (loss, full_loss)
        assert all(torch.allclose(g, f, atol=1e-5) for g, f in zip(grads, full_grads))
    assert torch.allclose(full[0][0], full[1][0], atol=1e-5), full
    loss_func.restore_model_output()  # the model has its head back: full logits again, the same loss
    assert model(**padded).logits.shape == (3, 20, model.config.vocab_size)
    assert torch.allclose(model(**padded).loss, full[1][0], atol=1e-5)
