"""
What a run did to the data its number is measured on, by the kernel's word (Linux inotify): which files of the
validation split it opened (their tokens and offsets, the pristine copies beside them, the raw val shards they
came from, for every dataset and profile in the cache, and a single loop's evaluator's own copy), and which
of the metric's files it wrote. Under the harness train.py has no reason to open any of them (the evaluator
scores the model it hands over, from that copy, after train.py ended), so a run that did looked at, or trained
on, the text it is judged on. Also when it first opened its training data: what it wrote after that can hold
what it learned (carryover.py). Elsewhere nothing is watched.
"""
import ctypes
import ctypes.util
import json
import os
import select
import struct
import threading
import time
from pathlib import Path

from autoresearch.metricdata import METRIC_FILES, PRISTINE

IN_MODIFY, IN_ATTRIB, IN_OPEN, IN_Q_OVERFLOW = 0x2, 0x4, 0x20, 0x4000
VAL_FILES = ("val.bin", "val.offsets.npy")
TRAIN_FILES = ("train.bin", "train.offsets.npy")
EVENT = struct.Struct("iIII")


def cache_dir(env):
    """The cache a run reads (prepare.py's layout), from the environment it runs in."""
    return Path(env.get("AUTORESEARCH_CACHE_DIR") or "~/.cache/autoresearch").expanduser()


def watched_files(cache, copy=None):
    """{path: mask}: every val split's files in the cache and in the evaluator's copy (opened: IN_OPEN) and the
    metric's other files (written: IN_MODIFY and friends)."""
    files = {}
    for prepared in [*cache.glob("prepared/*/*"), *([Path(copy)] if copy else [])]:
        for folder in (prepared, prepared / PRISTINE):
            for name in METRIC_FILES:
                if (folder / name).is_file():
                    files[folder / name] = IN_OPEN if name in VAL_FILES else IN_MODIFY | IN_ATTRIB
    for manifest in cache.glob("datasets/*/manifest.json"):
        try:
            shards = json.loads(manifest.read_text()).get("val", [])
        except (OSError, ValueError):
            continue
        files.update({manifest.parent / s: IN_OPEN for s in shards if (manifest.parent / s).is_file()})
    return files


def training_files(cache):
    """Every train split's files in the cache: its tokens and offsets, and the raw shards they came from."""
    files = [prepared / name for prepared in cache.glob("prepared/*/*") for name in TRAIN_FILES
             if (prepared / name).is_file()]
    for manifest in cache.glob("datasets/*/manifest.json"):
        try:
            shards = json.loads(manifest.read_text()).get("train", [])
        except (OSError, ValueError):
            continue
        files += [manifest.parent / s for s in shards if (manifest.parent / s).is_file()]
    return files


class DataWatch:
    """with DataWatch(cache, copy) as w: ...; then w.opened (val files opened) and w.written (metric files
    written), each a sorted list of paths, or None where inotify is not available; and w.train_opened_ns, the
    time (time.time_ns) a thread saw the first opening of a training file, None if there was none (the start of the
    watch where that was learned only at the end, or the kernel dropped events: w.seen_as_it_happened). copy: the
    evaluator's copy of the metric's files (metricdata.evaluation_copy), or None. on_train_opened: called by that
    thread right after it saw that opening (not when it learns of one only at the end)."""

    def __init__(self, cache, copy=None, on_train_opened=None):
        self.cache, self.copy, self.fd, self.paths, self.opened, self.written = cache, copy, None, {}, None, None
        # blind: some opening may have gone unseen (no watch on a file, the listener failed)
        self.on_train_opened, self.seen_as_it_happened, self.blind = on_train_opened, False, False
        self.train_wds, self.train_opened_ns, self.started_ns, self.events = set(), None, time.time_ns(), []
        self.listener, self.stop = None, None

    def __enter__(self):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        if not hasattr(libc, "inotify_init1"):
            return self
        fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            return self
        self.fd = fd
        for path, mask in watched_files(self.cache, self.copy).items():
            wd = libc.inotify_add_watch(fd, str(path).encode(), mask)
            if wd >= 0:
                self.paths[wd] = (path, mask)
        for path in training_files(self.cache):
            wd = libc.inotify_add_watch(fd, str(path).encode(), IN_OPEN)
            if wd >= 0:
                self.train_wds.add(wd)
            else:  # out of watches, say: an opening of this file would go unseen, so count one at the start
                self.train_opened_ns, self.blind = time.time_ns(), True
        self.started_ns = time.time_ns()
        self.stop = os.pipe()
        self.listener = threading.Thread(target=self.listen, daemon=True)
        self.listener.start()
        return self

    @property
    def watching(self):
        """Whether inotify watched the run (Linux)."""
        return self.fd is not None

    def listen(self):
        """Reads events as they come, to time the first opening of a training file (inotify gives no times)."""
        poller = select.poll()  # not select(): it refuses descriptors past 1023, which a busy loop may hold
        poller.register(self.fd, select.POLLIN)
        poller.register(self.stop[0], select.POLLIN)
        try:
            while True:
                ready = {fd for fd, _ in poller.poll()}
                if self.fd in ready:
                    self.read_events()
                if self.stop[0] in ready:
                    return
        except (OSError, ValueError):  # blind from here on: as if the data had been opened when the watch began
            self.blind = True
            if self.train_opened_ns is None:
                self.train_opened_ns = self.started_ns

    def read_events(self, at_exit=False):
        """Adds what the kernel has queued to self.events."""
        try:
            while chunk := os.read(self.fd, 65536):
                at = 0
                while at + EVENT.size <= len(chunk):
                    wd, mask, _, length = EVENT.unpack_from(chunk, at)
                    at += EVENT.size + length
                    self.events.append((wd, mask))
                    training = wd in self.train_wds and mask & IN_OPEN
                    if self.train_opened_ns is None and (training or mask & IN_Q_OVERFLOW):
                        # read only at the end, or after the kernel dropped events: it may have been at any time
                        # since the watch began
                        late = at_exit or mask & IN_Q_OVERFLOW
                        self.train_opened_ns = self.started_ns if late else time.time_ns()
                        self.seen_as_it_happened = not late
                        if not late and self.on_train_opened:
                            self.on_train_opened()
        except BlockingIOError:
            pass

    def __exit__(self, *exc):
        if self.fd is None:
            return False
        try:
            os.write(self.stop[1], b"x")
            self.listener.join()
            self.read_events(at_exit=True)
        finally:
            os.close(self.fd)
            for end in self.stop:
                os.close(end)
        opened, written = set(), set()
        for wd, mask in self.events:
            if mask & IN_Q_OVERFLOW:  # so many events that the kernel dropped some: everything may have been
                opened |= {str(p) for p, m in self.paths.values() if m == IN_OPEN}
                written |= {str(p) for p, m in self.paths.values() if m != IN_OPEN}
            elif wd in self.paths and mask & self.paths[wd][1]:  # not IN_IGNORED: a restore deletes the file
                path, watched = self.paths[wd]
                (opened if watched == IN_OPEN else written).add(str(path))
        self.opened, self.written = sorted(opened), sorted(written)
        return False
