"""The bench/ scripts run: a short invocation of each on the smoke data (their numbers are not checked here)."""

import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from autoresearch.confine import landlock_abi

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.long(minutes=1.6)  # on one core; conftest hands out the longest files first


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


def load_gpu_check():
    """bench/gpu_check.py as a module (bench/ is no package)."""
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    return gpu_check


def test_gpu_check_dry_run_lists_every_step_without_a_gpu():
    result = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    steps = [line.split()[0] for line in result.stdout.splitlines() if line.startswith("  ")]
    assert steps[-5:] == ["prepare", "tests", "eval-agreement", "reference-run", "warm-run"], result.stdout
    harness = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run", "--harness"], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    steps = [line.split()[0] for line in harness.stdout.splitlines() if line.startswith("  ")]
    assert steps[-5:] == ["prepare", "warm-run", "handoff-run", "evaluator-cold", "evaluator-warm"], harness.stdout


def test_gpu_check_reports_a_reference_run_killed_at_its_deadline_after_printing_its_summary():
    gpu_check = load_gpu_check()
    block = "step 00000 (0.0%) | loss 8.9 | 412 ms |\nstep 00001 (0.0%) | loss 8.7 | 398 ms |\n---\n" \
            "val_bpb:          3.032650\ntraining_seconds: 300.1\n" \
            "mfu_percent:      37.05\ntotal_tokens_M:   322.175\nstartup_seconds:  75.2\neval_seconds:     21.2\n"
    report = gpu_check.summary({"reference-run": ("timed out", block)})
    assert "reference-run timed out" in report
    assert re.search(r"^cold_steps_ms: +step0 412, step1 398$", report, re.M), report  # no compile in step 0
    assert re.search(r"^mfu_percent: +37.05$", report, re.M) and re.search(r"^val_bpb: +3.032650$", report, re.M)
    assert re.search(r"^tokens_per_s: +1,073,55\d$", report, re.M), report
    cut = gpu_check.summary({"reference-run": ("timed out", block.split("startup_seconds")[0])})
    assert re.search(r"^mfu_percent: +n/a$", cut, re.M), cut  # a block cut short is not read


def test_gpu_check_warm_run_reports_its_phases_and_aot_cache_and_harness_stages_what_the_evaluator_adds(
        smoke_cache, tmp_path):
    # the scripts the GPU runs after the reference run (and with --harness), run here on the smoke profile, which
    # does not compile: no cache decisions to log, so AOTAutograd's lines are added as torch writes them. The
    # harness's stages: the warm run exports its model instead of evaluating it, and the evaluator scores that
    # file on a compile cache of its own (twice on the GPU, cold then warm: once here, the command is the same)
    gpu_check = load_gpu_check()
    env = dict(os.environ, AUTORESEARCH_PROFILE="smoke", AUTORESEARCH_CACHE_DIR=str(smoke_cache))
    env.pop("AUTORESEARCH_DATASET", None)
    handoff, evaluator_cold, evaluator_warm = gpu_check.harness_stages(tmp_path)
    assert evaluator_cold == [("evaluator-cold", evaluator_warm[0][1])]
    results = {}
    for stage in [[("warm-run", [sys.executable, "-c", gpu_check.WARM_RUN])], handoff, evaluator_cold]:
        results.update(gpu_check.run_stage(stage, env, time.time() + 300, tmp_path))
    assert all(code == 0 for code, _ in results.values()), {name: out[-1500:] for name, (_, out) in
                                                            results.items()}
    warm = results["warm-run"][1]
    assert re.search(r"^training_seconds: +[3-9]\.\d$", warm, re.M), warm[-1500:]  # its 3 s budget
    results["warm-run"] = (0, "AOTAutograd cache hit for key a1\nBypassing autograd cache due to: Unsupported "
                              "call_function\n" + warm)
    results["evaluator-warm"] = results["evaluator-cold"]
    report = gpu_check.summary(results)
    startup = re.search(r"^startup_seconds: +(\S+)$", warm, re.M).group(1)
    assert re.search(rf"^warm_startup_s: +{re.escape(startup)}$", report, re.M), report
    assert re.search(r"^warm_eval_s: +\d+\.\d$", report, re.M), report
    assert re.search(r"^aot_cache: +hit 1, miss 0, bypass 1$", report, re.M), report
    phases = re.search(r"^warm_phases_s: +(.*)$", report, re.M).group(1).split(", ")
    assert [p.split()[0] for p in phases] == ["check_ready", "tokenizer", "build_model", "check_memory",
                                              "make_optimizer", "first_batch", "step0", "step1"], report
    # (in the order main() meets them)
    assert "val_bpb:          harness" in results["handoff-run"][1] and (tmp_path / "handoff.pt2").exists()
    assert (tmp_path / "evaluator-cache").is_dir()  # its own, as the loop gives it; not train.py's
    assert re.search(r"^handoff_export_s: +\d+\.\d$", report, re.M), report
    # the hand-over run confined as the loop's runs are, where the kernel can
    confined = r"confined \(Landlock ABI \d+\)" if landlock_abi()[0] else r"not confined: .+"
    assert re.search(rf"^handoff_run: +{confined}$", report, re.M), report
    assert re.search(r"^evaluator_s: +cold \d+\.\d+, warm \d+\.\d+$", report, re.M), report
    assert re.search(r"^harness_adds: +[+-]\d+\.\d s a run", report, re.M), report
    print(report)


def test_bench_hub_reports_reads_and_pushes_per_second():
    result = subprocess.run([sys.executable, "bench/bench_hub.py", "--seconds", "0.4", "--pushes", "4",
                             "--clients", "2", "--pushers", "2"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    rates = re.findall(r"^(pushes|GET \S+) .*?([\d.]+)/s", result.stdout, re.M)
    assert [what for what, _ in rates] == ["pushes", "GET /api/git/leaves", "GET /api/git/commits",
                                           "GET /api/results", "GET /api/channels/results/posts"], result.stdout
    assert all(float(rate) > 0 for _, rate in rates) and "5 commits on the hub" in result.stdout


def test_bench_decide_simulates_nights_and_the_readme_demo():
    night = subprocess.run([sys.executable, "bench/bench_decide.py", "--profile", "smoke", "--experiments", "40",
                            "--quiet-machine"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert night.returncode == 0, night.stdout + night.stderr
    kept = re.findall(r"kept +([\d.]+)%  runs/experiment ([\d.]+)", night.stdout)
    assert len(kept) == 6 and all(float(runs) >= 1 for _, runs in kept), night.stdout
    demo = subprocess.run([sys.executable, "bench/bench_decide.py", "--demo", "50"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    # a baseline and 3 experiments: 4 runs at the least, each experiment's first run
    spans = re.findall(r"nine demos of ten (\d+)-(\d+) \(([\d.]+) to ([\d.]+) minutes", demo.stdout)
    assert len(spans) == 6 and all(4 <= int(lo) <= int(hi) for lo, hi, _, _ in spans), demo.stdout


def test_bench_workers_times_an_arm_of_the_real_loop():
    # one arm of one worker, no experiment: the clone, data, baseline run and report the arms are made of
    result = subprocess.run([sys.executable, "bench/bench_workers.py", "--experiments", "0", "--arms", "1",
                             "--repeats", "1"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "init for 1 worker(s): 1 baseline runs" in result.stdout, result.stdout
    assert re.search(r"^arm 0 \(1 worker\): \d+ s for 0 experiments, 0 runs of train\.py", result.stdout, re.M)
    assert re.search(r"^1 worker\(s\): wall min \d+ / median \d+ / max \d+ s;", result.stdout, re.M), result.stdout
