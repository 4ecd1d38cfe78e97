"""
The loop as a hub's client (`run --hub URL`; autoresearch/hub.py is the other end). Credentials live in
~/.config/autoresearch/hubs/<host_port>.json (registered on first use, mode 600), as program_hub.md keeps them.
After each experiment its result goes to #results in agenthub's text format (the hub files it in its results
table, status included), and a keep is pushed as a bundle. Before each experiment, the hub's best commit for
this platform, when it beats the local best, becomes the next proposal: the loop's own runs and keep rule
decide whether it becomes the best here (a claim on the hub is a hint, not a fact). A hub that goes down
during the night never stops the loop: it says so and goes on (one that cannot be reached at the start does).
"""
import json
import os
import re
import secrets
import socket
import subprocess
import tempfile
from pathlib import Path

import requests

from autoresearch.gitrepo import git, identity
from autoresearch.layout import TRAIN, LoopError, read_json
from autoresearch.ledger import measured_versions, write_atomic
from autoresearch.proposers import Proposal
from autoresearch.state import say

TIMEOUT_S = 60
RESULTS_CHANNEL = "results"


class HubDown(Exception):
    """The hub did not answer, or answered with an error: the loop goes on without it."""


def credentials_path(url):
    name = re.sub(r"[^A-Za-z0-9.]+", "_", url.split("://", 1)[-1]).strip("_")
    return Path.home() / ".config" / "autoresearch" / "hubs" / f"{name}.json"


def platform_name(config):
    """Where val_bpb values compare: the accelerator, the profile and the dataset, e.g. H100.reference.climbmix."""
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10).stdout.splitlines()[0].replace("NVIDIA ", "")
    except (OSError, IndexError, subprocess.SubprocessError):
        gpu = f"cpu{len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()}"
    name = f"{gpu}.{config['profile']}.{config.get('dataset') or 'unknown'}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")[:64]


