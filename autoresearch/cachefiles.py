"""
The files prepare.py writes in its cache, and how: parquet shards (names, checks, sha256 records), a dataset's
manifest.json, atomic JSON writes, and folders rebuilt whole, so that an interrupted prepare never leaves a
half-written one. Also the one-line progress display that the download, tokenizer and tokenizing steps share.
Callers pass folders: the cache layout itself (which folder holds what) is defined in prepare.py.
"""

import contextlib
import hashlib
import json
import os
import shutil
import sys
import threading
import time

FORMAT_VERSION = 1  # bump to invalidate every prepared artifact

# ---------------------------------------------------------------------------
# Progress: one status line, rewritten in place on a terminal, printed every few seconds in a log


class Progress:
    def __init__(self, every=5.0):
        self.tty = sys.stdout.isatty()
        self.every = 0.2 if self.tty else every  # seconds between updates
        self.last = 0.0
        self.lock = threading.Lock()

    def show(self, text, final=False):
        with self.lock:
            now = time.time()
            if not final and now - self.last < self.every:
                return
            self.last = now
            if self.tty:
                print(f"\r\033[K{text}", end="\n" if final else "", flush=True)
            else:
                print(text, flush=True)

# ---------------------------------------------------------------------------
# Writing safely: JSON replaced atomically, folders rebuilt beside the old one and swapped in when complete


def write_json(path, obj):
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


@contextlib.contextmanager
def rebuilding(folder):
    """A fresh work folder that replaces `folder` when the block succeeds and is deleted when it fails: an
    interrupted prepare leaves the old folder or the new one, never a half-written one."""
    work = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        yield work
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(work, folder)

# ---------------------------------------------------------------------------
# Shards and manifests: a dataset folder holds shard_NNNNN.parquet files (one document per row, column `text`)
# and manifest.json (train/val split, sha256 and size per shard)


def shard_name(index):
    return f"shard_{index:05d}.parquet"


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def parquet_problem(path):
    """None if `path` is a readable parquet file with a `text` column, else what is wrong with it."""
    import pyarrow.parquet as pq  # here and below: every command of the loop imports this module, few need it
    try:
        names = pq.ParquetFile(path).schema_arrow.names
    except Exception as e:  # pyarrow raises several types for truncated or corrupt files
        return f"not a readable parquet file: {e}"
    return None if "text" in names else f"no 'text' column (columns: {', '.join(names)})"


def shard_record(path):
    import pyarrow.parquet as pq
    return {"sha256": sha256_of(path), "bytes": path.stat().st_size,
            "documents": pq.ParquetFile(path).metadata.num_rows}


def load_manifest(folder):
    """The manifest of the dataset in `folder`, or None when it has none yet."""
    path = folder / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else None


def write_shard(path, docs):
    import pyarrow as pa
    import pyarrow.parquet as pq
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.table({"text": pa.array(docs, pa.string())}), tmp, compression="zstd", row_group_size=1024)
    os.replace(tmp, path)


def write_dataset(folder, shards, manifest):
    """Writes shards ((filename, docs) pairs, consumed one at a time) and the manifest of a dataset into a
    fresh folder that then replaces `folder`. The manifest's train/val lists may be filled in while shards are
    read."""
    with rebuilding(folder) as work:
        for filename, docs in shards:
            write_shard(work / filename, docs)
        manifest["shards"] = {f: shard_record(work / f) for f in manifest["train"] + manifest["val"]}
        write_json(work / "manifest.json", manifest)
    return manifest
