"""
The offline demo: prepare (synthetic data) + init + run --agent mutate + report, on the smoke profile, each
stage a subprocess of agent_loop.py in a disposable worktree on a new branch, so that the user's checkout
and branch are never touched.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from autoresearch.gitrepo import ensure_ignored, git, git_root, head
from autoresearch.layout import (BRANCH_PREFIX, LOGS_DIR, PREPARE, REF_PREFIX, RESULTS, TRAIN, WORKTREES_DIR,
                                 LoopError)
from autoresearch.process import Stop


def run_demo(agent_loop, experiments):
    """agent_loop: the path of agent_loop.py, which runs the stages. Returns the exit code."""
    root = Path(git_root())
    os.chdir(root)
    for f in (PREPARE, TRAIN):
        if git("cat-file", "-e", f"HEAD:{f}", check=False) is None:
            raise LoopError(f"{f} is not committed: the demo runs the committed code in a worktree. "
                            f"Fix: `git add {f} && git commit -m 'add {f}'`")
    tag = "demo-" + time.strftime("%Y%m%d-%H%M%S")
    worktree = root / WORKTREES_DIR / tag
    base_cache = os.environ.get("AUTORESEARCH_CACHE_DIR") or os.path.expanduser("~/.cache/autoresearch")
    env = dict(os.environ, AUTORESEARCH_PROFILE="smoke", AUTORESEARCH_CACHE_DIR=os.path.join(base_cache, "demo"))
    env.pop("AUTORESEARCH_DATASET", None)
    stages = [  # (title, command), each run in the worktree
        ("prepare: synthetic data and tokenizer for the smoke profile (offline; cached in "
         f"{env['AUTORESEARCH_CACHE_DIR']})", [sys.executable, PREPARE, "--dataset", "synthetic"]),
        (f"baseline: agent_loop.py init --tag {tag} --repeats 1",
         [sys.executable, agent_loop, "init", "--tag", tag, "--repeats", "1"]),
        (f"{experiments} experiments: agent_loop.py run --agent mutate --max-experiments {experiments}",
         [sys.executable, agent_loop, "run", "--agent", "mutate", "--max-experiments", str(experiments)]),
        ("report", [sys.executable, agent_loop, "report", "--plot", "progress.png"]),
    ]
    total = len(stages) + 1
    print(f"\n==> [1/{total}] worktree {worktree.relative_to(root)} (detached at HEAD {head()[:7]}); "
          f"your checkout and branch are not touched", flush=True)
    ensure_ignored(f"{WORKTREES_DIR}/")
    git("worktree", "add", "-q", "--detach", str(worktree), "HEAD")
    t0 = time.monotonic()
    for i, (title, cmd) in enumerate(stages, start=2):
        print(f"\n==> [{i}/{total}] {title}", flush=True)
        stage = subprocess.Popen(cmd, cwd=worktree, env=env)
        try:
            code = stage.wait()
        except (KeyboardInterrupt, Stop):
            stage.send_signal(signal.SIGTERM)  # the stage stops cleanly and ends its own training run
            stage.wait()
            print(f"\ndemo stopped at stage {i}; the worktree is kept: {worktree}", file=sys.stderr)
            return 130
        if code:
            raise LoopError(f"demo stage {i} failed (see above); the worktree is kept for inspection: {worktree}")
    rel = worktree.relative_to(root)
    print(f"\ndemo done in {time.monotonic() - t0:.0f} s. plot: {worktree / 'progress.png'}\n"
          f"results: {rel}/{RESULTS}, logs: {rel}/{LOGS_DIR}/{tag}/\n"
          f"remove it: git worktree remove --force {rel} && git branch -D {BRANCH_PREFIX}{tag} && "
          f"git for-each-ref --format='delete %(refname)' {REF_PREFIX}{tag} | git update-ref --stdin")
    return 0

