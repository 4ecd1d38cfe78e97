"""
Child processes (train.py, an agent command) in their own process group, so that a timeout, Ctrl-C or the
end of a run kills them and everything they started, and never anything else; ending a child that outlived
a killed loop; processes that left the group (setsid, a double fork) found by a token in their environment,
or, having dropped it, below the loop, which adopts its orphaned descendants (Linux's child subreaper); and
SIGTERM, which the loop handles like Ctrl-C.
"""
import contextlib
import ctypes
import math
import os
import resource
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

KILL_GRACE_S = 10                            # SIGTERM, then SIGKILL this much later
PR_SET_CHILD_SUBREAPER = 36                  # prctl(2)
LIVE_SESSIONS = set()                        # the groups started here and not ended yet (their leaders' pids)


class Stop(BaseException):
    """SIGTERM: handled like Ctrl-C (stop cleanly at the best commit)."""


def raise_stop(signum, frame):
    raise Stop()


# -----------------------------------------------------------------------------
# Process groups


def proc_stat(pid):
    """The fields of /proc/PID/stat after the command's name (state, ppid, pgrp, session, ...), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def proc_start_time(pid):
    """Start time of a live (non-zombie) process, to tell our old child from a reused pid (Linux)."""
    fields = proc_stat(pid)
    return None if not fields or fields[0] == "Z" else fields[19]


def kill_group(pgid, alive):
    """SIGTERM the whole group, KILL_GRACE_S for its leader to exit, then SIGKILL what is left
    (its children too). alive() tells whether the leader still runs. A stopped group (Ctrl-Z, SIGSTOP) is
    continued, or the SIGTERM would wait the whole grace for it."""
    try:
        os.killpg(pgid, signal.SIGTERM)
        os.killpg(pgid, signal.SIGCONT)
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
    kills it and everything it started, also what left the group, and never anything else. Returns
    (exit code or None on timeout, seconds)."""
    return wait_group(start_group(cmd, stdout, stderr, env, stdin, shell), timeout, on_spawn)


@dataclass
class Group:
    """A child started by start_group, and what wait_group and end_group need to end all it started."""
    proc: subprocess.Popen
    token: str
    log: object  # its open output, where a note of processes that outlived it goes (or None)
    started: float
    born: int = 0  # the child's start time in clock ticks (/proc): all it started came later
    ended: bool = False


def start_group(cmd, stdout, stderr, env, stdin=subprocess.DEVNULL, shell=False):
    """cmd started in a new session (its own process group), for wait_group or end_group."""
    start = time.monotonic()
    token = new_run_token()
    adopt_orphans()
    try:
        proc = subprocess.Popen(cmd, shell=shell, stdin=stdin, stdout=stdout, stderr=stderr,
                                env={**env, RUN_TOKEN_ENV: token}, start_new_session=True)
    except BaseException:  # Ctrl-C inside Popen, after the fork: the child runs, and only its token names it
        kill_token_holders(token)
        raise
    LIVE_SESSIONS.add(proc.pid)
    born = int((proc_stat(proc.pid) or [0] * 20)[19])  # not reaped before end_group: readable, even a zombie
    return Group(proc, token, stdout if stderr == subprocess.STDOUT else stderr, start, born)


def wait_group(group, timeout, on_spawn=None):
    """Wait for a started group's child to exit (on_spawn(pid) first), at most `timeout` seconds from now, then
    end all it started. Returns (exit code or None on timeout, seconds since it started)."""
    rc = None
    try:
        if on_spawn:
            on_spawn(group.proc.pid)
        deadline = time.monotonic() + timeout if timeout is not None else math.inf
        while (rc := exit_code(group.proc)) is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        end_group(group)
    return rc, time.monotonic() - group.started


def end_group(group):
    """The group's child and everything it started, ended (SIGTERM, then SIGKILL) and reaped; once."""
    if group.ended:
        return
    group.ended = True
    if group.proc.stdin:
        group.proc.stdin.close()
    kill_group(group.proc.pid, lambda: exit_code(group.proc) is None)
    exit_code(group.proc, block=True)
    LIVE_SESSIONS.discard(group.proc.pid)
    escaped = kill_token_holders(group.token) | end_strays(group)
    if escaped:
        log_note(group.log, f"[agent_loop] killed {len(escaped)} process(es) of this run that outlived it "
                            f"(setsid, daemon)")


# -----------------------------------------------------------------------------
# What left the group and dropped its token: below the loop all the same


