"""
Training speed of train.py for the active profile: one real run (the full time budget), then training tokens/s
(total_tokens / training_seconds), MFU, startup and eval seconds and val_bpb, with the machine's load around it.

    uv run bench/bench_train.py                                   # active profile, active dataset
    AUTORESEARCH_PROFILE=cpu uv run bench/bench_train.py --source ../shared/data/gutenberg-children
    AUTORESEARCH_PROFILE=smoke uv run bench/bench_train.py --dataset synthetic --repeats 6 --quiet

--repeats N runs it N times with seeds 42, 43, ... and prints the run-to-run spread (the noise that the keep
rule works against, as bench/bench_decide.py takes it).

--source/--dataset prepare that data first (into --cache, default a temporary folder) and train on it.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(args, env, stream):
    """Run a script in the repo; with stream, echo its output live (the run takes minutes)."""
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if stream:
            print("  | " + line, end="", flush=True)
    return proc.wait(), "".join(lines)


def parse_summary(output):
    block = output.replace("\r", "\n").split("\n---\n")[-1]
    return dict(re.findall(r"^(\w+):\s+(\S+)$", block, flags=re.M))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", help="prepare this local data first (prepare.py --source)")
    parser.add_argument("--dataset", help="prepare this named dataset first (prepare.py --dataset)")
    parser.add_argument("--cache", help="AUTORESEARCH_CACHE_DIR for --source/--dataset (default: a temporary folder)")
    parser.add_argument("--quiet", action="store_true", help="do not echo train.py's output")
    parser.add_argument("--repeats", type=int, default=1, help="runs with seeds 42, 43, ... (default 1)")
    args = parser.parse_args()

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.source or args.dataset:
        env["AUTORESEARCH_CACHE_DIR"] = args.cache or tempfile.mkdtemp(prefix="bench-train-")
        prepare_args = ["--source", str(Path(args.source).resolve())] if args.source else ["--dataset", args.dataset]
        t0 = time.time()
        code, out = run(["prepare.py", *prepare_args], env, stream=False)
        if code:
            sys.exit(f"prepare.py {' '.join(prepare_args)} failed:\n{out[-3000:]}")
        print(f"prepared {' '.join(prepare_args)} in {time.time() - t0:.0f}s (cache {env['AUTORESEARCH_CACHE_DIR']})")

    seed = int(env.get("AUTORESEARCH_SEED", 42))
    results = [one_run(dict(env, AUTORESEARCH_SEED=str(seed + i)), args.quiet) for i in range(args.repeats)]
    if len(results) > 1:
        vals, speeds = [r[0] for r in results], [r[1] for r in results]
        print(f"\n{len(results)} runs: val_bpb mean {statistics.fmean(vals):.6f} sigma {statistics.stdev(vals):.6f} "
              f"(min {min(vals):.6f}, max {max(vals):.6f}); tokens/s mean {statistics.fmean(speeds):,.0f} "
              f"spread {100 * statistics.stdev(speeds) / statistics.fmean(speeds):.1f}%")


def one_run(env, quiet):
    """One train.py run with its numbers printed; returns (val_bpb, training tokens/s)."""
    load_before = os.getloadavg()
    t0 = time.time()
    code, out = run(["train.py"], env, stream=not quiet)
    wall = time.time() - t0
    load_after = os.getloadavg()
    if code:
        sys.exit(f"train.py exited {code}:\n{out[-3000:]}")
    s = parse_summary(out)
    tokens_per_s = float(s["total_tokens_M"]) * 1e6 / float(s["training_seconds"])
    mfu = s["mfu_percent"] + ("%" if s["mfu_percent"] != "n/a" else "")
    print(f"\nprofile {s['profile']} | device {s['device']} | attention {s['attention']} | depth {s['depth']} | "
          f"{s['num_params_M']}M params | seed {s['seed']}")
    print(f"training tokens/s: {tokens_per_s:,.0f}  ({s['total_tokens_M']}M tokens in {s['training_seconds']}s, "
          f"{s['num_steps']} steps)")
    print(f"mfu:               {mfu}")
    print(f"startup + eval:    {float(s['startup_seconds']) + float(s['eval_seconds']):.1f}s "
          f"(startup {s['startup_seconds']}s, eval {s['eval_seconds']}s); total {s['total_seconds']}s, "
          f"wall with imports {wall:.0f}s")
    print(f"val_bpb:           {s['val_bpb']}")
    print(f"peak memory:       {s['peak_vram_mb']} MB")
    print(f"machine:           {os.cpu_count()} CPUs, load average {load_before[0]:.2f} before, "
          f"{load_after[0]:.2f} after (1-minute)")
    return float(s["val_bpb"]), tokens_per_s


if __name__ == "__main__":
    main()
