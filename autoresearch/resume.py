"""
Never losing anything, and going on where a stopped or killed loop left off: saving whatever differs from
the best commit under refs/autoresearch/TAG/ and moving the branch back (after every discard, skip or
failed proposal too), finishing an interrupted experiment on Ctrl-C or at the next start, and opening a
tag's loop, which always begins with that.
"""
import os
import signal
import sys
from pathlib import Path

from autoresearch.gitrepo import changed_since, commit, current_branch, git, git_root, head, short, tree_status
from autoresearch.layout import BRANCH_PREFIX, LOGS_DIR, RESULTS, TRAIN, WORKTREES_DIR, LoopError, now_iso
from autoresearch.ledger import (INTERRUPTED, append_row, keep_file, ledger_dir, ledger_path, put_back,
                                 refuse_another_ledger, remember_records, render_results, restore_logs, tag_rows)
from autoresearch.preflight import shared_environment, tracked_outputs
from autoresearch.process import kill_leftover
from autoresearch.runner import default_timeout, evaluator_data, remove_scratch
from autoresearch.state import IN_FLIGHT, InFlight, Loop, load_config, lock, say, take_lock

KILLED = f"{INTERRUPTED}: the loop was killed during training (kill -9, reboot)"
STOPPED = f"{INTERRUPTED}: the loop was stopped (Ctrl-C or SIGTERM) during training"


# -----------------------------------------------------------------------------
# Saving work and moving the branch back


def save_and_reset(loop, name, message):
    """Commit whatever differs from the best commit (explicit paths), keep it reachable at
    refs/autoresearch/TAG/<name>, and move the branch back to best. The hard reset only runs on a
    clean tree, so it never throws anything away. Returns the ref, or None if nothing differed."""
    branch = current_branch()
    if branch and branch != loop.branch:  # detached is fine: the reset then moves no branch at all
        raise LoopError(f"HEAD is on {branch}, not on {loop.branch}, and the loop only ever resets its own "
                        f"branch: it stops here. Fix: `git checkout {loop.branch}` (commit or stash first), "
                        f"then run again")
    best = loop.best_commit
    dirty = changed_since("HEAD")
    if dirty:
        commit(sorted(dirty), message)
    if head() == best:
        return None
    ref, k = loop.ref(name), 1
    while git("rev-parse", "-q", "--verify", ref, check=False) not in (None, head()):
        k += 1  # never over work saved there before: a running.json the agent wrote named an experiment's number
        ref = f"{loop.ref(name)}.{k}"
    git("update-ref", ref, head())
    git("reset", "-q", "--hard", best)
    return ref


def spare_name(loop, kind, n):
    """kind/N.K with the first free K: several attempts without a row can share a number N."""
    k = 1
    while git("rev-parse", "-q", "--verify", loop.ref(f"{kind}/{n}.{k}"), check=False) is not None:
        k += 1
    return f"{kind}/{n}.{k}"


def save_failed_proposal(loop, n):
    """A proposer failed (or left the branch): save what it wrote, back on the loop's branch at best."""
    ref = save_and_reset(loop, spare_name(loop, "agent-failed", n), f"[agent failed] #{n}")
    if current_branch() != loop.checkout_branch:
        git("checkout", "-q", loop.checkout_branch or "--detach")
    return ref


# -----------------------------------------------------------------------------
# Finishing an interrupted experiment


def forget_killed_run(loop, state):
    """Loop.forget_killed_run for the run in flight when the loop was killed, its notes said."""
    for note in loop.forget_killed_run(state.get("started_ns") if state.get("phase") == "train" else None):
        say(loop, f"the interrupted run: {note}")


