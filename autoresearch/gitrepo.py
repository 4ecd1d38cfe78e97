"""
Git, through its command line. The loop commits only the paths it names and moves only its own branch;
this module runs git, brings a fallback identity for commits on a fresh machine, says what changed in the
tree, keeps the loop's own outputs ignored, and computes git's blob id of a file without a subprocess.
"""
import functools
import hashlib
import subprocess
from pathlib import Path

from autoresearch.layout import PREPARE, LoopError

GIT_FALLBACK_IDENTITY = (("user.name", "autoresearch"), ("user.email", "autoresearch@localhost"))


# -----------------------------------------------------------------------------
# Running git


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


# -----------------------------------------------------------------------------
# Where we are


def head():
    return git("rev-parse", "HEAD")


def short(sha):
    return git("rev-parse", "--short=7", sha)


def git_root():
    root = git("rev-parse", "--show-toplevel", check=False)
    if root is None:
        raise LoopError("not inside a git repository: agent_loop.py keeps each experiment as a commit. "
                        "Fix: `git init && git add -A && git commit -m baseline` (or clone the repo)")
    return root


def current_branch():
    return git("symbolic-ref", "--short", "-q", "HEAD", check=False) or ""


# -----------------------------------------------------------------------------
# What changed


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


def changed_since(rev):
    """Tracked paths that differ from a commit: uncommitted, or committed on top of it. prepare.py
    is also hashed outright: the metric lives there, and `git update-index --assume-unchanged`
    would hide it from `git status`."""
    changed, _ = tree_status()
    changed |= set(git("diff", "--name-only", "-z", rev, "HEAD").split("\0")) - {""}
    if git("hash-object", "--", PREPARE, check=False) != git("rev-parse", f"{rev}:{PREPARE}", check=False):
        changed.add(PREPARE)
    return changed


def blob_hash(data):
    """git's blob id of the content: the identity of a train.py, computed without a subprocess."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()[:12]


# -----------------------------------------------------------------------------
# Keeping the loop's outputs out of git


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
