"""
What a run could leave for the runs after it. A confined run (confine.py) writes nowhere that outlives it but
its version's compile cache (read by the version's later runs and by new versions seeded from it), /dev/shm
and /dev/mqueue: weights saved there by one run and loaded by the next would train past the budget, run after
run. So after each run the loop removes from its compile cache what changed after the run first opened its
training data (valwatch.DataWatch.train_opened_ns: from then on it can have learned something; train.py
compiles on a batch of zeros before that, so the cache stays warm), by its ctime, and what holds other bytes than
it did then (a file mapped for writing before that and written through the mapping: no ctime moves), and from
/dev/shm and /dev/mqueue what changed since the run started: nothing there needs to outlive a run.
"""
import hashlib
import os
import shutil
import stat
from pathlib import Path

RUN_ONLY = (Path("/dev/shm"), Path("/dev/mqueue"))
DIGEST_MAX_BYTES = 1 << 30  # a compile cache's largest file is a few MB: one past this is dropped, not hashed
TICK_NS = 50_000_000  # before kernel 6.13 a ctime is a clock tick coarse and lags the time: a margin where free


def unchecked_mark(compile_cache):
    """The file beside a version's compile cache that stands while a run may write there and its writes are not
    swept yet: a loop killed meanwhile (kill -9, a power cut) leaves it, and no other tag or worker then starts
    from that cache (state.newest_cache_of), nor this loop's next run (state.Loop.compile_cache). Beside the
    folder, not in it: a confined run cannot remove it (an unconfined one that does is rejected by the ledger's
    seal, unless it also kills the loop)."""
    cache = Path(compile_cache)
    return cache.with_name(f"{cache.name}.unchecked")


def opened_up(folder):
    """Makes a folder of ours that a run locked (chmod 0, 0o400) readable, enterable and writable again."""
    if not os.access(folder, os.R_OK | os.W_OK | os.X_OK):
        os.chmod(folder, 0o700)


def remove_tree(root):
    """shutil.rmtree, also through folders a run locked; True when nothing of it is left."""
    def unlock_and_retry(function, path, _):
        try:
            opened_up(os.path.dirname(path))
            if os.path.isdir(path) and not os.path.islink(path):
                opened_up(path)
                shutil.rmtree(path, onerror=lambda *args: None)
            else:
                function(path)
        except OSError:
            pass
    if os.path.lexists(root):
        try:
            opened_up(root)
        except OSError:
            pass
        shutil.rmtree(root, onerror=unlock_and_retry)
    return not os.path.lexists(root)


def drop_written_since(root, cutoff_ns, keep=lambda path, stat: False, root_too=False):
    """Removes every file, link and folder under `root` changed (ctime: no process can set it back) at or after
    cutoff_ns, and everything beneath such a folder (a late rename or chmod of a folder can carry what is under
    it), unless keep(path, stat); also everything when root_too and `root` itself changed then. Folders a run
    made unreadable or read-only are opened up first. Returns (paths removed, paths that could not be)."""
    removed, failed = [], []
    try:
        root_late = root_too and os.lstat(root).st_ctime_ns >= cutoff_ns
    except OSError:
        return removed, failed
    stack, folders = [(str(root), root_late)], []
    while stack:
        folder, late = stack.pop()
        folders.append((folder, late))
        try:
            if os.lstat(folder).st_uid == os.getuid():
                opened_up(folder)
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            continue
        except OSError:  # another user's folder, or one that would not open
            failed.append(folder)
            continue
        for entry in entries:
            try:
                stat = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            except OSError:
                failed.append(entry.path)
                continue
            if keep(entry.path, stat):
                continue
            changed = late or stat.st_ctime_ns >= cutoff_ns
            if entry.is_dir(follow_symlinks=False):
                stack.append((entry.path, changed))
            elif changed:
                try:
                    os.unlink(entry.path)
                    removed.append(entry.path)
                except FileNotFoundError:
                    pass
                except OSError:
                    failed.append(entry.path)
    for folder, late in reversed(folders[1:]):  # the deepest first
        if late:
            try:
                os.rmdir(folder)
                removed.append(folder)
            except FileNotFoundError:
                pass
            except OSError:  # something kept inside, or no right to remove it
                failed.append(folder)
    return removed, failed


