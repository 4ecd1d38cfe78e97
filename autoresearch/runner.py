"""
One run of train.py: its environment (the seed, and the profile pinned at init), its time limit, its output
appended to the experiment's log, and the verdict read from that output: the summary block after the last
`---` line, or why the run counts as a crash.
"""
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass

from autoresearch.layout import TRAIN, now_iso, to_float
from autoresearch.process import run_group


@dataclass
class Run:
    seed: int
    summary: dict
    error: str            # None when the run produced a finite val_bpb
    tail: list            # last lines of the traceback (or output), for crashes
    wall: float

    @property
    def val(self):
        return float(self.summary["val_bpb"])


# -----------------------------------------------------------------------------
# Launching


def child_env(config, seed):
    """train.py's environment: the seed, and the profile/dataset/cache pinned at init unless set."""
    env = dict(os.environ, AUTORESEARCH_SEED=str(seed), PYTHONUNBUFFERED="1")
    for key, field in (("AUTORESEARCH_PROFILE", "profile"), ("AUTORESEARCH_DATASET", "dataset"),
                       ("AUTORESEARCH_CACHE_DIR", "cache_dir")):
        if not env.get(key) and config.get(field):
            env[key] = str(config[field])
    return env


def default_timeout(config):
    """Twice the budget, and at least budget + 120 s for startup, compile and eval (10 min at 300 s)."""
    budget = float(config["time_budget"])
    return max(2 * budget, budget + 120)


def train_once(config, timeout, seed, log_path, on_spawn=None):
    """One `python train.py` with this seed, output appended to the experiment's log. on_spawn(pid)
    is called with the child's pid as soon as it runs (to record it for a resumed loop)."""
    with open(log_path, "a") as log:
        log.write(f"\n===== train.py  seed {seed}  timeout {timeout:.0f} s  {now_iso()} =====\n")
        log.flush()
        offset = log.tell()
        rc, wall = run_group([sys.executable, TRAIN], log, subprocess.STDOUT, child_env(config, seed),
                             timeout, on_spawn=on_spawn)
    with open(log_path, "rb") as f:
        f.seek(offset)
        output = f.read().decode(errors="replace")
    error, summary, tail = judge_run(output, rc, timeout)
    return Run(seed, summary, error, tail, wall)


# -----------------------------------------------------------------------------
# Reading the output


def parse_summary(output):
    """The `key: value` lines after the last `---` line of train.py's output."""
    lines = output.splitlines()
    marks = [i for i, line in enumerate(lines) if line.strip() == "---"]
    summary = {}
    for line in lines[marks[-1] + 1:] if marks else []:
        m = re.match(r"^(\w+):\s+(\S.*?)\s*$", line)
        if m:
            summary[m[1]] = m[2]
    return summary


def crash_tail(lines, n=3):
    """The last lines of the last traceback, else of the output: what a human reads first."""
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    return (lines[starts[-1] + 1:] if starts else lines)[-n:]


def judge_run(output, rc, timeout):
    """(error or None, summary, tail). A missing block, FAIL, a non-zero exit or a non-finite
    val_bpb is a crash."""
    summary = parse_summary(output)
    lines = [line.rstrip() for line in output.splitlines() if line.strip()]
    fail = next((line for line in reversed(lines) if line.startswith("FAIL")), None)
    val = to_float(summary.get("val_bpb"))
    if rc is None:
        error = f"timeout: killed with its whole process group after {timeout:.0f} s"
    elif fail:
        error = fail
    elif rc > 0:
        error = f"exit code {rc}"
    elif rc < 0:
        error = f"killed by signal {-rc}" + (" (out of memory?)" if rc == -9 else "")
    elif val is None:
        error = "no summary block (val_bpb missing)"
    elif not math.isfinite(val):
        error = f"val_bpb is {summary['val_bpb']}"
    else:
        error = None
    tail = crash_tail(lines) if error else []
    if error and tail and rc is not None and not fail:
        error = f"{error}: {tail[-1].strip()}"
    return error, summary, tail
