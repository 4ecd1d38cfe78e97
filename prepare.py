"""
prepare.py: the fixed part of autoresearch that no agent edits. It downloads or builds the data, trains the
tokenizer, pre-tokenizes the documents, and defines the dataloader and the metric (evaluate_bpb) that make two
experiments comparable. Profile (reference | cpu | smoke) from AUTORESEARCH_PROFILE, cache in AUTORESEARCH_CACHE_DIR.

    uv run prepare.py                           # climbmix from Hugging Face: 10 train shards + the pinned val shard
    uv run prepare.py --dataset synthetic       # offline, generated in seconds
    uv run prepare.py --source ~/my-corpus      # your own .parquet / .jsonl / .txt files
"""

import argparse
import contextlib
import glob
import hashlib
import itertools
import json
import math
import os
import pickle
import random
import re
import shlex
import shutil
import sys
import threading
import time
from bisect import bisect_right, insort
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import requests
import rustbpe
import tiktoken
# torch is imported inside the functions that need it: it takes seconds to import and the prepare CLI never does

# ---------------------------------------------------------------------------
# Profiles and constants

# TOKENIZER_MAX_CHARS: train text the tokenizer learns from. TRAIN_MAX_TOKENS: train tokens pre-tokenized, several
# runs' worth (a 300 s run reads ~500M tokens on an H100, ~10M on 2 CPU cores); the val split is pre-tokenized up
# to 2 * EVAL_TOKENS, all that evaluation reads.
PROFILES = {
    #            MAX_SEQ_LEN  TIME_BUDGET  EVAL_TOKENS   VOCAB_SIZE  TOKENIZER_MAX_CHARS  TRAIN_MAX_TOKENS
    "reference": (2048,       300,         40 * 524288,  8192,       2_000_000_000,       2_000_000_000),
    "cpu":       (256,        300,         2**20,        8192,       100_000_000,         50_000_000),
    "smoke":     (128,        15,          2**15,        1024,       5_000_000,           5_000_000),
}
SPECIAL_TOKENS = ["<|bos|>", "<|reserved_1|>", "<|reserved_2|>", "<|reserved_3|>"]  # first one is BOS
# GPT-4's split pattern, except numbers split into groups of at most 2 digits (saves vocab for a small tokenizer)
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
TOKENIZER_DOC_CHARS = 10_000  # longer documents are truncated for tokenizer training only: they add little variety
TXT_DOC_CHARS = 4_000         # .txt sources: paragraphs are merged into documents of about this size
PACKING_BUFFER = 1000         # documents the packer chooses from: larger packs tighter but picks slower
FORMAT_VERSION = 1            # bump to invalidate every prepared artifact

HF_REPO = "karpathy/climbmix-400b-shuffle"
CLIMBMIX_TRAIN_SHARDS = 6542  # shard_00000 .. shard_06541
CLIMBMIX_VAL_SHARD = 6542     # shard_06542, pinned as validation: never trained on
DOWNLOAD_ATTEMPTS = 5         # per shard, for server errors and broken transfers
CONNECT_ATTEMPTS = 3          # when the server cannot be reached at all: offline machines must fail in seconds
CONNECT_TIMEOUT, READ_TIMEOUT = 5, 60
BACKOFF_SECONDS = 0.5         # doubled after each failed attempt

SYNTHETIC_DOCS = {"train": 5000, "val": 500}  # ~7 MB + 0.7 MB of text
SYNTHETIC_SEEDS = {"train": 1, "val": 2}


def resolve_profile():
    name = os.environ.get("AUTORESEARCH_PROFILE", "")
    if not name:
        import torch
        name = "reference" if torch.cuda.is_available() else "cpu"
        print(f"\n*** AUTORESEARCH_PROFILE is not set: using the '{name}' profile "
              f"({'CUDA is available' if name == 'reference' else 'no CUDA GPU found'}). "
              f"Set AUTORESEARCH_PROFILE=reference|cpu|smoke to choose. ***\n", file=sys.stderr)
    elif name not in PROFILES:
        raise SystemExit(f"AUTORESEARCH_PROFILE={name!r} is not a profile; valid ones: {', '.join(PROFILES)} "
                         f"(e.g. AUTORESEARCH_PROFILE=cpu uv run train.py)")
    return name


PROFILE = resolve_profile()
MAX_SEQ_LEN, TIME_BUDGET, EVAL_TOKENS, VOCAB_SIZE, TOKENIZER_MAX_CHARS, TRAIN_MAX_TOKENS = PROFILES[PROFILE]

# ---------------------------------------------------------------------------
# Cache layout: raw shards per dataset, artifacts per dataset and profile, the active dataset per profile
#   CACHE_DIR/datasets/<dataset>/shard_NNNNN.parquet + manifest.json (sha256 per shard, train/val split)
#   CACHE_DIR/prepared/<dataset>/<profile>/tokenizer.pkl, token_bytes.npy, {train,val}.bin + .offsets.npy, meta.json
#   CACHE_DIR/prepared/active-<profile>.txt: the dataset last prepared for that profile

CACHE_DIR = Path(os.environ.get("AUTORESEARCH_CACHE_DIR") or "~/.cache/autoresearch").expanduser()


def dataset_dir(name):
    return CACHE_DIR / "datasets" / name


def prepared_dir(name, profile=None):
    return CACHE_DIR / "prepared" / name / (profile or PROFILE)


def active_file(profile):
    return CACHE_DIR / "prepared" / f"active-{profile}.txt"


