"""
What a run did to the data its number is measured on, by the kernel's word (Linux inotify): which files of the
validation split it opened (their tokens and offsets, the pristine copies beside them, the raw val shards they
came from, for every dataset and profile in the cache, and a single loop's evaluator's own copy), and which
of the metric's files it wrote. Under the harness train.py has no reason to open any of them (the evaluator
scores the model it hands over, from that copy, after train.py ended), so a run that did looked at, or trained
on, the text it is judged on. Elsewhere nothing is watched.
"""
import ctypes
import ctypes.util
import json
import os
import struct
from pathlib import Path

from autoresearch.metricdata import METRIC_FILES, PRISTINE

IN_MODIFY, IN_ATTRIB, IN_OPEN, IN_Q_OVERFLOW = 0x2, 0x4, 0x20, 0x4000
VAL_FILES = ("val.bin", "val.offsets.npy")
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


class DataWatch:
    """with DataWatch(cache, copy) as w: ...; then w.opened (val files opened) and w.written (metric files
    written), each a sorted list of paths, or None where inotify is not available. copy: the evaluator's copy
    of the metric's files (metricdata.evaluation_copy), or None."""

    def __init__(self, cache, copy=None):
        self.cache, self.copy, self.fd, self.paths, self.opened, self.written = cache, copy, None, {}, None, None

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
        return self

    def __exit__(self, *exc):
        if self.fd is None:
            return False
        data = b""
        try:
            while chunk := os.read(self.fd, 65536):
                data += chunk
        except BlockingIOError:
            pass
        finally:
            os.close(self.fd)
        opened, written, at = set(), set(), 0
        while at + EVENT.size <= len(data):
            wd, mask, _, length = EVENT.unpack_from(data, at)
            at += EVENT.size + length
            if mask & IN_Q_OVERFLOW:  # so many events that the kernel dropped some: everything may have been
                opened |= {str(p) for p, m in self.paths.values() if m == IN_OPEN}
                written |= {str(p) for p, m in self.paths.values() if m != IN_OPEN}
            elif wd in self.paths and mask & self.paths[wd][1]:  # not IN_IGNORED: a restore deletes the file
                path, watched = self.paths[wd]
                (opened if watched == IN_OPEN else written).add(str(path))
        self.opened, self.written = sorted(opened), sorted(written)
        return False
