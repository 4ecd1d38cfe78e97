"""
results.tsv, the record of every experiment: its columns (upstream's five first), reading it back (ours or
upstream's), appending a row so that a kill never leaves half of one, and the two judgements that every
reader of it shares: which row is the best, and which rows hold no trustworthy measurement.

The authoritative copy (the ledger) lives under the git directory, .git/autoresearch/results.tsv, where
neither an agent's edits, `git add -f` + reset, nor `git clean` reach; results.tsv in the checkout is a
rendering of it, rewritten whenever it differs. Each experiment's log and commit (as a patch) are kept beside
it, so a deleted log comes back and a discarded experiment survives the deletion of its ref and `git gc`.
The loop is the ledger's one writer: the bytes it last wrote are kept outside the repository, and whatever else
wrote the ledger since (an agent between two `step`s or experiments, a worker's run) is put back before the
next row is read or written; so are the loop's other records there (the pinned config, a half-confirmed
experiment...), each from a copy kept beside the ledger's.
"""
import collections
import contextlib
import fcntl
import functools
import glob
import hashlib
import json
import os
import pwd
import re
import secrets
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from autoresearch.gitrepo import git
from autoresearch.layout import RESULTS, LoopError

COLUMNS = ["commit", "val_bpb", "memory_gb", "status", "description",  # upstream's five, unchanged
           "tag", "n", "seeds", "val_bpb_runs", "training_seconds", "total_seconds", "mfu_percent",
           "num_steps", "profile", "train_py", "timestamp", "loop_s", "log", "note",
           # the evidence of the keep rule (decide.py): each run's speed, the best's re-runs made during the
           # experiment (paired with the candidate's), and the numbers of the decision
           "tokens_per_s", "best_seeds", "best_val_bpb_runs", "best_tokens_per_s", "best_train_py", "evidence",
           # how much better the pinned val rows score than the held-out slice (experiment.leaked)
           "heldout_gap",
           # seconds each finished run spent outside its reported training time (experiment.outside_budget)
           "outside_s", "best_outside_s",
           # and, of that, the seconds after it first opened its training data (experiment.outside_budget)
           "after_data_s", "best_after_data_s",
           # CPU cores other work kept busy while each run trained, by the harness's measure (process.other_work)
           "other_cores", "best_other_cores",
           # which worker of `run --workers N` ran the experiment (empty: the single loop)
           "worker",
           # the commit's full id, by which the loop finds it (gitrepo.row_commit): an agent can make a commit
           # that shares the 7 digits of `commit` in a minute, and put it on the branch
           "sha"]
DESCRIPTION_MAX = 120

# Rows whose train.py has no trustworthy measurement. The status column keeps upstream's values
# (keep/discard/crash), so the kind is the first word of the note: see unmeasured().
REJECTED = "rejected"        # broke the rules (another file changed, train.py deleted...): a discard
INTERRUPTED = "interrupted"  # the loop was stopped or killed while train.py ran: a crash
# A discard whose runs were sound but could not be compared (the machine changed speed under them): its version
# runs again when submitted again, until NOT_JUDGED_MAX of its experiments were not judged (then it is measured)
NOT_JUDGED = "not judged"
NOT_JUDGED_MAX = 2


# -----------------------------------------------------------------------------
# Fields and whole-file writes


def one_line(text, limit=None):
    """A results.tsv field: no tabs, newlines or other control characters (a terminal escape from an agent's
    words), ever, and valid UTF-8 (an argument in another encoding arrives as surrogates, which no file or
    terminal can take)."""
    text = str(text).encode(errors="surrogateescape").decode(errors="replace")
    text = " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())
    return text if limit is None or len(text) <= limit else text[:limit - 3] + "..."


