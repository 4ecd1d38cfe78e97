"""
The code the evaluator runs from outside the repository (torch and the other installed packages, the standard
library, shared libraries) as it was at the tag's first evaluation, so that a file edited *between* runs is
seen: an agent that edits torch's cross-entropy before a `step` would change the metric itself. The evaluator's
own check (evaluator.code_written_since) sees only what was written while train.py ran.

A record per tag (.git/autoresearch/TAG/installed-code.json) holds each file's ctime and sha256. A file whose
ctime moved since is read again: the same bytes pass (a reinstall of the same packages), other bytes are an
edit. A file met for the first time is checked against its package's RECORD (pip and uv list every installed
file's sha256 there; an install writes RECORD after the files, so a file changed later is newer than it) and
hashed only when it has no entry there (bytecode, the standard library): the tag's first evaluation reads
~100 MB, not the ~4 GB of torch's libraries.
"""
import base64
import csv
import json
import os
import time
from pathlib import Path

from autoresearch.cachefiles import sha256_of
from autoresearch.layout import read_json

RECORD_NAME = "installed-code.json"
FIX = "put it back with `uv sync --reinstall --locked`"  # the same bytes again: the record accepts them


def digest(path):
    """sha256 of the file in RECORD's form (sha256=<urlsafe base64, unpadded>)."""
    raw = bytes.fromhex(sha256_of(path))
    return "sha256=" + base64.urlsafe_b64encode(raw).decode().rstrip("=")


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


class InstalledCode:
    """What the evaluator ran code from outside the repository, by path: [ctime_ns, sha256]; `created`: when
    the record was first written (None: not yet, and then every file found is taken as it is)."""

    def __init__(self, path):
        self.path = Path(path)
        saved = None
        try:
            saved = read_json(self.path)
        except (ValueError, OSError):  # damaged: started again, as for a new tag
            pass
        saved = saved if isinstance(saved, dict) else {}
        self.files, self.created = saved.get("files") or {}, saved.get("created")
        self._records = {}

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
        for path in sorted(self.files if paths is None else set(paths)):
            try:
                ctime = os.stat(path).st_ctime_ns
            except OSError:  # gone: nothing runs from it
                continue
            entry = self.files.get(path)
            if entry and entry[0] == ctime:
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
                actual = digest(path)
            except OSError:  # there, but kept from us
                found.append(path)
                continue
            if expected is not None and actual != expected:
                found.append(path)
            else:
                self.files[path], changed = [ctime, actual], True
        if changed:
            self.save()
        return found

    def save(self):
        if self.created is None:
            self.created = time.time_ns()
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")  # workers of a tag share the record
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"created": self.created, "files": self.files}))
        os.replace(tmp, self.path)
