"""
Child processes (train.py, an agent command) in their own process group, so that a timeout, Ctrl-C or the
end of a run kills them and everything they started, and never anything else; ending a child that outlived
a killed loop; and SIGTERM, which the loop handles like Ctrl-C.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

KILL_GRACE_S = 10                            # SIGTERM, then SIGKILL this much later


class Stop(BaseException):
    """SIGTERM: handled like Ctrl-C (stop cleanly at the best commit)."""


def raise_stop(signum, frame):
    raise Stop()


# -----------------------------------------------------------------------------
# Process groups


def proc_start_time(pid):
    """Start time of a live (non-zombie) process, to tell our old child from a reused pid (Linux)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else fields[19]


def kill_group(pgid, alive):
    """SIGTERM the whole group, KILL_GRACE_S for its leader to exit, then SIGKILL what is left
    (its children too). alive() tells whether the leader still runs."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + KILL_GRACE_S
    while alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_group(cmd, stdout, stderr, env, timeout, stdin=subprocess.DEVNULL, shell=False, on_spawn=None):
    """Run cmd in a new session (its own process group): a timeout, Ctrl-C or the end of the run
    kills it and everything it started, and never anything else. Returns (exit code or None on
    timeout, seconds)."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, shell=shell, stdin=stdin, stdout=stdout, stderr=stderr, env=env,
                            start_new_session=True)
    try:
        if on_spawn:
            on_spawn(proc.pid)
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        rc = None
    finally:
        kill_group(proc.pid, lambda: proc.poll() is None)
        proc.wait()
    return rc, time.monotonic() - start


def kill_leftover(state):
    """After a kill -9 of the loop, its child (own session) may still be training: end it, but
    only if that pid still is the process we started."""
    pgid, started = state.get("pgid"), state.get("started")
    if not pgid or started is None or proc_start_time(pgid) != started:
        return
    kill_group(pgid, lambda: proc_start_time(pgid) == started)
    print(f"killed the leftover process group {pgid} of the interrupted experiment", file=sys.stderr)
