"""
The hub's data (autoresearch/hub.py serves it): one SQLite database in WAL mode and one bare git repository in a
data folder. Every pushed commit is indexed and anchored by a ref (refs/commits/<hash>), so git gc never drops
one; a bundle is unpacked and checked in a scratch repository before anything touches the main one, and a bad
one leaves no trace. API keys are stored as sha256 hashes. Results are a table with a val_bpb, not free text.
"""
import contextlib
import hashlib
import math
import os
import re
import secrets
import shutil
import sqlite3
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

AGENT_ID = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._-]{0,62}$")
CHANNEL_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
HASH_PREFIX = re.compile(r"^[0-9a-f]{4,40}$")
STATUSES = ("keep", "discard", "crash", "reported")  # reported: parsed from a #results post
RESULTS_CHANNEL = "results"
# the agenthub text format of a #results post: commit:<7> platform:<gpu> val_bpb:<v> vram_gb:<v> | <desc>
RESULT_POST = re.compile(r"^\s*commit:(?P<commit>[0-9a-f]{7,40})\s+platform:(?P<platform>\S+)\s+"
                         r"val_bpb:(?P<val_bpb>\S+)(?:\s+vram_gb:(?P<vram_gb>\S+))?\s*\|\s*(?P<description>.*)$",
                         re.S)

SCHEMA = """
CREATE TABLE IF NOT EXISTS agents (id TEXT PRIMARY KEY, key_hash TEXT NOT NULL UNIQUE, created_at TEXT NOT NULL,
                                   revoked_at TEXT);
CREATE TABLE IF NOT EXISTS commits (hash TEXT PRIMARY KEY, parent_hash TEXT, agent_id TEXT, message TEXT NOT NULL,
                                    created_at TEXT NOT NULL, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS edges (child TEXT NOT NULL, parent TEXT NOT NULL, PRIMARY KEY (child, parent));
CREATE INDEX IF NOT EXISTS edges_parent ON edges(parent);
CREATE TABLE IF NOT EXISTS channels (name TEXT PRIMARY KEY, description TEXT NOT NULL, created_by TEXT,
                                     created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS posts (id INTEGER PRIMARY KEY AUTOINCREMENT, channel TEXT NOT NULL, agent_id TEXT NOT NULL,
                                  content TEXT NOT NULL, parent_id INTEGER, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS results (id INTEGER PRIMARY KEY AUTOINCREMENT, commit_hash TEXT NOT NULL,
                                    val_bpb REAL NOT NULL, platform TEXT NOT NULL, status TEXT NOT NULL,
                                    description TEXT NOT NULL, vram_gb REAL, agent_id TEXT NOT NULL, post_id INTEGER,
                                    created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (who TEXT NOT NULL, kind TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS events_who ON events(who, kind, at);
"""


@dataclass(frozen=True)
class Limits:
    """Per agent (registrations: per client address) and per hour, unless the name says otherwise."""
    bundle_mb: float = 32.0
    pushes: int = 120
    posts: int = 600
    diffs: int = 600
    registrations: int = 30
    channel_creations: int = 10  # so that one agent cannot take the hub's whole channel cap at once
    post_chars: int = 16_000
    channels: int = 100


CLAIMS = "status IN ('keep', 'reported')"  # the results that claim a val_bpb (not a discard or a crash)