def reconcile(loop, reason=KILLED, restart=True):
    """Finish what a killed or interrupted loop left behind: end its leftover child, give an
    interrupted training run its crash row, save unfinished work under refs/autoresearch/, move the
    branch back to the best commit. Idempotent: runs at every start (restart=True) and on Ctrl-C."""
    with InFlight(loop) as flight:
        state = flight.read()
        loop.rows = tag_rows(loop.tag)
        if state is None:
            return
        kill_leftover(state)
        if state.get("log"):
            remove_scratch(state["log"])
        if reason == KILLED:  # what the run wrote (the evaluator cache's record, what it learned): unchecked
            forget_killed_run(loop, state)
        if state.get("baseline"):  # init runs the baseline again
            return
        if state.get("running_best"):  # the best's train.py stood in for the candidate's during a pair
            git("checkout", state["commit"], "--", TRAIN)
        n = state["n"]
        row = next((r for r in loop.rows if r.get("n") == str(n)), None)
        if row is None and state["phase"] == "train":
            row = interrupted_row(loop, state, reason)
            append_row(row)
            loop.rows.append(row)
            keep_file(loop.pending_path, None)  # the runs a `step` made before are in its log
        if row and row["status"] == "keep":
            return
        # After a restart, changes to other files may be the user's, made since the kill: never reset them.
        # (a worker's worktree holds nobody's edits but its agent's)
        others = sorted(changed_since("HEAD") - {TRAIN}) if restart and not loop.worker else []
        if others:
            raise LoopError(f"experiment #{n} was interrupted, and finishing it resets {loop.branch} to the "
                            f"best commit, but {', '.join(others)} have uncommitted changes that may be yours. "
                            f"Fix: commit them elsewhere or `git stash`, or if the experiment wrote them, "
                            f"`git checkout -- {' '.join(others)}`; then run the same command again")
        if row is None:  # stopped before training: the agent's partial edits are saved, not run
            ref = save_and_reset(loop, spare_name(loop, "interrupted", n), f"[interrupted before training] #{n}")
            if ref:
                say(loop, f"#{n} interrupted before training; its changes are saved at {ref}")
        else:
            # train.py edited since its commit was made (e.g. by a coding agent after its `step` was killed)
            # is the next proposal: it stays in the working tree, and a copy is saved with the experiment.
            edited = TRAIN in tree_status()[0]
            ref = save_and_reset(loop, f"discarded/{n}", f"[{row['status']}] #{n} {row['description']}")
            if edited:
                git("checkout", ref, "--", TRAIN)
                say(loop, f"#{n} saved at {ref}; your uncommitted edit of {TRAIN} is kept in the working tree")


def reconcile_worker(loop, number, reason=KILLED):
    """What worker `number` of a `run --workers` left in flight (its running.json), finished as reconcile
    does, in its worktree (worktrees/TAG-wN), once its process has let go of its lock. With the worktree gone,
    the experiment still gets its row, and its commit a ref. Leaves the worktree at the best when clean."""
    ledger_dir()  # this checkout's ledger, before the worktree (its own git dir) is the current folder
    root = os.getcwd()
    wl = Loop(loop.tag, loop.config, [], loop.timeout, loop.min_delta, worker=number, root=root)
    tree = Path(root) / WORKTREES_DIR / f"{loop.tag}-w{number}"
    fd = take_lock(wl.dir)
    try:
        if tree.is_dir():
            os.chdir(tree)
            reconcile(wl, reason, restart=False)
            if not changed_since("HEAD"):
                git("checkout", "-q", "--detach", wl.best_commit)
        else:
            with InFlight(wl) as flight:
                state = flight.read()
                wl.rows = tag_rows(loop.tag)
                if state and state.get("phase") == "train" and state.get("commit"):
                    kill_leftover(state)
                    if state.get("log"):
                        remove_scratch(state["log"])
                    if reason == KILLED:
                        forget_killed_run(wl, state)
                    if not any(r.get("n") == str(state["n"]) for r in wl.rows):
                        append_row(interrupted_row(wl, state, reason))
                    git("update-ref", wl.ref(f"discarded/{state['n']}"), state["commit"])
    finally:
        os.chdir(root)
        os.close(fd)
    loop.rows = tag_rows(loop.tag)
    render_results()


def catch_up(loop):
    """The branch at the best commit, when a `run --workers` killed between a keep's row and the branch's move
    left it behind (a fast-forward: refused if it would touch uncommitted changes)."""
    best = loop.best_commit
    if head() != best and git("merge-base", "--is-ancestor", "HEAD", best, check=False) is not None:
        if git("merge", "--ff-only", "-q", best, check=False) is not None:
            say(loop, f"{loop.branch} moved up to the best, #{loop.best['n']} ({loop.best['commit']})")


