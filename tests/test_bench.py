"""The bench/ scripts run: a short invocation of each on the smoke data (their numbers are not checked here)."""

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_dataloader_measures_a_prepared_folder(smoke_cache):
    prepared = smoke_cache / "prepared" / "synthetic" / "smoke"
    env = dict(os.environ, AUTORESEARCH_CACHE_DIR=str(smoke_cache))
    result = subprocess.run([sys.executable, "bench/bench_dataloader.py", "--profile", "smoke", "--seconds", "0.3",
                             "--prepared", str(prepared)], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "synthetic:" in result.stdout
    rates = [line for line in result.stdout.splitlines() if "make_dataloader B=32" in line]
    assert len(rates) == 2 and all("M tokens/s" in line for line in rates), result.stdout


def test_gpu_check_dry_run_lists_every_step_without_a_gpu():
    result = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    steps = [line.split()[0] for line in result.stdout.splitlines() if line.startswith("  ")]
    assert steps[-4:] == ["prepare", "tests", "eval-agreement", "reference-run"], result.stdout


def test_bench_hub_reports_reads_and_pushes_per_second():
    result = subprocess.run([sys.executable, "bench/bench_hub.py", "--seconds", "0.4", "--pushes", "4",
                             "--clients", "2", "--pushers", "2"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    rates = re.findall(r"^(pushes|GET \S+) .*?([\d.]+)/s", result.stdout, re.M)
    assert [what for what, _ in rates] == ["pushes", "GET /api/git/leaves", "GET /api/git/commits",
                                           "GET /api/results", "GET /api/channels/results/posts"], result.stdout
    assert all(float(rate) > 0 for _, rate in rates) and "5 commits on the hub" in result.stdout