def read_active_dataset(profile):
    path = active_file(profile)
    return (path.read_text().strip() or None) if path.exists() else None


def load_manifest(name):
    path = dataset_dir(name) / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else None


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


def prepare_command(dataset):
    """The command that prepares `dataset` for the active profile (for error messages)."""
    args = ""
    if dataset == "synthetic":
        args = " --dataset synthetic"
    elif dataset not in (None, "climbmix"):
        manifest = load_manifest(dataset)
        args = " --source " + (shlex.quote(manifest["source"]) if manifest else "PATH")
    return f"AUTORESEARCH_PROFILE={PROFILE} uv run prepare.py{args}"


DATASET = os.environ.get("AUTORESEARCH_DATASET") or read_active_dataset(PROFILE)

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


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def parquet_problem(path):
    """None if `path` is a readable parquet file with a `text` column, else what is wrong with it."""
    try:
        names = pq.ParquetFile(path).schema_arrow.names
    except Exception as e:  # pyarrow raises several types for truncated or corrupt files
        return f"not a readable parquet file: {e}"
    return None if "text" in names else f"no 'text' column (columns: {', '.join(names)})"


def shard_record(path):
    return {"sha256": sha256_of(path), "bytes": path.stat().st_size,
            "documents": pq.ParquetFile(path).metadata.num_rows}

# ---------------------------------------------------------------------------
# climbmix: parallel, resumable, verified download from Hugging Face (or the mirror in HF_ENDPOINT)


def shard_name(index):
    return f"shard_{index:05d}.parquet"


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
            delay = BACKOFF_SECONDS * 2 ** (attempt - 1)
            warn(str(e), f"{shard_name(index)}: attempt {attempt}/{DOWNLOAD_ATTEMPTS} failed ({e}); "
                         f"retrying in {delay:g}s")
            stop.wait(delay)
    raise SystemExit(f"Could not download {shard_name(index)} from {url} after {DOWNLOAD_ATTEMPTS} attempts "
                     f"(last error: {error}). Run the same command again to resume.")


def download_climbmix(num_shards, workers):
    if num_shards != -1 and not 1 <= num_shards <= CLIMBMIX_TRAIN_SHARDS:
        raise SystemExit(f"--num-shards {num_shards}: climbmix has {CLIMBMIX_TRAIN_SHARDS} train shards; "
                         f"use 1..{CLIMBMIX_TRAIN_SHARDS}, or -1 for all (e.g. uv run prepare.py --num-shards 10)")
    if workers < 1:
        raise SystemExit(f"--download-workers {workers}: use at least 1 (e.g. --download-workers 8)")
    folder = dataset_dir("climbmix")
    folder.mkdir(parents=True, exist_ok=True)
    train = list(range(CLIMBMIX_TRAIN_SHARDS if num_shards == -1 else num_shards))
    wanted = train + [CLIMBMIX_VAL_SHARD]
    known = (load_manifest("climbmix") or {}).get("shards", {})
    todo = []
    for index in wanted:
        path = folder / shard_name(index)
        if path.exists() and known.get(path.name, {}).get("bytes") == path.stat().st_size:
            continue
        if path.exists():
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
    shards = {}
    for index in wanted:
        name = shard_name(index)
        old = known.get(name)
        path = folder / name
        shards[name] = old if old and old["bytes"] == path.stat().st_size else shard_record(path)
    manifest = {"dataset": "climbmix", "source": f"https://huggingface.co/datasets/{HF_REPO}",
                "train": [shard_name(i) for i in train], "val": [shard_name(CLIMBMIX_VAL_SHARD)],
                "split": f"pinned validation shard {shard_name(CLIMBMIX_VAL_SHARD)}", "shards": shards}
    write_json(folder / "manifest.json", manifest)
    return manifest

# ---------------------------------------------------------------------------
# --source: local .parquet / .jsonl / .txt files, converted into parquet shards in the cache

SOURCE_SUFFIXES = (".parquet", ".jsonl", ".txt")


def find_source_files(spec):
    path = Path(spec).expanduser()
    if any(c in spec for c in "*?["):
        files = [Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True)]
    elif path.is_dir():
        files = list(path.rglob("*"))
    elif path.is_file():
        files = [path]
    else:
        raise SystemExit(f"--source {spec}: no such file or folder. Give a folder, a file or a glob of "
                         f".parquet/.jsonl/.txt files, e.g. uv run prepare.py --source ~/corpus")
    cache = CACHE_DIR.resolve()  # the cache's own shards are never a source, e.g. with the cache inside the folder
    files = sorted((f for f in files if f.is_file() and f.suffix.lower() in SOURCE_SUFFIXES
                    and cache not in f.resolve().parents), key=str)
    if not files:
        raise SystemExit(f"--source {spec}: no .parquet, .jsonl or .txt files there (files in the cache {CACHE_DIR} "
                         f"do not count). Point it at your text, e.g. uv run prepare.py --source ~/corpus/*.jsonl")
    return files


def source_name(spec):
    """A dataset name from the path: its last component without glob characters."""
    parts = [p for p in Path(spec).expanduser().parts if not any(c in p for c in "*?[")]
    last = Path(*parts).resolve() if parts else Path.cwd()
    name = re.sub(r"[^a-z0-9._-]+", "-", (last.stem if last.is_file() else last.name).lower()).strip("-.") or "source"
    return f"source-{name}" if name in ("climbmix", "synthetic") else name