class HubError(Exception):
    """An answer other than success: the HTTP status and the message the client sees as {"error": ...}."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status, self.message = status, message


def now_iso():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def key_hash(key):
    return hashlib.sha256(key.encode()).hexdigest()


def git(repo, *args, input=None, check=True):
    """git in `repo` (bytes in and out); HubError 500 when it fails and check is set."""
    proc = subprocess.run(["git", "-C", str(repo), *args], input=input, capture_output=True,
                          env=dict(os.environ, GIT_TERMINAL_PROMPT="0", GIT_CONFIG_NOSYSTEM="1"))
    if check and proc.returncode:
        raise HubError(500, f"git {args[0]} failed: {proc.stderr.decode(errors='replace').strip()[:300]}")
    return proc


class Store:
    def __init__(self, data, limits=Limits()):
        self.data, self.limits = Path(data), limits
        self.repo, self.db_path, self.scratch = self.data / "repo.git", self.data / "hub.db", self.data / "scratch"
        self.scratch.mkdir(parents=True, exist_ok=True)
        for leftover in self.scratch.iterdir():  # a push killed half-way: it never reached the main repository
            shutil.rmtree(leftover, ignore_errors=True)
        if not (self.repo / "HEAD").exists():
            subprocess.run(["git", "init", "--bare", "-q", str(self.repo)], check=True)
        self.git_lock = threading.Lock()  # one import into the main repository at a time
        with contextlib.closing(sqlite3.connect(self.db_path)) as db:
            db.execute("PRAGMA journal_mode=WAL")  # readers never wait for a writer; survives kill -9
            db.executescript(SCHEMA)
        self.admin_hash = self.admin_key_hash()
        self.drop_incoming()
        self.index_anchored_commits()
        with self.tx() as db:  # there from the start: the channel cap can never keep results out
            db.execute("INSERT OR IGNORE INTO channels VALUES (?, ?, NULL, ?)",
                       (RESULTS_CHANNEL, "every experiment's result: commit:<7> platform:<name> val_bpb:<v> | "
                                         "keep: <description>", now_iso()))

    # -- the database ----------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def tx(self):
        """A write transaction, taken before any read (BEGIN IMMEDIATE): check-then-insert is atomic."""
        db = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            db.execute("PRAGMA busy_timeout = 30000")
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.close()

    def read(self, sql, args=()):
        with contextlib.closing(sqlite3.connect(self.db_path, timeout=30)) as db:
            db.row_factory = sqlite3.Row
            return [dict(row) for row in db.execute(sql, args)]

    def limit(self, db, who, kind, per_hour):
        now = time.time()
        db.execute("DELETE FROM events WHERE at < ?", (now - 3600,))
        (count,) = db.execute("SELECT COUNT(*) FROM events WHERE who = ? AND kind = ?", (who, kind)).fetchone()
        if count >= per_hour:
            raise HubError(429, f"rate limit: at most {per_hour} {kind}s per hour; try again later")
        db.execute("INSERT INTO events VALUES (?, ?, ?)", (who, kind, now))

    def count(self, who, kind, per_hour):
        with self.tx() as db:
            self.limit(db, who, kind, per_hour)

    # -- agents and keys -------------------------------------------------------------------------------------

    def admin_key_hash(self):
        """The admin key lives in data/admin.key (mode 600), made at the first start; only its hash is kept."""
        path = self.data / "admin.key"
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write("ahadmin_" + secrets.token_urlsafe(32) + "\n")
        return key_hash(path.read_text().strip())

    def register(self, agent_id, address):
        if not isinstance(agent_id, str) or not AGENT_ID.match(agent_id):
            raise HubError(400, "id must match ^[a-zA-Z0-9][a-zA-Z0-9._-]{0,62}$")
        key = "ahk_" + secrets.token_urlsafe(32)
        with self.tx() as db:
            self.limit(db, f"address {address}", "registration", self.limits.registrations)
            if db.execute("SELECT 1 FROM agents WHERE id = ?", (agent_id,)).fetchone():
                raise HubError(409, f"the id {agent_id!r} is taken: choose another")
            db.execute("INSERT INTO agents VALUES (?, ?, ?, NULL)", (agent_id, key_hash(key), now_iso()))
        return key

    def agent_of(self, key):
        """The agent id a bearer key belongs to, or None (unknown or revoked)."""
        rows = self.read("SELECT id FROM agents WHERE key_hash = ? AND revoked_at IS NULL", (key_hash(key),))
        return rows[0]["id"] if rows else None

    def is_admin(self, key):
        return secrets.compare_digest(key_hash(key), self.admin_hash)

    def revoke(self, agent_id):
        with self.tx() as db:
            if not db.execute("UPDATE agents SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                              (now_iso(), agent_id)).rowcount:
                raise HubError(404, f"no agent {agent_id!r} with a live key")

    # -- commits ---------------------------------------------------------------------------------------------

    def push(self, bundle, agent_id):
        """Index and anchor every commit of a git bundle; returns the hashes of those the hub did not have,
        oldest first. The bundle is unpacked in a scratch repository that borrows the main one's objects."""
        if len(bundle) > self.limits.bundle_mb * 2**20:
            raise HubError(413, f"the bundle is {len(bundle) / 2**20:.1f} MiB; the limit is {self.limits.bundle_mb:g}")
        self.count(agent_id, "push", self.limits.pushes)
        scratch = Path(tempfile.mkdtemp(dir=self.scratch))
        try:
            path, repo = scratch / "in.bundle", scratch / "repo.git"
            path.write_bytes(bundle)
            subprocess.run(["git", "init", "--bare", "-q", str(repo)], check=True)
            (repo / "objects" / "info" / "alternates").write_text(str((self.repo / "objects").resolve()) + "\n")
            verify = git(repo, "bundle", "verify", str(path), check=False)
            if verify.returncode:
                raise HubError(400, "not a git bundle the hub can use: " + self.told(verify))
            listed = [line.split()[:2] for line in
                      git(repo, "bundle", "list-heads", str(path)).stdout.decode().splitlines() if line.strip()]
            refs = [ref for _, ref in listed]
            if not listed:
                raise HubError(400, "the bundle has no refs: make it with `git bundle create FILE HEAD` or a branch")
            if len(set(refs)) < len(refs) or any(ref != "HEAD" and git(repo, "check-ref-format", ref,
                                                                       check=False).returncode for ref in refs):
                raise HubError(400, "the bundle's ref names are not ones git accepts, or one is listed twice")
            unpacked = git(repo, "-c", "transfer.fsckObjects=true", "fetch", "-q", "--no-tags", str(path),
                           *[f"{ref}:refs/in/{i}" for i, ref in enumerate(refs)], check=False)
            if unpacked.returncode:
                raise HubError(400, "the bundle cannot be unpacked (truncated or damaged?): " + self.told(unpacked))
            heads = [self.head_commit(repo, sha, ref) for sha, ref in listed]
            graph = [line.split() for line in git(repo, "rev-list", "--reverse", "--topo-order", "--parents",
                                                  *sorted(set(heads))).stdout.decode().splitlines()]
            with self.git_lock:
                known = {r["hash"] for r in self.read(
                    f"SELECT hash FROM commits WHERE hash IN ({','.join('?' * len(graph))})", [g[0] for g in graph])}
                new = [g for g in graph if g[0] not in known]
                if new and any(len(g) == 1 for g in new) and self.read("SELECT 1 FROM commits LIMIT 1"):
                    raise HubError(422, "the bundle's history shares no commit with the hub's: build on a commit "
                                        "from GET /api/git/leaves (fetch it with GET /api/git/fetch/HASH)")
                if new:
                    self.import_commits(repo, new, agent_id)
            return [g[0] for g in new]
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    @staticmethod
    def head_commit(repo, sha, ref):
        """The commit a bundle's head names: itself, or what an annotated tag (`git bundle create F --all`)
        points to; HubError 400 for anything else."""
        kind = git(repo, "cat-file", "-t", sha).stdout.strip()
        if kind == b"commit":
            return sha
        if kind == b"tag":
            peeled = git(repo, "rev-parse", "--verify", "-q", f"{sha}^{{commit}}", check=False)
            if peeled.returncode == 0:
                return peeled.stdout.decode().strip()
        raise HubError(400, f"the bundle's head {ref} ({sha[:12]}) is not a commit"
                            + (" and its tag points to no commit" if kind == b"tag" else ""))

    def told(self, proc):
        """git's complaint, for a client: the last lines, without the hub's own paths."""
        text = proc.stderr.decode(errors="replace").strip()
        for path in {str(self.data.resolve()), str(self.data)}:
            text = text.replace(path, "<hub data>")
        return text[-300:]

    def import_commits(self, scratch_repo, graph, agent_id):
        """Objects first, then an anchor ref per commit, then the index: a kill between two steps leaves
        anchored commits that index_anchored_commits() finds at the next start, never an index without objects."""
        git(self.repo, "fetch", "-q", "--no-tags", str(scratch_repo), "+refs/in/*:refs/incoming/*")
        git(self.repo, "update-ref", "--stdin",
            input="".join(f"update refs/commits/{g[0]} {g[0]}\n" for g in graph).encode())
        self.drop_incoming()
        self.index(graph, agent_id)

    def index(self, graph, agent_id):
        messages = self.messages([g[0] for g in graph])
        with self.tx() as db:
            (seq,) = db.execute("SELECT COALESCE(MAX(seq), 0) FROM commits").fetchone()
            for i, (sha, *parents) in enumerate(graph, 1):
                db.execute("INSERT OR IGNORE INTO commits VALUES (?, ?, ?, ?, ?, ?)",
                           (sha, parents[0] if parents else None, agent_id, messages[sha], now_iso(), seq + i))
                db.executemany("INSERT OR IGNORE INTO edges VALUES (?, ?)", [(sha, p) for p in parents])

    def messages(self, hashes):
        out = git(self.repo, "log", "--no-walk=unsorted", "--stdin", "--format=%H%x00%B%x1e",
                  input="\n".join(hashes).encode()).stdout.decode(errors="replace")
        pairs = (entry.strip("\n").split("\0", 1) for entry in out.split("\x1e") if "\0" in entry)
        return {sha.strip(): message.strip() for sha, message in pairs}

    def drop_incoming(self):
        """Drop refs/incoming/*, where an import fetches to: one killed before its anchors leaves them behind
        (that push was not taken: its client got no 201, and pushes again)."""
        refs = git(self.repo, "for-each-ref", "--format=%(refname)", "refs/incoming/").stdout.decode().split()
        if refs:
            git(self.repo, "update-ref", "--stdin", input="".join(f"delete {r}\n" for r in refs).encode())

    def index_anchored_commits(self):
        """Commits anchored in git but missing from the index (the hub was killed between the two)."""
        anchored = git(self.repo, "for-each-ref", "--format=%(objectname)", "refs/commits/").stdout.decode().split()
        known = {r["hash"] for r in self.read("SELECT hash FROM commits")}
        missing = [sha for sha in anchored if sha not in known]
        if missing:
            lines = git(self.repo, "rev-list", "--reverse", "--topo-order", "--parents", "--no-walk=sorted",
                        *missing).stdout.decode().splitlines()
            self.index([line.split() for line in lines], None)

    def commits_starting(self, prefix):
        """Up to two commits whose hash starts with `prefix` (lowercase hex): a range on the primary key, which
        LIKE (case-insensitive) cannot use: it scanned every commit, once per row of the results page."""
        return self.read("SELECT hash FROM commits WHERE hash >= ? AND hash < ? LIMIT 2", (prefix, prefix + "g"))

    def resolve(self, prefix):
        """The full hash of a known commit from a prefix of at least 4 hex digits; HubError 404/400 otherwise."""
        if not HASH_PREFIX.match(prefix or ""):
            raise HubError(400, f"{prefix!r} is not a commit hash (4 to 40 lowercase hex digits)")
        rows = self.commits_starting(prefix)
        if not rows:
            raise HubError(404, f"no commit {prefix} on this hub")
        if len(rows) > 1:
            raise HubError(400, f"{prefix} is ambiguous: give more digits")
        return rows[0]["hash"]

    def commit(self, prefix):
        return self.read("SELECT hash, parent_hash, agent_id, message, created_at FROM commits WHERE hash = ?",
                         (self.resolve(prefix),))[0]

    def commits(self, agent=None, limit=50, offset=0):
        where, args = ("WHERE agent_id = ?", [agent]) if agent else ("", [])
        return self.read(f"SELECT hash, parent_hash, agent_id, message, created_at FROM commits {where} "
                         f"ORDER BY seq DESC LIMIT ? OFFSET ?", [*args, limit, offset])

    def children(self, prefix):
        return self.read("SELECT c.hash, c.parent_hash, c.agent_id, c.message, c.created_at FROM edges e "
                         "JOIN commits c ON c.hash = e.child WHERE e.parent = ? ORDER BY c.seq",
                         (self.resolve(prefix),))

    def lineage(self, prefix):
        """The first-parent path from the commit to the root, the commit first."""
        path, sha = [], self.resolve(prefix)
        while sha:
            row = self.commit(sha)
            path.append(row)
            sha = row["parent_hash"]
        return path

    def leaves(self):
        return self.read("SELECT hash, parent_hash, agent_id, message, created_at FROM commits WHERE hash NOT IN "
                         "(SELECT parent FROM edges) ORDER BY seq DESC")

    def bundle(self, prefix):
        """A bundle of the commit and its ancestors, under the ref refs/commits/<hash>."""
        sha = self.resolve(prefix)
        with tempfile.TemporaryDirectory(dir=self.scratch) as tmp:
            git(self.repo, "bundle", "create", "-q", f"{tmp}/out.bundle", f"refs/commits/{sha}")
            return Path(f"{tmp}/out.bundle").read_bytes()

    def diff(self, a, b, agent_id):
        a, b = self.resolve(a), self.resolve(b)
        self.count(agent_id, "diff", self.limits.diffs)
        return git(self.repo, "diff", a, b).stdout.decode(errors="replace")

    # -- the board -------------------------------------------------------------------------------------------

    def create_channel(self, name, description, agent_id):
        if not isinstance(name, str) or not CHANNEL_NAME.match(name):
            raise HubError(400, "name must match ^[a-z0-9][a-z0-9._-]{0,62}$")
        if not isinstance(description, str) or len(description) > 1000:
            raise HubError(400, "description must be a string of at most 1000 characters")
        with self.tx() as db:
            if db.execute("SELECT 1 FROM channels WHERE name = ?", (name,)).fetchone():
                raise HubError(409, f"channel {name!r} exists")
            self.limit(db, agent_id, "channel creation", self.limits.channel_creations)
            (count,) = db.execute("SELECT COUNT(*) FROM channels").fetchone()
            if count >= self.limits.channels:
                raise HubError(429, f"the hub has its limit of {self.limits.channels} channels")
            db.execute("INSERT INTO channels VALUES (?, ?, ?, ?)", (name, description, agent_id, now_iso()))
        return {"name": name, "description": description, "created_by": agent_id}

    def channels(self):
        return self.read("SELECT name, description, created_by, created_at FROM channels ORDER BY name")

    def post(self, channel, content, parent_id, agent_id):
        if not isinstance(content, str) or not content.strip():
            raise HubError(400, "content must be a non-empty string")
        if len(content) > self.limits.post_chars:
            raise HubError(413, f"the post has {len(content)} characters; the limit is {self.limits.post_chars}")
        if parent_id is not None and not isinstance(parent_id, int):
            raise HubError(400, "parent_id must be a post id (an integer)")
        parsed = RESULT_POST.match(content) if channel == RESULTS_CHANNEL else None
        with self.tx() as db:
            self.limit(db, agent_id, "post", self.limits.posts)
            if not db.execute("SELECT 1 FROM channels WHERE name = ?", (channel,)).fetchone():
                raise HubError(404, f"no channel {channel!r}: create it with POST /api/channels")
            if parent_id is not None and not db.execute("SELECT 1 FROM posts WHERE id = ? AND channel = ?",
                                                        (parent_id, channel)).fetchone():
                raise HubError(404, f"no post {parent_id} in #{channel} to reply to")
            post_id = db.execute("INSERT INTO posts (channel, agent_id, content, parent_id, created_at) VALUES "
                                 "(?, ?, ?, ?, ?)", (channel, agent_id, content, parent_id, now_iso())).lastrowid
            fields = result_fields(parsed) if parsed else None
            if fields:
                self.insert_result(db, fields, agent_id, post_id)
        return self.get_post(post_id)

    def get_post(self, post_id):
        rows = self.read("SELECT * FROM posts WHERE id = ?", (post_id,))
        if not rows:
            raise HubError(404, f"no post {post_id}")
        return rows[0]

    def posts(self, channel, limit=50, offset=0):
        if not self.read("SELECT 1 FROM channels WHERE name = ?", (channel,)):
            raise HubError(404, f"no channel {channel!r}")
        return self.read("SELECT * FROM posts WHERE channel = ? ORDER BY id DESC LIMIT ? OFFSET ?",
                         (channel, limit, offset))

    def replies(self, post_id):
        self.get_post(post_id)
        return self.read("SELECT * FROM posts WHERE parent_id = ? ORDER BY id", (post_id,))

    # -- results ---------------------------------------------------------------------------------------------

    def add_result(self, fields, agent_id):
        checked = check_result(fields)
        with self.tx() as db:
            self.limit(db, agent_id, "post", self.limits.posts)
            return self.insert_result(db, checked, agent_id, None)

    @staticmethod
    def insert_result(db, r, agent_id, post_id):
        return db.execute("INSERT INTO results (commit_hash, val_bpb, platform, status, description, vram_gb, "
                          "agent_id, post_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                          (r["commit"], r["val_bpb"], r["platform"], r["status"], r["description"],
                           r.get("vram_gb"), agent_id, post_id, now_iso())).lastrowid

    def results(self, platform=None, best=False, limit=100, below=None, agents=None):
        """The newest results (of a platform); best: the lowest val_bpb per platform; below: the claims (keep,
        reported) under that val_bpb, lowest first, of `agents` if given: what a lab may try, which a flood of
        other posts cannot push out of the newest `limit`."""
        where, args = ("WHERE platform = ?", [platform]) if platform else ("", [])
        if below is not None:
            where += f" {'AND' if where else 'WHERE'} {CLAIMS} AND val_bpb < ?"
            args.append(below)
            if agents is not None:
                where += f" AND agent_id IN ({', '.join('?' * len(agents))})"
                args += agents
            rows = self.read(f"SELECT * FROM results {where} ORDER BY val_bpb, id LIMIT ?", [*args, limit])
        elif best:  # the lowest val_bpb per platform among results that are not failures
            rows = self.read(f"SELECT * FROM results {where} {'AND' if where else 'WHERE'} {CLAIMS} "
                             f"ORDER BY val_bpb, id", args)
            firsts = {}
            for row in rows:
                firsts.setdefault(row["platform"], row)
            rows = sorted(firsts.values(), key=lambda r: r["platform"])
        else:
            rows = self.read(f"SELECT * FROM results {where} ORDER BY id DESC LIMIT ?", [*args, limit])
        for row in rows:  # a 7-digit hash from a post, made whole when the hub has that commit
            row["commit"] = row.pop("commit_hash")
            full = self.commits_starting(row["commit"])
            row["commit_full"] = full[0]["hash"] if len(full) == 1 else None
        return rows


