"""
The sealed repository, beyond the tracked files (gitrepo.changed_since hashes those, also when index flags hide
an edit). Between the start and the end of an experiment:
- train.py stays a regular file: a symlink could point at anything outside the repository;
- the importable files git does not track (untracked or ignored, outside SKIP_DIRS: .py, sourceless .pyc,
  and extension modules, which import prefers to a .py of the same name), which train.py could import, stay
  as they were: a changed one is moved aside (nothing is lost) and the experiment is rejected;
- nothing but train.py is written while train.py runs, even when it is changed back before the run ends: every
  write moves a file's ctime, and no process can set it back. That includes the bytecode of the repository's
  modules (compiled before the run, so that no honest import writes it): a rewritten .pyc would be loaded in
  place of its .py by every later import, the loop's and the evaluator's, so it is compiled again at once; and
  so is all of it before each run, whatever the agent left there;
- nothing in the ledger folder under .git/ either (LedgerSeal), which is put back as it was.
"""
import compileall
import functools
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import shutil
from pathlib import Path

from autoresearch.gitrepo import git
from autoresearch.layout import TRAIN, read_json
from autoresearch.ledger import write_atomic

IMPORTABLE = tuple(importlib.machinery.all_suffixes())  # .py, .pyc, .so and its tagged forms
SKIP_DIRS = {".git", ".venv", "venv", "logs", "worktrees", "__pycache__", ".pytest_cache", "node_modules"}


def outside_the_seal(folder, name):
    """Folders whose .py files are not the experiment's: virtual environments, installed packages, caches."""
    path = Path(folder) / name
    caches = {Path(os.environ[k]).resolve() for k in ("AUTORESEARCH_CACHE_DIR", "HF_HOME") if os.environ.get(k)}
    return (name in SKIP_DIRS or name == "site-packages" or (path / "pyvenv.cfg").exists()
            or path.resolve() in caches)


def untracked_modules():
    """{path: sha256} of the importable files under the repository root that git does not track."""
    tracked = set(git("ls-files", "-z").split("\0"))
    found = {}
    for folder, dirs, files in os.walk("."):
        dirs[:] = [d for d in dirs if not outside_the_seal(folder, d)]
        for name in files:
            path = os.path.normpath(os.path.join(folder, name))
            if name.endswith(IMPORTABLE) and path not in tracked:
                found[path] = hashlib.sha256(Path(path).read_bytes()).hexdigest() if Path(path).is_file() else ""
    return found


def changed_modules(before, after):
    """Untracked modules added, changed or removed between two untracked_modules() snapshots."""
    return sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))


def set_aside(paths, folder):
    """Move these untracked files (those still there) into folder, keeping their relative paths."""
    moved = []
    for path in paths:
        if Path(path).exists():
            target = Path(folder) / path
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(path, target)
            moved.append(path)
    return moved


def module_bytecode(force=False, untracked=None):
    """The __pycache__ files of the repository's modules (tracked, and the untracked ones inside the seal:
    untracked_modules(), or `untracked` when the caller has them), compiled now where missing or out of date, so
    that no honest import writes one while train.py runs; force: all compiled again from their sources, whatever
    anything left there (a forged .pyc whose header matches its .py would be loaded in place of it)."""
    found = []
    for path in [*git("ls-files", "-z").split("\0"), *(untracked_modules() if untracked is None else untracked)]:
        if path.endswith(".py") and path != TRAIN and Path(path).is_file():
            compileall.compile_file(path, quiet=2, force=force)
            found.append(importlib.util.cache_from_source(path))
    return found


def write_times(modules):
    """{path: ctime_ns} of every tracked file but train.py, and of the untracked files given."""
    times = {}
    for path in [p for p in git("ls-files", "-z").split("\0") if p and p != TRAIN] + list(modules):
        try:
            times[path] = os.lstat(path).st_ctime_ns
        except FileNotFoundError:
            times[path] = None
    return times


def written_since(times):
    """Paths whose ctime moved (or that appeared or vanished) since write_times()."""
    tracked = set(git("ls-files", "-z").split("\0"))
    now = write_times([p for p in times if p not in tracked])
    return sorted(p for p in set(times) | set(now) if times.get(p) != now.get(p))


def symlinked_train():
    return Path(TRAIN).is_symlink()


