"""
Where the experiment loop keeps things (the files it reads and writes, its branches and refs), the one
error type it reports to the user, and the few helpers for times, numbers and JSON files that all of the
loop's modules share.
"""
import json
import time
from pathlib import Path

# -----------------------------------------------------------------------------
# Names

TRAIN, PREPARE, PROGRAM = "train.py", "prepare.py", "program.md"
UV_LOCK = "uv.lock"                         # the environment's packages, by version and hash
RESULTS = "results.tsv"                     # in the repo root, ignored by git
LOGS_DIR = "logs"                           # logs/TAG/NNN-sha.log, plus the loop's state files
WORKTREES_DIR = "worktrees"                 # demo checkouts
BRANCH_PREFIX = "autoresearch/"
REF_PREFIX = "refs/autoresearch/"           # discarded work stays reachable here


# -----------------------------------------------------------------------------
# Errors and small helpers


class LoopError(Exception):
    """A problem the user must fix; the message says what is wrong and the command that fixes it."""


def now_iso():
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def to_float(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
