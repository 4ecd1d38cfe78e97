"""
Git, through its command line. The loop commits only the paths it names and moves only its own branch;
this module runs git, brings a fallback identity for commits on a fresh machine, says what changed in the
tree, keeps the loop's own outputs ignored, and computes git's blob id of a file without a subprocess.
"""
import functools
import hashlib
import os
import re
import subprocess
from pathlib import Path

from autoresearch.layout import LoopError

GIT_FALLBACK_IDENTITY = (("user.name", "autoresearch"), ("user.email", "autoresearch@localhost"))


# -----------------------------------------------------------------------------
# Running git


# Variables with which the environment `step` runs in (the agent's shell) would point git at another repository,
# index or object store than the checkout's, or give commits other parents; the loop's git never sees them.
GIT_REDIRECTS = ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY", "GIT_COMMON_DIR",
                 "GIT_ALTERNATE_OBJECT_DIRECTORIES", "GIT_NAMESPACE", "GIT_REPLACE_REF_BASE", "GIT_GRAFT_FILE")


def git_env():
    """The environment of every git command of the loop. .git/info/grafts (deprecated, but git 2.39 still reads
    it, --no-replace-objects or not) gives any commit other parents: a red team's made an experiment's recorded
    patch another change than the one that ran. GIT_GRAFT_FILE at an empty file switches it off."""
    env = {k: v for k, v in os.environ.items() if k not in GIT_REDIRECTS}
    env["GIT_GRAFT_FILE"] = os.devnull
    return env


def git(*args, check=True):
    """stdout of a git command (trailing newline removed); None on failure when check=False. Bytes
    that are not UTF-8 (a path, a diff of a train.py the agent wrote in latin-1) round-trip as
    surrogates: paths still work as arguments, and files written from it use errors="replace"."""
    # hooks never run: a hook is code the agent could have written, and overnight nothing may prompt; nor does
    # an fsmonitor command (the repository's config names it: a red team's ran inside the loop, unconfined, and
    # left a process that swapped the runs' models), nor replacement objects (`git replace`), with which any
    # commit could stand for another
    p = subprocess.run(["git", "--no-replace-objects", "-c", "core.hooksPath=/dev/null",
                        "-c", "core.fsmonitor=false", "-c", "advice.graftFileDeprecated=false", *args],
                       env=git_env(), capture_output=True, text=True, errors="surrogateescape")
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


# keys of the repository's own git config (an agent confined to the checkout can write .git/config) with which
# git runs a command of its choosing inside the loop: filters, diff drivers, and what includes another file
COMMAND_KEYS = re.compile(r"^(filter\.[^=]*\.(clean|smudge|process)|diff\.[^=]*\.(textconv|command)|diff\.external"
                          r"|merge\.[^=]*\.driver|core\.(sshcommand|pager|editor|askpass)|include\.path"
                          r"|includeif\.[^=]*)=", re.I)


def commands_in_config():
    """The keys of the repository's own config (local and worktree scope) with which git would run a command."""
    listed = git("config", "--list", "--show-scope", check=False) or ""
    return sorted({line.split("\t", 1)[1].split("=", 1)[0] for line in listed.splitlines()
                   if line.startswith(("local\t", "worktree\t")) and COMMAND_KEYS.match(line.split("\t", 1)[1])})


def commit_named(prefix, within=None):
    """The full id of the one commit whose id begins with `prefix` (the ledger's short ids), looked up among
    objects only: `git rev-parse` takes a branch or tag of that name first (with a warning on stderr), and the
    agent can make one, so that another commit than the ledger's would run as the best. When several commits
    share the prefix (a hub's lab found one sharing a best's 7 digits in 18 s), the one on the first-parent
    history of `within` (the tag's branch, where every keep and the baseline are) is the ledger's."""
    found = [sha for sha in (git("rev-parse", f"--disambiguate={prefix}", check=False) or "").split()
             if git("cat-file", "-t", sha, check=False) == "commit"]
    if len(found) > 1 and within:
        history = set((git("rev-list", "--first-parent", within, check=False) or "").split())
        found = [sha for sha in found if sha in history] or found
    if len(found) != 1:
        raise LoopError(f"the ledger's commit {prefix} is {'no' if not found else 'more than one'} commit of "
                        f"this repository{': ' + ', '.join(found) if found else ''}. Fix: start a new tag with "
                        f"`uv run agent_loop.py init --tag NEW`")
    return found[0]