class HarnessFolder:
    """A folder only the harness writes (the evaluator's compile cache): the files it held when the harness
    last wrote it, so that whatever anything else left there since (a "kernel" the evaluator would load and
    run) is found, and never used. The record (FOLDER.json) carries that over to the next loop process (each
    `step` is one), read when it starts, before any train.py of it runs; without one it trusts none of it."""

    def __init__(self, path):
        self.path = Path(path)
        self.record = self.path.with_name(f"{self.path.name}.json")
        try:
            self.seen = read_json(self.record)
        except (ValueError, OSError):  # damaged or unreadable: nothing is known
            self.seen = None
        if not isinstance(self.seen, dict):
            self.seen = None

    def files(self):
        """{path relative to the folder: ctime_ns} (relative: a repository moved elsewhere keeps its record)."""
        found = {}
        for p in self.path.rglob("*") if self.path.is_dir() else ():
            try:
                found[str(p.relative_to(self.path))] = p.lstat().st_ctime_ns
            except FileNotFoundError:  # gone since the listing
                pass
        return found

    def written(self):
        """Files written or removed since settle() (none before this loop first settled it)."""
        if self.seen is None:
            return []
        now = self.files()
        return sorted(str(self.path / p) for p in set(now) | set(self.seen) if now.get(p) != self.seen.get(p))

    def clean(self):
        """The folder, emptied unless it holds just what the harness left (a cache: nothing is lost)."""
        if self.seen is None or self.written():
            shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir(parents=True, exist_ok=True)
        return self.path

    def settle(self):
        self.seen = self.files()
        self.keep_record()

    def forget(self):
        """The record is not known to be the harness's (a loop killed while a run trained: the run may have
        rewritten it, and no check followed): the folder is emptied before the next evaluation reads it."""
        self.seen = None
        self.keep_record()

    def keep_record(self):
        """The record as this process knows it, whatever a run wrote over it (a run cut short by Ctrl-C is never
        checked: the next process then empties what it left, by this record)."""
        if self.seen is None:
            self.record.unlink(missing_ok=True)
        else:
            write_atomic(self.record, json.dumps(self.seen).encode())


@functools.cache
def harness_folder(path):
    """One HarnessFolder per folder in a process: every loop (and Ray task) in it shares what it saw."""
    return HarnessFolder(path)


# -----------------------------------------------------------------------------
# The ledger while train.py runs: under .git/, so the seal of the checkout above does not cover it

CACHES = "compile-cache"  # a tag's (or worker's) torch.compile caches: kept by ctime only, never by their bytes


def ledger_files(folder, skip=()):
    """{path: ctime_ns} of the files under the ledger folder, but the files and folders in `skip`."""
    skip = {os.path.realpath(s) for s in skip if s}
    found = {}
    for top, dirs, files in os.walk(os.path.realpath(folder)):  # real paths below it: links are not followed
        links = [d for d in dirs if os.path.islink(os.path.join(top, d))]
        dirs[:] = [d for d in dirs if d not in links and os.path.join(top, d) not in skip]
        for name in files + links:
            path = os.path.join(top, name)
            if path in skip:
                continue
            try:
                found[path] = os.lstat(path).st_ctime_ns
            except FileNotFoundError:  # gone since the listing
                pass
    return found


class LedgerSeal:
    """The ledger folder (.git/autoresearch: rows, pinned config, patches, log copies, the caches of every
    version and tag) as it was before train.py started, so that whatever the run wrote there is found (by
    ctime, which no process can set back: also a file changed and changed back) and put back once it ends:
    records from the bytes kept here, a file the run added moved aside, a compile cache it wrote in removed
    (the code compiles again). skip: what the run itself writes (its version's compile cache; on a Ray node,
    where the ledger holds them, its log and hand-over) or another check owns (the evaluator's cache,
    seal.HarnessFolder)."""

    def __init__(self, folder, skip=()):
        self.folder, self.skip = Path(os.path.realpath(folder)), skip
        self.times = ledger_files(folder, skip)
        self.kept = {}
        for path in self.times:
            if CACHES not in Path(path).relative_to(self.folder).parts:
                try:
                    self.kept[path] = Path(path).read_bytes()
                except OSError:  # unreadable: found if written, but not put back
                    pass

    def written(self):
        now = ledger_files(self.folder, self.skip)
        return sorted(p for p in set(self.times) | set(now) if self.times.get(p) != now.get(p))

    def put_back(self, aside):
        """Undo what the run wrote; returns (the paths it wrote, the lines that say what was done)."""
        written, lines = self.written(), []
        if not written:
            return [], []
        added, caches = [], set()
        for path in written:
            parts = Path(path).relative_to(self.folder).parts
            if CACHES in parts:  # the version's folder in it: a cache, emptied rather than trusted
                caches.add(self.folder.joinpath(*parts[:parts.index(CACHES) + 2]))
            elif path in self.kept:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                write_atomic(path, self.kept[path])
            elif path not in self.times and os.path.lexists(path):
                target = Path(aside) / Path(path).relative_to(self.folder)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(path, target)
                added.append(path)
        for cache in sorted(caches):
            shutil.rmtree(cache, ignore_errors=True) if cache.is_dir() else cache.unlink(missing_ok=True)
        put_back = [p for p in written if p in self.kept]
        if put_back:
            lines.append(f"the ledger files the run wrote are put back as they were before it ({len(put_back)})")
        if added:
            lines.append(f"files the run added to the ledger moved to {aside}")
        if caches:
            lines.append(f"compile caches the run wrote in emptied: {', '.join(c.name for c in sorted(caches))}")
        unreadable = [p for p in written if p in self.times and p not in self.kept
                      and CACHES not in Path(p).relative_to(self.folder).parts]
        if unreadable:
            lines.append(f"could not be put back (unreadable before the run): {', '.join(unreadable)}")
        return written, lines
