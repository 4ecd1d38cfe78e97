"""
agent_loop.py: the experiment loop of autoresearch. One experiment = one change to train.py: commit it,
train for the fixed time budget, keep it only if val_bpb beats the best kept result by more than the
measured noise, else save the commit under refs/autoresearch/TAG/ and move the branch back. Every
experiment is a row in results.tsv and a log in logs/TAG/; the loop resumes after any kill.

    uv run agent_loop.py demo                          # offline demo in a disposable worktree (smoke profile)
    uv run agent_loop.py init --tag mar5               # branch autoresearch/mar5 + baseline runs (noise)
    uv run agent_loop.py run --agent mutate            # autonomous loop; or --agent "claude -p ..." (run --help)
    uv run agent_loop.py step -m "raise MATRIX_LR"     # one experiment, for a coding agent following program.md
    uv run agent_loop.py report [--json] [--plot progress.png]
"""
import argparse
import ast
import fcntl
import functools
import hashlib
import json
import math
import operator
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# -----------------------------------------------------------------------------
# Constants

TRAIN, PREPARE, PROGRAM = "train.py", "prepare.py", "program.md"
RESULTS = "results.tsv"                     # in the repo root, ignored by git
LOGS_DIR = "logs"                           # logs/TAG/NNN-sha.log, plus the loop's state files
WORKTREES_DIR = "worktrees"                 # demo checkouts
BRANCH_PREFIX = "autoresearch/"
REF_PREFIX = "refs/autoresearch/"           # discarded work stays reachable here
COLUMNS = ["commit", "val_bpb", "memory_gb", "status", "description",  # upstream's five, unchanged
           "tag", "n", "seeds", "val_bpb_runs", "training_seconds", "total_seconds", "mfu_percent",
           "num_steps", "profile", "train_py", "timestamp", "loop_s", "log", "note"]
DEFAULT_SEED = 42                            # train.py's default; AUTORESEARCH_SEED overrides at init
DEFAULT_REPEATS = 2                          # baseline runs: 2 is the fewest that measure noise
# Keep margin floor, relative to the baseline val_bpb: 0.1% (= 0.001 at the reference profile's ~1.0).
# Relative because the smoke/cpu profiles and other datasets sit at other bpb scales, and because a
# sigma from 2 runs can come out near 0 by chance.
MARGIN_FLOOR = 0.001
KILL_GRACE_S = 10                            # SIGTERM, then SIGKILL this much later
AGENT_TIMEOUT_S = 1800
MAX_AGENT_FAILURES = 3                       # consecutive: a broken agent command must not spin all night
DESCRIPTION_MAX = 120
PROMPT_DIFF_LINES = 200
CRASH_TAIL_LINES = 40
GIT_FALLBACK_IDENTITY = (("user.name", "autoresearch"), ("user.email", "autoresearch@localhost"))

AGENT_HELP = """\
--agent CMD runs CMD with `sh -c` in the repo root once per experiment, with a fresh context each
time. The prompt (program.md + the results so far + the best diff + the last crash's log tail) is
on stdin and in the file $AUTORESEARCH_PROMPT_FILE. CMD must edit train.py only and exit; the last
non-empty line of its stdout becomes the experiment's description. Working invocations:

  run --agent 'claude -p --dangerously-skip-permissions'      # Claude Code (a non-root user); or
  run --agent 'claude -p --permission-mode acceptEdits'       #   only allow file edits
  run --agent 'codex exec --sandbox workspace-write -'        # Codex CLI ('-' = prompt from stdin;
                                                              #   older versions: --full-auto)
  run --agent 'aider --yes-always --no-git --message-file "$AUTORESEARCH_PROMPT_FILE" train.py'
  run --agent mutate                                          # built-in offline proposer, no LLM

The loop (not the agent) commits, trains, decides and resets; it also kills the agent after
--agent-timeout seconds. Stop with Ctrl-C: the branch is left at the best commit.
"""

# -----------------------------------------------------------------------------
# Small helpers


class LoopError(Exception):
    """A problem the user must fix; the message says what is wrong and the command that fixes it."""


class Stop(BaseException):
    """SIGTERM: handled like Ctrl-C (stop cleanly at the best commit)."""


def raise_stop(signum, frame):
    raise Stop()


def now_iso():
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def one_line(text, limit=None):
    """A results.tsv field: no tabs or newlines, ever, and valid UTF-8 (an argument in another
    encoding arrives as surrogates, which no file or terminal can take)."""
    text = " ".join(str(text).encode(errors="surrogateescape").decode(errors="replace").split())
    return text if limit is None or len(text) <= limit else text[:limit - 3] + "..."