def row_commit(row, within=None):
    """The full id of a ledger row's commit: its `sha` column (a commit of this repository, or the ledger names
    none), else, in a row from before that column, the one commit its short id names (commit_named)."""
    sha = row.get("sha") or ""
    if not sha:
        return commit_named(row["commit"], within)
    if not sha.startswith(row["commit"]) or git("cat-file", "-t", sha, check=False) != "commit":
        raise LoopError(f"the ledger's commit {sha} (#{row.get('n')}) is not a commit of this repository. Fix: "
                        f"start a new tag with `uv run agent_loop.py init --tag NEW`")
    return sha


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
    """Tracked paths that differ from a commit: uncommitted, committed on top of it, or hidden from
    `git status`: every file of the commit's tree is also hashed outright (`git update-index
    --assume-unchanged` or `--skip-worktree` would hide an edit), and those index flags are cleared."""
    changed, _ = tree_status()
    changed |= set(git("diff", "--name-only", "-z", rev, "HEAD").split("\0")) - {""}
    flagged = hidden_by_index_flags()
    if flagged:
        git("update-index", "--no-assume-unchanged", "--no-skip-worktree", "--", *flagged)
    return changed | set(flagged) | differs_from_tree(rev)


def hidden_by_index_flags():
    """Tracked paths marked assume-unchanged (lower-case tag) or skip-worktree (S) in the index; in a sparse
    checkout skip-worktree is how git leaves files out, and is not counted."""
    sparse = git("config", "--bool", "core.sparseCheckout", check=False) == "true"
    entries = git("ls-files", "-v", "-z").split("\0")
    return sorted(e[2:] for e in entries if e and (e[0].islower() or (e[0] == "S" and not sparse)))


def differs_from_tree(rev):
    """Paths of rev's tree whose file in the working tree has other content, another kind (a symlink where a
    file was) or is missing, computed from the bytes on disk, whatever the index says, and never through git's
    filters: a clean filter the agent configures would hand git the committed bytes of an edited prepare.py (a
    red team's scaled the metric and got a comment kept), so a repository whose files git stores otherwise than
    they are on disk (Git LFS, end-of-line conversion) shows them as changed."""
    changed = set()
    for entry in git("ls-tree", "-r", "-z", rev).split("\0"):
        if not entry:
            continue
        meta, path = entry.split("\t", 1)
        mode, _, blob = meta.split()
        file = Path(path)
        if mode == "160000":  # a submodule: its own repository
            continue
        if mode == "120000":
            same = file.is_symlink() and git_blob_id(str(file.readlink()).encode()) == blob
        else:
            same = file.is_file() and not file.is_symlink() and git_blob_id(file.read_bytes()) == blob
        if not same and not (file.exists() or file.is_symlink()) and path in sparse_outside():
            same = True
        if not same:
            changed.add(path)
    return changed


def sparse_outside():
    """Paths a sparse checkout leaves out of the working tree (skip-worktree), else none."""
    if git("config", "--bool", "core.sparseCheckout", check=False) != "true":
        return set()
    return {e[2:] for e in git("ls-files", "-v", "-z").split("\0") if e.startswith("S ")}


def git_blob_id(data):
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def blob_hash(data):
    """git's blob id of the content, shortened: the identity of a train.py, computed without a subprocess."""
    return git_blob_id(data)[:12]


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
