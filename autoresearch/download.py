"""
climbmix: the default dataset, karpathy/climbmix-400b-shuffle on Hugging Face (or the mirror in HF_ENDPOINT).
A parallel, resumable, verified download of --num-shards train shards plus the pinned validation shard into a
dataset folder of the cache, with retries for server errors and broken transfers, and a message naming the
offline alternatives when the server cannot be reached at all.
"""

import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import requests

from autoresearch.cachefiles import (Progress, load_manifest, parquet_problem, sha256_of, shard_name,
                                     shard_record, write_json)

HF_REPO = "karpathy/climbmix-400b-shuffle"
CLIMBMIX_TRAIN_SHARDS = 6542  # shard_00000 .. shard_06541
CLIMBMIX_VAL_SHARD = 6542     # shard_06542, pinned as validation: never trained on
DOWNLOAD_ATTEMPTS = 5         # per shard, for server errors and broken transfers
CONNECT_ATTEMPTS = 3          # when the server cannot be reached at all: offline machines must fail in seconds
CONNECT_TIMEOUT, READ_TIMEOUT = 5, 60
BACKOFF_SECONDS = 0.5         # doubled after each failed attempt

# ---------------------------------------------------------------------------
# One shard: where it is, what to say when the server cannot be reached, a resumable fetch with retries


def shard_url(index):
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    return f"{endpoint}/datasets/{HF_REPO}/resolve/main/{shard_name(index)}"


def offline_message(url, reason):
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    return (f"Could not connect to {endpoint} to download {url.rsplit('/', 1)[-1]} ({reason}).\n"
            f"Without internet access, prepare another dataset:\n"
            f"  your own text (.parquet/.jsonl/.txt):  uv run prepare.py --source PATH\n"
            f"  a generated corpus, offline:           uv run prepare.py --dataset synthetic\n"
            f"or download through a Hugging Face mirror: HF_ENDPOINT=https://your-mirror uv run prepare.py")


def connection_reason(error):
    match = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", str(error))
    return match.group(1).strip() if match else type(error).__name__


class TransientError(Exception):
    """A failed attempt worth retrying (server error, broken transfer, corrupt file)."""


def fetch(url, tmp, stop, progress_bytes):
    """Downloads url into tmp, resuming from the bytes already in tmp. Raises TransientError or SystemExit."""
    headers = {"Authorization": f"Bearer {os.environ['HF_TOKEN']}"} if os.environ.get("HF_TOKEN") else {}
    have = tmp.stat().st_size if tmp.exists() else 0
    if have:
        headers["Range"] = f"bytes={have}-"
    with requests.get(url, headers=headers, stream=True, timeout=(CONNECT_TIMEOUT, READ_TIMEOUT)) as r:
        name = url.rsplit("/", 1)[-1]
        if r.status_code == 404:
            raise SystemExit(f"{name} does not exist: HTTP 404 for {url}\n"
                             f"climbmix has train shards 0..{CLIMBMIX_TRAIN_SHARDS - 1} (--num-shards at most "
                             f"{CLIMBMIX_TRAIN_SHARDS}, or -1 for all); check HF_ENDPOINT if you use a mirror.")
        if r.status_code in (401, 403):
            raise SystemExit(f"{name}: access denied (HTTP {r.status_code}) for {url}\n"
                             f"Set a valid Hugging Face token: HF_TOKEN=hf_... uv run prepare.py")
        if r.status_code == 416:  # nothing after our bytes: tmp is complete (killed before the rename) or garbage,
            return                # which the parquet check that follows tells apart
        if r.status_code >= 500 or r.status_code in (408, 429):
            raise TransientError(f"HTTP {r.status_code}")
        if r.status_code >= 400:
            raise SystemExit(f"{name}: HTTP {r.status_code} for {url}")
        resumed = r.status_code == 206
        if resumed and not r.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
            tmp.unlink()
            raise TransientError(f"server resumed at the wrong offset ({r.headers.get('Content-Range')})")
        length = r.headers.get("Content-Length")
        expected = int(length) + (have if resumed else 0) if length else None
        with open(tmp, "ab" if resumed else "wb") as f:
            for chunk in r.iter_content(1 << 16):  # small chunks: a killed download leaves its bytes on disk
                if stop.is_set():
                    return
                f.write(chunk)
                progress_bytes(len(chunk))
    if expected is not None and tmp.stat().st_size != expected:
        raise TransientError(f"transfer ended at {tmp.stat().st_size} of {expected} bytes")