def split_paragraphs(text):
    """Documents of a .txt file: paragraphs (split at blank lines) merged up to TXT_DOC_CHARS characters."""
    docs, current = [], ""
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = paragraph.strip()
        if not paragraph:
            continue
        if current and len(current) + len(paragraph) + 2 > TXT_DOC_CHARS:
            docs.append(current)
            current = ""
        current = f"{current}\n\n{paragraph}" if current else paragraph
    return docs + [current] if current else docs


def read_documents(path, retry):
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        problem = parquet_problem(path)
        if problem:
            raise SystemExit(f"{path}: {problem}. --source needs parquet files with a string column named "
                             f"'text' (one document per row): rename the column holding your documents, then run: "
                             f"{retry}")
        docs = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    elif suffix == ".jsonl":
        docs = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SystemExit(f"{path}:{lineno}: not valid JSON ({e}). --source needs one JSON object "
                                     f'per line, like {{"text": "..."}}; fix the file, then run: {retry}')
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise SystemExit(f'{path}:{lineno}: no string field "text". --source needs one JSON object '
                                     f'per line, like {{"text": "..."}}; fix the file, then run: {retry}')
                docs.append(record["text"])
    else:
        docs = split_paragraphs(path.read_text(encoding="utf-8", errors="replace"))
    return [d for d in docs if d and d.strip()]


def write_shard(path, docs):
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.table({"text": pa.array(docs, pa.string())}), tmp, compression="zstd", row_group_size=1024)
    os.replace(tmp, path)


def write_dataset(name, shards, manifest):
    """Writes shards ((filename, docs) pairs, consumed one at a time) and the manifest of a dataset into a fresh
    folder that then replaces the old one. The manifest's train/val lists may be filled in while shards are read."""
    with rebuilding(dataset_dir(name)) as work:
        for filename, docs in shards:
            write_shard(work / filename, docs)
        manifest["shards"] = {f: shard_record(work / f) for f in manifest["train"] + manifest["val"]}
        write_json(work / "manifest.json", manifest)
    return manifest


