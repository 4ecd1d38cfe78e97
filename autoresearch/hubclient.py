"""
The loop as a hub's client (`run --hub URL`; autoresearch/hub.py is the other end). Credentials live in
~/.config/autoresearch/hubs/<host_port>.json (registered on first use, mode 600), as program_hub.md keeps them.
After each experiment its result goes to #results in agenthub's text format (the hub files it in its results
table, status included), and a keep is pushed as a bundle; so do, at the start and after an outage, the rows
the hub has not had yet (the baseline, those of a night without --hub or while the hub was down). Before each
experiment, the hub's best commit for this platform, when it beats the local best, becomes the next proposal:
the loop's own runs and keep rule decide whether it becomes the best here (a claim on the hub is a hint, not a
fact). With --workers, the coordinator posts and pushes, and each worker adopts (one record of tried commits:
each is tried once, by one worker, and again after a verdict of "not judged"). A hub that goes down during the
night never stops the loop: it says so and goes on (one that cannot be reached at the start does). Adopting a
commit runs code that another agent pushed: --hub-trust limits whose.
"""
import contextlib
import fcntl
import json
import os
import re
import secrets
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import requests
import urllib3

from autoresearch.gitrepo import git, git_env, identity, row_commit
from autoresearch.layout import TRAIN, LoopError, read_json
from autoresearch.ledger import ledger_dir, measured_versions, not_judged, one_line, tag_rows, write_atomic
from autoresearch.proposers import Proposal
from autoresearch.state import say

TIMEOUT_S = 60             # for the hub's whole answer, not each read of it: a hub that drips one byte a while
MAX_ANSWER = 1 << 30       # bytes: a bundle of a whole history is far smaller
FULL_ID = re.compile(r"[0-9a-f]{40}([0-9a-f]{24})?")
RESULTS_CHANNEL = "results"


class HubDown(Exception):
    """The hub did not answer, or not as it should: the loop goes on without it."""

    def __init__(self, message, status=None):
        super().__init__(message)
        self.status = status


def credentials_path(url):
    name = re.sub(r"[^A-Za-z0-9.]+", "_", url.split("://", 1)[-1]).strip("_")
    return Path.home() / ".config" / "autoresearch" / "hubs" / f"{name}.json"


def platform_name(config):
    """Where val_bpb values compare: accelerator.profile.dataset, e.g. H100-80GB-HBM3.reference.climbmix."""
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10)
        gpu = smi.stdout.splitlines()[0].replace("NVIDIA ", "") if smi.returncode == 0 else None
    except (OSError, IndexError, subprocess.SubprocessError):
        gpu = None
    if not gpu:
        gpu = f"cpu{len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()}"
    def clean(text):
        return re.sub(r"[^A-Za-z0-9._-]+", "-", text.strip())

    tail = clean(f".{config['profile']}.{config.get('dataset') or 'unknown'}")[:64]
    return clean(gpu)[:64 - len(tail)].strip("-.") + tail  # the accelerator is cut, never the profile


