"""
Parallel workers against the single loop, side by side: the wall time `run --agent mutate` takes to finish the
same number of experiments with 1 worker (this checkout, no worktree) and with N (`--workers N`), each arm in a
copy of a repository initialised for its number of workers (`init --workers N`: on CPUs each run, the
baseline's too, has 1/N of the cores), smoke profile, synthetic data, the real train.py; arms 1, N, 1, N...

    uv run bench/bench_workers.py                          # 6 experiments, arms 1 2 1 2
    uv run bench/bench_workers.py --experiments 4 --arms 1 2 1

Prints each arm's wall time, runs of train.py and the coordinator's own time per experiment, then min / median /
max per arm and the ratio of the medians. Run it on an otherwise idle machine: every arm trains for real.
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
    results = {}
    for i, workers in enumerate(args.arms):
        wall, runs, done, coordinator = run_arm(bases[workers], work, env, i, workers, args.experiments)
        results.setdefault(workers, []).append(wall)
        extra = f", coordinator {coordinator} ms per experiment" if coordinator is not None else ""
        print(f"arm {i} ({workers} worker{'s' * (workers > 1)}): {wall:.0f} s for {done} experiments, "
              f"{runs} runs of train.py ({runs / max(done, 1):.2f} per experiment){extra}", flush=True)
    for workers, walls in sorted(results.items()):
        print(f"{workers} worker(s): wall min {min(walls):.0f} / median {statistics.median(walls):.0f} / "
              f"max {max(walls):.0f} s over {len(walls)} arm(s)")
    if 1 in results and len(results) > 1:
        one = statistics.median(results[1])
        for workers, walls in sorted(results.items()):
            if workers > 1:
                print(f"{workers} workers take {100 * statistics.median(walls) / one:.0f}% of 1 worker's wall time "
                      f"(medians)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