def download_shard(index, folder, stop, progress_bytes, warn):
    url, path = shard_url(index), folder / shard_name(index)
    tmp = path.with_name(path.name + ".tmp")
    error = None
    for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
        if stop.is_set():
            return
        try:
            try:
                fetch(url, tmp, stop, progress_bytes)
            except requests.exceptions.ConnectionError as e:
                if e.request is not None and e.response is None and attempt >= CONNECT_ATTEMPTS:
                    raise SystemExit(offline_message(url, connection_reason(e)))
                raise TransientError(f"connection failed: {connection_reason(e)}")
            except requests.exceptions.RequestException as e:  # broken transfer, read timeout: resume next time
                raise TransientError(f"{type(e).__name__}: {connection_reason(e)}")
            if stop.is_set():
                return
            problem = parquet_problem(tmp)
            if problem is None:
                os.replace(tmp, path)
                return
            tmp.unlink(missing_ok=True)
            raise TransientError(f"downloaded file is corrupt ({problem}); fetching it again")
        except TransientError as e:
            error = e
            if attempt == DOWNLOAD_ATTEMPTS:  # no point waiting (or promising a retry) before giving up
                break
            delay = BACKOFF_SECONDS * 2 ** (attempt - 1)
            warn(str(e), f"{shard_name(index)}: attempt {attempt}/{DOWNLOAD_ATTEMPTS} failed ({e}); "
                         f"retrying in {delay:g}s")
            stop.wait(delay)
    raise SystemExit(f"Could not download {shard_name(index)} from {url} after {DOWNLOAD_ATTEMPTS} attempts "
                     f"(last error: {error}). Run the same command again to resume.")

# ---------------------------------------------------------------------------
# The dataset: the shards not in the cache yet, downloaded in parallel with one progress line; the manifest


def download_climbmix(folder, num_shards, workers):
    """Downloads num_shards train shards (-1: all) and the pinned val shard into `folder`, skipping the ones
    already there, and writes its manifest (which it returns)."""
    if num_shards != -1 and not 1 <= num_shards <= CLIMBMIX_TRAIN_SHARDS:
        raise SystemExit(f"--num-shards {num_shards}: climbmix has {CLIMBMIX_TRAIN_SHARDS} train shards; "
                         f"use 1..{CLIMBMIX_TRAIN_SHARDS}, or -1 for all (e.g. uv run prepare.py --num-shards 10)")
    if workers < 1:
        raise SystemExit(f"--download-workers {workers}: use at least 1 (e.g. --download-workers 8)")
    folder.mkdir(parents=True, exist_ok=True)
    train = list(range(CLIMBMIX_TRAIN_SHARDS if num_shards == -1 else num_shards))
    wanted = train + [CLIMBMIX_VAL_SHARD]
    known = (load_manifest(folder) or {}).get("shards", {})
    # shards of their recorded size would be trusted as they are: their sha256 is checked first, as a
    # same-size corruption (a bad disk, a file overwritten in place) passes both the size and the parquet checks
    sized = {}
    for index in wanted:
        path = folder / shard_name(index)
        if path.exists() and known.get(path.name, {}).get("bytes") == path.stat().st_size:
            sized[index] = path
    if sized:
        print(f"verifying the sha256 of the {len(sized)} shards already in {folder}", flush=True)
    with ThreadPoolExecutor(workers) as pool:  # hashlib releases the GIL: the shards are hashed in parallel
        hashes = dict(zip(sized, pool.map(sha256_of, sized.values())))
    todo = []
    for index in wanted:
        path = folder / shard_name(index)
        if index in hashes:
            if hashes[index] == known[path.name]["sha256"]:
                continue
            print(f"{path.name} in the cache does not match its recorded sha256: fetching it again")
            path.unlink()
        elif path.exists():
            problem = parquet_problem(path)
            if problem is None:
                continue
            print(f"{path.name} in the cache is corrupt ({problem}): fetching it again")
            path.unlink()
        todo.append(index)
    print(f"climbmix: {len(train)} train shards + val shard {shard_name(CLIMBMIX_VAL_SHARD)}; "
          f"{len(wanted) - len(todo)} already in {folder}, {len(todo)} to download with {workers} workers")

    progress, stop, lock = Progress(), threading.Event(), threading.Lock()
    state, warned = {"bytes": 0, "done": 0}, set()
    start = time.time()

    def warn(key, message):  # each distinct failure once: eight workers failing alike is one problem
        with lock:
            if key in warned:
                return
            warned.add(key)
        print(message, flush=True)

    def report(final=False):
        mb = state["bytes"] / 1e6
        progress.show(f"download: {state['done']}/{len(todo)} shards, {mb:.1f} MB, "
                      f"{mb / max(time.time() - start, 1e-6):.1f} MB/s", final)

    def add_bytes(n):
        with lock:
            state["bytes"] += n
        report()

    def one(index):
        download_shard(index, folder, stop, add_bytes, warn)
        if not stop.is_set():
            with lock:
                state["done"] += 1
            report(final=not progress.tty)

    if todo:
        with ThreadPoolExecutor(workers) as pool:
            futures = [pool.submit(one, index) for index in todo]
            try:
                for future in as_completed(futures):
                    future.result()
            except BaseException:
                stop.set()  # the other workers stop at their next chunk
                for future in futures:
                    future.cancel()
                raise
        report(final=True)
    shards, fetched = {}, set(todo)
    for index in wanted:
        name = shard_name(index)
        old = known.get(name)
        path = folder / name
        # a shard fetched again is recorded afresh: the server's file may have changed since the last record
        kept = old and index not in fetched and old["bytes"] == path.stat().st_size
        shards[name] = old if kept else shard_record(path)
    manifest = {"dataset": "climbmix", "source": f"https://huggingface.co/datasets/{HF_REPO}",
                "train": [shard_name(i) for i in train], "val": [shard_name(CLIMBMIX_VAL_SHARD)],
                "split": f"pinned validation shard {shard_name(CLIMBMIX_VAL_SHARD)}", "shards": shards}
    write_json(folder / "manifest.json", manifest)
    return manifest
