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
- nothing in the ledger folder under .git/ either, nor in the loop's records of it outside the repository
  (LedgerSeal), which are put back as they were.
"""
import compileall
import contextlib
import functools
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import shutil
import stat
from pathlib import Path

from autoresearch.gitrepo import git
from autoresearch.layout import TRAIN, read_json
from autoresearch.ledger import keep_file, kept_by_loop, write_atomic

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
    `step` is one), read when it starts, before any train.py of it runs; without one it trusts none of it.
    kin(path), when given, names the same harness's folders of other loops (other tags and workers): an emptied
    folder starts from a copy of one of them that holds just what its own harness left (seed_from)."""

    def __init__(self, path, kin=None):
        self.path = Path(path)
        self.kin = kin
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

    def altered(self):
        """What a run kept out of the folder by the kernel (confine.py) can still have done to it while the
        evaluator wrote there: a file the harness had left changed (a chmod, which Landlock does not govern) or
        gone, or a new one the evaluator could no longer read or rewrite (mode without the owner's rw)."""
        if self.seen is None:
            return []
        now = self.files()
        changed = [p for p in self.seen if now.get(p) != self.seen[p]]
        unusable = []
        for p in set(now) - set(self.seen):
            try:
                if (self.path / p).lstat().st_mode & 0o600 != 0o600:
                    unusable.append(p)
            except FileNotFoundError:  # gone since the listing (the evaluator's own temporary file)
                pass
        return sorted(str(self.path / p) for p in changed + unusable)

    def clean(self):
        """The folder, emptied unless it holds just what the harness left (a cache: nothing is lost)."""
        if self.seen is None or self.written():
            shutil.rmtree(self.path, ignore_errors=True)
            self.seed_from(self.kin(self.path) if self.kin else ())
        self.path.mkdir(parents=True, exist_ok=True)
        return self.path

    def seed_from(self, folders):
        """Fill the (absent) folder with a copy of the first of `folders` that holds just what its own harness
        left: by its record, before and after the copy (nothing written meanwhile comes along), and a record
        the loop wrote (its copy outside the repository, ledger.keep_file: a folder and a record that a run or
        an agent planted are never taken). The folder it came from, or None. A cache: a compile starts warm
        instead of cold, and nothing else changes."""
        staging = self.path.with_name(f".{self.path.name}.partial")
        for folder in folders:
            other = HarnessFolder(folder)
            if not other.seen or other.written() or not kept_by_loop(other.record):
                continue
            shutil.rmtree(staging, ignore_errors=True)
            try:
                shutil.copytree(other.path, staging, symlinks=True)
            except (OSError, shutil.Error):  # emptied or written meanwhile by its own loop
                shutil.rmtree(staging, ignore_errors=True)
                continue
            copied = {str(p.relative_to(staging)) for p in staging.rglob("*")}
            if other.written() or copied != set(other.seen) or not kept_by_loop(other.record):
                shutil.rmtree(staging, ignore_errors=True)
                continue
            try:
                if os.path.lexists(self.path):  # a link or a file the emptying left
                    os.unlink(self.path)
                staging.rename(self.path)
            except OSError:
                shutil.rmtree(staging, ignore_errors=True)
                return None
            return folder
        return None

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
        keep_file(self.record, None if self.seen is None else json.dumps(self.seen).encode())


@functools.cache
def harness_folder(path, kin=None):
    """One HarnessFolder per folder in a process: every loop (and Ray task) in it shares what it saw."""
    return HarnessFolder(path, kin)


# -----------------------------------------------------------------------------
# The ledger while train.py runs: under .git/, so the seal of the checkout above does not cover it

CACHES = "compile-cache"  # a tag's (or worker's) torch.compile caches: kept by ctime only, never by their bytes
KEEP_MAX = 64 << 20  # a record larger than this is watched, not kept (the loop writes none near it)


def ledger_files(folder, skip=()):
    """{path: ctime_ns} of the files and links under the ledger folder (not followed), but the files and folders
    in `skip`; {} when the folder is no longer a folder (a run swapped in a link)."""
    skip = {os.path.realpath(s) for s in skip if s}
    found = {}
    if os.path.islink(folder) or not os.path.isdir(folder):
        return found
    for top, dirs, files in os.walk(folder):
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