def interrupted_row(loop, state, reason):
    commit_sha = state["commit"]
    with open(state["log"], "a") as log:
        log.write(f"\n===== decision =====\ncrash: {reason}\n")
    say(loop, f"#{state['n']} crash {reason} log={os.path.relpath(state['log'], loop.root)}")
    return {"commit": short(commit_sha), "sha": git("rev-parse", commit_sha), "val_bpb": "0.000000",
            "memory_gb": "0.0", "status": "crash",
            "description": git("log", "-1", "--format=%s", commit_sha), "tag": loop.tag, "n": str(state["n"]),
            "profile": loop.config["profile"], "train_py": git("rev-parse", f"{commit_sha}:{TRAIN}")[:12],
            "seeds": ",".join(str(s) for s in state.get("seeds", [])),
            "timestamp": now_iso(), "note": reason, "worker": str(loop.worker or ""),
            # a worker's logs are in the main checkout, named from there like everyone's
            "log": os.path.relpath(state["log"], loop.root) if os.path.isabs(state["log"]) else state["log"]}


# -----------------------------------------------------------------------------
# Opening and stopping a tag's loop


def open_loop(timeout=None, min_delta=0.0):
    """cd to the repo root, find the tag from the branch, lock it, load its state, and resume."""
    os.chdir(git_root())
    branch = current_branch()
    if not branch.startswith(BRANCH_PREFIX):
        tags = git("for-each-ref", "--format=%(refname:short)", f"refs/heads/{BRANCH_PREFIX}").split()
        hint = f" or switch to one: `git checkout {tags[-1]}`" if tags else ""
        raise LoopError(f"not on an autoresearch branch (on {branch or 'a detached HEAD'}). "
                        f"Start one with `uv run agent_loop.py init --tag mytag`{hint}")
    tag = branch[len(BRANCH_PREFIX):]
    refuse_another_ledger(tag)
    if problem := tracked_outputs():
        raise LoopError(f"{problem}, then start a new run from there with `init --tag {tag}b`")
    lock(Path(LOGS_DIR) / tag)
    edited = put_back()  # before anything under .git is read, the pinned config first
    config = load_config(tag)
    loop = Loop(tag, config, [], timeout or default_timeout(config), min_delta)
    remember_records(loop.private_dir)
    repair_records(loop, edited)
    reconcile(loop)
    for running in sorted(loop.private_dir.glob(f"w*/{IN_FLIGHT}")):  # a killed `run --workers`'s workers
        reconcile_worker(loop, int(running.parent.name[1:]))
    if not loop.rows or loop.rows[0]["status"] != "keep":
        raise LoopError(f"{RESULTS} has no baseline for {tag}: run `uv run agent_loop.py init --tag {tag}` "
                        f"(on this branch it resumes the baseline)")
    catch_up(loop)
    if config.get("harness_eval"):  # the evaluator's own copy, made before any run is watched (valwatch)
        evaluator_data(config)
    if warning := shared_environment():
        print(warning, file=sys.stderr)
    return loop


def repair_records(loop, edited):
    """What put_back did (the ledger and the loop's records as it last wrote them: an edit between two `step`s
    is put back) said, then results.tsv and the logs as the ledger has them: whatever deleted or edited them."""
    for note in edited:
        say(loop, f"note: {note}")
    if render_results():
        say(loop, f"{RESULTS} differed from the ledger ({ledger_path()}): rendered again")
    for log in restore_logs(tag_rows(loop.tag)):
        say(loop, f"restored {log} from the ledger's copy")


def stop_cleanly(loop):
    """Ctrl-C or SIGTERM: the child group is already dead; record, save, reset, say where we are."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    reconcile(loop, reason=STOPPED, restart=False)
    say(loop, f"stopped: {loop.branch} at the best commit {loop.best['commit']} (val_bpb {loop.best_val:.6f})")
    raise SystemExit(130)
