"""The pipeline's command line stops on bad params in one line, before any work (the params model:
tests/unit/test_params.py)."""

import subprocess
import sys

from tests.helpers import ROOT


def test_the_pipeline_cli_stops_on_bad_params_in_one_line(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text((ROOT / "params.yaml").read_text().replace("  seed: 7", "  seed: 7\n  sed: 3", 1))
    result = subprocess.run([sys.executable, "-m", "flows.pipeline", "--params", str(bad)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stderr == f"error: {bad}: split: unknown key 'sed' (did you mean seed?)\n"