def write_atomic(path, data):
    """Write bytes via a temp file + rename: a kill leaves the old file or the new one, never half."""
    tmp = Path(f"{path}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None


def to_float(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def blob_hash(data):
    """git's blob id of the content: the identity of a train.py, computed without a subprocess."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()[:12]


# -----------------------------------------------------------------------------
# Git (subprocess; the loop commits only train.py and moves only its own branch)


def git(*args, check=True):
    """stdout of a git command (trailing newline removed); None on failure when check=False. Bytes
    that are not UTF-8 (a path, a diff of a train.py the agent wrote in latin-1) round-trip as
    surrogates: paths still work as arguments, and files written from it use errors="replace"."""
    p = subprocess.run(["git", *args], capture_output=True, text=True, errors="surrogateescape")
    if p.returncode:
        if check:
            raise LoopError(f"`git {' '.join(args)}` failed: {(p.stderr or p.stdout).strip()}")
        return None
    return p.stdout.rstrip("\n")


@functools.lru_cache(maxsize=None)
def identity():
    """-c flags for what git identity is missing, so commits work on a fresh machine or in CI."""
    flags = []
    for key, value in GIT_FALLBACK_IDENTITY:
        if not git("config", key, check=False):
            flags += ["-c", f"{key}={value}"]
    return tuple(flags)


def commit(paths, message):
    """Commit exactly these paths (never -a, never add -A); no hooks or signing prompts overnight."""
    git(*identity(), "-c", "commit.gpgsign=false", "commit", "-q", "--no-verify", "-m", message, "--", *paths)
    return git("rev-parse", "HEAD")


def head():
    return git("rev-parse", "HEAD")


def short(sha):
    return git("rev-parse", "--short=7", sha)


def tree_status():
    """(tracked paths that differ from HEAD, untracked paths), from one `git status`."""
    entries = git("status", "--porcelain", "-z", "--untracked-files=normal").split("\0")
    tracked, untracked = set(), set()
    i = 0
    while i < len(entries):
        entry, i = entries[i], i + 1
        if not entry:
            continue
        code, path = entry[:2], entry[3:]
        if code == "??":
            untracked.add(path)
            continue
        tracked.add(path)
        if code[0] in "RC":  # a rename or copy also names its source
            tracked.add(entries[i])
            i += 1
    return tracked, untracked


def changed_since(commit):
    """Tracked paths that differ from a commit: uncommitted, or committed on top of it. prepare.py
    is also hashed outright: the metric lives there, and `git update-index --assume-unchanged`
    would hide it from `git status`."""
    changed, _ = tree_status()
    changed |= set(git("diff", "--name-only", "-z", commit, "HEAD").split("\0")) - {""}
    if git("hash-object", "--", PREPARE, check=False) != git("rev-parse", f"{commit}:{PREPARE}", check=False):
        changed.add(PREPARE)
    return changed


def git_root():
    root = git("rev-parse", "--show-toplevel", check=False)
    if root is None:
        raise LoopError("not inside a git repository: agent_loop.py keeps each experiment as a commit. "
                        "Fix: `git init && git add -A && git commit -m baseline` (or clone the repo)")
    return root


def current_branch():
    return git("symbolic-ref", "--short", "-q", "HEAD", check=False) or ""


def tracked_outputs():
    """results.tsv and logs/ change during every experiment: tracked, they would make every
    experiment look like it changed them, and a reset would take results rows back."""
    tracked = git("ls-files", "--", RESULTS, LOGS_DIR).splitlines()
    return (f"{', '.join(tracked)} tracked by git, but agent_loop.py writes them during every experiment. "
            f"Fix: `git rm -r -q --cached {' '.join(tracked)} && git commit -m 'untrack experiment outputs'`"
            if tracked else None)


def ensure_ignored(*patterns):
    """results.tsv, logs/ and worktrees/ must never show up as the agent's new files or get
    committed: when the checkout's .gitignore lacks them, use .git/info/exclude (untracked)."""
    missing = [p for p in patterns if git("check-ignore", "-q", "--no-index", p, check=False) is None]
    if missing:
        exclude = Path(git("rev-parse", "--git-path", "info/exclude"))
        exclude.parent.mkdir(parents=True, exist_ok=True)
        with open(exclude, "a") as f:
            f.write("".join(f"{p}\n" for p in missing))
        print(f"added {', '.join(missing)} to {exclude} (ignored by git, nothing tracked changed)")


# -----------------------------------------------------------------------------
# results.tsv: append-only, one whole line per write


def read_results(path):
    """Header and rows of a results.tsv, ours or upstream's 5 columns. In ours, a last line
    without a newline and without all its columns is a row cut by a crash mid-write and is
    ignored. An empty file has no rows."""
    try:
        text = Path(path).read_text(errors="replace")
    except FileNotFoundError:
        raise LoopError(f"{path} not found: start a run with `uv run agent_loop.py init --tag TAG`") from None
    if not text.strip():
        return COLUMNS, []
    lines = text.split("\n")
    last = lines.pop()
    if not lines:
        lines, last = [last], ""
    header = lines[0].split("\t")
    if [h.strip() for h in header[:5]] != COLUMNS[:5]:
        raise LoopError(f"{path}: the header must start with the tab-separated columns "
                        f"{' '.join(COLUMNS[:5])}; got: {lines[0][:80]!r}")
    header = [h.strip() for h in header]
    if last.strip() and ("tag" not in header or len(last.split("\t")) >= len(header)):
        lines.append(last)  # written or edited by hand: the final newline may be missing
    rows = [dict(zip(header, (f.strip() for f in line.split("\t")))) for line in lines[1:] if line.strip()]
    return header, rows


def tag_rows(tag):
    if not Path(RESULTS).exists():
        return []
    _, rows = read_results(RESULTS)
    return [r for r in rows if r.get("tag") == tag]


def end_last_line(path):
    """Before appending: a last line without its newline is a row edited by hand (all columns
    there: it gets its newline) or one cut by a power loss mid-write (dropped, and printed)."""
    with open(path, "rb+") as f:
        data = f.read()
        cut = data.rfind(b"\n") + 1
        if cut == len(data):
            return
        if data[cut:].count(b"\t") >= len(COLUMNS) - 1:
            f.write(b"\n")
        else:
            f.truncate(cut)
            print(f"warning: dropped a partial last line of {path}: {data[cut:]!r}", file=sys.stderr)


def append_row(row):
    """One os.write of a whole line, then fsync: after any kill a row is fully there or absent."""
    line = "\t".join(one_line(row.get(c, "")) for c in COLUMNS) + "\n"
    end_last_line(RESULTS)
    fd = os.open(RESULTS, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_results_header():
    if not Path(RESULTS).exists() or Path(RESULTS).stat().st_size == 0:
        write_atomic(RESULTS, ("\t".join(COLUMNS) + "\n").encode())


# -----------------------------------------------------------------------------
# The loop's state: rows of this tag, the profile pinned at init, a lock, the in-flight experiment


@dataclass
class Loop:
    tag: str
    config: dict          # logs/TAG/init.json: profile, dataset, budget... pinned at init
    rows: list            # this tag's rows of results.tsv
    timeout: float        # hard limit for one train.py run
    min_delta: float = None
    confirm: bool = False

    @property
    def dir(self):
        return Path(LOGS_DIR) / self.tag

    @property
    def branch(self):
        return BRANCH_PREFIX + self.tag

    def ref(self, name):
        """Where discarded, skipped or interrupted work stays reachable."""
        return f"{REF_PREFIX}{self.tag}/{name}"

    @property
    def best(self):
        """The last kept row: each keep beat the one before, so it is the best."""
        return next(r for r in reversed(self.rows) if r["status"] == "keep")

    @property
    def best_val(self):
        return float(self.best["val_bpb"])

    @property
    def best_commit(self):
        return git("rev-parse", f"{self.best['commit']}^{{commit}}")

    def margin(self):
        """(margin, why): --min-delta, else 2 sigma of the baseline runs, with a floor."""
        if self.min_delta is not None:
            return self.min_delta, f"--min-delta {self.min_delta}"
        base = self.rows[0]
        floor = MARGIN_FLOOR * float(base["val_bpb"])
        runs = [float(v) for v in base.get("val_bpb_runs", "").split(",") if v]
        if len(runs) < 2:
            return floor, f"floor {floor:.4f} = 0.1% of the baseline; 1 baseline run, noise unknown"
        sigma = statistics.stdev(runs)
        if 2 * sigma >= floor:
            return 2 * sigma, f"2 sigma of {len(runs)} baseline runs"
        return floor, f"floor {floor:.4f} = 0.1% of the baseline; 2 sigma = {2 * sigma:.4f}"


def say(loop, text):
    """Print one line and keep it in logs/TAG/loop.log (the overnight record of the loop itself)."""
    print(text, flush=True)
    with open(loop.dir / "loop.log", "a") as f:
        f.write(f"{now_iso()} {text}\n")


def lock(tag_dir):
    """One agent_loop per tag at a time (an agent calling `step` inside `run` is refused).
    flock is released by the kernel even after kill -9."""
    tag_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(tag_dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.read(fd, 32).decode().strip()
        raise LoopError(f"another agent_loop.py (pid {pid}) is working on {tag_dir.name}: wait for it, "
                        f"or stop it with `kill {pid}` (it stops cleanly at the best commit)") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def pinned_config(prepare, tag, repeats):
    """What makes two experiments comparable, from prepare.py, recorded at init."""
    return {"tag": tag, "profile": prepare.PROFILE, "dataset": prepare.DATASET, "cache_dir": str(prepare.CACHE_DIR),
            "time_budget": prepare.TIME_BUDGET, "max_seq_len": prepare.MAX_SEQ_LEN,
            "base_seed": int(os.environ.get("AUTORESEARCH_SEED", DEFAULT_SEED)), "repeats": repeats,
            "created": now_iso()}


def import_prepare():
    """prepare.py, imported lazily (it imports torch) from the repo root; it reads
    AUTORESEARCH_PROFILE and AUTORESEARCH_CACHE_DIR."""
    sys.path.insert(0, os.getcwd())
    import prepare
    return prepare


def load_config(tag):
    config = read_json(Path(LOGS_DIR) / tag / "init.json")
    if config is None:  # logs/ was cleaned: rebuild it from prepare.py (slow once: imports torch)
        config = pinned_config(import_prepare(), tag, None)
        write_atomic(Path(LOGS_DIR) / tag / "init.json", json.dumps(config, indent=1).encode())
    for key, field in (("AUTORESEARCH_PROFILE", "profile"), ("AUTORESEARCH_DATASET", "dataset")):
        if os.environ.get(key) and config.get(field) and os.environ[key] != config[field]:
            raise LoopError(f"{key}={os.environ[key]}, but {BRANCH_PREFIX}{tag} was initialised with "
                            f"{config[field]}: results would not be comparable. Fix: `export {key}="
                            f"{config[field]}` (or `unset {key}`), or start a new tag with `init`")
    return config


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


def mark_running(loop, **state):
    """logs/TAG/running.json names the experiment in flight, so that a killed loop can be resumed."""
    write_atomic(loop.dir / "running.json", json.dumps(state).encode())


def clear_running(loop):
    (loop.dir / "running.json").unlink(missing_ok=True)


# -----------------------------------------------------------------------------
# Running a child (train.py or the agent) in its own process group


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


# -----------------------------------------------------------------------------
# One train.py run: launch, parse the summary block, explain a crash


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


def train_once(loop, seed, log_path, state):
    """One `python train.py` with this seed, output appended to the experiment's log."""
    with open(log_path, "a") as log:
        log.write(f"\n===== train.py  seed {seed}  timeout {loop.timeout:.0f} s  {now_iso()} =====\n")
        log.flush()
        offset = log.tell()

        def on_spawn(pid):
            mark_running(loop, **state, pgid=pid, started=proc_start_time(pid))

        rc, wall = run_group([sys.executable, TRAIN], log, subprocess.STDOUT, child_env(loop.config, seed),
                             loop.timeout, on_spawn=on_spawn)
    with open(log_path, "rb") as f:
        f.seek(offset)
        output = f.read().decode(errors="replace")
    error, summary, tail = judge_run(output, rc, loop.timeout)
    return Run(seed, summary, error, tail, wall)


def measure(loop, log_path, state):
    """Train once; with --confirm, train a candidate keep again with the next seed."""
    seed = loop.config["base_seed"]
    runs = [train_once(loop, seed, log_path, state)]
    margin, _ = loop.margin()
    if loop.confirm and not runs[0].error and runs[0].val < loop.best_val - margin:
        runs.append(train_once(loop, seed + 1, log_path, state))
    return runs


# -----------------------------------------------------------------------------
# Deciding: keep only what beats the best by more than the noise


def decide(loop, runs):
    """(status, val_bpb, note). The note explains the decision in numbers."""
    first = runs[0]
    if first.error:
        return "crash", 0.0, f"crash: {first.error}" + "".join(f" | {t.strip()}" for t in first.tail[:-1])
    best, (margin, why) = loop.best_val, loop.margin()
    threshold = best - margin
    if len(runs) > 1 and runs[1].error:
        return "discard", first.val, (f"discard: seed {first.seed} gave {first.val:.6f}, but the confirm run "
                                      f"(seed {runs[1].seed}) crashed: {runs[1].error}")
    mean = statistics.fmean(r.val for r in runs)
    what = f"mean {mean:.6f} of seeds {','.join(str(r.seed) for r in runs)}" if len(runs) > 1 else f"{mean:.6f}"
    if mean < threshold:
        return "keep", mean, f"keep: {what} < best {best:.6f} - margin {margin:.4f} = {threshold:.6f} ({why})"
    if len(runs) > 1:
        return "discard", mean, (f"discard: not confirmed: seed {first.seed} gave {first.val:.6f}, but the "
                                 f"{what} is not below {threshold:.6f} (best {best:.6f} - margin {margin:.4f}; {why})")
    return "discard", mean, (f"discard: {what} is not below best {best:.6f} - margin {margin:.4f} = "
                             f"{threshold:.6f} ({why})")


def outcome_line(loop, status, val, log, reason="", previous_best=None):
    """The one line an agent (or a human watching `run`) acts on."""
    if status == "crash" or reason:
        return f"{status} {reason} log={log}"
    margin, _ = loop.margin()
    return (f"{status} val_bpb={val:.6f} delta={val - previous_best:+.4f} (margin {margin:.4f}) "
            f"best={loop.best_val:.6f} log={log}")


# -----------------------------------------------------------------------------
# Keeping, resetting and never losing anything


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
    ref = loop.ref(name)
    git("update-ref", ref, head())
    git("reset", "-q", "--hard", best)
    return ref


def spare_name(loop, kind, n):
    """kind/N.K with the first free K: several attempts without a row can share a number N."""
    k = 1
    while git("rev-parse", "-q", "--verify", loop.ref(f"{kind}/{n}.{k}"), check=False) is not None:
        k += 1
    return f"{kind}/{n}.{k}"


def reconcile(loop, reason="interrupted: the loop was killed during training (kill -9, reboot)", restart=True):
    """Finish what a killed or interrupted loop left behind: end its leftover child, give an
    interrupted training run its crash row, save unfinished work under refs/autoresearch/, move the
    branch back to the best commit. Idempotent: runs at every start (restart=True) and on Ctrl-C."""
    state = read_json(loop.dir / "running.json")
    loop.rows = tag_rows(loop.tag)
    if state is None:
        return
    kill_leftover(state)
    if state.get("baseline"):  # init runs the baseline again
        clear_running(loop)
        return
    n = state["n"]
    row = next((r for r in loop.rows if r.get("n") == str(n)), None)
    if row is None and state["phase"] == "train":
        row = interrupted_row(loop, state, reason)
        append_row(row)
        loop.rows.append(row)
    if row and row["status"] == "keep":
        clear_running(loop)
        return
    # After a restart, changes to other files may be the user's, made since the kill: never reset them.
    others = sorted(changed_since("HEAD") - {TRAIN}) if restart else []
    if others:
        raise LoopError(f"experiment #{n} was interrupted, and finishing it resets {loop.branch} to the best "
                        f"commit, but {', '.join(others)} have uncommitted changes that may be yours. Fix: commit "
                        f"them elsewhere or `git stash`, or if the experiment wrote them, `git checkout -- "
                        f"{' '.join(others)}`; then run the same command again")
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
    clear_running(loop)


def interrupted_row(loop, state, reason):
    commit_sha = state["commit"]
    with open(state["log"], "a") as log:
        log.write(f"\n===== decision =====\ncrash: {reason}\n")
    say(loop, f"#{state['n']} crash {reason} log={state['log']}")
    return {"commit": short(commit_sha), "val_bpb": "0.000000", "memory_gb": "0.0", "status": "crash",
            "description": git("log", "-1", "--format=%s", commit_sha), "tag": loop.tag, "n": str(state["n"]),
            "profile": loop.config["profile"], "train_py": git("rev-parse", f"{commit_sha}:{TRAIN}")[:12],
            "timestamp": now_iso(), "log": state["log"], "note": reason}


def check_position(loop, allow_ahead):
    """The branch must sit at the best commit (or, for `step`, on top of it)."""
    best, here = loop.best_commit, head()
    if here == best or (allow_ahead and git("merge-base", "--is-ancestor", best, here, check=False) is not None):
        return
    raise LoopError(f"{loop.branch} is at {here[:7]}, not at the best kept commit {best[:7]} "
                    f"(experiment #{loop.best['n']}). Fix: `git branch keep-{here[:7]} {here[:7]} && "
                    f"git reset --keep {best[:7]}` (your commits stay on branch keep-{here[:7]})")


def seen_hashes(rows):
    """train.py versions already measured (rejected or interrupted ones never ran to the end)."""
    return {r["train_py"]: r for r in rows
            if r.get("train_py") and not r.get("note", "").startswith(("rejected", "interrupted"))}


# -----------------------------------------------------------------------------
# One experiment: commit, run, decide, log, keep or reset (shared by `step` and `run`)


def run_experiment(loop, description, started, strict, untracked_new=()):
    """The tree holds a proposed change (from the agent, mutate, or a coding agent calling `step`).
    Returns the one-line outcome. started = time.monotonic() when the loop took over."""
    description = one_line(description, DESCRIPTION_MAX) or "(no description)"
    n, best = len(loop.rows), loop.best_commit
    if not strict and git("merge-base", "--is-ancestor", best, "HEAD", check=False) is None:
        git("reset", "-q", "--soft", best)  # the agent rewrote history (amend, rebase): keep its files only
    changed = changed_since(best)
    others = sorted(changed - {TRAIN})
    why, fixes = [], []
    if others:
        why.append(f"changed {', '.join(others)} (only {TRAIN} may change)")
        fixes.append(f"set them aside with `git stash push -- {' '.join(others)}` (or undo them with "
                     f"`git checkout {best[:7]} -- {' '.join(others)}`)")
    if not Path(TRAIN).exists():
        why.append(f"deleted {TRAIN}")
        fixes.append(f"restore {TRAIN} with `git checkout {best[:7]} -- {TRAIN}`")
    if why and strict:
        if head() != best:
            fixes.insert(0, f"`git reset --soft {best[:7]}` (undoes the commits, keeps the changes)")
        raise LoopError(f"{' and '.join(why)}; nothing was run. Fix: {', then '.join(fixes)}, then step again")
    note_extra = f"; agent created untracked files (left in place): {', '.join(sorted(untracked_new))}" \
        if untracked_new else ""
    if not changed:
        save_and_reset(loop, spare_name(loop, "skipped", n), f"[skipped: no change] {description}")
        clear_running(loop)
        return f"skip {TRAIN} is unchanged from the best commit: nothing to run"
    mark_running(loop, n=n, phase="commit", best=best)
    if why:
        return reject(loop, n, best, description, " and ".join(why), started, note_extra)
    train_py = blob_hash(Path(TRAIN).read_bytes())
    twin = seen_hashes(loop.rows).get(train_py)
    if twin:
        save_and_reset(loop, spare_name(loop, "skipped", n), f"[skipped: identical to #{twin['n']}] {description}")
        clear_running(loop)
        return (f"skip identical to #{twin['n']} ({twin['commit']}, {twin['status']} val_bpb={twin['val_bpb']}): "
                f"not run again; {TRAIN} reset to the best")
    sha = commit([TRAIN], description) if TRAIN in tree_status()[0] else head()
    log = str(loop.dir / f"{n:03d}-{sha[:7]}.log")
    write_log_header(loop, log, n, sha, best, description)
    state = dict(n=n, phase="train", commit=sha, log=log, best=best)
    mark_running(loop, **state)
    train_start = time.monotonic()
    runs = measure(loop, log, state)
    train_wall = time.monotonic() - train_start
    status, val, note = decide(loop, runs)
    dirty = changed_since(sha)
    if dirty:  # train.py wrote to tracked files while it ran: its number cannot be trusted
        status, val, note = "discard", 0.0, (f"rejected: {TRAIN} changed {', '.join(sorted(dirty))} while running; "
                                             f"saved at {loop.ref(f'discarded/{n}')}")
    got = runs[0].summary.get("profile")
    if got and got != loop.config["profile"]:
        status, val, note = "discard", 0.0, f"rejected: ran profile {got}, expected {loop.config['profile']}"
    previous_best = loop.best_val
    row = experiment_row(loop, n, short(sha), status, description, runs, val, note + note_extra, log, train_py)
    finish(loop, row, log, started, train_wall)
    reason = note[len("crash: "):] if status == "crash" else note if note.startswith("rejected") else ""
    return outcome_line(loop, status, val, log, reason, previous_best)


def reject(loop, n, best, description, why, started, note_extra):
    """The proposal changed files other than train.py (or deleted it): save all of it under a ref,
    restore them, and record a row that says so (no training run)."""
    dirty = changed_since("HEAD")
    sha = commit(sorted(dirty), f"[rejected] {description}") if dirty else head()
    log = str(loop.dir / f"{n:03d}-{sha[:7]}.log")
    write_log_header(loop, log, n, sha, best, description)
    ref = loop.ref(f"discarded/{n}")
    note = f"rejected: {why}; saved at {ref}, restore a file with `git checkout {ref} -- FILE`{note_extra}"
    train_py = blob_hash(Path(TRAIN).read_bytes()) if Path(TRAIN).exists() else ""
    row = experiment_row(loop, n, short(sha), "discard", description, [], 0.0, note, log, train_py)
    finish(loop, row, log, started, 0.0)
    return outcome_line(loop, "discard", 0.0, log, note)


def write_log_header(loop, log, n, sha, best, description):
    diff = git("diff", best, sha, "--", TRAIN) if sha != best else ""
    with open(log, "a", errors="replace") as f:
        f.write(f"experiment #{n} on {loop.branch}: {description}\n"
                f"commit {sha}  parent best {best[:7]} (val_bpb {loop.best_val:.6f}, #{loop.best['n']})\n"
                f"profile {loop.config['profile']}  python {sys.executable}  {now_iso()}\n"
                f"\n{diff or '(no diff to train.py)'}\n")


def experiment_row(loop, n, sha, status, description, runs, val, note, log, train_py):
    ok = [r for r in runs if not r.error]
    first = ok[0].summary if ok else {}
    memory = max((to_float(r.summary.get("peak_vram_mb")) or 0.0 for r in ok), default=0.0) / 1024
    return {"commit": sha, "val_bpb": f"{val:.6f}", "memory_gb": f"{memory if status != 'crash' else 0:.1f}",
            "status": status, "description": description, "tag": loop.tag, "n": str(n),
            "seeds": ",".join(str(r.seed) for r in runs), "val_bpb_runs": ",".join(f"{r.val:.6f}" for r in ok),
            "training_seconds": first.get("training_seconds", ""), "total_seconds": first.get("total_seconds", ""),
            "mfu_percent": first.get("mfu_percent", ""), "num_steps": first.get("num_steps", ""),
            "profile": first.get("profile", loop.config["profile"]), "train_py": train_py,
            "timestamp": now_iso(), "log": log, "note": note}


def finish(loop, row, log, started, train_wall):
    """Write the row, then keep (branch stays) or save under refs/ and reset; explain in the log."""
    row["loop_s"] = f"{time.monotonic() - started - train_wall:.2f}"
    append_row(row)
    loop.rows.append(row)
    if row["status"] == "keep":
        after = f"branch {loop.branch} now at {row['commit']} (new best)"
    else:
        ref = save_and_reset(loop, f"discarded/{row['n']}", f"[{row['status']} #{row['n']}] {row['description']}")
        after = f"saved at {ref}; branch reset to the best {loop.best['commit']}"
    clear_running(loop)
    overhead = time.monotonic() - started - train_wall
    with open(log, "a") as f:
        f.write(f"\n===== decision =====\n{row['note']}\n{after}\n"
                f"loop overhead {overhead:.2f} s (git, parsing, logging; excludes training and the agent)\n")


# -----------------------------------------------------------------------------
# Proposers: `mutate` (seeded, offline) and an external coding agent

# name: (kind, low, high). int: +/- ~12%; pow2: x2 or /2; scale: x or / 1.25..2; ratio: +/- 0.05..0.1;
# betas: 1 - beta scaled by 1.5 or 2. Bounds keep every proposal trainable.
MUTATIONS = {
    "DEPTH": ("int", 1, 48), "ASPECT_RATIO": ("int", 8, 256), "HEAD_DIM": ("pow2", 16, 256),
    "TOTAL_BATCH_SIZE": ("pow2", 2**10, 2**24), "DEVICE_BATCH_SIZE": ("pow2", 1, 1024),
    "EMBEDDING_LR": ("scale", 1e-4, 10.0), "UNEMBEDDING_LR": ("scale", 1e-5, 1.0),
    "MATRIX_LR": ("scale", 1e-4, 1.0), "SCALAR_LR": ("scale", 1e-4, 10.0), "WEIGHT_DECAY": ("scale", 1e-4, 2.0),
    "ADAM_BETAS": ("betas", 0.5, 0.999), "WARMUP_RATIO": ("ratio", 0.0, 0.5),
    "WARMDOWN_RATIO": ("ratio", 0.0, 1.0), "FINAL_LR_FRAC": ("ratio", 0.0, 1.0),
}
SCALE_FACTORS = (1.25, 1.25, 1.5, 2.0)       # small steps most often
ASSIGN = re.compile(r"^(?P<indent>[ \t]*)(?P<name>[A-Z][A-Z0-9_]*)[ \t]*=[ \t]*(?P<value>[^#\n]*?)[ \t]*(#.*)?$")
PROFILE_IF = re.compile(r"^(?P<kw>if|elif)\s+PROFILE\s*(==|in)\s*(?P<names>.+?)\s*:\s*(#.*)?$")
OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
       ast.FloorDiv: operator.floordiv, ast.Pow: operator.pow}


def literal(text):
    """Value of a plain hyperparameter literal (numbers, 2**18, 4 * 64, tuples), else None."""
    def value(node):
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in OPS:
            return OPS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.Tuple):
            return tuple(value(e) for e in node.elts)
        raise ValueError(text)
    try:
        return value(ast.parse(text.strip(), mode="eval").body)
    except (SyntaxError, ValueError, TypeError, ArithmeticError):
        return None


def active_hyperparameters(source, profile):
    """NAME -> (line index, regex match, value) for the active profile: the line in the profile's
    `if PROFILE == ...` block when there is one, else the top-level line (train.py's contract)."""
    top, block = {}, {}
    in_block = matched = False
    for i, line in enumerate(source.split("\n")):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line[0].isspace():
            m = PROFILE_IF.match(line)
            if m:
                names = set(re.findall(r"[\"'](\w+)[\"']", m["names"]))
                matched = False if m["kw"] == "if" else matched
                in_block = profile in names and not matched
                matched |= in_block
                continue
            if re.match(r"else\s*:", line):
                in_block, matched = not matched, True
                continue
            in_block = False
        elif not in_block:
            continue
        m = ASSIGN.match(line)
        if m and literal(m["value"]) is not None:
            (block if in_block else top)[m["name"]] = (i, m, literal(m["value"]))
    return {**top, **block}


def mutate_value(name, value, rng):
    kind, low, high = MUTATIONS[name]
    up = rng.random() < 0.5
    if kind == "int":
        step = max(1, round(abs(value) / 8))
        new = value + step if up else value - step
    elif kind == "pow2":
        new = value * 2 if up else (value // 2 if value % 2 == 0 else None)
    elif kind == "scale":
        factor = rng.choice(SCALE_FACTORS)
        new = float(f"{value * factor if up else value / factor:.3g}") if value > 0 else None
    elif kind == "ratio":
        step = rng.choice((0.05, 0.1))
        new = round(value + step if up else value - step, 4)
    else:  # betas: move 1 - beta, the scale on which betas matter
        i, factor = rng.randrange(len(value)), rng.choice((1.5, 2.0))
        gap = (1 - value[i]) * factor if up else (1 - value[i]) / factor
        new = tuple(round(1 - gap, 3) if j == i else v for j, v in enumerate(value))
    parts = new if isinstance(new, tuple) else (new,)
    return new if new is not None and all(low <= p <= high for p in parts) else None


def consistent(params, max_seq_len):
    """Rules train.py relies on: the device batch divides the total batch (in tokens), and
    warmup + warmdown fit in the budget."""
    total, device = params.get("TOTAL_BATCH_SIZE"), params.get("DEVICE_BATCH_SIZE")
    if total and device and max_seq_len and (total % (device * max_seq_len) or total < device * max_seq_len):
        return False
    return params.get("WARMUP_RATIO", 0) + params.get("WARMDOWN_RATIO", 0) <= 1


def format_value(value, old_text):
    if isinstance(value, tuple):
        return "(" + ", ".join(format_value(v, "") for v in value) + ")"
    if isinstance(value, int) and "**" in old_text and value > 0 and value & (value - 1) == 0:
        return f"2**{value.bit_length() - 1}"
    return repr(value)  # a float's repr always reads back as a float


def propose_mutation(source, profile, max_seq_len, rng, seen):
    """(new source, description): one seeded change of one hyperparameter, never a train.py that
    was measured before; None when no new mutation is found."""
    params = active_hyperparameters(source, profile)
    names = sorted(name for name in MUTATIONS if name in params)
    if not names:
        raise LoopError(f"mutate: {TRAIN} has none of the hyperparameters it knows ({', '.join(MUTATIONS)}) "
                        f"as plain `NAME = number` lines")
    values = {name: v for name, (_, _, v) in params.items()}
    for _ in range(300):
        name = rng.choice(names)
        i, m, value = params[name]
        new = mutate_value(name, value, rng)
        if new is None or new == value or not consistent({**values, name: new}, max_seq_len):
            continue
        text = format_value(new, m["value"])
        lines = source.split("\n")
        lines[i] = lines[i][:m.start("value")] + text + lines[i][m.end("value"):]
        candidate = "\n".join(lines)
        if blob_hash(candidate.encode()) not in seen:
            return candidate, f"{name} {m['value'].strip()} -> {text}"
    return None


def build_prompt(loop, n):
    """A fresh context for the agent: the rules of this call, program.md, and the state of the run."""
    program = Path(PROGRAM).read_text() if Path(PROGRAM).exists() else "(this repository has no program.md)"
    report = format_report(summarize(loop.rows), RESULTS, recent=12)
    base, best = git("rev-parse", f"{loop.rows[0]['commit']}^{{commit}}"), loop.best_commit
    diff = git("diff", base, best, "--", TRAIN).split("\n") if base != best else []
    if len(diff) > PROMPT_DIFF_LINES:
        more = len(diff) - PROMPT_DIFF_LINES
        diff = diff[:PROMPT_DIFF_LINES] + [f"... ({more} more lines: git diff {base[:7]} {best[:7]})"]
    crash = ""
    last = loop.rows[-1]
    if last["status"] == "crash" and last.get("log") and Path(last["log"]).exists():
        tail = Path(last["log"]).read_text(errors="replace").splitlines()[-CRASH_TAIL_LINES:]
        crash = (f"\n## The last experiment (#{last['n']}) crashed; the end of its log\n```\n"
                 + "\n".join(tail) + "\n```\n")
    rules = (f"You are called by `agent_loop.py run` for experiment #{n} on branch {loop.branch}, with a fresh "
             f"context. Make ONE experimental change to {TRAIN} (edit only {TRAIN}: a change to any other file "
             f"gets the experiment rejected). Do NOT run {TRAIN}, agent_loop.py or git yourself: the loop commits, "
             f"trains for the fixed budget, measures val_bpb and keeps or discards the change. Identical versions of "
             f"{TRAIN} are never run twice. End your reply with ONE line that describes the change; it becomes the "
             f"description in results.tsv.")
    return (f"# Instructions for this call\n{rules}\n\n# program.md\n{program}\n\n"
            f"# The run so far\n```\n{report}\n```\n"
            f"\n## Kept changes to {TRAIN} so far (git diff baseline best)\n```diff\n"
            f"{chr(10).join(diff) or '(none yet: the best is still the baseline)'}\n```\n{crash}"
            f"\n# Reminder\n{rules}\n")


def nonblank_lines(f):
    """Read back through the open file: an agent that cleans up (`git clean -fdx`) may have deleted it."""
    f.seek(0)
    return [line.strip() for line in f.read().decode(errors="replace").splitlines() if line.strip()]


def call_agent(loop, cmd, n, timeout):
    """Run the agent command non-interactively. Returns (description, error or None)."""
    prompt = loop.dir / f"{n:03d}-prompt.md"
    prompt.write_text(build_prompt(loop, n), errors="replace")
    out, err = loop.dir / f"{n:03d}-agent.log", loop.dir / f"{n:03d}-agent.err"
    env = dict(os.environ, AUTORESEARCH_PROMPT_FILE=str(prompt.resolve()), AUTORESEARCH_TAG=loop.tag,
               AUTORESEARCH_EXPERIMENT=str(n))
    record = Path(RESULTS).read_bytes()
    with open(prompt) as stdin, open(out, "w+b") as stdout, open(err, "w+b") as stderr:
        rc, _ = run_group(cmd, stdout, stderr, env, timeout, stdin=stdin, shell=True, on_spawn=lambda pid: mark_running(
            loop, n=n, phase="agent", pgid=pid, started=proc_start_time(pid)))
        lines, errs = nonblank_lines(stdout), nonblank_lines(stderr)
    if not Path(RESULTS).exists() or Path(RESULTS).read_bytes() != record:  # the loop's record is not the agent's
        loop.dir.mkdir(parents=True, exist_ok=True)
        write_atomic(RESULTS, record)
        say(loop, f"#{n} the agent changed or deleted {RESULTS}: restored")
    description = lines[-1] if lines else ""
    if rc is None:
        return description, f"agent timed out after {timeout:.0f} s (killed with its process group)"
    if rc != 0:
        return description, f"agent exited with code {rc}: {(errs or lines or [''])[-1][:200]}"
    return description, None


# -----------------------------------------------------------------------------
# Reporting


def summarize(rows):
    """Numbers of a results.tsv: the baseline is the first kept row; deltas are against the best
    kept before each experiment."""
    base_i = next((i for i, r in enumerate(rows) if r["status"] == "keep"), 0)
    base = rows[base_i]
    base_val = best_val = to_float(base["val_bpb"]) or 0.0
    best, history = base, []
    for i, r in enumerate(rows):
        val = to_float(r["val_bpb"]) or 0.0
        measured = val > 0 and r["status"] != "crash"
        entry = {"n": int(r["n"]) if r.get("n", "").isdigit() else i, "commit": r["commit"], "status": r["status"],
                 "val_bpb": val, "delta": round(val - best_val, 6) if measured and i > base_i and best_val else None,
                 "description": r["description"], "note": r.get("note", "")}
        history.append(entry)
        if i > base_i and r["status"] == "keep" and measured and (val < best_val or not best_val):
            best, best_val, best_n = r, val, entry["n"]
        elif i == base_i:
            best_n = entry["n"]
    exps = history[base_i + 1:]
    count = {s: sum(e["status"] == s for e in exps) for s in ("keep", "discard", "crash")}
    runs = [float(v) for v in base.get("val_bpb_runs", "").split(",") if v]
    overhead = [to_float(r.get("loop_s")) for r in rows[base_i + 1:] if to_float(r.get("loop_s")) is not None]
    return {
        "tag": base.get("tag"), "experiments": len(exps), "keeps": count["keep"], "discards": count["discard"],
        "crashes": count["crash"], "keep_rate": round(count["keep"] / len(exps), 4) if exps else None,
        "baseline": {"commit": base["commit"], "val_bpb": base_val, "runs": runs},
        "best": {"n": best_n, "commit": best["commit"], "val_bpb": best_val, "description": best["description"]},
        "improvement": round(base_val - best_val, 6),
        "improvement_percent": round(100 * (base_val - best_val) / base_val, 3) if base_val else None,
        "noise_sigma": round(statistics.stdev(runs), 6) if len(runs) > 1 else None,
        "kept": [e for e in exps if e["status"] == "keep"],
        "crashed": [e for e in exps if e["status"] == "crash"],
        "loop_overhead_s_mean": round(statistics.fmean(overhead), 3) if overhead else None,
        "history": history,
    }


def format_report(s, path, recent=0):
    pct = f" ({s['improvement_percent']:.2f}%)" if s["improvement_percent"] is not None else ""
    rate = f" ({100 * s['keep_rate']:.0f}%)" if s["keep_rate"] is not None else ""
    lines = [f"{path}{' (tag ' + s['tag'] + ')' if s['tag'] else ''}: baseline + {s['experiments']} experiments",
             f"baseline val_bpb {s['baseline']['val_bpb']:.6f}  {s['baseline']['commit']}",
             f"best val_bpb     {s['best']['val_bpb']:.6f}  {s['best']['commit']}  "
             f"improvement {s['improvement']:.6f}{pct}"
             f"  ({s['best']['description']})",
             f"keeps {s['keeps']}{rate}, discards {s['discards']}, crashes {s['crashes']}"]
    if s["noise_sigma"] is not None:
        lines.append(f"noise sigma       {s['noise_sigma']:.6f}  from {len(s['baseline']['runs'])} baseline runs")
    if s["loop_overhead_s_mean"] is not None:
        lines.append(f"loop overhead {s['loop_overhead_s_mean']:.2f} s per experiment (mean; excludes training)")
    def entry(e):
        val = f"{e['val_bpb']:.6f}" if e["val_bpb"] else "   -    "
        delta = f"{e['delta']:+.6f}" if e["delta"] is not None else "         "
        return f"  #{e['n']:<4} {e['commit']:<8} {e['status']:<7} {val}  {delta}  {e['description']}"
    if s["kept"]:
        lines += ["kept changes (delta vs the best before each):"] + [entry(e) for e in s["kept"]]
    if s["crashed"]:
        lines += ["crashes:"] + [entry(e) + (f"  [{e['note']}]" if e["note"] else "") for e in s["crashed"]]
    if recent:
        lines += [f"last {min(recent, len(s['history']))} experiments:"] + [
            entry(e) + (f"  [{one_line(e['note'], 160)}]" if e["note"] and e["status"] != "keep" else "")
            for e in s["history"][-recent:]]
    return "\n".join(lines)


def plot(s, path):
    """Every experiment: discards faint, keeps highlighted and labelled, best-so-far as a step line,
    crashes and rejections as marks at the bottom."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    hist = s["history"]
    xs = list(range(len(hist)))
    measured = [(x, e) for x, e in zip(xs, hist) if e["val_bpb"] > 0 and e["status"] != "crash"]
    base, best = s["baseline"]["val_bpb"], s["best"]["val_bpb"]
    # the scale follows the bulk of the results; a diverged run must not squash the progress line
    vals = sorted(e["val_bpb"] for _, e in measured) or [base]
    top = max(vals[int(0.9 * (len(vals) - 1))], base)
    pad = 0.08 * max(top - best, 0.002)
    low, high = best - pad, top + pad
    fig, ax = plt.subplots(figsize=(12, 6))
    disc = [(x, e["val_bpb"]) for x, e in measured if e["status"] != "keep" and e["val_bpb"] <= high]
    if disc:
        ax.scatter(*zip(*disc), s=16, color="0.55", alpha=0.35, label="discard", zorder=2)
    off = [x for x, e in measured if e["status"] != "keep" and e["val_bpb"] > high]
    if off:
        ax.scatter(off, [high - 0.3 * pad] * len(off), marker="^", s=22, color="0.55", alpha=0.5,
                   label="discard (off scale)", zorder=2)
    keeps = [(x, e) for x, e in measured if e["status"] == "keep"]
    ax.scatter([x for x, _ in keeps], [e["val_bpb"] for _, e in keeps], s=50, color="#1a9850",
               edgecolor="black", linewidth=0.5, label="keep", zorder=4)
    for x, e in keeps:
        ax.annotate(one_line(e["description"], 40), (x, e["val_bpb"]), xytext=(4, 6), textcoords="offset points",
                    fontsize=7, rotation=20, color="#1a6630")
    running, best_so_far = [], None
    for e in hist:
        if e["status"] == "keep" and e["val_bpb"] > 0:
            best_so_far = e["val_bpb"] if best_so_far is None else min(best_so_far, e["val_bpb"])
        running.append(best_so_far if best_so_far is not None else base)
    ax.step(xs, running, where="post", color="#1a9850", linewidth=1.5, label="best so far", zorder=3)
    failed = [x for x, e in zip(xs, hist) if e["status"] == "crash" or e["val_bpb"] <= 0]
    if failed:
        ax.scatter(failed, [low + 0.3 * pad] * len(failed), marker="x", color="#d73027",
                   label="crash / rejected", zorder=4)
    ax.set_ylim(low, high)
    ax.set_xlabel("experiment")
    ax.set_ylabel("val_bpb (lower is better)")
    ax.set_title(f"{s['experiments']} experiments, {s['keeps']} kept: val_bpb {base:.4f} -> {best:.4f}")
    ax.grid(alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(loc="best", fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


# -----------------------------------------------------------------------------
# Subcommands


def open_loop(args):
    """cd to the repo root, find the tag from the branch, lock it, load its state, and resume."""
    os.chdir(git_root())
    branch = current_branch()
    if not branch.startswith(BRANCH_PREFIX):
        tags = git("for-each-ref", "--format=%(refname:short)", f"refs/heads/{BRANCH_PREFIX}").split()
        hint = f" or switch to one: `git checkout {tags[-1]}`" if tags else ""
        raise LoopError(f"not on an autoresearch branch (on {branch or 'a detached HEAD'}). "
                        f"Start one with `uv run agent_loop.py init --tag mytag`{hint}")
    tag = branch[len(BRANCH_PREFIX):]
    if problem := tracked_outputs():
        raise LoopError(f"{problem}, then start a new run from there with `init --tag {tag}b`")
    lock(Path(LOGS_DIR) / tag)
    config = load_config(tag)
    loop = Loop(tag, config, [], args.timeout or default_timeout(config), args.min_delta, args.confirm)
    reconcile(loop)
    if not loop.rows or loop.rows[0]["status"] != "keep":
        raise LoopError(f"{RESULTS} has no baseline for {tag}: run `uv run agent_loop.py init --tag {tag}` "
                        f"(on this branch it resumes the baseline)")
    return loop


def stop_cleanly(loop):
    """Ctrl-C or SIGTERM: the child group is already dead; record, save, reset, say where we are."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    reconcile(loop, reason="interrupted: the loop was stopped (Ctrl-C or SIGTERM) during training", restart=False)
    say(loop, f"stopped: {loop.branch} at the best commit {loop.best['commit']} (val_bpb {loop.best_val:.6f})")
    raise SystemExit(130)


def setup_problems(tag, resume):
    """Everything that stops init, each with the command that fixes it."""
    problems = []
    if git("rev-parse", "--verify", "-q", "HEAD", check=False) is None:
        return [f"the repository has no commit yet. Fix: `git add {PREPARE} {TRAIN} && git commit -m baseline`"]
    for f in (PREPARE, TRAIN):
        if git("ls-files", "--error-unmatch", f, check=False) is None:
            problems.append(f"{f} is not committed. Fix: `git add {f} && git commit -m 'add {f}'`")
    dirty, _ = tree_status()
    if PREPARE in dirty:
        problems.append(f"{PREPARE} differs from the commit ({PREPARE} is the fixed contract). "
                        f"Fix: `git checkout -- {PREPARE}` (or commit it before starting)")
    if dirty - {PREPARE}:
        problems.append(f"uncommitted changes to tracked files: {', '.join(sorted(dirty - {PREPARE}))}. The baseline "
                        f"must be a commit. Fix: `git commit -am 'my change'` or set them aside with `git stash`")
    if problem := tracked_outputs():
        problems.append(problem)
    branch = BRANCH_PREFIX + tag
    if git("rev-parse", "--verify", "-q", f"refs/heads/{branch}", check=False) is not None and not resume:
        problems.append(f"branch {branch} already exists. Fix: pick another tag (`init --tag {tag}b`), or continue "
                        f"it: `git checkout {branch} && uv run agent_loop.py run --agent mutate`")
    if Path(RESULTS).exists() and Path(RESULTS).stat().st_size:
        header = Path(RESULTS).read_text(errors="replace").split("\n", 1)[0].split("\t")
        if header != COLUMNS:
            problems.append(f"{RESULTS} exists in another format. Fix: `mv {RESULTS} results.old.tsv`")
        elif tag_rows(tag) and not resume:
            problems.append(f"{RESULTS} already has rows for tag {tag}. Fix: pick another tag (`init --tag {tag}b`)")
    if Path(PREPARE).exists():
        try:
            problems += list(import_prepare().check_ready())
        except Exception as e:  # whatever prepare.py raises, the user must see it, with the file named
            problems.append(f"importing {PREPARE} failed: {type(e).__name__}: {e}")
    return problems


def cmd_init(args):
    os.chdir(git_root())
    tag = args.tag or time.strftime("%b").lower() + str(int(time.strftime("%d")))
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", tag):
        raise LoopError(f"bad tag {tag!r}: use letters, digits, '.', '_' or '-' (e.g. `--tag mar5`)")
    if args.repeats < 1:
        raise LoopError(f"--repeats {args.repeats}: the baseline needs at least one run (2 measure the noise)")
    branch = BRANCH_PREFIX + tag
    resume = current_branch() == branch and not any(r["status"] == "keep" for r in tag_rows(tag))
    problems = setup_problems(tag, resume)
    if problems:
        print("init: cannot start:\n" + "\n".join(f"  - {p}" for p in problems), file=sys.stderr)
        return 1
    ensure_ignored(RESULTS, f"{LOGS_DIR}/")
    if not resume:
        git("checkout", "-q", "-b", branch)
    tag_dir = Path(LOGS_DIR) / tag
    lock(tag_dir)
    prepare = import_prepare()
    config = pinned_config(prepare, tag, args.repeats)
    write_atomic(tag_dir / "init.json", json.dumps(config, indent=1).encode())
    ensure_results_header()
    loop = Loop(tag, config, [], args.timeout or default_timeout(config))
    print(f"{'resuming' if resume else 'created'} branch {branch} at {head()[:7]}; profile {config['profile']}, "
          f"dataset {config['dataset']}, budget {config['time_budget']} s, timeout {loop.timeout:.0f} s")
    try:
        return run_baseline(loop, args.repeats)
    except (KeyboardInterrupt, Stop):
        clear_running(loop)
        print("interrupted: run the same init command again to resume the baseline", file=sys.stderr)
        return 130


def run_baseline(loop, repeats):
    """The unchanged train.py, `repeats` times with seeds base, base+1, ...: the baseline and the
    run-to-run noise that the keep margin is based on."""
    started, sha = time.monotonic(), head()
    log = str(loop.dir / f"000-{sha[:7]}.log")
    with open(log, "a") as f:
        f.write(f"baseline of {loop.branch}: {repeats} run(s) of commit {sha}\n")
    state = dict(n=0, phase="train", commit=sha, log=log, baseline=True)
    mark_running(loop, **state)
    runs = []
    for i in range(repeats):
        run = train_once(loop, loop.config["base_seed"] + i, log, state)
        print(f"baseline run {i + 1}/{repeats} seed {run.seed}: "
              + (f"val_bpb={run.val:.6f}" if not run.error else f"crash {run.error}"), flush=True)
        if run.error:
            clear_running(loop)
            print(f"the baseline crashed: {run.error}\n" + "\n".join(run.tail) + f"\nlog: {log}\n"
                  f"Fix the cause, then run `uv run agent_loop.py init --tag {loop.tag}` again (it resumes).",
                  file=sys.stderr)
            return 1
        runs.append(run)
    train_wall = sum(r.wall for r in runs)
    loop.rows = [experiment_row(loop, 0, short(sha), "keep", "baseline", runs,
                                statistics.fmean(r.val for r in runs), "", log,
                                blob_hash(Path(TRAIN).read_bytes()))]
    margin, why = loop.margin()
    sigma = f"sigma {statistics.stdev(r.val for r in runs):.6f}" if repeats > 1 else "sigma unknown (1 run)"
    row = loop.rows[0]
    row["note"] = f"baseline: {repeats} run(s), {sigma}; keep margin {margin:.4f} ({why})"
    row["loop_s"] = f"{time.monotonic() - started - train_wall:.2f}"
    append_row(row)
    clear_running(loop)
    with open(log, "a") as f:
        f.write(f"\n===== baseline =====\n{row['note']}\n")
    say(loop, f"baseline val_bpb={float(row['val_bpb']):.6f} runs={row['val_bpb_runs']} {sigma} "
              f"margin={margin:.4f} log={log}")
    print(f"next: `uv run agent_loop.py run --agent mutate` (or an LLM agent: run --help), or point a coding "
          f"agent at {PROGRAM}")
    return 0


def cmd_step(args):
    started = time.monotonic()
    loop = open_loop(args)
    try:
        check_position(loop, allow_ahead=True)
        say(loop, run_experiment(loop, args.message, started, strict=True))
    except (KeyboardInterrupt, Stop):
        stop_cleanly(loop)
    return 0


def check_clean(loop):
    """Before each experiment of `run`: on the branch, at the best commit, nothing uncommitted. So
    whatever differs later was written by the proposer, and only that is ever saved and reset."""
    if current_branch() != loop.branch:
        raise LoopError(f"HEAD left {loop.branch} (now on {current_branch() or 'a detached HEAD'}); the loop stops "
                        f"and touches nothing. Fix: `git checkout {loop.branch}`, then run again")
    check_position(loop, allow_ahead=False)
    dirty = changed_since("HEAD")
    if dirty:
        fix = ("run that change first with `uv run agent_loop.py step -m \"...\"`, or set it aside with `git stash`"
               if dirty == {TRAIN} else "commit them elsewhere or set them aside with `git stash`")
        raise LoopError(f"uncommitted changes to {', '.join(sorted(dirty))}: nothing you wrote is ever thrown away, "
                        f"so the loop does not go on. Fix: {fix}, then run again")


def cmd_run(args):
    loop = open_loop(args)
    check_clean(loop)
    t0, done, failures = time.monotonic(), 0, 0
    say(loop, f"run on {loop.branch}: agent {args.agent!r}, best val_bpb={loop.best_val:.6f} "
              f"({len(loop.rows) - 1} experiments so far), margin {loop.margin()[0]:.4f}, timeout {loop.timeout:.0f} s")
    try:
        while args.max_experiments is None or done < args.max_experiments:
            if args.hours is not None and time.monotonic() - t0 >= args.hours * 3600:
                say(loop, f"time limit of {args.hours} h reached")
                break
            check_clean(loop)
            n, done = len(loop.rows), done + 1
            mark_running(loop, n=n, phase="propose")  # from here on, a stop saves what the proposer wrote
            if args.agent == "mutate":
                started = time.monotonic()
                rng = random.Random(f"{args.seed}/{loop.tag}/{n}")
                proposal = propose_mutation(Path(TRAIN).read_text(), loop.config["profile"],
                                            loop.config.get("max_seq_len"), rng, seen_hashes(loop.rows))
                if proposal is None:
                    clear_running(loop)
                    say(loop, "mutate: no untried mutation left; stopping")
                    break
                Path(TRAIN).write_text(proposal[0])
                description, untracked_new = proposal[1], ()
            else:
                _, before = tree_status()
                description, error = call_agent(loop, args.agent, n, args.agent_timeout)
                started = time.monotonic()
                untracked_new = tree_status()[1] - before
                if current_branch() != loop.branch:
                    error = (f"the agent left {loop.branch} for {current_branch() or 'a detached HEAD'} "
                             f"(commits it made there stay there)")
                    git("checkout", "-q", "--detach")  # save its uncommitted edits without moving that branch
                if error:
                    failures += 1
                    ref = save_and_reset(loop, spare_name(loop, "agent-failed", n), f"[agent failed] #{n}")
                    if current_branch() != loop.branch:
                        git("checkout", "-q", loop.branch)
                    clear_running(loop)
                    say(loop, f"#{n} skip {error}; log={loop.dir / f'{n:03d}-agent.err'}"
                              + (f"; its changes saved at {ref}" if ref else ""))
                    if failures >= MAX_AGENT_FAILURES:
                        say(loop, f"the agent failed {failures} times in a row: stopping. Check the command by hand: "
                                  f"`{args.agent} < {loop.dir / f'{n:03d}-prompt.md'}`")
                        return 1
                    continue
                failures = 0
            line = run_experiment(loop, description, started, strict=False, untracked_new=untracked_new)
            say(loop, f"#{n} {line} | {description}")
            if untracked_new:
                say(loop, f"#{n} note: the agent created untracked files (left in place): "
                          f"{', '.join(sorted(untracked_new))}")
    except (KeyboardInterrupt, Stop):
        stop_cleanly(loop)
    s = summarize(loop.rows)
    say(loop, f"done: {s['experiments']} experiments, {s['keeps']} kept; best val_bpb={s['best']['val_bpb']:.6f} "
              f"at {s['best']['commit']} ({s['best']['description']}); see `uv run agent_loop.py report`")
    return 0


def cmd_report(args):
    path = args.results or args.path
    if path is None:
        root = git("rev-parse", "--show-toplevel", check=False)
        path = str(Path(root or ".") / RESULTS)
    header, rows = read_results(path)
    if "tag" in header:
        tag = args.tag
        if tag is None:  # the current branch's run, else the latest one
            here = current_branch().removeprefix(BRANCH_PREFIX)
            tag = here if here in {r.get("tag") for r in rows} else (rows[-1]["tag"] if rows else None)
        rows = [r for r in rows if r.get("tag") == tag]
    if not rows:
        raise LoopError(f"{path} has no rows{' for tag ' + args.tag if args.tag else ''} yet")
    s = summarize(rows)
    if args.json:
        print(json.dumps({"results": path, **s}, indent=1))
    else:
        print(format_report(s, path))
    if args.plot:
        plot(s, args.plot)
        print(f"plot: {args.plot}", file=sys.stderr if args.json else sys.stdout)
    return 0


def cmd_demo(args):
    """prepare (synthetic) + init + run --agent mutate + report, on the smoke profile, in a
    disposable worktree on a new branch: the user's checkout and branch are never touched."""
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
    me = os.path.abspath(__file__)
    stages = [
        ("prepare: synthetic data and tokenizer for the smoke profile (offline; cached in "
         f"{env['AUTORESEARCH_CACHE_DIR']})", [sys.executable, PREPARE, "--dataset", "synthetic"]),
        (f"baseline: agent_loop.py init --tag {tag} --repeats 1",
         [sys.executable, me, "init", "--tag", tag, "--repeats", "1"]),
        (f"{args.experiments} experiments: agent_loop.py run --agent mutate --max-experiments {args.experiments}",
         [sys.executable, me, "run", "--agent", "mutate", "--max-experiments", str(args.experiments)]),
        ("report", [sys.executable, me, "report", "--plot", "progress.png"]),
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


# -----------------------------------------------------------------------------
# Command line


def build_parser():
    p = argparse.ArgumentParser(prog="agent_loop.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    init = sub.add_parser("init", help="create branch autoresearch/TAG, check the setup, run the baseline")
    init.add_argument("--tag", help="run name; branch autoresearch/TAG (default: today, e.g. mar5)")
    init.add_argument("--repeats", type=int, default=DEFAULT_REPEATS,
                      help=f"baseline runs with seeds 42, 43, ... to measure noise (default {DEFAULT_REPEATS})")
    init.add_argument("--timeout", type=float,
                      help="hard limit per train.py run, s (default max(2*budget, budget+120))")
    init.set_defaults(func=cmd_init)

    decide_flags = argparse.ArgumentParser(add_help=False)
    decide_flags.add_argument("--confirm", action="store_true",
                              help="re-run a candidate keep with the next seed; keep only if the mean "
                                   "still clears the margin")
    decide_flags.add_argument("--min-delta", type=float,
                              help="keep margin in val_bpb (default: 2 sigma of the baseline runs, at "
                                   "least 0.1%% of the baseline)")
    decide_flags.add_argument("--timeout", type=float,
                              help="hard limit per train.py run, s (default max(2*budget, budget+120): "
                                   "600 s at the reference budget)")

    step = sub.add_parser("step", parents=[decide_flags],
                          help="commit the change to train.py, run it, keep or reset; print one line")
    step.add_argument("-m", "--message", required=True, help="one-line description of the change")
    step.set_defaults(func=cmd_step)

    run = sub.add_parser("run", parents=[decide_flags], help="the autonomous loop", epilog=AGENT_HELP,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--agent", required=True, help="'mutate' or a shell command (see below)")
    run.add_argument("--max-experiments", type=int, help="stop after N iterations (default: until Ctrl-C)")
    run.add_argument("--hours", type=float, help="start no new experiment after H hours")
    run.add_argument("--agent-timeout", type=float, default=AGENT_TIMEOUT_S, help=f"s (default {AGENT_TIMEOUT_S})")
    run.add_argument("--seed", type=int, default=0, help="mutate's random seed (default 0)")
    run.set_defaults(func=cmd_run)

    report = sub.add_parser("report", help="summary of results.tsv (ours or upstream's 5 columns)")
    report.add_argument("path", nargs="?", help="results.tsv to read (default: the repo's)")
    report.add_argument("--results", help="same as PATH")
    report.add_argument("--json", action="store_true", help="machine-readable, for agents")
    report.add_argument("--plot", metavar="FILE.png", help="write a progress plot")
    report.add_argument("--tag", help="which run of a results.tsv with several (default: the current branch's)")
    report.set_defaults(func=cmd_report)

    demo = sub.add_parser("demo", help="offline end-to-end demo (smoke profile) in a disposable worktree")
    demo.add_argument("--experiments", type=int, default=3, help="mutate experiments (default 3)")
    demo.set_defaults(func=cmd_demo)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, raise_stop)
    try:
        return args.func(args)
    except LoopError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Stop):  # commands with work to save catch this themselves; the rest just stop
        print("\nstopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