def adopt_orphans():
    """This process becomes the reaper of its orphaned descendants (prctl's child subreaper, Linux): whatever a
    run starts stays below the loop, whichever session and environment it moves to, where end_strays finds it
    (an orphan would otherwise go to init, out of sight). Off Linux, nothing."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def processes_below(pid):
    """{pid: /proc stat fields} of every process below pid, zombies included (Linux; elsewhere none)."""
    table, children = {}, {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if entry.name.isdigit() and (fields := proc_stat(entry.name)):
            table[int(entry.name)] = fields
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = {}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found[child] = table[child]
            todo.append(child)
    return found


def end_strays(group):
    """SIGKILL what the group started that left it (setsid, a double fork, a cleared environment): every process
    below this one, started since the group's child, in a session that is neither this process's (its own git
    commands) nor a live group's (the evaluator beside train.py); and reap the orphans adopted here. The pids
    of those found running outside the group's process group."""
    me, sessions, escaped = os.getpid(), {os.getsid(0)} | LIVE_SESSIONS, set()
    for _ in range(20):
        strays = {pid: f for pid, f in processes_below(me).items() if int(f[3]) not in sessions
                  and (int(f[19]) >= group.born or (f[0] == "Z" and int(f[1]) == me))}
        if not strays:
            break
        for pid, f in strays.items():
            if f[0] != "Z":
                escaped |= {pid} if int(f[2]) != group.proc.pid else set()
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            if int(f[1]) == me:  # adopted here: reaped here, or it stays a zombie
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)
    return escaped


def cpu_seconds(pid):
    """CPU seconds a live process has used (its threads and reaped children), or 0.0 if it cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def cpu_clock():
    """(CPU seconds the processors this process may run on have been busy: all of them, or its share of a machine
    split between workers; CPU seconds of this process and of the children it has reaped), for other_work(). The
    first is None without /proc/stat (not Linux)."""
    own = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    own = sum(r.ru_utime + r.ru_stime for r in own)
    mine = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    try:
        with open("/proc/stat") as f:
            lines = [line.split() for line in f if line.startswith("cpu")]
        if 0 < len(mine) < len(lines) - 1:  # pinned to some of the processors: theirs only
            lines = [fields for fields in lines[1:] if int(fields[0][3:]) in mine]
        else:  # the first line sums them all
            lines = lines[:1]
        busy = sum(int(v) for fields in lines for i, v in enumerate(fields[1:9]) if i not in (3, 4))  # not idle
    except (OSError, ValueError):
        return None, own
    return busy / os.sysconf("SC_CLK_TCK"), own


def counted_cores():
    """How many processors cpu_clock() counts: those this process may run on (a worker's share, or all)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def other_work(before, seconds, ours=0.0):
    """CPU cores the machine spent on work that was not ours (nor our reaped children's, nor `ours` CPU seconds
    of a child still running) since cpu_clock() gave `before`, averaged over `seconds`: the harness's own view
    of a busy machine, which a run cannot talk down. What a run starts is reaped by the loop (the subreaper) and
    counts as ours, so its own children cannot make the machine look busy either (a test's spinner found this).
    None where it cannot be measured."""
    (busy0, own0), (busy1, own1) = before, cpu_clock()
    if busy0 is None or busy1 is None or seconds <= 0:
        return None
    return max(0.0, (busy1 - busy0) - (own1 - own0) - ours) / seconds


def cores_used(before, seconds):
    """CPU cores this process and the children it reaped used on average since cpu_clock() gave `before`: a run
    pinned to a share of the machine (`run --workers`) that uses more has left its share (sched_setaffinity)."""
    return (cpu_clock()[1] - before[1]) / seconds if seconds > 0 else 0.0


def exit_code(proc, block=False):
    """The child's exit code, or None while it runs. Reaped here with os.waitpid, not Popen.wait/poll: a
    Ctrl-C that lands between their lock's acquire and its try leaves the lock held, and the next
    Popen.wait() then blocks for ever (seen: the loop hung on Ctrl-C during an agent call)."""
    if proc.returncode is None:
        try:
            pid, status = os.waitpid(proc.pid, 0 if block else os.WNOHANG)
        except ChildProcessError:  # reaped already
            pid, status = proc.pid, 0
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode


def log_note(f, text):
    """A line of the loop's own in a child's open log (text or binary), if it is a file."""
    if hasattr(f, "write"):
        f.write(f"\n{text}\n".encode() if "b" in getattr(f, "mode", "") else f"\n{text}\n")
        f.flush()


RUN_TOKEN_ENV = "AUTORESEARCH_RUN_TOKEN"


def new_run_token():
    """A value for RUN_TOKEN_ENV: every process a run starts inherits it, whatever session it moves to."""
    return secrets.token_hex(12)


def processes_with_token(token):
    """Pids of this user's live processes whose environment holds RUN_TOKEN_ENV=token (Linux /proc)."""
    needle = f"{RUN_TOKEN_ENV}={token}".encode()
    found = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0") and proc_start_time(entry.name):
                found.append(int(entry.name))
        except OSError:  # gone meanwhile, or another user's
            continue
    return found


def kill_token_holders(token):
    """SIGKILL every process that still carries the run's token (a daemon that escaped its process group);
    returns their pids. Repeated until none is left: a dying parent may fork once more."""
    killed = set()
    for _ in range(20):
        pids = [pid for pid in processes_with_token(token) if pid not in killed or proc_start_time(pid)]
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.05)
    return killed


def kill_leftover(state):
    """After a kill -9 of the loop, its child (own session) may still be training: end it, but
    only if that pid still is the process we started."""
    pgid, started = state.get("pgid"), state.get("started")
    if not pgid or started is None or proc_start_time(pgid) != started:
        return
    kill_group(pgid, lambda: proc_start_time(pgid) == started)
    print(f"killed the leftover process group {pgid} of the interrupted experiment", file=sys.stderr)