class HubClient:
    def __init__(self, url, loop, platform=None):
        self.url, self.loop = url.rstrip("/"), loop
        self.platform = platform or platform_name(loop.config)
        self.state_path = loop.private_dir / "hub.json"  # tried commits, last push: out of the agent's reach
        try:
            self.auth = {"Authorization": f"Bearer {self.credentials()['api_key']}"}
            self.call("GET", "/api/git/leaves")
        except HubDown as e:
            raise LoopError(f"the hub at {self.url} cannot be used: {e}. Fix: start one with `uv run agent_loop.py "
                            f"hub --listen HOST:PORT` or check the URL; or run without --hub") from None

    def call(self, method, path, ok=(), **kw):
        try:
            r = requests.request(method, self.url + path, headers=getattr(self, "auth", {}), timeout=TIMEOUT_S, **kw)
        except requests.RequestException as e:
            raise HubDown(f"{method} {path}: {type(e).__name__}") from None
        if r.status_code >= 400 and r.status_code not in ok:
            try:
                reason = r.json().get("error", r.text)
            except ValueError:
                reason = r.text
            raise HubDown(f"{method} {path}: {r.status_code} {str(reason)[:200]}")
        return r

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
                write_atomic(path, json.dumps(saved).encode())
                path.chmod(0o600)
                say(self.loop, f"hub: registered as {agent_id}; key saved in {path}")
                return saved
        raise HubDown("every id tried was taken")

    def state(self):
        return read_json(self.state_path) or {"tried": [], "pushed": None}

    def save(self, state):
        write_atomic(self.state_path, json.dumps(state).encode())

    # -- after an experiment -----------------------------------------------------------------------------------

    def publish(self, row):
        """Post a finished experiment's row; push the branch when it was kept."""
        try:
            sha = git("rev-parse", row["commit"])
            val, memory = float(row["val_bpb"]), float(row.get("memory_gb") or 0)
            self.call("POST", "/api/channels", ok=(409,), json={"name": RESULTS_CHANNEL,
                                                                 "description": "every experiment's result"})
            self.call("POST", f"/api/channels/{RESULTS_CHANNEL}/posts", json={
                "content": f"commit:{sha[:7]} platform:{self.platform} val_bpb:{val:.6f} vram_gb:{memory:.1f} | "
                           f"{row['status']}: {row['description']}"})
            if row["status"] == "keep":
                self.push()
        except HubDown as e:
            say(self.loop, f"hub: {e}; the loop goes on without it")

    def push(self):
        state = self.state()
        head = git("rev-parse", "HEAD")
        if head == state["pushed"]:
            return
        since = state["pushed"] if state["pushed"] and git("merge-base", "--is-ancestor", state["pushed"], "HEAD",
                                                           check=False) is not None else None
        with tempfile.TemporaryDirectory() as tmp:
            for exclude in ([f"^{since}"] if since else []), []:  # thin first; whole if the hub lacks `since`
                path = Path(tmp) / "push.bundle"
                git("bundle", "create", "-q", str(path), f"refs/heads/{self.loop.branch}", *exclude)
                r = self.call("POST", "/api/git/push", ok=(400,), data=path.read_bytes())
                if r.status_code == 201:
                    break
            else:
                raise HubDown(f"push refused: {r.json().get('error', '')[:200]}")
        self.save(dict(state, pushed=head))
        say(self.loop, f"hub: pushed {self.loop.branch} at {head[:7]} ({len(r.json()['hashes'])} new commits)")

    # -- before an experiment ----------------------------------------------------------------------------------

    def adopt(self):
        """The hub's best commit for this platform as the working tree's train.py, or None (none better, or
        tried, or the hub is down). Each hub commit is tried once."""
        try:
            best = self.call("GET", "/api/results", params={"platform": self.platform, "best": "1"}).json()
            if not best or best[0]["val_bpb"] >= self.loop.best_val or not best[0]["commit_full"]:
                return None
            claim, state = best[0], self.state()
            sha = claim["commit_full"]
            if sha in state["tried"]:
                return None
            self.save(dict(state, tried=state["tried"] + [sha]))
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / "in.bundle").write_bytes(self.call("GET", f"/api/git/fetch/{sha}").content)
                git("fetch", "-q", "--no-tags", str(Path(tmp) / "in.bundle"), f"refs/commits/{sha}:refs/hub/{sha}")
        except HubDown as e:
            say(self.loop, f"hub: {e}; the loop goes on without it")
            return None
        blob = git("rev-parse", f"{sha}:{TRAIN}", check=False)
        if blob is None or blob[:12] in measured_versions(self.loop.rows):
            return None  # no train.py there, or a version measured here already (our own push, say)
        source = subprocess.run(["git", "cat-file", "blob", blob], capture_output=True, check=True).stdout
        Path(TRAIN).write_bytes(source)
        description = f"from the hub: {sha[:7]} of {claim['agent_id']} ({claim['description'][:80]})"
        # the experiment's commit has two parents, this branch's best first and the hub's commit second: the
        # loop's checks see a child of the best that changes train.py, and the hub's tree sees whose work it is
        git("add", "--", TRAIN)
        merge = git(*identity(), "-c", "commit.gpgsign=false", "commit-tree", git("write-tree"), "-p", "HEAD",
                    "-p", sha, "-m", description)
        git("reset", "-q", merge)
        say(self.loop, f"hub: trying {sha[:7]} of {claim['agent_id']}, val_bpb {claim['val_bpb']:.6f} there "
                       f"against {self.loop.best_val:.6f} here")
        return Proposal(description)


class HubFirst:
    """A proposer that tries the hub's better commit before asking its own proposer."""

    def __init__(self, client, proposer):
        self.client, self.proposer = client, proposer

    def propose(self, loop, n, flight):
        return self.client.adopt() or self.proposer.propose(loop, n, flight)
