"""
The code the evaluator runs from outside the repository (torch and the other installed packages, the standard
library, shared libraries) as it was at the tag's first evaluation, so that a file edited *between* runs is
seen: an agent that edits torch's cross-entropy before a `step` would change the metric itself. The evaluator's
own check (evaluator.code_written_since) sees only what was written while train.py ran.

A record per tag (.git/autoresearch/TAG/installed-code.json) holds each file's ctime and sha256. A file whose
ctime moved since is read again: the same bytes pass (a reinstall of the same packages; for bytecode, the
same code under a new source mtime), other bytes are an edit. A file met for the first time is checked
against its package's RECORD (pip and uv list every installed file's sha256 there; an install writes RECORD
after the files, so a file changed later is newer than it) and hashed only when it has no entry there
(bytecode, the standard library): the tag's first evaluation reads ~100 MB, not the ~4 GB of torch's
libraries.

A new tag starts from the newest earlier tag's record made under the same uv.lock: a file that tag's evaluations
ran must still have those bytes, so an agent's edit made during an earlier night (its RECORD line edited too) is
not taken as installed by the next `init`. A new uv.lock (an upgrade) starts a record of its own.
"""
import base64
import csv
import functools
import hashlib
import json
import os
import time
from pathlib import Path

from autoresearch.cachefiles import sha256_of
from autoresearch.layout import read_json
from autoresearch.ledger import keep_file

RECORD_NAME = "installed-code.json"
FIX = "put it back with `uv sync --reinstall --locked`"  # the same bytes again: the record accepts them


def record_form(raw):
    """A sha256 as RECORD writes it: sha256=<urlsafe base64, unpadded>."""
    return "sha256=" + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def digests(path):
    """The file's sha256 in RECORD's form; for bytecode, first the sha256 with the source's mtime and size in
    its header zeroed: a reinstall of the same package compiles the same code under a new mtime (and Python
    ignores a .pyc whose header does not match its source). The first one is what a record keeps."""
    if not path.endswith(".pyc"):
        return [digest(path)]
    data = bytearray(Path(path).read_bytes())
    whole = record_form(hashlib.sha256(data).digest())
    if len(data) < 16 or int.from_bytes(data[4:8], "little") != 0:  # flags 0: checked by timestamp
        return [whole]
    data[8:16] = bytes(8)
    return [record_form(hashlib.sha256(data).digest()), whole]


def digest(path):
    return record_form(bytes.fromhex(sha256_of(path)))


def package_records(site):
    """{path: (sha256 as in RECORD, ctime_ns of that RECORD)} of every file the packages in this site-packages
    folder installed with a hash."""
    found = {}
    for record in Path(site).glob("*.dist-info/RECORD"):
        try:
            written, text = record.stat().st_ctime_ns, record.read_text(errors="replace")
        except OSError:
            continue
        for row in csv.reader(text.splitlines()):
            if len(row) >= 2 and row[1].startswith("sha256="):
                found[os.path.normpath(os.path.join(site, row[0]))] = (row[1], written)
    return found


def saved_record(path):
    """A tag's record as saved, or {} (none yet, or damaged: then started again, as for a new tag)."""
    try:
        saved = read_json(path)
    except (ValueError, OSError):
        saved = None
    return saved if isinstance(saved, dict) else {}


class InstalledCode:
    """What the evaluator ran code from outside the repository, by path: [ctime_ns, sha256]; `created`: when
    the record was first written (None: not yet, and then every file found is taken as it is)."""

    def __init__(self, path, lock=None):
        """lock: the sha256 of the uv.lock the environment was installed from (None: no uv.lock)."""
        self.path, self.lock = Path(path), lock
        saved = saved_record(self.path)
        self.files, self.created = saved.get("files") or {}, saved.get("created")
        self._records = {}

    @functools.cached_property
    def earlier(self):
        """{path: [ctime_ns, sha256]} of the newest other tag's record under the same uv.lock, while this tag
        has none of its own yet (then its first evaluation is checked against it); else {}."""
        if self.created is not None:
            return {}
        others = [saved_record(p) for p in self.path.parent.parent.glob(f"*/{self.path.name}") if p != self.path]
        same = [r for r in others if r.get("lock") == self.lock and isinstance(r.get("files"), dict)
                and r["files"] and isinstance(r.get("created"), int)]
        return max(same, key=lambda r: r["created"])["files"] if same else {}

    def listed(self, path):
        """(sha256, RECORD's ctime) of an installed package's file, or None (not in a site-packages' RECORD)."""
        head, sep, _ = path.rpartition("/site-packages/")
        if not sep:
            return None
        site = head + "/site-packages"
        if site not in self._records:
            self._records[site] = package_records(site)
        return self._records[site].get(os.path.normpath(path))

    def edited(self, paths=None):
        """The files among `paths` (default: all recorded) whose bytes differ from what the record or their
        package's RECORD says, or that appeared, unlisted, after the record was made. The rest are recorded."""
        found, changed = [], False
        for path in sorted(set(self.files) | set(self.earlier) if paths is None else set(paths)):
            try:
                ctime = os.stat(path).st_ctime_ns
            except OSError:  # gone: nothing runs from it
                continue
            own = self.files.get(path)
            if own and own[0] == ctime:
                continue
            entry = own or self.earlier.get(path)
            if entry and entry[0] == ctime:  # untouched since an earlier tag's evaluation ran it
                self.files[path], changed = list(entry), True
                continue
            expected = entry[1] if entry else None
            if expected is None:
                listed = self.listed(path)
                if listed and ctime <= listed[1]:  # untouched since its package was installed
                    self.files[path], changed = [ctime, listed[0]], True
                    continue
                expected = listed[0] if listed else None
            if expected is None and self.created is not None and ctime > self.created:
                found.append(path)  # unlisted, and written since the record began: nothing to compare with
                continue
            try:
                actual = digests(path)
            except OSError:  # there, but kept from us
                found.append(path)
                continue
            if expected is not None and expected not in actual:
                found.append(path)
            else:
                self.files[path], changed = [ctime, actual[0]], True
        if changed:
            self.save()
        return found

    def save(self):
        if self.created is None:
            self.created = time.time_ns()
        self.path.parent.mkdir(parents=True, exist_ok=True)  # a copy kept too: an edit is put back (ledger.py)
        keep_file(self.path, json.dumps({"created": self.created, "lock": self.lock, "files": self.files}).encode())