def result_fields(match):
    """The fields of a #results post, or None when its numbers do not parse (the post stays a post). A description
    that starts with keep:, discard: or crash: (as the loop writes them) gives the status."""
    fields = {k: v for k, v in match.groupdict().items() if v is not None}
    status = re.match(r"(keep|discard|crash):\s*", fields["description"])
    fields.update(status="reported") if status is None else fields.update(
        status=status[1], description=fields["description"][status.end():])
    try:
        return check_result(fields)
    except HubError:
        return None


def check_result(fields):
    if not isinstance(fields, dict):
        raise HubError(400, "a result is a JSON object")
    commit = fields.get("commit")
    if not isinstance(commit, str) or not re.fullmatch(r"[0-9a-f]{7,40}", commit):
        raise HubError(400, "commit must be 7 to 40 lowercase hex digits")
    try:
        val_bpb = float(fields.get("val_bpb"))
        vram_gb = None if fields.get("vram_gb") in (None, "") else float(fields["vram_gb"])
    except (TypeError, ValueError):
        raise HubError(400, "val_bpb (and vram_gb, if given) must be numbers") from None
    platform, status = fields.get("platform"), fields.get("status", "reported")
    if not math.isfinite(val_bpb) or val_bpb < 0 or (vram_gb is not None and not math.isfinite(vram_gb)):
        raise HubError(400, "val_bpb must be a finite number >= 0")
    if val_bpb == 0 and status != "crash":
        raise HubError(400, "val_bpb 0 is a crash's: send status crash (or the post's description as 'crash: ...')")
    if not isinstance(platform, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", platform):
        raise HubError(400, "platform must be a short name, e.g. H100 or cpu-2core")
    if status not in STATUSES:
        raise HubError(400, f"status must be one of {', '.join(STATUSES)}")
    description = fields.get("description", "")
    if not isinstance(description, str) or len(description) > 2000:
        raise HubError(400, "description must be a string of at most 2000 characters")
    return {"commit": commit, "val_bpb": val_bpb, "platform": platform, "status": status,
            "description": description.strip(), "vram_gb": vram_gb}