def import_source(spec):
    files = find_source_files(spec)
    name = source_name(spec)
    fingerprint = [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    manifest = load_manifest(name)
    if manifest and manifest.get("files") == fingerprint and manifest.get("format") == FORMAT_VERSION:
        print(f"source: {len(files)} files unchanged since the last import into {dataset_dir(name)}")
        return name, manifest
    print(f"source: reading {len(files)} files from {spec}")
    retry = f"uv run prepare.py --source {shlex.quote(spec)}"
    if len(files) >= 2:
        split = f"the last file in sorted order is validation: {files[-1]}"
    else:
        split = "single file: its last 10% of documents (at least 1) are validation"
    manifest = {"dataset": name, "source": os.path.abspath(os.path.expanduser(spec)), "files": fingerprint,
                "format": FORMAT_VERSION, "train": [], "val": [], "split": split}
    counts = {"train": 0, "val": 0}

    def shards():  # one input file in memory at a time
        for i, path in enumerate(files):
            docs = read_documents(path, retry)
            print(f"  {path}: {len(docs)} documents")
            if len(files) == 1:
                if len(docs) < 2:
                    raise SystemExit(f"{path} holds {len(docs)} documents; a train/val split needs at least 2. "
                                     f"Add text (or more files: the last one becomes validation), then run: {retry}")
                n_val = max(1, len(docs) // 10)
                parts = [("train", docs[:-n_val]), ("val", docs[-n_val:])]
            elif i == len(files) - 1:
                if not docs:
                    raise SystemExit(f"{path} holds no documents, but the last file (sorted) is the validation "
                                     f"split. Add text to it or remove it, then run: {retry}")
                parts = [("val", docs)]
            else:
                parts = [("train", docs)] if docs else []
            for role, part in parts:
                filename = shard_name(len(manifest["train"]) + len(manifest["val"]))
                manifest[role].append(filename)
                counts[role] += len(part)
                yield filename, part
        if not manifest["train"]:
            raise SystemExit(f"--source {spec}: no training documents (every file but the validation one is "
                             f"empty). Add text, then run: {retry}")

    write_dataset(name, shards(), manifest)
    print(f"split: {split}\n  train: {counts['train']} documents in {len(manifest['train'])} shards, "
          f"val: {counts['val']} documents")
    return name, manifest

# ---------------------------------------------------------------------------
# synthetic: generated stories with consistent entities, facts and arithmetic that a small model can learn

SYL = "ka lo mi ra to su ne pa di vo la be ri mo ta fi no se gu ha zo ve".split()
KINDS = "child fox rabbit robot farmer baker dragon sailor owl painter knight".split()
ADJS = "little brave quiet clever happy sleepy curious kind tall tiny old young".split()
COLORS = "red blue green yellow purple orange white black silver golden".split()
ANIMALS = "cat dog bird frog horse goat duck mouse turtle pony".split()
ITEMS = "apples stones books coins shells cookies flowers pencils eggs marbles".split()
FOODS = "soup bread cheese honey rice pie plums noodles berries cake".split()
SPOTS = "market forest river hill garden library beach bridge tower farm".split()
THINGS = "lamp key map box drum hat kite ring boat bell".split()
FURNITURE = "table bed chair shelf door window rug stairs".split()
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
NUMBER_WORDS = "zero one two three four five six seven eight nine ten".split()


def _places():
    """Fixed facts shared by every document (seed 0): each town has one river color and one favourite food."""
    rng = random.Random(0)
    names = sorted({(rng.choice(SYL) + rng.choice(SYL)).capitalize() + rng.choice(["ton", "vale", "ford", "by"])
                    for _ in range(40)})
    return {name: (rng.choice(COLORS), rng.choice(FOODS)) for name in names}


PLACES = _places()


def synthetic_name(rng):
    name = "".join(rng.choice(SYL) for _ in range(rng.choice((2, 2, 3)))).capitalize()
    # pronouns follow the last letter, a rule a model can pick up
    return name, ("she", "her", "She") if name[-1] in "aei" else ("he", "his", "He")


def synthetic_story(rng):
    hero, (he, his, He) = synthetic_name(rng)
    pet = rng.choice(ANIMALS)
    friend, _ = synthetic_name(rng)
    town = rng.choice(list(PLACES))
    river, food = PLACES[town]
    day = rng.randrange(7)
    out = [f"Once upon a time, there was a {rng.choice(ADJS)} {rng.choice(KINDS)} named {hero} who lived in {town}.",
           f"{He} had a {rng.choice(COLORS)} {pet} called {friend}."]
    for _ in range(rng.randint(6, 14)):
        kind = rng.randrange(8)
        if kind == 0:
            a, b = rng.randint(1, 20), rng.randint(1, 20)
            item = rng.choice(ITEMS)
            out.append(f"{hero} had {a} {item}. {He} found {b} more, so now {he} had {a + b} {item}.")
        elif kind == 1:
            a = rng.randint(2, 30)
            b = rng.randint(1, a - 1)
            item = rng.choice(ITEMS)
            out.append(f"{hero} had {a} {item} and gave {b} to {friend}. Now {hero} had {a - b} {item} left.")
        elif kind == 2:
            start = rng.randint(1, 90)
            out.append(f"{hero} counted the {rng.choice(ITEMS)}: "
                       + ", ".join(str(n) for n in range(start, start + rng.randint(3, 8))) + ".")
        elif kind == 3:
            out.append(f"On {DAYS[day]}, {hero} and the {pet} went to the {rng.choice(SPOTS)}. "
                       f"The next day was {DAYS[(day + 1) % 7]}.")
            day = (day + 1) % 7
        elif kind == 4:
            out.append(f"In {town}, the river is always {river}, and everyone loves {food}.")
        elif kind == 5:
            thing = rng.choice(THINGS)
            out.append(f'"Where is my {thing}?" asked {hero}. "Your {thing} is under the '
                       f'{rng.choice(FURNITURE)}," said {friend}.')
        elif kind == 6:
            n = rng.randint(1, 9)
            out.append(f"{He} saw {NUMBER_WORDS[n]} {rng.choice(ANIMALS)}s, and then {NUMBER_WORDS[n + 1]}.")
        else:
            out.append(f"{hero} ate some {food} with {his} {pet}. It was {rng.choice(ADJS)} and good.")
    out.append(f"At the end of the day, {hero} went home to {town} and slept. The end.")
    return " ".join(out)


def synthetic_worksheet(rng):
    lines = [f"Worksheet {rng.randint(1, 99)}."]
    for _ in range(rng.randint(5, 15)):
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        lines.append(f"Q: {a} + {b} = ? A: {a + b}" if rng.random() < 0.6 else
                     f"Q: {max(a, b)} - {min(a, b)} = ? A: {max(a, b) - min(a, b)}")
    return "\n".join(lines)


def synthetic_documents(split):
    rng = random.Random(SYNTHETIC_SEEDS[split])
    return [synthetic_worksheet(rng) if rng.random() < 0.15 else "\n\n".join(
        synthetic_story(rng) for _ in range(rng.randint(1, 3))) for _ in range(SYNTHETIC_DOCS[split])]


def make_synthetic():
    manifest = load_manifest("synthetic")
    recipe = {"docs": SYNTHETIC_DOCS, "seeds": SYNTHETIC_SEEDS, "format": FORMAT_VERSION}
    if manifest and manifest.get("recipe") == recipe:
        print(f"synthetic: already generated in {dataset_dir('synthetic')}")
        return manifest
    shards = [(shard_name(0), synthetic_documents("train")), (shard_name(1), synthetic_documents("val"))]
    print(f"synthetic: generated {SYNTHETIC_DOCS['train']} train + {SYNTHETIC_DOCS['val']} val documents, "
          f"{sum(len(d) for _, docs in shards for d in docs) / 1e6:.1f}M characters")
    manifest = {"dataset": "synthetic", "source": "generated by prepare.py", "recipe": recipe,
                "train": [shard_name(0)], "val": [shard_name(1)],
                "split": f"separate generator seeds: train {SYNTHETIC_SEEDS['train']}, val {SYNTHETIC_SEEDS['val']}"}
    return write_dataset("synthetic", shards, manifest)

# ---------------------------------------------------------------------------
# Tokenizer: BPE trained with rustbpe on the train split, saved as a tiktoken encoding


def iter_texts(folder, files, batch_size=1024):
    """Batches of document texts from parquet shards, in order."""
    for filename in files:
        for batch in pq.ParquetFile(folder / filename).iter_batches(batch_size=batch_size, columns=["text"]):
            if texts := [t for t in batch.column(0).to_pylist() if t]:
                yield texts


def train_tokenizer(folder, files, vocab_size, max_chars):
    """Returns the tiktoken Encoding and what the training took (chars, seconds)."""
    progress, start, seen = Progress(every=10), time.time(), 0

    def texts():
        nonlocal seen
        for batch in iter_texts(folder, files):
            for text in batch:
                text = text[:min(TOKENIZER_DOC_CHARS, max_chars - seen)]
                seen += len(text)
                yield text
                if seen >= max_chars:
                    break
            progress.show(f"tokenizer: read {seen / 1e6:.1f}M of at most {max_chars / 1e6:.0f}M characters, "
                          f"{time.time() - start:.1f}s")
            if seen >= max_chars:
                break
        progress.show(f"tokenizer: read {seen / 1e6:.1f}M characters; computing merges", final=True)

    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(texts(), vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    ranks = {bytes(token): rank for token, rank in bpe.get_mergeable_ranks()}
    specials = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
    enc = tiktoken.Encoding(name="autoresearch", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks,
                            special_tokens=specials)
    if enc.n_vocab < vocab_size:
        print(f"note: the training text only supports {enc.n_vocab} of {vocab_size} tokens (too few distinct pairs)")
    check_round_trip(enc)
    return enc, seen, time.time() - start


def check_round_trip(enc):
    sample = "Hello, wörld! naïve café — 東京タワー 🚀👩‍💻 x=42; def f(a): return a**2  \n\tÅngström ∑ 1234"
    decoded = enc.decode(enc.encode_ordinary(sample))
    if decoded != sample:
        raise RuntimeError(f"tokenizer round trip failed: {sample!r} came back as {decoded!r}")


def token_byte_lengths(enc):
    n_ranks = enc.n_vocab - len(SPECIAL_TOKENS)  # the special tokens come last and count 0 bytes
    return np.array([len(enc.decode_single_token_bytes(i)) for i in range(n_ranks)] + [0] * len(SPECIAL_TOKENS),
                    dtype=np.int32)


class Tokenizer:
    """A tiktoken encoding plus the folder of token data it belongs to."""

    def __init__(self, enc, directory=None):
        self.enc = enc
        self.directory = Path(directory) if directory else None
        self.bos_token_id = enc.encode_single_token(SPECIAL_TOKENS[0])

    @classmethod
    def from_directory(cls, directory=None):
        if directory is None:
            if DATASET is None:
                raise FileNotFoundError(f"No dataset is prepared for the '{PROFILE}' profile in {CACHE_DIR}. "
                                        f"Prepare one: {prepare_command(None)}")
            directory = prepared_dir(DATASET)
        path = Path(directory) / "tokenizer.pkl"
        if not path.exists():
            raise FileNotFoundError(f"No tokenizer at {path}. Prepare it: {prepare_command(DATASET)}")
        with open(path, "rb") as f:
            return cls(pickle.load(f), directory)

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_bos_token_id(self):
        return self.bos_token_id

    def encode(self, text, prepend=None, num_threads=8):
        if prepend is not None and not isinstance(prepend, int):
            prepend = self.enc.encode_single_token(prepend)
        first = [] if prepend is None else [prepend]
        if isinstance(text, str):
            return first + self.enc.encode_ordinary(text)
        return [first + ids for ids in self.enc.encode_ordinary_batch(text, num_threads=num_threads)]

    def decode(self, ids):
        return self.enc.decode(ids)


def get_token_bytes(device="cpu", directory=None):
    """UTF-8 byte length of every token (0 for the special tokens), for bits per byte."""
    import torch
    if directory is None and DATASET is not None:
        directory = prepared_dir(DATASET)
    if directory is None or not (Path(directory) / "token_bytes.npy").exists():
        raise FileNotFoundError(f"No token byte lengths prepared for the '{PROFILE}' profile. "
                                f"Prepare them: {prepare_command(DATASET)}")
    return torch.from_numpy(np.load(Path(directory) / "token_bytes.npy")).to(device)

# ---------------------------------------------------------------------------
# Pre-tokenization: every document once, BOS first, into <split>.bin (uint16 tokens) + <split>.offsets.npy


def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def write_token_split(directory, split, batches, dtype):
    """Writes batches (lists of token lists, each beginning with BOS) as one token file plus document offsets."""
    lengths = []
    with open(directory / f"{split}.bin", "wb") as f:
        for docs in batches:
            lens = np.fromiter(map(len, docs), np.int64, len(docs))
            f.write(np.fromiter(itertools.chain.from_iterable(docs), dtype, int(lens.sum())).tobytes())
            lengths.append(lens)
    offsets = np.concatenate([[0], np.cumsum(np.concatenate(lengths))]) if lengths else np.zeros(1, np.int64)
    np.save(directory / f"{split}.offsets.npy", offsets.astype(np.int64))
    return len(offsets) - 1, int(offsets[-1])


def tokenize_batches(enc, folder, files, label, max_tokens, pool, threads):
    """Encodes the documents of `files` in order, in parallel chunks, until max_tokens: yields lists of token
    lists with BOS first."""
    bos = enc.encode_single_token(SPECIAL_TOKENS[0])
    progress, start, docs, tokens = Progress(), time.time(), 0, 0

    def encode(texts):
        return [[bos] + enc.encode_ordinary(t) for t in texts]

    for texts in iter_texts(folder, files, batch_size=512):
        step = -(-len(texts) // threads)
        batch = [ids for chunk in pool.map(encode, [texts[i:i + step] for i in range(0, len(texts), step)])
                 for ids in chunk]
        ends = np.cumsum([len(ids) for ids in batch]) + tokens
        capped = ends[-1] >= max_tokens
        if capped:  # keep documents until the cap is reached
            batch = batch[:int(np.searchsorted(ends, max_tokens)) + 1]
        yield batch
        docs += len(batch)
        tokens = int(ends[len(batch) - 1])
        progress.show(f"tokenize {label}: {docs:,} documents, {tokens / 1e6:.1f}M tokens, "
                      f"{tokens / 1e6 / max(time.time() - start, 1e-6):.1f}M tokens/s")
        if capped:
            print(f"tokenize {label}: stopped at the {PROFILE} profile's cap of {max_tokens / 1e6:.1f}M tokens")
            break
    progress.show(f"tokenize {label}: {docs:,} documents, {tokens / 1e6:.1f}M tokens in {time.time() - start:.1f}s",
                  final=True)


def tokenize_split(enc, folder, files, directory, split, pool, threads):
    max_tokens = TRAIN_MAX_TOKENS if split == "train" else 2 * EVAL_TOKENS
    batches = tokenize_batches(enc, folder, files, split, max_tokens, pool, threads)
    return write_token_split(directory, split, batches, token_dtype(enc.n_vocab))


def load_token_split(directory, split):
    """(tokens memmap, document offsets) of a prepared split; a clear error when it is missing or empty."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    directory = Path(directory)
    offsets_path = directory / f"{split}.offsets.npy"
    if not offsets_path.exists():
        raise FileNotFoundError(f"No {split} tokens in {directory}. Prepare them: {prepare_command(DATASET)}")
    offsets = np.load(offsets_path)
    if len(offsets) < 2 or offsets[-1] == 0:
        raise ValueError(f"The {split} split in {directory} has no documents, so there is nothing to load. "
                         f"Prepare a dataset with {split} data: {prepare_command(DATASET)}")
    dtype = json.loads((directory / "meta.json").read_text())["dtype"]
    # a plain ndarray view of the memmap: slicing it skips numpy.memmap's per-slice bookkeeping
    return np.memmap(directory / f"{split}.bin", dtype=dtype, mode="r").view(np.ndarray), offsets


def build_tokenizer_and_tokens(name, manifest):
    """Trains the tokenizer and writes the token files for (dataset, profile); skipped when already up to date."""
    settings = {"format": FORMAT_VERSION, "vocab_size": VOCAB_SIZE, "max_chars": TOKENIZER_MAX_CHARS,
                "max_tokens": [TRAIN_MAX_TOKENS, 2 * EVAL_TOKENS],
                "pattern": SPLIT_PATTERN, "specials": SPECIAL_TOKENS, "train": manifest["train"],
                "val": manifest["val"], "sha256": {k: v["sha256"] for k, v in sorted(manifest["shards"].items())}}
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    final = prepared_dir(name)
    if (final / "meta.json").exists():
        meta = json.loads((final / "meta.json").read_text())
        if meta.get("fingerprint") == fingerprint:
            print(f"tokenizer and tokens for '{name}' / '{PROFILE}' are up to date in {final}")
            return meta
    folder = dataset_dir(name)
    with rebuilding(final) as work:
        enc, chars, seconds = train_tokenizer(folder, manifest["train"], VOCAB_SIZE, TOKENIZER_MAX_CHARS)
        print(f"tokenizer: vocab {enc.n_vocab} trained on {chars / 1e6:.1f}M characters in {seconds:.1f}s "
              f"({chars / 1e6 / max(seconds, 1e-6):.1f}M chars/s)")
        with open(work / "tokenizer.pkl", "wb") as f:
            pickle.dump(enc, f)
        np.save(work / "token_bytes.npy", token_byte_lengths(enc))
        start, threads = time.time(), os.cpu_count() or 1
        with ThreadPoolExecutor(threads) as pool:
            counts = {split: tokenize_split(enc, folder, manifest[split], work, split, pool, threads)
                      for split in ("train", "val")}
        meta = {"dataset": name, "profile": PROFILE, "fingerprint": fingerprint,
                "dtype": np.dtype(token_dtype(enc.n_vocab)).name,
                "vocab_size": enc.n_vocab, "tokenizer_chars": chars, "tokenizer_seconds": round(seconds, 2),
                "tokenize_seconds": round(time.time() - start, 2),
                **{f"{split}_documents": n for split, (n, _) in counts.items()},
                **{f"{split}_tokens": t for split, (_, t) in counts.items()}}
        write_json(work / "meta.json", meta)  # written last: its presence means the folder is complete
    return meta

# ---------------------------------------------------------------------------
# Dataloader: best-fit packing of pre-tokenized documents into rows that start with BOS, without padding or waste


def document_stream(offsets, shuffle, seed, epochs=None):
    """(start, end, epoch) of every document, epoch after epoch; train order reshuffled per epoch from the seed."""
    n, epoch = len(offsets) - 1, 1
    while epochs is None or epoch <= epochs:
        order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
        yield from zip(offsets[order].tolist(), offsets[order + 1].tolist(), [epoch] * n)
        epoch += 1


def best_fit_rows(documents, capacity):
    """Packs documents into rows of `capacity` tokens. Yields (segments, epoch) per row, segments being
    (start, end, bos_first) token ranges: bos_first means a BOS token precedes tokens[start:end].
    Repeatedly places the largest piece that fits; when none does, the shortest is cropped to fill the row and its
    remainder returns to the buffer as a new piece led by BOS, so no token is dropped. A piece longer than a row
    counts as row-sized: it fills an empty row and its remainder goes back, so long documents are never starved.
    With a finite `documents` the last, partial row is not yielded."""
    buffer = []  # sorted (fit, seq, start, end, bos_first); fit = min(length, capacity), seq breaks ties in order
    seq, epoch, exhausted = 0, 1, False
    while True:
        segments, room = [], capacity
        while room:
            while len(buffer) < PACKING_BUFFER and not exhausted:
                try:
                    start, end, epoch = next(documents)
                except StopIteration:
                    exhausted = True
                    break
                insort(buffer, (min(end - start, capacity), seq, start, end, False))
                seq += 1
            if not buffer:
                return
            i = bisect_right(buffer, (room, math.inf)) - 1  # the largest piece that fits
            _, _, start, end, bos_first = buffer.pop(max(i, 0))  # none fits: crop the shortest
            size = end - start + bos_first
            take = min(size, room)
            segments.append((start, start + take - bos_first, bos_first))
            if take < size:
                rest = start + take - bos_first
                insort(buffer, (min(end - rest + 1, capacity), seq, rest, end, True))
                seq += 1
            room -= take
        yield segments, epoch


def fill_row(row, segments, tokens, bos):
    pos = 0
    for start, end, bos_first in segments:
        if bos_first:
            row[pos] = bos
            pos += 1
        row[pos:pos + end - start] = tokens[start:end]
        pos += end - start


def default_device():
    import torch
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def make_dataloader(tokenizer, B, T, split, device=None, seed=0):
    """Infinite iterator of (inputs, targets, epoch): LongTensors [B, T] on `device`, targets = inputs shifted by
    one. Rows are best-fit packed documents (see best_fit_rows); train documents are shuffled per epoch from
    `seed`, val documents come in file order. Deterministic for a given seed."""
    import torch
    tokens, offsets = load_token_split(tokenizer.directory, split)
    device = torch.device(device) if device is not None else default_device()
    bos = tokenizer.get_bos_token_id()
    rows = best_fit_rows(document_stream(offsets, shuffle=split == "train", seed=seed), T + 1)
    batch = np.empty((B, T + 1), dtype=np.int64)
    if device.type == "cuda":
        # two pinned staging buffers, so that filling one never races the asynchronous copy from the other; each
        # copy lands in a fresh device tensor, ordered with the model's kernels on the same stream
        staging = [torch.empty((2, B, T), dtype=torch.long, pin_memory=True) for _ in range(2)]
        copied = [torch.cuda.Event(), torch.cuda.Event()]  # waiting on a never-recorded event returns at once
    for step in itertools.count():
        for b in range(B):
            segments, epoch = next(rows)
            fill_row(batch[b], segments, tokens, bos)
        if device.type == "cuda":
            k = step % 2
            copied[k].synchronize()  # the copy out of this buffer two steps ago has finished
            host = staging[k].numpy()
            host[0], host[1] = batch[:, :-1], batch[:, 1:]
            on_device = staging[k].to(device, non_blocking=True)
            copied[k].record(torch.cuda.current_stream(device))
            yield on_device[0], on_device[1], epoch
        else:  # fresh contiguous copies, as the batch array is refilled for the next step
            inputs, targets = torch.from_numpy(batch[:, :-1].copy()), torch.from_numpy(batch[:, 1:].copy())
            yield inputs.to(device), targets.to(device), epoch

# ---------------------------------------------------------------------------
# Evaluation: bits per byte on EVAL_TOKENS tokens of pinned validation data


def eval_rows(directory, T, n_rows, bos):
    """The validation rows (n_rows x (T+1) tokens), packed like training rows from val documents in file order.
    The same rows whatever the batch size; wraps around the val split (with a warning) when it is too small."""
    tokens, offsets = load_token_split(directory, "val")
    # packing places every token it reads (a crop adds a BOS, never drops one): n_rows * (T+1) tokens fill the rows
    passes = math.ceil(n_rows * (T + 1) / len(tokens))
    if passes > 1:
        print(f"warning: the val split has {len(tokens):,} tokens, fewer than the {n_rows * (T + 1):,} that "
              f"{n_rows:,} evaluation rows read: evaluation wraps around it", file=sys.stderr)
    rows = best_fit_rows(document_stream(offsets, shuffle=False, seed=0, epochs=passes), T + 1)
    out = np.empty((n_rows, T + 1), dtype=tokens.dtype)
    for r in range(n_rows):
        fill_row(out[r], next(rows)[0], tokens, bos)
    return out


def evaluate_bpb(model, tokenizer, batch_size):
    """Bits per byte: the summed cross-entropy (nats) of target tokens that have bytes, over ln 2 times their
    byte count, on EVAL_TOKENS // MAX_SEQ_LEN rows of MAX_SEQ_LEN targets. Uses the model's device.
    model(x, y, reduction='none') must return per-token losses in nats, [B*T] or [B, T]."""
    import torch
    device = next(itertools.chain(model.parameters(), model.buffers())).device
    rows = eval_rows(tokenizer.directory, MAX_SEQ_LEN, EVAL_TOKENS // MAX_SEQ_LEN, tokenizer.get_bos_token_id())
    token_bytes = get_token_bytes(device, tokenizer.directory)
    row_nats, total_bytes = [], torch.zeros((), dtype=torch.int64, device=device)
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            chunk = torch.from_numpy(rows[i:i + batch_size].astype(np.int64)).to(device)
            x, y = chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()
            loss = model(x, y, reduction="none").reshape(y.shape).float()
            nbytes = token_bytes[y]
            # rows summed in float64 on the CPU (MPS has no float64), one row at a time whatever the batch
            row_nats.append(torch.where(nbytes > 0, loss, 0.0).cpu().double().sum(dim=1))
            total_bytes += nbytes.sum()
    # fsum over per-row sums: the total does not depend on how rows were grouped into batches
    return math.fsum(torch.cat(row_nats).tolist()) / (math.log(2) * total_bytes.item())

# ---------------------------------------------------------------------------
# Readiness: what stops a training run, each problem ending with the command that fixes it


def check_ready():
    if DATASET is None:
        return [f"No dataset is prepared for the '{PROFILE}' profile in {CACHE_DIR} (offline? add --dataset "
                f"synthetic or --source PATH); run: {prepare_command(None)}"]
    directory = prepared_dir(DATASET)
    fix = prepare_command(DATASET)
    if not (directory / "meta.json").exists():
        return [f"Dataset '{DATASET}' is not prepared for the '{PROFILE}' profile (no complete {directory}); "
                f"run: {fix}"]
    needed = {"tokenizer.pkl": "tokenizer", "token_bytes.npy": "token byte lengths", "train.bin": "train tokens",
              "train.offsets.npy": "train document offsets", "val.bin": "val tokens",
              "val.offsets.npy": "val document offsets"}
    return [f"The {what} of '{DATASET}' for the '{PROFILE}' profile is missing ({directory / filename}); run: {fix}"
            for filename, what in needed.items() if not (directory / filename).exists()]

# ---------------------------------------------------------------------------
# CLI


def main():
    parser = argparse.ArgumentParser(
        description="Prepare data, tokenizer and token files for autoresearch (profile from AUTORESEARCH_PROFILE: "
                    "reference, cpu or smoke; cache in AUTORESEARCH_CACHE_DIR, default ~/.cache/autoresearch).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="profiles (AUTORESEARCH_PROFILE; unset: reference with CUDA, else cpu):\n" + "".join(
            f"  {name:<10}  context {p[0]}, eval {p[2]:,} tokens, vocab {p[3]}; tokenizer trained on <= {p[4] / 1e6:g}M "
            f"chars, <= {p[5] / 1e6:g}M train tokens kept\n" for name, p in PROFILES.items())
        + """\ndatasets:
  climbmix    karpathy/climbmix-400b-shuffle from Hugging Face: --num-shards train shards + the pinned
              validation shard shard_06542. Honours HF_ENDPOINT (mirrors) and HF_TOKEN. Resumable.
  synthetic   generated offline in seconds: stories with consistent characters, towns, counting and
              arithmetic; separate seeds for train and val.
  --source    your own files: a folder (searched recursively), a file, or a glob of
                .parquet  one document per row, string column 'text'
                .jsonl    one JSON object per line with a string field "text"
                .txt      split at blank lines into paragraphs, merged into ~4,000-character documents
              Split: with 2 or more files the last one in sorted order is validation; with a single file
              its last 10% of documents (at least 1). The dataset is named after the path.
Each run records the prepared dataset as the active one for the profile (AUTORESEARCH_DATASET overrides).""")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--dataset", choices=["climbmix", "synthetic"], default="climbmix",
                       help="dataset to prepare (default climbmix)")
    which.add_argument("--source", metavar="PATH", help="prepare local files instead (see below)")
    parser.add_argument("--num-shards", type=int, default=10,
                        help=f"climbmix train shards to download (default 10, -1 = all {CLIMBMIX_TRAIN_SHARDS})")
    parser.add_argument("--download-workers", type=int, default=8, help="parallel downloads (default 8)")
    args = parser.parse_args()

    start = time.time()
    print(f"profile: {PROFILE} (MAX_SEQ_LEN {MAX_SEQ_LEN}, EVAL_TOKENS {EVAL_TOKENS:,}, VOCAB_SIZE {VOCAB_SIZE}); "
          f"cache: {CACHE_DIR}")
    if args.source:
        name, manifest = import_source(args.source)
    elif args.dataset == "synthetic":
        name, manifest = "synthetic", make_synthetic()
    else:
        name, manifest = "climbmix", download_climbmix(args.num_shards, args.download_workers)
    data_seconds = time.time() - start
    meta = build_tokenizer_and_tokens(name, manifest)
    active_file(PROFILE).parent.mkdir(parents=True, exist_ok=True)
    active_file(PROFILE).write_text(name + "\n")

    directory = prepared_dir(name)
    print(f"\nprepared '{name}' for the '{PROFILE}' profile in {time.time() - start:.1f}s")
    print(f"  data:      {dataset_dir(name)} ({len(manifest['train'])} train + {len(manifest['val'])} val shards; "
          f"{manifest['split']}) [{data_seconds:.1f}s]")
    print(f"  tokenizer: {directory / 'tokenizer.pkl'} (vocab {meta['vocab_size']}, "
          f"{meta['tokenizer_chars'] / 1e6:.1f}M characters) [{meta['tokenizer_seconds']:.1f}s]")
    print(f"  tokens:    train {meta['train_tokens']:,} in {meta['train_documents']:,} documents, "
          f"val {meta['val_tokens']:,} in {meta['val_documents']:,} documents ({meta['dtype']}) "
          f"[{meta['tokenize_seconds']:.1f}s]")
    if meta["val_tokens"] < EVAL_TOKENS // MAX_SEQ_LEN * (MAX_SEQ_LEN + 1):
        print(f"  note: val has fewer tokens than evaluation reads ({EVAL_TOKENS:,} targets): it wraps around them")
    print(f"  active dataset for '{PROFILE}': {name} (recorded in {active_file(PROFILE)})")
    print(f"next: AUTORESEARCH_PROFILE={PROFILE} uv run train.py")


if __name__ == "__main__":
    main()
