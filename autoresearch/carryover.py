"""
What a run could leave for the runs after it. A confined run (confine.py) writes nowhere that outlives it but its
version's compile cache (read by the version's later runs and by new versions seeded from it) and /dev/shm:
weights saved there by one run and loaded by the next would train past the budget, run after run. So what a run
wrote there after it first opened its training data (valwatch.DataWatch.train_opened_ns: from then on it can
have learned something) is removed after it. train.py compiles on a batch of zeros before it opens the data, so
torch.compile's own writes come earlier and the cache stays warm.
"""
import os
from pathlib import Path

SHARED_MEMORY = Path("/dev/shm")


def drop_written_since(folder, cutoff_ns, keep=lambda path, stat: False):
    """Removes every file and link under `folder` changed (ctime, which no process can set back) at or after
    cutoff_ns, unless keep(path, stat), and the folders made then that this leaves empty; returns how many
    files and links it removed. Folders a run made unreadable or read-only are opened up first."""
    removed = 0

    def visit(folder):
        nonlocal removed
        try:
            entries = list(os.scandir(folder))
        except PermissionError:
            try:
                os.chmod(folder, 0o700)
                entries = list(os.scandir(folder))
            except OSError:  # another user's
                return
        except FileNotFoundError:
            return
        for entry in entries:
            try:
                stat = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if entry.is_dir(follow_symlinks=False):
                visit(entry.path)
                if stat.st_ctime_ns >= cutoff_ns and not keep(entry.path, stat) and not os.listdir(entry.path):
                    os.rmdir(entry.path)
            elif stat.st_ctime_ns >= cutoff_ns and not keep(entry.path, stat):
                if not os.access(folder, os.W_OK | os.X_OK):
                    os.chmod(folder, 0o700)
                os.unlink(entry.path)
                removed += 1

    if Path(folder).is_dir() and not Path(folder).is_symlink():
        visit(str(folder))
    return removed


def held_open(under):
    """Paths under `under` that a live process of this user holds open or mapped (/proc)."""
    held, prefix = set(), str(under) + "/"
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith(prefix):
                    held.add(target)
            held |= {line.split(None, 5)[5].strip() for line in (proc / "maps").read_text().splitlines()
                     if prefix in line and len(line.split(None, 5)) == 6}
        except OSError:  # gone meanwhile, or another user's
            continue
    return held


def drop_carryover(train_opened_ns, compile_cache):
    """Removes what the run wrote after it opened its training data where later runs could read it; returns
    the notes for its row (none when it wrote nothing there)."""
    if train_opened_ns is None:
        return []
    # the listener sees the opening a moment after it happened (milliseconds: less than a step to learn in), and
    # anything earlier is torch.compile's, or the rest of the start
    cutoff, notes = train_opened_ns, []
    if compile_cache and (n := drop_written_since(compile_cache, cutoff)):
        notes.append(f"{n} file(s) this run wrote in its compile cache after it opened the training data were "
                     f"removed: they could carry what it learned to later runs (torch.compile before reading "
                     f"data, as train.py does, keeps the cache warm)")
    held = None

    def not_the_runs(path, stat):  # another user's, or in use by a live process (Ray's object store, say)
        nonlocal held
        if stat.st_uid != os.getuid():
            return True
        held = held_open(SHARED_MEMORY) if held is None else held
        return path in held

    if n := drop_written_since(SHARED_MEMORY, cutoff, keep=not_the_runs):
        notes.append(f"{n} file(s) this run left in {SHARED_MEMORY} after it opened the training data were "
                     f"removed: they could carry what it learned to later runs")
    return notes