def write_atomic(path, data):
    """Write bytes via a temp file + rename: a kill leaves the old file or the new one, never half. The temp file
    is this thread's (a worker's seal and the coordinator put back one record at once: one renamed the other's
    temp file away, and its own rename failed); one that a killed process left goes at the next write."""
    name = Path(path).name
    for stale in Path(path).parent.glob(f"{glob.escape(name)}.*-*.tmp"):
        pid = stale.name[len(name) + 1:].split("-", 1)[0]
        if not pid.isdigit() or process_alive(int(pid)):
            continue
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    tmp = Path(f"{path}.{os.getpid()}-{threading.get_ident()}.tmp")
    if tmp.is_dir() and not tmp.is_symlink():  # whatever a kill left or a run planted there: not written through
        shutil.rmtree(tmp)
    elif os.path.lexists(tmp):
        os.unlink(tmp)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        pass
    return True


# -----------------------------------------------------------------------------
# Reading


def read_results(path, text=None):
    """Header and rows of a results.tsv (or of its text, named path), ours or upstream's 5 columns. In ours, a
    last line without a newline and without all its columns is a row cut by a crash mid-write and is ignored.
    An empty file has no rows."""
    try:
        text = Path(path).read_text(errors="replace") if text is None else text
    except FileNotFoundError:
        raise LoopError(f"{path} not found: start a run with `uv run agent_loop.py init --tag TAG`") from None
    if not text.strip():
        return COLUMNS, []
    lines = text.split("\n")
    last = lines.pop()
    if not lines:
        lines, last = [last], ""
    header = lines[0].split("\t")
    if [h.strip() for h in header[:5]] != COLUMNS[:5]:
        raise LoopError(f"{path}: the header must start with the tab-separated columns "
                        f"{' '.join(COLUMNS[:5])}; got: {lines[0][:80]!r}")
    header = [h.strip() for h in header]
    if last.strip() and ("tag" not in header or len(last.split("\t")) >= len(header)):
        lines.append(last)  # written or edited by hand: the final newline may be missing
    rows = [dict(zip(header, (f.strip() for f in line.split("\t")))) for line in lines[1:] if line.strip()]
    return header, rows


def tag_rows(tag):
    path = ledger_path() if ledger_path().exists() else Path(RESULTS)
    if not path.exists():
        return []
    _, rows = read_results(path)
    return [r for r in rows if r.get("tag") == tag]


# The workers of `run --workers N` run in worktrees of their own, and record in their coordinator's ledger
LEDGER_ENV = "AUTORESEARCH_LEDGER_DIR"


@functools.lru_cache(maxsize=None)
def ledger_dir():
    """.git/autoresearch (per worktree: a demo's worktree has its own), or the coordinator's (LEDGER_ENV)."""
    shared = os.environ.get(LEDGER_ENV)
    folder = Path(shared) if shared else Path(git("rev-parse", "--git-dir")).resolve() / "autoresearch"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def ledger_path():
    return ledger_dir() / "results.tsv"


def render_results():
    """Make results.tsv a copy of the ledger again. Returns True when it had to be rewritten (an agent or a
    run deleted or edited it)."""
    ledger = ledger_path().read_bytes() if ledger_path().exists() else None
    current = Path(RESULTS).read_bytes() if Path(RESULTS).exists() else None
    if ledger is None or current == ledger:
        return False
    if current and not ledger.startswith(current):  # not just behind the ledger: someone's edits, kept aside
        write_atomic(f"{RESULTS}.bak", current)
    write_atomic(RESULTS, ledger)
    return True


def keep_copies(tag, n, log, commit, base=None):
    """The experiment's log and its commit as a patch, beside the ledger: what `rm -rf logs` or deleted refs
    and `git gc` would otherwise take away for good. The patch is the change from base (the best it ran
    against), named by the loop: not from the commit's parent, which the agent chooses (its own commits on top
    of the best, .git/shallow)."""
    folder = ledger_dir() / tag
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    if log and Path(log).exists():
        shutil.copyfile(log, folder / "logs" / Path(log).name)
    if not commit:
        return
    if not base:  # the baseline: its own commit
        patch = git("format-patch", "-1", "--stdout", commit, check=False)
    else:
        message = git("show", "-s", f"--format=From %H Mon Sep 17 00:00:00 2001%nFrom: %an <%ae>%nDate: %aD%n"
                                    f"Subject: [PATCH] %s%n%n%b%nthe change from the best, {base}%n---", commit,
                      check=False)
        diff = git("diff", "--binary", "--full-index", base, commit, check=False)
        patch = None if message is None or diff is None else f"{message}\n{diff}"
    if patch is not None:
        (folder / f"{int(n):03d}-{commit[:7]}.patch").write_text(patch + "\n", errors="replace")