def held_open(under):
    """Paths under `under` that a live process of this user holds open or mapped (/proc)."""
    held, prefix, device = set(), str(under) + "/", os.stat(under).st_dev
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            fds = list((proc / "fd").iterdir())
            maps = (proc / "maps").read_bytes().decode(errors="surrogateescape").splitlines()
        except OSError:  # gone meanwhile, or another user's
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
                if target.startswith(prefix):
                    held.add(target)
                elif target.startswith("/") and os.stat(fd).st_dev == device:  # a message queue reads "/name"
                    held.add(str(under) + target)
            except OSError:  # closed meanwhile
                continue
        held |= {line.split(None, 5)[5] for line in maps if prefix in line and len(line.split(None, 5)) == 6}
    return held


def digests(root, since_ns=None):
    """{path: digest of its bytes, or None where it cannot be read} for the regular files under `root` (links not
    followed); with since_ns, only those whose ctime is that late."""
    found = {}
    for top, _, names in os.walk(root):
        for name in names:
            path = os.path.join(top, name)
            try:
                status = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISREG(status.st_mode) and (since_ns is None or status.st_ctime_ns >= since_ns):
                found[path] = digest(path)
    return found


def digest(path, largest=DIGEST_MAX_BYTES):
    """The digest of a regular file's bytes, or None: not one (a FIFO, a link, a device put in its place would
    hang or never end a read), unreadable, or larger than `largest` (a file that big is dropped, not read)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        status = os.fstat(f.fileno())
        if not stat.S_ISREG(status.st_mode) or status.st_size > largest:
            return None
        h = hashlib.blake2b()
        try:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        except OSError:
            return None
        return h.digest()


def drop_rewritten(before):
    """Removes the files of `before` ({path: digest}) that hold other bytes now, or cannot be read: (removed,
    failed)."""
    removed, failed = [], []
    for path, was in before.items():
        if not os.path.lexists(path):
            continue
        if was is None or digest(path) != was:
            try:
                os.unlink(path)
                removed.append(path)
            except OSError:
                failed.append(path)
    return removed, failed


def described(paths, n=3):
    return ", ".join(paths[:n]) + (f" and {len(paths) - n} more" if len(paths) > n else "")


def drop_carryover(started_ns, train_opened_ns, compile_cache, run_only=RUN_ONLY, before=None):
    """Removes what a run that started at started_ns (time.time_ns) and first opened its training data at
    train_opened_ns (None: never, as far as the loop saw) left where later runs could read it; returns the notes
    for its row (none when it left nothing there). before: the compile cache's digests (digests) as the run
    started, with those of the files it wrote before opening the data taken as it opened it; a file that holds
    other bytes now goes too. Without it, only ctimes are checked."""
    notes = []
    if compile_cache and Path(compile_cache).is_dir():
        try:
            removed, failed = drop_written_since(compile_cache, train_opened_ns or started_ns, root_too=True)
            rewritten, unremoved = drop_rewritten(before or {})
            removed, failed = removed + rewritten, failed + unremoved
        except Exception as e:  # noqa: BLE001  (whatever it met, the cache must not keep it)
            removed, failed = [], [f"{type(e).__name__}: {e}"]
        if failed:  # a folder it could not enter or empty: the whole cache goes (the next run compiles cold)
            if not remove_tree(compile_cache):
                notes.append(f"could not remove the compile cache {compile_cache}: remove it by hand")
            Path(compile_cache).mkdir(parents=True, exist_ok=True)
        if removed or failed:
            whole = " (the whole cache: some could not be)" if failed else ""
            notes.append(f"{len(removed)} file(s) and folder(s) this run changed in its compile cache after "
                         f"it opened the training data were removed{whole}: they could carry what it learned to "
                         f"later runs (torch.compile before reading data, as train.py does, keeps the cache warm)")
    for folder in run_only:
        folder = folder.resolve()
        if not folder.is_dir():
            continue
        held = None

        def not_the_runs(path, stat):  # another user's, or in use by a live process (Ray's object store, say)
            nonlocal held
            if stat.st_uid != os.getuid():
                return True
            held = held_open(folder) if held is None else held
            return path in held

        try:
            removed, failed = drop_written_since(folder, started_ns - TICK_NS, keep=not_the_runs)
        except Exception as e:  # noqa: BLE001  (a note, not a dead loop)
            removed, failed = [], [f"{type(e).__name__}: {e}"]
        if removed:
            notes.append(f"removed what this run left in {folder}, where it could carry what it learned to "
                         f"later runs: {described(removed)}")
        if failed:
            notes.append(f"could not remove what this run left in {folder}: {described(failed)}")
    return notes
