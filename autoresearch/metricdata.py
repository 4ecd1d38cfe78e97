"""
The files the metric reads (validation tokens, their document offsets, token byte counts, the tokenizer):
hashed and copied read-only into .pristine/ beside them when they are prepared, checked before every
evaluation, and restored from the copies when a run damaged them, so that one run cannot bend another's metric.
"""

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from autoresearch.cachefiles import sha256_of

METRIC_FILES = ("val.bin", "val.offsets.npy", "token_bytes.npy", "tokenizer.pkl", "meta.json")
PRISTINE = ".pristine"


class MetricDataError(Exception):
    """A metric file is damaged and cannot be restored: the message names the fix."""


def file_stamps(directory, names):
    """{name: [size, mtime_ns, ctime_ns, inode]} of these files (None for one that is missing): the training
    files, too large to hash before every run, are pinned at init by these; a write, even one changed back,
    moves the ctime, which no process can set back."""
    stamps = {}
    for name in names:
        try:
            info = os.stat(Path(directory) / name)
            stamps[name] = [info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino]
        except OSError:
            stamps[name] = None
    return stamps


def seal_metric_files(directory):
    """Read-only copies of the metric's files and their hashes, in directory/.pristine (idempotent)."""
    directory = Path(directory)
    pristine = directory / PRISTINE
    if (pristine / "hashes.json").exists():
        return json.loads((pristine / "hashes.json").read_text())
    pristine.mkdir(exist_ok=True)
    hashes = {}
    for name in METRIC_FILES:
        (pristine / name).unlink(missing_ok=True)  # a copy left read-only by an interrupted seal
        shutil.copyfile(directory / name, pristine / name)
        (pristine / name).chmod(0o444)
        hashes[name] = sha256_of(pristine / name)
    (pristine / "hashes.json").write_text(json.dumps(hashes, indent=1))
    (pristine / "hashes.json").chmod(0o444)
    return hashes


def verify_metric_files(directory, expected=None):
    """Restore any metric file whose hash differs from `expected` (default: the pristine record) from its
    pristine copy. Returns the lines that say what was restored; MetricDataError if no intact copy."""
    directory = Path(directory)
    recorded = seal_metric_files(directory)
    expected = expected or recorded
    restored = []
    for name in METRIC_FILES:
        path = directory / name
        if path.exists() and sha256_of(path) == expected[name]:
            continue
        copy = directory / PRISTINE / name
        if recorded.get(name) != expected[name] or sha256_of(copy) != expected[name]:
            raise MetricDataError(f"{path} does not match the hash recorded at prepare time, and no intact copy "
                                  f"is left: prepare the dataset again (uv run prepare.py ...)")
        path.unlink(missing_ok=True)
        shutil.copyfile(copy, path)
        path.chmod(0o644)
        restored.append(f"restored {path} from its pristine copy (it did not match the hash recorded at "
                        f"prepare time)")
    return restored


def evaluation_copy(prepared, expect, owner=""):
    """The folder the evaluator reads the metric's files from: a sealed copy (of those in prepared/.pristine) in
    the system's temp folder, outside the repository and the cache, named by their hashes and by its owner (a
    loop's ledger). The cache's val files are watched while train.py runs (valwatch), and so is a single
    loop's copy: an evaluator of another run reading them then would look like that run, so each loop has a
    copy of its own. None (the evaluator reads the cache) without recorded hashes or an intact pristine copy."""
    if not (expect and prepared):
        return None
    key = hashlib.sha256(json.dumps([expect, owner], sort_keys=True).encode()).hexdigest()[:16]
    final = Path(tempfile.gettempdir()) / f"autoresearch-{os.getuid()}" / "metric" / key
    if (final / PRISTINE / "hashes.json").exists():
        try:
            verify_metric_files(final, expect)
            return final
        except (MetricDataError, OSError):  # damaged beyond its own pristine copies: made again
            for path in final.rglob("*"):
                path.chmod(0o644)
            shutil.rmtree(final, ignore_errors=True)
    source = Path(prepared) / PRISTINE
    staging = final.with_name(f".{key}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        for name in METRIC_FILES:
            shutil.copyfile(source / name, staging / name)
        if seal_metric_files(staging) != {k: expect[k] for k in METRIC_FILES}:
            return None
        for name in METRIC_FILES:
            (staging / name).chmod(0o444)
        os.rename(staging, final)
    except FileNotFoundError:
        return None
    except OSError:  # another run's evaluator made it first
        pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final if (final / PRISTINE / "hashes.json").exists() else None