def restore_logs(rows):
    """Put back the logs of these rows that were deleted from logs/ (from keep_copies). Returns their paths."""
    restored = []
    for row in rows:
        log = row.get("log")
        copy = ledger_dir() / row.get("tag", "") / "logs" / Path(log or "-").name
        if log and not Path(log).exists() and copy.exists():
            Path(log).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(copy, log)
            restored.append(log)
    return restored


# -----------------------------------------------------------------------------
# Appending: one whole line per write


def end_last_line(path):
    """Before appending: a last line without its newline is a row edited by hand (all columns
    there: it gets its newline) or one cut by a power loss mid-write (dropped, and printed)."""
    with open(path, "rb+") as f:
        data = f.read()
        cut = data.rfind(b"\n") + 1
        if cut == len(data):
            return
        if data[cut:].count(b"\t") >= len(COLUMNS) - 1:
            f.write(b"\n")
        else:
            f.truncate(cut)
            print(f"warning: dropped a partial last line of {path}: {data[cut:]!r}", file=sys.stderr)


def append_row(row):
    """One os.write of a whole line to the ledger, then fsync: after any kill a row is fully there or
    absent. The ledger's record (below) gets the row first, so that a kill between the two leaves a row the
    next process completes, not one it takes for an edit. Then results.tsv is rendered from the ledger."""
    ensure_results_header()  # first, what else wrote the ledger is put back
    line = ("\t".join(one_line(row.get(c, "")) for c in COLUMNS) + "\n").encode()
    end_last_line(ledger_path())  # a hand-edited last row gets its newline: what it leaves is the loop's
    current, known = ledger_path().read_bytes(), last_written()
    if known is not None and current not in (known, known + b"\n"):  # a row written since the check (a worker's
        current = known if known.endswith(b"\n") else known + b"\n"  # run, timed to it): the next check drops it
    remember(current + line)
    fd = os.open(ledger_path(), os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    render_results()


# -----------------------------------------------------------------------------
# The loop as the ledger's one writer. The ledger's bytes as the loop last wrote them are kept outside the
# repository, where neither an agent nor a run casually reaches, and in one place whatever the environment
# says: two `step`s (or a restarted `run`) may see different HOME, XDG or TMPDIR values, and a record found by
# one and not the other would put back rows the loop wrote.

LEDGER_ID = "autoresearch-ledger-id"  # in the git directory, beside the ledger's folder (not in it)


def record_folder():
    try:
        home = Path(pwd.getpwuid(os.getuid()).pw_dir)  # the system's, not $HOME
    except KeyError:  # a user the system does not know (a container's)
        home = Path(tempfile.gettempdir()) / f"autoresearch-{os.getuid()}"
    return home / ".local" / "state" / "autoresearch" / "ledgers"


def record_file():
    return record_folder() / hashlib.sha256(str(ledger_dir()).encode()).hexdigest()[:24]


def repository_identity(make=False):
    """The random name the loop gave this ledger's repository, or None: a new clone (or worktree) at the same
    path has another, so a record of the old one is not taken for its own. Kept outside the ledger's folder, so
    that a deleted ledger is still known as this repository's and put back."""
    path = ledger_dir().parent / LEDGER_ID
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        if not make:
            return None
        write_atomic(path, secrets.token_hex(8).encode())
        return path.read_text().strip()


# The record as this process first found it or last wrote it (path: (ctime_ns, bytes)). A process that lives
# across many runs (`run`, the coordinator of `run --workers`, the only writer of rows while its workers' runs
# train) knows from it that something else wrote the record since, when a run or an agent wrote a row in the
# ledger and its record alike.
WRITTEN = {}


def last_written():
    """The ledger's bytes as the loop last wrote them, or None when there is no record of them."""
    try:
        path = record_file()
        head, _, data = (WRITTEN[path][1] if path in WRITTEN else path.read_bytes()).partition(b"\n")
        meta = json.loads(head)
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or not isinstance(meta.get("repository"), str):
        return None
    identity = repository_identity()
    if identity != meta["repository"] and (same_night(data) or still_recorded(meta["repository"], identity)):
        write_atomic(ledger_dir().parent / LEDGER_ID, meta["repository"].encode())  # the id file put back
        identity = meta["repository"]
    return data if identity == meta["repository"] else None


def still_recorded(recorded, identity):
    """Whether a ledger whose id file is gone or names another repository is still the recorded one: it holds a
    row, or records whose copies are still the recorded repository's, where a new clone's ledger is empty when
    the loop first meets the old record (its first command claims the copies, then makes the ledger and the
    record its own); and no record of another repository (one moved to this path) names the id it has now."""
    try:
        rows = bool(ledger_path().read_bytes().partition(b"\n")[2].strip())
    except OSError:
        rows = False
    try:
        copies = (copies_folder() / ".repository").read_text() == recorded
    except OSError:
        copies = False
    if not (rows or (copies and kept_files())):
        return False
    others = [p for p in record_folder().glob("*") if p != record_file() and p.is_file() and ".old-" not in p.name]
    return identity is None or not any(recorded_id(other) == identity for other in others)


def recorded_id(record):
    """The repository id a ledger's record names, or None."""
    try:
        with open(record, "rb") as f:
            return json.loads(f.readline()).get("repository")
    except (OSError, ValueError, AttributeError):
        return None


def same_night(recorded):
    """Whether the ledger still begins with the recorded one's header and first row (its baseline, which a new
    clone's night cannot share: another time, another commit)."""
    first = recorded.split(b"\n")[:2]
    if len(first) < 2 or not first[1].strip():
        return False
    try:
        with open(ledger_path(), "rb") as f:
            return f.read(len(first[0]) + len(first[1]) + 2) == b"\n".join(first) + b"\n"
    except OSError:
        return False


def put_back_record():
    """The ledger's record as this process last knew it, when something else wrote it since: the line that says
    so, or None."""
    try:
        path = record_file()
        if path not in WRITTEN:
            if path.is_file() and not path.is_symlink():
                WRITTEN[path] = (os.lstat(path).st_ctime_ns, path.read_bytes())
            return None
        ctime, mine = WRITTEN[path]
        if os.path.lexists(path) and os.lstat(path).st_ctime_ns == ctime:
            return None
        same = path.is_file() and not path.is_symlink() and path.read_bytes() == mine
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        path.parent.mkdir(parents=True, exist_ok=True)  # the whole folder deleted, say
        write_atomic(path, mine)
        WRITTEN[path] = (os.lstat(path).st_ctime_ns, mine)
    except OSError as e:
        cannot_remember(str(record_folder()), e.strerror)
        return None
    return None if same else (f"the ledger's record {path} was written by something other than this loop since it "
                              f"last wrote it: put back as the loop left it")


def remember(data):
    """Record these bytes as the ledger the loop wrote. A home that cannot keep the record costs the check
    between two processes of the loop, never a row."""
    path = record_file()
    try:
        if not path.exists():
            forget_gone_repositories()
        else:
            keep_anothers_record(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"ledger": str(ledger_path()), "repository": repository_identity(make=True)}
        record = json.dumps(meta).encode() + b"\n" + data
        write_atomic(path, record)
        WRITTEN[path] = (os.lstat(path).st_ctime_ns, record)
    except OSError as e:
        cannot_remember(str(path.parent), e.strerror)


def keep_anothers_record(path):
    """The record of another repository's ledger at this path (a clone this one replaced, or an old ledger whose
    rows and id file were both deleted), kept beside this one's as <key>.old-<its id>: no record is lost."""
    theirs, mine = recorded_id(path), repository_identity(make=True)
    if isinstance(theirs, str) and re.fullmatch("[0-9a-f]{16}", theirs) and theirs != mine:
        os.replace(path, path.with_name(f"{path.name}.old-{theirs}"))


@functools.cache
def cannot_remember(folder, reason):
    """Said once per process."""
    print(f"warning: cannot keep the ledger's record in {folder} ({reason}): an edit of the ledger between two "
          f"runs of the loop goes unnoticed", file=sys.stderr)


def forget_gone_repositories():
    """Drop the records of ledgers whose repository is gone (a temporary one, a deleted clone), and the copies
    of their other records (keep_file)."""
    for path in record_folder().glob("*"):
        try:
            if path.is_dir():
                ledger = Path((path / ".ledger").read_text())
            else:
                with open(path, "rb") as f:
                    ledger = Path(json.loads(f.readline())["ledger"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if ledger.parent.parent.exists():
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def recorded_elsewhere(tag):
    """Another ledger of this repository (its main checkout's or a worktree's) where the loop recorded rows of
    `tag`, when this checkout's ledger is not that one: None when there is none. A tag has one ledger: a
    worktree's is a fresh folder (and AUTORESEARCH_LEDGER_DIR any folder) with no record of the loop's, whose
    rows would be taken as they are: a red team's copy of the tag's ledger, with the best's rows made worse,
    had a comment-only change kept on the tag's branch."""
    common = Path(git("rev-parse", "--git-common-dir")).resolve()
    mine = ledger_path().resolve()
    for record in record_folder().glob("*"):
        if not record.is_file() or ".old-" in record.name:
            continue
        try:
            with open(record, "rb") as f:
                ledger = Path(json.loads(f.readline())["ledger"]).resolve()
                if ledger == mine or not ledger.is_relative_to(common) or not ledger.parent.parent.exists():
                    continue  # this ledger, another repository's, or a worktree since removed
                _, rows = read_results(ledger, f.read().decode(errors="replace"))
        except (OSError, ValueError, KeyError, TypeError, LoopError):
            continue
        if any(row.get("tag") == tag for row in rows):
            return ledger
    return None


def refuse_another_ledger(tag):
    """Stop before this checkout's ledger is read or recorded when `tag`'s rows are in another one
    (recorded_elsewhere), naming where the tag's loop runs."""
    theirs = recorded_elsewhere(tag)
    if theirs is None:
        return
    git_dir = theirs.parent.parent
    checkout = git_dir.parent if git_dir.name == ".git" else (
        Path((git_dir / "gitdir").read_text().strip()).parent if (git_dir / "gitdir").is_file() else git_dir)
    why = (f" ({LEDGER_ENV} is set: it is for the workers of `run --workers`, which set it themselves)"
           if os.environ.get(LEDGER_ENV) else "")
    raise LoopError(f"tag {tag}'s rows are in the ledger {theirs}, which the loop wrote; this checkout's ledger "
                    f"({ledger_path()}){why} is another, which the loop never wrote for {tag}: nothing was run. "
                    f"Fix: run the loop in {checkout}, or start a new tag here with "
                    f"`uv run agent_loop.py init --tag NEW`")


def as_last_written():
    """(where, text) of this repository's rows as the loop last wrote them, for a reader that writes nothing
    (`report`): the record outside the repository, else the ledger; None where there is neither. results.tsv in
    the checkout is a rendering anyone can edit after the loop's last command (a keep forged for the morning)."""
    try:
        known = last_written()
        if known is not None:
            return str(ledger_path()), known.decode(errors="replace")
        if ledger_path().is_file():
            return str(ledger_path()), ledger_path().read_text(errors="replace")
    except (OSError, LoopError):
        pass
    return None


def put_back():
    """The ledger and the loop's other records (kept_files) as the loop last wrote them, where something else
    wrote them since: the lines that say what was put back (none when all is as the loop left it)."""
    return [note for note in [put_back_record(), put_back_ledger(), *put_back_kept()] if note]


def put_back_ledger():
    """The ledger as the loop last wrote it again, when something else wrote it since: the line that says so,
    the edited file kept beside it (results.tsv.edited-TIME); None when it is as the loop left it. A ledger
    without a record (made before records were kept) becomes the loop's as it is, from its first check on."""
    known = last_written()
    current = ledger_path().read_bytes() if ledger_path().is_file() else None
    if known is None and current is not None:
        remember(current)
    if known is None or current == known:
        return None
    if current is not None and known.startswith(current) and known[len(current):].count(b"\n") == 1:
        write_atomic(ledger_path(), known)  # the loop's own last row, recorded before a kill cut its write
        render_results()
        return None
    edited = edited_name(ledger_path())
    if current is not None:
        write_atomic(edited, current)
    elif os.path.lexists(ledger_path()):
        shutil.move(ledger_path(), edited)  # a folder or a link in its place: kept too
    write_atomic(ledger_path(), known)
    render_results()
    return (f"the ledger ({ledger_path()}) was written by something other than this loop since its last row: "
            f"put back as the loop left it" + (f"; the edited file is kept at {edited}" if current else ""))


# The loop's other records in the ledger folder decide how its runs are judged: the config pinned at init, an
# experiment a `step` left half-confirmed (its runs so far), the run in flight (what a killed loop finishes), the
# untracked modules the seal compares with, what the evaluator's cache held, the evaluator's code outside the
# repository as first seen. Each is written with keep_file, which keeps a copy beside the ledger's record, and
# each command puts back an edit of one (an agent between two `step`s) as it does the ledger's. The workers of a
# tag write some of them at the same time as their coordinator checks them: a lock makes each copy and its file
# one write.

KEPT = ("*/init.json", "*/pending.json", "*/modules.json", "*/w*/modules.json", "*/compile-cache/evaluator.json",
        "*/w*/compile-cache/evaluator.json", "*/installed-code.json", "*/running.json", "*/w*/running.json")


# The records of this process's own folders (remember_records) as it found or last wrote them (path: bytes, or
# None for one it removed). A process that lives across many experiments (`run`, a worker of `run --workers`)
# knows from it that something else wrote a record and its copy alike (an agent between two experiments,
# another worker's run). Not a worker's folder below the tag's, which its worker owns, nor installed-code.json,
# which a tag's workers all write.
KEPT_WRITTEN = {}
OWN_FOLDERS = []
SHARED = "*/installed-code.json"


def owned(path):
    """Whether a record lies in one of this process's own folders (not in a worker's below the tag's) and in this
    repository's ledger, and is not a shared one."""
    path = Path(path)
    for folder in OWN_FOLDERS:
        if path.is_relative_to(folder) and path.is_relative_to(ledger_dir()):
            return not re.fullmatch(r"w\d+", path.relative_to(folder).parts[0]) and not path.match(SHARED)
    return False


def kept_files():
    """The loop's records of these kinds now in the ledger folder."""
    return {path for pattern in KEPT for path in ledger_dir().glob(pattern) if path.is_file() or path.is_symlink()}


def is_kept(relative):
    return any(Path(relative).match(pattern) for pattern in KEPT)


def copies_folder():
    return record_file().with_name(f"{record_file().name}.files")


def copy_of(path):
    """Where the copy of a record is kept (by its path as written: a link in the ledger folder is an edit)."""
    return copies_folder() / Path(path).relative_to(ledger_dir())


@contextlib.contextmanager
def copies_held():
    """The copies, held by this process until the block ends."""
    copies_folder().mkdir(parents=True, exist_ok=True)
    with open(copies_folder() / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def copies_known():
    """Whether the copies kept are this repository's; when they are not (none yet, a new clone at this path),
    the folder is emptied and made this repository's. Called holding them."""
    folder, identity = copies_folder(), repository_identity(make=True)
    try:
        if (folder / ".repository").read_text() == identity:
            return True
    except OSError:
        pass
    for path in folder.iterdir():
        if path.name == ".lock":
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    (folder / ".ledger").write_text(str(ledger_path()))  # for forget_gone_repositories
    (folder / ".repository").write_text(identity)
    return False


def keep_file(path, data):
    """Write one of the loop's records (KEPT) in the ledger folder, its copy first (a kill between the two then
    leaves what the loop meant to write, which the next check puts in place); data None removes both. Outside
    a ledger (a test's folder) it is written alone."""
    copied = False
    with contextlib.ExitStack() as held:
        try:
            copy_of(path)
            held.enter_context(copies_held())
            if (copies_folder() / ".repository").read_text() == repository_identity():  # put_back_kept made them
                write_copy(path, data)
                copied = True
        except (LoopError, ValueError, FileNotFoundError):  # no repository, not in its ledger, no copies yet
            pass
        except OSError as e:
            cannot_remember(str(copies_folder()), e.strerror)
        if data is None:
            Path(path).unlink(missing_ok=True)
        else:
            write_atomic(path, data)  # the workers of a tag share some (installed-code.json)
        if copied and owned(path):
            KEPT_WRITTEN[Path(path)] = data


def write_copy(path, data):
    copy = copy_of(path)
    if data is None:
        copy.unlink(missing_ok=True)
    else:
        copy.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(copy, data)


def kept_by_loop(path):
    """Whether the file holds what the loop last wrote there (keep_file's copy, outside the repository)."""
    try:
        return copy_of(path).read_bytes() == Path(path).read_bytes()
    except (OSError, LoopError, ValueError):
        return False


def kept_and_present(path):
    """(the bytes the loop last wrote there, or None; the bytes there now, or None)."""
    try:
        want = copy_of(path).read_bytes()
    except FileNotFoundError:
        want = None
    return want, path.read_bytes() if path.is_file() and not path.is_symlink() else None


def put_back_kept():
    """Each of the loop's records as the loop last wrote it (keep_file): an edited one put back, one the loop had
    removed (or never wrote) set aside, one deleted made again; the edited file kept as NAME.edited-TIME. Lines
    that say so. The first check with no copies of this repository's yet takes the records as they are."""
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(copies_held())
            if not copies_known():
                for path in kept_files():
                    write_copy(path, path.read_bytes())
                return []
            copies = {ledger_dir() / p.relative_to(copies_folder()) for p in copies_folder().rglob("*")
                      if p.is_file() and is_kept(p.relative_to(copies_folder()))}
        except OSError as e:
            cannot_remember(str(copies_folder()), e.strerror)
            return []
        return put_back_each(sorted(kept_files() | copies | set(filter(owned, KEPT_WRITTEN))))


def remember_records(folder):
    """Take the records of this loop's own folder (the tag's, or a worker's: not its workers' nor the tag's shared
    installed-code.json) as this process's, as they are now, put back already; one not there as one it removed.
    A process that lives across experiments then puts back what else writes them with their copies alike."""
    if Path(folder) not in OWN_FOLDERS:
        OWN_FOLDERS.append(Path(folder))
    for name in ("init.json", "pending.json", "modules.json", "compile-cache/evaluator.json", "running.json"):
        path = Path(folder) / name
        if is_kept(path.relative_to(ledger_dir())) and owned(path) and not path.is_symlink():
            KEPT_WRITTEN.setdefault(path, path.read_bytes() if path.is_file() else None)


def put_back_own():
    """put_back_kept for the records this process wrote alone (a worker, before each experiment: the others'
    are theirs to check)."""
    own = sorted(filter(owned, KEPT_WRITTEN))
    if not own:
        return []
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(copies_held())
            if (copies_folder() / ".repository").read_text() != repository_identity():
                return []  # not this repository's (the coordinator's next check makes them so)
        except (OSError, LoopError) as e:
            cannot_remember(str(copies_folder()), getattr(e, "strerror", None) or str(e))
            return []
        return put_back_each(own)


def put_back_each(paths):
    """Each record as the loop last wrote it; copies held."""
    notes = []
    for path in paths:
        try:
            notes += put_back_copy(path) + put_back_one(path)
        except (OSError, ValueError) as e:  # a folder on its way replaced, say: named, and the rest go on
            notes.append(f"{path} differs from what this loop last wrote there and could not be put back: {e}")
    return notes


def put_back_copy(path):
    """The copy of a record this process wrote, as it wrote it, when something else wrote the copy since (with the
    record alike, say, which put_back_one then puts back from it)."""
    if path not in KEPT_WRITTEN:
        return []
    copy, want = copy_of(path), KEPT_WRITTEN[path]
    if not copy.is_symlink() and not copy.is_dir() and (copy.read_bytes() if copy.is_file() else None) == want:
        return []
    if copy.is_dir() and not copy.is_symlink():
        shutil.rmtree(copy)
    elif copy.is_symlink():
        copy.unlink()
    write_copy(path, want)
    return [f"the copy of {path} outside the repository ({copy}) was written by something other than this loop "
            f"since it last wrote it: put back as the loop left it"]


def put_back_one(path):
    want, have = kept_and_present(path)
    if want == have and not path.is_symlink():
        return []
    present = os.path.lexists(path)
    edited = edited_name(path)
    if present:
        shutil.move(path, edited)
    if want is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, want)
    what = ("put back as the loop left it" if want is not None and present else
            "made again (it was deleted)" if want is not None else "set aside (the loop never wrote it)")
    return [f"{path} was written by something other than this loop since it last wrote it: {what}"
            + (f"; the edited file is kept at {edited}" if present else "")]


def edited_name(path):
    """NAME.edited-TIME beside it, one that no earlier edit (in the same second) took."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    edited, n = Path(path).with_name(f"{Path(path).name}.edited-{stamp}"), 1
    while os.path.lexists(edited):
        edited, n = Path(path).with_name(f"{Path(path).name}.edited-{stamp}-{n}"), n + 1
    return edited


def ensure_results_header():
    """A ledger with the header; one made before the ledger existed starts from the old results.tsv, and one
    with an older header gets today's columns (its rows keep their values). What else wrote the ledger since
    the loop last did is put back first, with a warning, so that no edit of it becomes the loop's own."""
    for note in put_back():
        print(f"warning: {note}", file=sys.stderr)
    if ledger_path().exists() and ledger_path().stat().st_size:
        header, rows = read_results(ledger_path())
        if header != COLUMNS and set(header) <= set(COLUMNS):
            lines = ["\t".join(COLUMNS)] + ["\t".join(one_line(r.get(c, "")) for c in COLUMNS) for r in rows]
            write_atomic(ledger_path(), ("\n".join(lines) + "\n").encode())
            remember(ledger_path().read_bytes())
            render_results()
        return
    if Path(RESULTS).exists() and Path(RESULTS).stat().st_size:
        end_last_line(RESULTS)
        shutil.copyfile(RESULTS, ledger_path())
    else:
        write_atomic(ledger_path(), ("\t".join(COLUMNS) + "\n").encode())
    remember(ledger_path().read_bytes())
    render_results()


# -----------------------------------------------------------------------------
# What the rows mean (the loop, the report and the plot all ask here)


def best_row(rows):
    """The best result: the last kept row, since each keep was shown better than the best before it
    (decide.py). None when nothing is kept. Works on results rows and on the report's history
    entries alike (both have a status)."""
    return next((r for r in reversed(rows) if r["status"] == "keep"), None)


def unmeasured(note):
    """REJECTED or INTERRUPTED when a row's note says its train.py has no trustworthy measurement
    (it never ran, did not run to the end, or broke the rules while running), else None."""
    return next((kind for kind in (REJECTED, INTERRUPTED) if note.startswith(kind)), None)


def not_judged(note):
    return note.startswith(f"discard: {NOT_JUDGED}")


def measured_versions(rows):
    """train.py versions already measured, by blob hash: the loop never runs one of them again. A version the
    rule could not judge is not measured until it was not judged NOT_JUDGED_MAX times: the note asks for it
    again once the machine is steady, and a stretch of load must not bar a change for the night."""
    ran = [(r, not_judged(r.get("note", ""))) for r in rows
           if r.get("train_py") and not unmeasured(r.get("note", ""))]
    tries = collections.Counter(r["train_py"] for r, unjudged in ran if unjudged)
    return {r["train_py"]: r for r, unjudged in ran if not unjudged or tries[r["train_py"]] >= NOT_JUDGED_MAX}