def regular_file_bytes(path, limit):
    """The bytes of a regular file up to `limit` long, else None (a link, a fifo, a device: not followed)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        return f.read() if stat.S_ISREG(info.st_mode) and info.st_size <= limit else None


def clear_the_way(path, folder):
    """Whatever stands where a file of the ledger must be written again: a link or a file in place of one of
    its folders, a folder in place of it."""
    for parent in reversed(Path(path).relative_to(folder).parents[:-1]):
        place = folder / parent
        if os.path.islink(place) or (os.path.lexists(place) and not place.is_dir()):
            os.unlink(place)
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)


class LedgerSeal:
    """The ledger folder (.git/autoresearch: rows, pinned config, patches, log copies, the caches of every
    version and tag) as it was before train.py started, so that whatever the run wrote there is found (by
    ctime, which no process can set back: also a file changed and changed back) and put back once it ends:
    records from the bytes kept here, a file the run added moved aside, a compile cache it wrote in removed
    (the code compiles again). skip: what the run itself writes (its version's compile cache; on a Ray node,
    where the ledger holds them, its log and hand-over) or another check owns (the evaluator's cache,
    seal.HarnessFolder). outside: the loop's records of the ledger outside the repository (ledger.record_file,
    ledger.copies_folder), sealed alike: a run that wrote a row there, or a record and its copy, would otherwise
    have the next command of the loop put its forgery in place. trusted: {path: bytes} to put back there in place
    of what it held when the run started (which another worker's run may have written)."""

    def __init__(self, folder, skip=(), outside=(), trusted=None):
        self.folder, self.skip = Path(os.path.realpath(folder)), skip
        self.outside = [Path(os.path.abspath(p)) for p in outside]
        self.folders = [f for f in [self.folder, *self.outside] if f.is_dir() and not f.is_symlink()]
        self.times = self.files()
        self.kept = {}
        for path in self.times:
            data = None if self.cache_of(path) else regular_file_bytes(path, KEEP_MAX)
            if data is not None:
                self.kept[path] = data
        self.kept.update({str(Path(os.path.abspath(p))): data for p, data in (trusted or {}).items()})

    def files(self):
        """{path: ctime_ns} of what is sealed: the files under each folder, and each file outside on its own."""
        found = ledger_files(self.folder, self.skip)
        for path in self.outside:
            if path in self.folders:
                found.update(ledger_files(path, self.skip))
            else:
                with contextlib.suppress(FileNotFoundError):  # none there, or gone since
                    found[str(path)] = os.lstat(path).st_ctime_ns
        return found

    def root_of(self, path):
        return next((f for f in self.folders if Path(path).is_relative_to(f)), Path(path).parent)

    def cache_of(self, path):
        """The compile cache (a version's folder in compile-cache/ of the ledger) that holds this path, or None."""
        if not Path(path).is_relative_to(self.folder):
            return None
        parts = Path(path).relative_to(self.folder).parts
        return self.folder.joinpath(*parts[:parts.index(CACHES) + 2]) if CACHES in parts[:-1] else None

    def written(self):
        swapped = [f for f in self.folders if os.path.islink(f) or not f.is_dir()]
        now = self.files()
        return swapped, sorted(p for p in set(self.times) | set(now) if self.times.get(p) != now.get(p))

    def put_back(self, aside):
        """Undo what the run wrote; returns (the paths it wrote, the lines that say what was done). Each file on
        its own: one that cannot be put back is named, and the others still are."""
        swapped, written = self.written()
        lines, added, failed, caches = [], [], {}, set()
        for folder in swapped:  # moved away and replaced: made again from the records kept (caches are lost)
            kind = "the ledger folder" if folder == self.folder else "the folder of the ledger's records"
            lines.append(f"{kind} {folder} was replaced while the run trained: made again")
            written = sorted(set(written) | {str(folder)})
            try:
                if os.path.lexists(folder):
                    os.unlink(folder)
                folder.mkdir(parents=True, exist_ok=True)  # its parent may be gone too (ledgers/ deleted)
            except OSError as e:
                failed[str(folder)] = e.strerror or str(e)
        for path in written:
            try:
                if path in map(str, swapped):
                    continue
                if self.cache_of(path):  # emptied rather than trusted
                    caches.add(self.cache_of(path))
                elif path in self.kept:
                    clear_the_way(path, self.root_of(path))
                    write_atomic(path, self.kept[path])
                elif path not in self.times and os.path.lexists(path):
                    root = self.root_of(path)
                    target = Path(aside) / ("" if root == self.folder else "outside-the-repository") / \
                        Path(path).relative_to(root)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(path, target)
                    added.append(path)
                elif path in self.times:
                    failed[path] = f"not kept: not a regular file, or over {KEEP_MAX >> 20} MB"
            except OSError as e:
                failed[path] = e.strerror or str(e)
        for cache in sorted(caches):
            if os.path.islink(cache) or (os.path.lexists(cache) and not cache.is_dir()):
                os.unlink(cache)
            else:
                shutil.rmtree(cache, ignore_errors=True)
        put_back = [p for p in written if p in self.kept and p not in failed]
        if put_back:
            lines.append(f"the ledger files the run wrote are put back as they were before it ({len(put_back)})")
        if added:
            lines.append(f"files the run added to the ledger moved to {aside}")
        if caches:
            lines.append(f"compile caches the run wrote in emptied: {', '.join(c.name for c in sorted(caches))}")
        if failed:
            lines.append("could not be put back: " + ", ".join(f"{p} ({why})" for p, why in failed.items()))
        return written, lines
