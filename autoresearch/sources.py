"""
--source: your own text as a dataset. Finds the .parquet / .jsonl / .txt files that a path or glob names, reads
their documents (a .txt file is split at blank lines into paragraphs, merged into documents of about
TXT_DOC_CHARS), chooses the train/val split, and converts them into parquet shards in a dataset folder of the
cache. The import is skipped when the files are unchanged since the last one.
"""

import glob
import json
import os
import re
import shlex
from pathlib import Path

import pyarrow.parquet as pq

from autoresearch.cachefiles import FORMAT_VERSION, load_manifest, parquet_problem, shard_name, write_dataset

TXT_DOC_CHARS = 4_000  # .txt sources: paragraphs are merged into documents of about this size
SOURCE_SUFFIXES = (".parquet", ".jsonl", ".txt")

# ---------------------------------------------------------------------------
# Finding the files and naming the dataset


def find_source_files(spec, cache_dir):
    """The files that `spec` names (a glob, a folder searched recursively, or a file), in sorted order; files
    in `cache_dir` never count."""
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
    cache = cache_dir.resolve()  # the cache's own shards are never a source, e.g. with the cache inside the folder
    files = sorted((f for f in files if f.is_file() and f.suffix.lower() in SOURCE_SUFFIXES
                    and cache not in f.resolve().parents), key=str)
    if not files:
        raise SystemExit(f"--source {spec}: no .parquet, .jsonl or .txt files there (files in the cache {cache_dir} "
                         f"do not count). Point it at your text, e.g. uv run prepare.py --source ~/corpus/*.jsonl")
    return files


def source_name(spec):
    """A dataset name from the path: its last component without glob characters."""
    parts = [p for p in Path(spec).expanduser().parts if not any(c in p for c in "*?[")]
    last = Path(*parts).resolve() if parts else Path.cwd()
    name = re.sub(r"[^a-z0-9._-]+", "-", (last.stem if last.is_file() else last.name).lower()).strip("-.") or "source"
    return f"source-{name}" if name in ("climbmix", "synthetic") else name

# ---------------------------------------------------------------------------
# Reading documents: one per parquet row or JSON line; .txt paragraphs merged


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

# ---------------------------------------------------------------------------
# The import: files read one at a time into shards, split into train and val, and the manifest


def import_source(spec, name, folder, cache_dir):
    """Converts the files of `spec` into the shards of dataset `name` in `folder`, unless they are unchanged
    since the last import; returns its manifest."""
    files = find_source_files(spec, cache_dir)
    fingerprint = [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    manifest = load_manifest(folder)
    if manifest and manifest.get("files") == fingerprint and manifest.get("format") == FORMAT_VERSION:
        print(f"source: {len(files)} files unchanged since the last import into {folder}")
        return manifest
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

    write_dataset(folder, shards(), manifest)
    print(f"split: {split}\n  train: {counts['train']} documents in {len(manifest['train'])} shards, "
          f"val: {counts['val']} documents")
    return manifest