class HubClient:
    def __init__(self, url, loop, platform=None, trust=None):
        self.url, self.loop, self.trust = url.rstrip("/"), loop, trust
        self.platform = platform or platform_name(loop.config)
        # tried commits, posted rows and the last push, out of the agent's reach; one file for the tag (its workers
        # included) and this hub: another hub has had none of them
        self.state_path = ledger_dir() / loop.tag / f"hub-{credentials_path(self.url).stem}.json"
        try:
            self.auth = {"Authorization": f"Bearer {self.credentials()['api_key']}"}
            self.data("GET", "/api/git/leaves")
        except HubDown as e:
            if e.status == 401:  # a key saved for this address that the hub there does not know
                raise LoopError(f"the hub at {self.url} cannot be used: it does not know the key saved in "
                                f"{credentials_path(self.url)} (a new hub at that address, or the key was revoked)."
                                f" Fix: delete that file to register again, or run without --hub") from None
            raise LoopError(f"the hub at {self.url} cannot be used: {e}. Fix: start one with `uv run agent_loop.py "
                            f"hub --listen HOST:PORT` or check the URL; or run without --hub") from None

    def call(self, method, path, ok=(), **kw):
        deadline = time.monotonic() + TIMEOUT_S
        try:
            r = requests.request(method, self.url + path, headers=getattr(self, "auth", {}), timeout=TIMEOUT_S,
                                 stream=True, **kw)
            body = bytearray()
            while chunk := r.raw.read1(1 << 16, decode_content=True):  # one read each: the deadline is seen
                body += chunk
                if time.monotonic() > deadline or len(body) > MAX_ANSWER:
                    r.close()
                    raise HubDown(f"{method} {path}: no whole answer within {TIMEOUT_S} s and {MAX_ANSWER} bytes")
            r._content = bytes(body)  # read whole, as requests does without stream: .json(), .text, .content
        except (requests.RequestException, urllib3.exceptions.HTTPError) as e:
            raise HubDown(f"{method} {path}: {type(e).__name__}") from None
        if r.status_code >= 400 and r.status_code not in ok:
            try:
                reason = r.json().get("error", r.text)
            except (ValueError, AttributeError):
                reason = r.text
            raise HubDown(f"{method} {path}: {r.status_code} {str(reason)[:200]}", r.status_code)
        return r

    def data(self, method, path, **kw):
        """The JSON answer (a proxy's HTML page is a hub that is down, not a crash of the loop)."""
        r = self.call(method, path, **kw)
        try:
            return r.json()
        except ValueError:
            raise HubDown(f"{method} {path}: the answer is not JSON ({r.text[:80]!r})") from None

    def credentials(self):
        path = credentials_path(self.url)
        saved = read_json(path)
        if saved and saved.get("api_key"):
            return saved
        base = re.sub(r"[^a-zA-Z0-9._-]", "-", f"{socket.gethostname()}-{self.loop.tag}")[:50].strip("-._") or "lab"
        for agent_id in (base, f"{base}-{secrets.token_hex(3)}", f"{base}-{secrets.token_hex(3)}"):
            r = self.call("POST", "/api/register", ok=(409,), json={"id": agent_id})
            if r.status_code == 201:
                saved = {"hub": self.url, "id": agent_id, "api_key": r.json()["api_key"]}
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.name + ".tmp")
                with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
                    json.dump(saved, f)  # mode 600 from its first byte
                os.replace(tmp, path)
                say(self.loop, f"hub: registered as {agent_id}; key saved in {path}")
                return saved
        raise HubDown("every id tried was taken")

    def state(self):
        return read_json(self.state_path) or {"tried": [], "pushed": None, "posted": []}

    @contextlib.contextmanager
    def changing_state(self):
        """The hub state file to change in place, under a lock: workers adopt while their coordinator pushes."""
        with open(self.state_path.with_suffix(".lock"), "a") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            state = self.state()
            yield state
            write_atomic(self.state_path, json.dumps(state).encode())

    # -- after an experiment -----------------------------------------------------------------------------------

    def publish(self, row=None):
        """Post every row of the tag the hub has not had yet (the baseline, those of a night before --hub or
        while the hub was down), then this finished experiment's; push the branch when one was kept."""
        rows = tag_rows(self.loop.tag)
        if row is not None and row.get("n") not in {r.get("n") for r in rows}:
            rows.append(row)
        posted = set(self.state().get("posted", []))
        waiting = [r for r in rows if r.get("n") not in posted]
        measured = measured_versions(rows)
        for r in waiting:  # this experiment's, and any a loop recorded but died before publishing
            if r.get("train_py") not in measured:
                self.untry(r)
        try:
            for r in waiting:
                val, memory = float(r["val_bpb"]), float(r.get("memory_gb") or 0)
                # the full id: another lab can make a commit that shares the first 7 digits, and the hub could
                # then name neither (a discarded commit, off the branch, stays ambiguous: its short id goes)
                try:
                    full = row_commit(r, within=f"refs/heads/{self.loop.branch}")
                except LoopError:
                    full = r["commit"]
                self.call("POST", f"/api/channels/{RESULTS_CHANNEL}/posts", json={
                    "content": f"commit:{full} platform:{self.platform} val_bpb:{val:.6f} "
                               f"vram_gb:{memory:.1f} | {r['status']}: {r['description']}"})
                with self.changing_state() as state:
                    state["posted"] = state.get("posted", []) + [r.get("n")]
            if any(r["status"] == "keep" for r in waiting):
                self.push()
            if len(waiting) > 1:
                say(self.loop, f"hub: posted {len(waiting)} results")
        except (HubDown, LoopError) as e:
            say(self.loop, f"hub: {e}; the loop goes on without it (what is not posted yet will be, later)")

    def untry(self, row):
        """A hub commit the rule could not judge (ledger.not_judged) may be tried again, as the note says, once
        another experiment was recorded after it. Once per row: a row the hub has not had yet comes here at each
        publish, and its commit may have been taken again meanwhile (by another worker, say)."""
        adopted = re.match(r"from the hub: ([0-9a-f]{7,}) of ", row.get("description", ""))
        if adopted and not_judged(row.get("note", "")):
            with self.changing_state() as state:
                if str(row.get("n")) in state.get("untried", []):
                    return
                state["untried"] = state.get("untried", []) + [str(row.get("n"))]
                again = [t for t in state["tried"] if t.startswith(adopted[1])]
                state["tried"] = [t for t in state["tried"] if t not in again]
                # not at the very next experiment, on a machine that may still be as it was: after another one
                state["after"] = dict(state.get("after", {}), **{t: str(row.get("n")) for t in again})

    def push(self):
        state = self.state()
        head = git("rev-parse", f"refs/heads/{self.loop.branch}")  # a coordinator's checkout may be elsewhere
        if head == state["pushed"]:
            return
        since = state["pushed"] if state["pushed"] and git("merge-base", "--is-ancestor", state["pushed"], head,
                                                           check=False) is not None else None
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "push.bundle"
            for exclude in ([[f"^{since}"]] if since else []) + [[]]:  # thin first; whole if the hub lacks `since`
                git("bundle", "create", "-q", str(path), f"refs/heads/{self.loop.branch}", *exclude)
                r = self.call("POST", "/api/git/push", ok=(400,), data=path.read_bytes())
                if r.status_code == 201:
                    break
            else:
                raise HubDown(f"push refused: {r.text[:200]}")
        with self.changing_state() as state:
            state["pushed"] = head
        try:
            new = len(r.json()["hashes"])
        except (ValueError, KeyError, TypeError):  # pushed all the same: the hub's answer is only a count
            new = "?"
        say(self.loop, f"hub: pushed {self.loop.branch} at {head[:7]} ({new} new commits)")

    # -- before an experiment ----------------------------------------------------------------------------------

    def candidate(self):
        """The best claim on the hub for this platform that beats the local best, comes from a trusted agent,
        is on the hub and was not tried here yet; None if there is none."""
        # the claims below the best, lowest first (of the trusted agents): newest first, a flood of other posts
        # pushed them out of the 1000 a lab reads; a hub without these filters answers the newest, filtered here
        claims = self.data("GET", "/api/results", params={
            "platform": self.platform, "limit": "1000", "below": repr(self.loop.best_val),
            **({"agents": ",".join(sorted(self.trust))} if self.trust is not None else {})})
        if not isinstance(claims, list):
            raise HubDown(f"GET /api/results: not a list of results ({str(claims)[:80]!r})")
        state = self.state()
        last = str(self.loop.rows[-1].get("n")) if self.loop.rows else None
        tried = set(state["tried"]) | {c for c, n in state.get("after", {}).items() if n == last}
        usable = [c for c in claims if well_formed(c) and c["status"] in ("keep", "reported")
                  and 0 < c["val_bpb"] < self.loop.best_val and c["commit_full"] not in tried
                  and (self.trust is None or c["agent_id"] in self.trust)]
        for claim in sorted(usable, key=lambda c: (c["val_bpb"], c["id"])):
            if self.trust is None:
                return claim
            # the commit's pusher trusted too: an untrusted agent's commit can share a trusted claim's 7 digits
            # (a red team's did in 51 s), and the hub then names it as the claim's
            pushed = self.data("GET", f"/api/git/commits/{claim['commit_full']}")
            if isinstance(pushed, dict) and pushed.get("agent_id") in self.trust:
                return claim
        return None

    def adopt(self):
        """The hub's best claim (see candidate) as the working tree's train.py, committed on the best, or None.
        Each hub commit is tried once, by one worker (again after "not judged": see untry)."""
        sha = None
        try:
            claim = self.candidate()
            if claim is None:
                return None
            sha = claim["commit_full"]
            with self.changing_state() as state:
                taken = sha in state["tried"]  # by another worker, meanwhile
                state["tried"] += [] if taken else [sha]
            if taken:
                return None
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / "in.bundle").write_bytes(self.call("GET", f"/api/git/fetch/{sha}").content)
                fetched = git("fetch", "-q", "--no-tags", str(Path(tmp) / "in.bundle"),
                              f"refs/commits/{sha}:refs/hub/{sha}", check=False)  # or a bundle that never will be
        except HubDown as e:
            if sha:  # tried again once the hub answers
                with self.changing_state() as state:
                    state["tried"] = [t for t in state["tried"] if t != sha]
            say(self.loop, f"hub: {e}; the loop goes on without it")
            return None
        entry = (git("ls-tree", sha, "--", TRAIN, check=False) or "").split() if fetched is not None else []
        mode, kind, blob = entry[:3] if len(entry) >= 3 else (None, None, "")
        # a train.py that is no file (a folder, a symlink, a submodule) crashed the loop at its read
        if kind != "blob" or mode not in ("100644", "100755") or blob[:12] in measured_versions(self.loop.rows):
            return None  # unusable, no train.py there, or a version measured here already (our own push, say)
        source = subprocess.run(["git", "--no-replace-objects", "cat-file", "blob", blob], capture_output=True,
                                env=git_env(), check=True).stdout
        Path(TRAIN).write_bytes(source)
        first = one_line((claim["description"] or "").split("\n")[0], 80)
        description = f"from the hub: {sha[:7]} of {claim['agent_id']} ({first})"
        git("add", "--", TRAIN)
        # With the rest of the tree the same, the commit gets the hub's commit as its second parent (the best
        # first: the loop's checks see a child of the best that changes train.py), so the hub's tree shows whose
        # work it continues; otherwise that parent would claim their other files as merged, so a trailer says it.
        same_rest = git("diff", "--quiet", "HEAD", sha, "--", ".", f":!{TRAIN}", check=False) is not None
        parents = ["-p", "HEAD"] + (["-p", sha] if same_rest else [])
        message = description + ("" if same_rest else f"\n\nHub-Source: {sha}")
        git("reset", "-q", git(*identity(), "-c", "commit.gpgsign=false", "commit-tree", git("write-tree"),
                               *parents, "-m", message))
        say(self.loop, f"hub: trying {sha[:7]} of {claim['agent_id']}, val_bpb {claim['val_bpb']:.6f} there "
                       f"against {self.loop.best_val:.6f} here")
        return Proposal(description)


def well_formed(claim):
    """A result as our hub serves it: a hub that answers otherwise is passed over, not a crash of the loop."""
    return (isinstance(claim, dict) and isinstance(claim.get("status"), str) and isinstance(claim.get("id"), int)
            and type(claim.get("val_bpb")) in (int, float) and isinstance(claim.get("agent_id"), str)
            and isinstance(claim.get("commit_full"), str) and FULL_ID.fullmatch(claim["commit_full"]) is not None
            and isinstance(claim.get("description") or "", str))


class HubFirst:
    """A proposer that tries the hub's better commit before asking its own proposer."""

    def __init__(self, client, proposer):
        self.client, self.proposer = client, proposer

    def propose(self, loop, n, flight):
        return self.client.adopt() or self.proposer.propose(loop, n, flight)
