"""agent_loop.py refuses flags outside their range before doing anything, naming the flag and the range."""

import subprocess
import sys
from pathlib import Path

import pytest

AGENT_LOOP = Path(__file__).resolve().parents[1] / "agent_loop.py"


@pytest.mark.parametrize("args, flag, words", [
    (["step", "-m", "x", "--min-delta", "-1"], "--min-delta", "0 or more"),
    (["step", "-m", "x", "--timeout", "-5"], "--timeout", "greater than 0"),
    (["init", "--timeout", "0"], "--timeout", "greater than 0"),
    (["run", "--agent", "mutate", "--hours", "nan"], "--hours", "finite number greater than 0"),
    (["run", "--agent", "mutate", "--hours", "-1"], "--hours", "greater than 0"),
    (["run", "--agent", "mutate", "--max-experiments", "-1"], "--max-experiments", "0 or more"),
    (["run", "--agent", "mutate", "--agent-timeout", "inf"], "--agent-timeout", "finite number"),
    (["demo", "--experiments", "abc"], "--experiments", "not a number"),
])
def test_a_flag_out_of_its_range_is_refused_with_the_flag_and_the_range(tmp_path, args, flag, words):
    result = subprocess.run([sys.executable, str(AGENT_LOOP), *args], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert f"argument {flag}:" in result.stderr and words in result.stderr, result.stderr
    assert not (tmp_path / "logs").exists() and not (tmp_path / "results.tsv").exists()  # nothing was started
