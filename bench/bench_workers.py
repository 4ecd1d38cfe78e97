"""
Parallel workers against the single loop, side by side: the wall time `run --agent mutate` takes to finish the
same number of experiments with 1 worker (this checkout, no worktree) and with N (`--workers N`), each arm in a
copy of a repository initialised for its number of workers (`init --workers N`: on CPUs each run, the
baseline's too, has 1/N of the cores), smoke profile, synthetic data, the real train.py; arms 1, N, 1, N...

    uv run bench/bench_workers.py                          # 6 experiments, arms 1 2 1 2
    uv run bench/bench_workers.py --experiments 4 --arms 1 2 1

Prints each arm's wall time, runs of train.py and the coordinator's own time per experiment, then min / median /
max per arm and the ratio of the medians. Run it on an otherwise idle machine: every arm trains for real.

Measured 2026-11-26, 2 cores (AMD EPYC), quiet machine, 6 experiments per arm, arms 1 2 1 2:
    arm   workers   wall    runs of train.py   runs per experiment   wall per run   coordinator
    0     1         628 s   23                 3.83                  27.3 s
    1     2         111 s    7                 1.17                  15.9 s         18 ms per experiment
    2     1         459 s   17                 2.83                  27.0 s
    3     2         325 s   24                 4.00                  13.5 s         19 ms per experiment
Medians: 2 workers took 40% of 1 worker's wall time (218 s against 544 s), and 54% of its wall time per run.
What limits it: on 2 cores each worker trains on one, so a run's fixed budget (15 s then) overlaps with the
other's but its start-up and evaluation take longer alone on a core; and the runs an experiment needs (1.2 to 4.0 here)
follow the keep rule's decisions, which differ from arm to arm, so 6 experiments give a wide spread: compare the
wall per run. Before `init --workers` pinned the baseline's runs to a worker's share, the 2-worker arm needed
4.17 runs per experiment against 2.67 (395 s against 424 s): each comparison waited for a re-run of the best at
the worker's speed.
"""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def sh(cmd, cwd, env, timeout=3600):
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode:
        sys.exit(f"`{' '.join(map(str, cmd))}` failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return p.stdout


def initialised_repo(work, env, repeats, workers):
    """A clone of this repository's HEAD, its smoke data prepared, and `init` done (the baseline runs) for this
    many workers: on CPUs, each run of N workers (the baseline's too) has 1/N of the cores."""
    repo = work / f"base-w{workers}"
    sh(["git", "clone", "-q", str(REPO), str(repo)], work, env)
    sh([sys.executable, "prepare.py", "--dataset", "synthetic"], repo, env)
    print(f"init for {workers} worker(s): {repeats} baseline runs ...", flush=True)
    sh([sys.executable, "agent_loop.py", "init", "--tag", "bench", "--repeats", str(repeats), "--workers",
        str(workers)], repo, env)
    return repo


def run_arm(base, work, env, i, workers, experiments):
    """One arm in a fresh copy of the initialised repository: (wall seconds, runs of train.py, coordinator ms)."""
    repo = work / f"arm{i}-w{workers}"
    shutil.copytree(base, repo, symlinks=True)
    cmd = [sys.executable, "agent_loop.py", "run", "--agent", "mutate", "--max-experiments", str(experiments)]
    if workers > 1:
        cmd += ["--workers", str(workers)]
    t0 = time.monotonic()
    out = sh(cmd, repo, env)
    wall = time.monotonic() - t0
    report = json.loads(sh([sys.executable, "agent_loop.py", "report", "--json"], repo, env))
    runs = sum(len(e["runs"]) + len(e["best_runs"]) for e in report["history"][1:])
    done = report["experiments"]
    coordinator = re.search(r"coordinator: (\d+) ms per experiment", out)
    shutil.rmtree(repo, ignore_errors=True)
    return wall, runs, done, int(coordinator[1]) if coordinator else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiments", type=int, default=6, help="experiments per arm (default 6)")
    ap.add_argument("--arms", type=int, nargs="+", default=[1, 2, 1, 2], help="workers of each arm, in order")
    ap.add_argument("--repeats", type=int, default=2, help="baseline runs (default 2)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_")}
    env.update(AUTORESEARCH_PROFILE="smoke", AUTORESEARCH_CACHE_DIR=str(work / "cache"), PYTHONUNBUFFERED="1")
    print(f"{os.cpu_count()} CPU cores; smoke profile; mutate; {args.experiments} experiments per arm; "
          f"arms {args.arms}; work in {work}", flush=True)
    bases = {workers: initialised_repo(work, env, args.repeats, workers) for workers in sorted(set(args.arms))}
    results, per_run = {}, {}
    for i, workers in enumerate(args.arms):
        wall, runs, done, coordinator = run_arm(bases[workers], work, env, i, workers, args.experiments)
        results.setdefault(workers, []).append(wall)
        per_run.setdefault(workers, []).append(wall / max(runs, 1))
        extra = f", coordinator {coordinator} ms per experiment" if coordinator is not None else ""
        print(f"arm {i} ({workers} worker{'s' * (workers > 1)}): {wall:.0f} s for {done} experiments, "
              f"{runs} runs of train.py ({runs / max(done, 1):.2f} per experiment, {wall / max(runs, 1):.1f} s of "
              f"wall time per run){extra}", flush=True)
    for workers, walls in sorted(results.items()):
        print(f"{workers} worker(s): wall min {min(walls):.0f} / median {statistics.median(walls):.0f} / "
              f"max {max(walls):.0f} s; per run min {min(per_run[workers]):.1f} / median "
              f"{statistics.median(per_run[workers]):.1f} / max {max(per_run[workers]):.1f} s; "
              f"over {len(walls)} arm(s)")
    if 1 in results and len(results) > 1:
        one, one_run = statistics.median(results[1]), statistics.median(per_run[1])
        for workers, walls in sorted(results.items()):
            if workers > 1:
                print(f"{workers} workers take {100 * statistics.median(walls) / one:.0f}% of 1 worker's wall time "
                      f"for the same experiments, {100 * statistics.median(per_run[workers]) / one_run:.0f}% per "
                      f"run of train.py (medians; the runs an experiment needs depend on its decisions)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
