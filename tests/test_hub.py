"""The hub (autoresearch/hub.py) as its clients meet it: a real server on 127.0.0.1 with a temporary data folder,
real git bundles, and program_hub.md's own curl commands."""

import http.server
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.long(minutes=3)  # on one core; conftest hands out the longest files first


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Hub:
    def __init__(self, data, *flags):
        self.data, self.flags = data, flags
        self.start()

    def start(self, port=None):
        port = port or free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen([sys.executable, str(REPO / "agent_loop.py"), "hub", "--listen",
                                      f"127.0.0.1:{port}", "--data", str(self.data), *self.flags],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if requests.get(self.url + "/api/health", timeout=1).json() == {"status": "ok"}:
                    return
            except requests.RequestException:
                time.sleep(0.1)
        self.proc.kill()
        raise AssertionError("the hub did not start: " + self.proc.stdout.read())

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def register(self, agent_id):
        r = requests.post(self.url + "/api/register", json={"id": agent_id})
        assert r.status_code == 201, r.text
        return {"Authorization": "Bearer " + r.json()["api_key"]}

    def get(self, path, auth, **kw):
        return requests.get(self.url + path, headers=auth, **kw)

    def post(self, path, auth, **kw):
        return requests.post(self.url + path, headers=auth, **kw)


@pytest.fixture
def hub(tmp_path):
    server = Hub(tmp_path / "hub-data")
    yield server
    server.proc.kill()
    server.proc.wait()


def git(repo, *args):
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t", GIT_CONFIG_NOSYSTEM="1")
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True,
                          env=env).stdout.strip()


def lab(path, commits=2):
    """A git repository with `commits` commits of train.py on main (unrelated to any other lab's)."""
    path.mkdir()
    git(path, "init", "-q", "-b", "main")
    for i in range(commits):
        (path / "train.py").write_text(f"# {path.name}\nMATRIX_LR = 0.0{i + 4}\n")
        git(path, "add", "train.py")
        git(path, "commit", "-qm", f"change {i}" if i else "baseline")
    return path


def bundle(repo, path, *revs):
    git(repo, "bundle", "create", "-q", str(path), *(revs or ["HEAD"]))
    return path.read_bytes()


def hub_state(hub):
    """What a bad push must not change: the refs and objects of the hub's repository and its index."""
    repo = hub.data / "repo.git"
    objects = subprocess.run(["git", "-C", str(repo), "count-objects", "-v"], capture_output=True, text=True).stdout
    refs = subprocess.run(["git", "-C", str(repo), "for-each-ref"], capture_output=True, text=True).stdout
    with sqlite3.connect(hub.data / "hub.db") as db:
        commits = db.execute("SELECT hash FROM commits ORDER BY hash").fetchall()
    return objects, refs, commits, sorted(os.listdir(hub.data / "scratch"))

# ---------------------------------------------------------------------------
# program_hub.md as written


def program_blocks():
    text = (REPO / "program_hub.md").read_text()
    return [b for b in re.findall(r"```bash\n(.*?)```", text, re.S) if "agent_loop.py hub" not in b]


def test_program_hub_curl_commands_work_against_our_hub(hub, tmp_path):
    repo = lab(tmp_path / "lab", commits=3)
    script = "set -euo pipefail\n" + "\n".join(program_blocks()).replace("http://127.0.0.1:8080", hub.url)
    script += '\necho "API_KEY=$API_KEY"\n'
    env = dict(os.environ, HOME=str(tmp_path / "home"), GIT_CONFIG_NOSYSTEM="1")
    result = subprocess.run(["bash", "-c", script], cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    key = re.search(r"^API_KEY=(\S+)$", result.stdout, re.M)[1]
    saved = json.loads((tmp_path / f"home/.config/autoresearch/hubs/127.0.0.1_{hub.url.rsplit(':', 1)[1]}.json")
                       .read_text())
    assert saved["api_key"] == key and saved["hub"] == hub.url
    auth = {"Authorization": f"Bearer {key}"}
    head = git(repo, "rev-parse", "HEAD")
    assert [c["hash"] for c in hub.get("/api/git/commits", auth).json()] == \
        git(repo, "rev-list", "HEAD").split()  # every commit of the bundle, newest first, not only its head
    assert [c["hash"] for c in hub.get("/api/git/leaves", auth).json()] == [head]
    assert [p["content"][:12] for p in hub.get("/api/channels/ideas/posts", auth).json()] == ["trying MATRI"]
    results = hub.get("/api/results", auth).json()
    assert [(r["status"], r["val_bpb"], r["commit_full"]) for r in results] == [("keep", 1.234567, head)]
    assert git(repo, "rev-parse", f"refs/hub/{head}") == head  # fetched back and unbundled


# ---------------------------------------------------------------------------
# Commits: all indexed, all anchored, nothing left by a bad bundle


def test_every_commit_of_a_bundle_is_indexed_and_survives_gc(hub, tmp_path):
    repo = lab(tmp_path / "lab", commits=4)
    auth = hub.register("alice")
    r = hub.post("/api/git/push", auth, data=bundle(repo, tmp_path / "b"))
    assert r.status_code == 201 and r.json()["hashes"] == git(repo, "rev-list", "--reverse", "HEAD").split()
    middle = git(repo, "rev-parse", "HEAD~2")
    assert hub.get(f"/api/git/commits/{middle[:7]}", auth).json()["message"] == "change 1"
    lineage = [c["hash"] for c in hub.get(f"/api/git/commits/{middle}/lineage", auth).json()]
    assert lineage == git(repo, "rev-list", middle).split()
    subprocess.run(["git", "-C", str(hub.data / "repo.git"), "gc", "-q", "--prune=now"], check=True)
    fetched = hub.get(f"/api/git/fetch/{middle}", auth)
    other = lab(tmp_path / "other", commits=0)
    (tmp_path / "f.bundle").write_bytes(fetched.content)
    git(other, "fetch", "-q", str(tmp_path / "f.bundle"), f"refs/commits/{middle}:refs/heads/x")
    assert git(other, "rev-list", "x").split() == git(repo, "rev-list", middle).split()


def test_a_bad_bundle_gets_a_4xx_with_its_reason_and_leaves_no_trace(hub, tmp_path):
    repo = lab(tmp_path / "lab", commits=2)
    auth = hub.register("alice")
    git(repo, "branch", "first", "HEAD~1")
    assert hub.post("/api/git/push", auth, data=bundle(repo, tmp_path / "b", "first")).status_code == 201
    before = hub_state(hub)
    git(repo, "commit", "-q", "--allow-empty", "-m", "on top")
    thin = bundle(repo, tmp_path / "thin", "HEAD~1..main")  # needs HEAD~1, which the hub lacks
    unrelated = bundle(lab(tmp_path / "stranger", commits=1), tmp_path / "u")
    whole = bundle(repo, tmp_path / "whole", "main")
    for body, status, words in [(b"not a bundle", 400, "not a git bundle"),
                                (thin, 400, "lacks these prerequisite commits"),  # git's words, passed on
                                (unrelated, 422, "shares no commit"),
                                (whole[:len(whole) - 40], 400, "cannot be unpacked"),  # cut off in its pack
                                (b"", 400, "not a git bundle")]:
        r = hub.post("/api/git/push", auth, data=body)
        assert r.status_code == status and words in r.json()["error"], r.text
        assert hub_state(hub) == before
    small = Hub(tmp_path / "small", "--max-bundle-mb", "0.0001")
    try:
        r = small.post("/api/git/push", small.register("bob"), data=unrelated)
        assert r.status_code == 413 and "limit" in r.json()["error"]
    finally:
        small.proc.kill()


def test_annotated_tags_in_a_bundle_land_their_commits_and_a_tag_of_no_commit_is_refused(hub, tmp_path):
    repo = lab(tmp_path / "lab", commits=3)
    auth = hub.register("alice")
    git(repo, "tag", "-a", "-m", "release", "v1", "HEAD~1")  # `git bundle create F --all` carries it
    r = hub.post("/api/git/push", auth, data=bundle(repo, tmp_path / "b", "--all"))
    assert r.status_code == 201 and r.json()["hashes"] == git(repo, "rev-list", "--reverse", "HEAD").split()
    before = hub_state(hub)
    git(repo, "tag", "-a", "-m", "a file", "file-tag", git(repo, "rev-parse", "HEAD:train.py"))
    r = hub.post("/api/git/push", auth, data=bundle(repo, tmp_path / "c", "main", "file-tag"))
    assert r.status_code == 400 and "refs/tags/file-tag" in r.json()["error"], r.text
    assert "points to no commit" in r.json()["error"] and hub_state(hub) == before


def test_concurrent_pushes_all_land(hub, tmp_path):
    repo = lab(tmp_path / "lab", commits=1)
    auth = hub.register("alice")
    assert hub.post("/api/git/push", auth, data=bundle(repo, tmp_path / "root")).status_code == 201
    bundles = []
    for i in range(6):  # six labs, each one commit on the shared root
        git(repo, "checkout", "-q", "-B", f"lab{i}", "main")
        git(repo, "commit", "-q", "--allow-empty", "-m", f"idea {i}")
        bundles.append(bundle(repo, tmp_path / f"b{i}", f"main..lab{i}"))
    codes = []
    threads = [threading.Thread(target=lambda b=b: codes.append(hub.post("/api/git/push", auth, data=b).status_code))
               for b in bundles]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes == [201] * 6
    root = git(repo, "rev-parse", "main")
    assert len(hub.get(f"/api/git/commits/{root}/children", auth).json()) == 6
    assert len(hub.get("/api/git/leaves", auth).json()) == 6


# ---------------------------------------------------------------------------
# Keys, ids, limits


def test_keys_are_stored_hashed_checked_and_revocable(hub):
    r = requests.post(hub.url + "/api/register", json={"id": "alice"})
    key = r.json()["api_key"]
    assert key.encode() not in (hub.data / "hub.db").read_bytes()
    assert requests.post(hub.url + "/api/register", json={"id": "alice"}).status_code == 409
    for bad in ("-dash-first", "x" * 64, "sp ace", "", None):
        assert requests.post(hub.url + "/api/register", json={"id": bad}).status_code == 400, bad
    auth = {"Authorization": f"Bearer {key}"}
    assert hub.get("/api/git/leaves", auth).status_code == 200
    assert hub.get("/api/git/leaves", {}).status_code == 401
    assert hub.get("/api/git/leaves", {"Authorization": "Bearer nope"}).status_code == 401
    assert hub.post("/api/admin/revoke", auth, json={"id": "alice"}).status_code == 401  # not the admin key
    admin = {"Authorization": "Bearer " + (hub.data / "admin.key").read_text().strip()}
    assert hub.post("/api/admin/revoke", admin, json={"id": "alice"}).status_code == 200
    assert hub.get("/api/git/leaves", auth).status_code == 401
    assert oct((hub.data / "admin.key").stat().st_mode)[-3:] == "600"


def test_rate_limits_answer_429_and_name_the_limit(tmp_path):
    hub = Hub(tmp_path / "hub-data", "--max-posts", "3", "--max-registrations", "2", "--max-channel-creations", "2")
    try:
        auth = hub.register("alice")
        hub.register("bob")
        r = requests.post(hub.url + "/api/register", json={"id": "carol"})
        assert r.status_code == 429 and "30" not in r.json()["error"] and "2 registrations" in r.json()["error"]
        assert hub.post("/api/channels", auth, json={"name": "ideas", "description": ""}).status_code == 201
        codes = [hub.post("/api/channels/ideas/posts", auth, json={"content": f"idea {i}"}).status_code
                 for i in range(4)]
        assert codes == [201, 201, 201, 429]
        codes = [hub.post("/api/channels", auth, json={"name": f"c{i}", "description": ""}).status_code
                 for i in range(2)]
        assert codes == [201, 429]  # one agent cannot take the hub's whole channel cap
    finally:
        hub.proc.kill()


# ---------------------------------------------------------------------------
# Results, the board, the page


def test_results_posts_are_parsed_and_the_best_per_platform_is_served(hub):
    auth = hub.register("alice")
    hub.post("/api/channels", auth, json={"name": "results", "description": "all results"})
    for content in ["commit:abc1234 platform:H100 val_bpb:0.997900 vram_gb:44.0 | baseline",
                    "commit:def5678 platform:H100 val_bpb:0.990100 vram_gb:44.2 | MATRIX_LR 0.05",
                    "commit:0123456 platform:cpu-2core val_bpb:1.820000 | cpu baseline",
                    "just chatting, no result here",
                    "commit:7777777 platform:H100 val_bpb:nan | broken number"]:
        assert hub.post("/api/channels/results/posts", auth, json={"content": content}).status_code == 201
    assert hub.post("/api/results", auth, json={"commit": "9999999", "val_bpb": 0.5, "platform": "H100",
                                                "status": "crash", "description": "crashes are not best"}).ok
    best = hub.get("/api/results?best=1", auth).json()
    assert [(r["platform"], r["commit"], r["val_bpb"]) for r in best] == \
        [("H100", "def5678", 0.9901), ("cpu-2core", "0123456", 1.82)]
    assert hub.get("/api/results?platform=cpu-2core&best=1", auth).json()[0]["commit"] == "0123456"
    for bad in ({"commit": "xyz", "val_bpb": 1, "platform": "H100"}, {"commit": "abc1234", "val_bpb": "inf",
                                                                       "platform": "H100"},
                {"commit": "abc1234", "val_bpb": 0, "platform": "H100", "status": "keep"},
                {"commit": "abc1234", "val_bpb": 1, "platform": "H100", "status": "great"}):
        r = hub.post("/api/results", auth, json=bad)
        assert r.status_code == 400 and r.json()["error"], bad
    page = requests.get(hub.url + "/").text
    assert "0.990100" in page and "MATRIX_LR 0.05" in page
    zero = "commit:abc1234 platform:H100 val_bpb:0.000000 | a crash posted without saying so"
    assert hub.post("/api/channels/results/posts", auth, json={"content": zero}).status_code == 201
    assert hub.get("/api/results?best=1", auth).json()[0]["val_bpb"] == 0.9901  # 0 is a crash's, never a best


def test_the_claims_a_lab_may_try_are_served_lowest_first_whatever_else_was_posted_since(hub):
    # a red team's 1000 crash posts from untrusted agents pushed every trusted claim out of the newest 1000
    trusted, mallory = hub.register("trusted"), hub.register("mallory")
    for commit, val in (("aaaaaaa", 0.95), ("bbbbbbb", 0.93), ("ccccccc", 0.99)):
        hub.post("/api/results", trusted, json={"commit": commit, "val_bpb": val, "platform": "P", "status": "keep"})
    hub.post("/api/results", mallory, json={"commit": "ddddddd", "val_bpb": 0.90, "platform": "P", "status": "keep"})
    for i in range(30):
        hub.post("/api/results", mallory, json={"commit": f"{i:07x}", "val_bpb": 0.5, "platform": "P",
                                                "status": "crash"})
    assert len(hub.get("/api/results?platform=P&limit=20", trusted).json()) == 20  # the newest: crashes only
    claims = hub.get("/api/results?platform=P&limit=20&below=0.98", trusted).json()
    assert [(c["commit"], c["agent_id"]) for c in claims] == [
        ("ddddddd", "mallory"), ("bbbbbbb", "trusted"), ("aaaaaaa", "trusted")]
    claims = hub.get("/api/results?platform=P&limit=2&below=0.98&agents=trusted,alice", trusted).json()
    assert [c["commit"] for c in claims] == ["bbbbbbb", "aaaaaaa"]
    assert hub.get("/api/results?below=low", trusted).status_code == 400


def test_posts_replies_and_errors_are_json(hub):
    auth = hub.register("alice")
    assert hub.post("/api/channels", auth, json={"name": "Bad Name"}).status_code == 400
    hub.post("/api/channels", auth, json={"name": "ideas", "description": "d"})
    assert hub.post("/api/channels", auth, json={"name": "ideas", "description": "d"}).status_code == 409
    first = hub.post("/api/channels/ideas/posts", auth, json={"content": "<script>alert(1)</script>"}).json()
    reply = hub.post("/api/channels/ideas/posts", auth, json={"content": "re", "parent_id": first["id"]}).json()
    assert hub.get(f"/api/posts/{first['id']}/replies", auth).json()[0]["id"] == reply["id"]
    assert hub.post("/api/channels/ideas/posts", auth, json={"content": "re", "parent_id": 999}).status_code == 404
    assert hub.post("/api/channels/none/posts", auth, json={"content": "x"}).status_code == 404
    assert hub.post("/api/channels/ideas/posts", auth, data="{not json").status_code == 400
    r = hub.get("/api/no/such/thing", auth)
    assert r.status_code == 404 and "error" in r.json()
    r = requests.post(hub.url + "/api/register", data=b"{" + b" " * (2 << 20) + b"}")
    assert r.status_code == 413 and "limit" in r.json()["error"]  # refused before it is read whole
    assert hub.get("/api/git/leaves", {"Authorization": auth["Authorization"].replace("Bearer", "bearer")}).ok
    assert "&lt;script&gt;" in requests.get(hub.url + "/").text


# ---------------------------------------------------------------------------
# kill -9


def test_a_hub_killed_with_kill_9_restarts_with_nothing_lost(hub, tmp_path):
    repo = lab(tmp_path / "lab", commits=3)
    auth = hub.register("alice")
    hub.post("/api/git/push", auth, data=bundle(repo, tmp_path / "b"))
    hub.post("/api/channels", auth, json={"name": "results", "description": ""})
    hub.post("/api/channels/results/posts", auth, json={"content": "commit:abc1234 platform:H100 val_bpb:0.99 | x"})
    before = [hub.get(p, auth).json() for p in ("/api/git/commits", "/api/channels/results/posts", "/api/results")]
    # killed between anchoring a commit in git and indexing it: the next start indexes it
    git(repo, "commit", "-q", "--allow-empty", "-m", "anchored only")
    git(repo, "push", "-q", str(hub.data / "repo.git"), f"HEAD:refs/commits/{git(repo, 'rev-parse', 'HEAD')}")
    hub.kill9()
    hub.start()
    after = [hub.get(p, auth).json() for p in ("/api/git/commits", "/api/channels/results/posts", "/api/results")]
    assert after[1:] == before[1:]
    assert [c["hash"] for c in after[0][1:]] == [c["hash"] for c in before[0]]
    assert after[0][0]["message"] == "anchored only" and after[0][0]["parent_hash"] == before[0][0]["hash"]


def push_ignoring_the_kill(url, auth, data):
    try:
        requests.post(url + "/api/git/push", headers=auth, data=data)
    except requests.ConnectionError:
        pass


def test_a_hub_killed_at_any_moment_of_a_push_restarts_consistent_and_takes_the_push_again(hub, tmp_path):
    repo = lab(tmp_path / "lab")
    auth = hub.register("alice")
    store = hub.data / "repo.git"
    seen = set()
    for delay in (0.0, 0.02, 0.05, 0.08, 0.12, 0.16, 0.2, 0.3):  # from mid-upload to mid-index, on 2 cores
        for i in range(30):  # each round pushes 30 commits the hub does not have
            git(repo, "commit", "-q", "--allow-empty", "-m", f"{delay} {i}")
        everything = git(repo, "rev-list", "HEAD").split()
        data = bundle(repo, tmp_path / "b")
        threading.Thread(target=push_ignoring_the_kill, args=(hub.url, auth, data), daemon=True).start()
        time.sleep(delay)
        hub.kill9()
        hub.start()
        with sqlite3.connect(hub.data / "hub.db") as db:
            indexed = dict(db.execute("SELECT hash, parent_hash FROM commits").fetchall())
        anchored = set(git(store, "for-each-ref", "--format=%(objectname)", "refs/commits/").split())
        # whatever point the kill hit: the index holds exactly the anchored commits, each with its parent,
        # and every object of each; a half-done import left no other ref and no scratch repository
        assert set(indexed) == anchored, delay
        assert all(parent is None or parent in indexed for parent in indexed.values()), delay
        if indexed:
            assert git(store, "rev-list", "--objects", *indexed)
        assert git(store, "for-each-ref", "--format=%(refname)") == "\n".join(
            sorted(f"refs/commits/{h}" for h in indexed)), delay
        assert list((hub.data / "scratch").iterdir()) == [], delay
        seen.add(len(set(everything) - set(indexed)))
        # and the push, made again, completes it
        again = hub.post("/api/git/push", auth, data=data)
        assert again.status_code == 201, again.text
        assert sorted(set(again.json()["hashes"]) | set(indexed)) == sorted(everything)
        commits = hub.get("/api/git/commits", auth, params={"limit": 1000}).json()
        assert sorted(c["hash"] for c in commits) == sorted(everything)
    assert len(seen) > 1, seen  # the kills hit before and after the import at least


# ---------------------------------------------------------------------------
# The loop as a client: two labs, one frontier (the stand-in train.py of the agent_loop tests)

from conftest import user_env  # noqa: E402
from test_agent_loop import env, initialised, loop, repo, rows, spinning  # noqa: E402,F401  (fixtures and helpers)


@pytest.fixture
def lab_env(env, tmp_path):
    """A lab's environment with a home of its own: hub keys are saved per address, and an earlier test's hub
    may have had this port."""
    return dict(env, HOME=str(tmp_path / "home"))


def claim_on_hub(hub, auth, repo, clone, env, constant, val_bpb):
    """Another lab's commit on the hub (a clone of repo whose train.py sets `constant` in place of VAL_BPB = 1.0)
    with a claimed val_bpb for platform "here". Returns the commit."""
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True, env=env, capture_output=True)
    (clone / "train.py").write_text((clone / "train.py").read_text().replace("VAL_BPB = 1.0", constant))
    subprocess.run(["git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qam", f"claims {val_bpb}"],
                   cwd=clone, check=True)
    subprocess.run(["git", "bundle", "create", "-q", "b.bundle", "HEAD"], cwd=clone, check=True)
    assert hub.post("/api/git/push", auth, data=(clone / "b.bundle").read_bytes()).status_code == 201
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True).stdout.strip()
    hub.post("/api/results", auth, json={"commit": sha, "val_bpb": val_bpb, "platform": "here", "status": "keep"})
    return sha


def test_two_labs_share_a_frontier_and_a_hub_claim_is_measured_before_it_is_kept(hub, repo, env, tmp_path):
    other = tmp_path / "other"  # lab B: a clone of lab A's repository, before either experimented
    subprocess.run(["git", "clone", "-q", str(repo), str(other)], check=True, env=env, capture_output=True)
    env_a, env_b = dict(env, HOME=str(tmp_path / "home-a")), dict(env, HOME=str(tmp_path / "home-b"))
    better = tmp_path / "better.sh"
    better.write_text("#!/bin/sh\nsed -i 's/^VAL_BPB = .*/VAL_BPB = 0.9/' train.py\necho 'VAL_BPB 0.9'\n")
    better.chmod(0o755)
    initialised(repo, env_a)
    out_a = loop(repo, env_a, "run", "--agent", str(better), "--hub", hub.url, "--max-experiments", "1").stdout
    assert "hub: pushed autoresearch/t" in out_a and rows(repo)[-1]["status"] == "keep", out_a
    a_keep = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()

    # lab B's own agent has nothing to offer: the hub's better commit is its next experiment, run here
    initialised(other, env_b)
    out_b = loop(other, env_b, "run", "--agent", "true", "--hub", hub.url, "--max-experiments", "1").stdout
    adopted = rows(other)[-1]
    assert adopted["status"] == "keep" and adopted["description"].startswith(f"from the hub: {a_keep[:7]}"), out_b
    assert float(adopted["val_bpb"]) == 0.9 and "VAL_BPB = 0.9" in (other / "train.py").read_text()
    saved = json.loads(next((tmp_path / "home-b/.config/autoresearch/hubs").iterdir()).read_text())
    auth = {"Authorization": f"Bearer {saved['api_key']}"}
    results = hub.get("/api/results", auth).json()  # each lab's baseline, A's keep and B's adoption of it
    assert sorted((r["agent_id"] == saved["id"], r["status"]) for r in results) == [(False, "keep")] * 2 + [
        (True, "keep")] * 2, hub.get("/api/channels/results/posts", auth).text
    assert len({r["agent_id"] for r in results}) == 2
    (leaf,) = hub.get("/api/git/leaves", auth).json()  # B's keep builds on A's: A's is no longer a leaf
    assert leaf["agent_id"] == saved["id"] and leaf["message"] == adopted["description"]
    assert [c["hash"] for c in hub.get(f"/api/git/commits/{a_keep}/children", auth).json()] == [leaf["hash"]]


def test_a_hub_claim_that_does_not_hold_here_is_discarded_and_tried_once(hub, repo, lab_env, tmp_path):
    initialised(repo, lab_env)
    auth = hub.register("boaster")
    boast = repo / ".." / "boast"
    sha = claim_on_hub(hub, auth, repo, boast, lab_env, "VAL_BPB = 1.1", 0.5)
    here = ("run", "--agent", "true", "--hub", hub.url, "--hub-platform", "here", "--max-experiments")
    out = loop(repo, lab_env, *here, "1", "--hub-trust", "alice,bob").stdout
    assert "hub: trying" not in out and len(rows(repo)) == 1, out  # not an agent we trust
    out = loop(repo, lab_env, *here, "2").stdout
    statuses = [(r["status"], r["description"][:18]) for r in rows(repo)[1:]]
    assert statuses[0] == ("discard", "from the hub: " + sha[:4]), out  # measured here: 1.1, not 0.5
    assert out.count("hub: trying") == 1, out  # and never tried again
    # a later, smaller claim that holds is still found: the one that did not hold blocks nothing
    (boast / "train.py").write_text((boast / "train.py").read_text().replace("VAL_BPB = 1.1", "VAL_BPB = 0.9"))
    subprocess.run(["git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qam", "claims 0.95"],
                   cwd=boast, check=True)
    subprocess.run(["git", "bundle", "create", "-q", "c.bundle", f"{sha}..HEAD"], cwd=boast, check=True)
    assert hub.post("/api/git/push", auth, data=(boast / "c.bundle").read_bytes()).status_code == 201
    honest = subprocess.run(["git", "rev-parse", "HEAD"], cwd=boast, capture_output=True, text=True).stdout.strip()
    hub.post("/api/results", auth, json={"commit": honest, "val_bpb": 0.95, "platform": "here", "status": "keep"})
    loop(repo, lab_env, *here, "1")
    assert rows(repo)[-1]["status"] == "keep" and rows(repo)[-1]["description"].startswith(
        f"from the hub: {honest[:7]}")


def test_a_trusted_agents_claim_on_a_commit_another_agent_pushed_is_not_tried(hub, repo, lab_env, tmp_path):
    # a red team's untrusted agent pushed a commit sharing a trusted claim's 7 digits (51 s of SHA-1), and the hub
    # then named it as that claim's commit: the lab ran it as the trusted agent's
    initialised(repo, lab_env)
    mallory, trusted = hub.register("mallory"), hub.register("trusted")
    sha = claim_on_hub(hub, mallory, repo, repo / ".." / "m", lab_env, "VAL_BPB = 0.5", 0.5)
    hub.post("/api/results", trusted, json={"commit": sha, "val_bpb": 0.4, "platform": "here", "status": "keep"})
    here = ("run", "--agent", "true", "--hub", hub.url, "--hub-platform", "here", "--max-experiments", "1")
    out = loop(repo, lab_env, *here, "--hub-trust", "trusted").stdout
    assert "hub: trying" not in out and len(rows(repo)) == 1, out  # pushed by an agent it does not trust
    out = loop(repo, lab_env, *here, "--hub-trust", "trusted,mallory").stdout
    assert f"hub: trying {sha[:7]}" in out and rows(repo)[-1]["status"] == "keep", out


class GarbledHub(http.server.BaseHTTPRequestHandler):
    """In front of a real hub (`upstream`), as a dishonest or broken one: its list of results is not ours."""
    upstream = None

    def do_GET(self):
        if self.path.startswith("/api/results"):
            return self.answer(200, json.dumps([{"id": 1, "status": "keep", "val_bpb": "0.1", "agent_id": "x",
                                                 "commit_full": "a" * 40, "description": ""}, 7, None]).encode())
        self.forward("GET")

    def do_POST(self):
        self.forward("POST")

    def forward(self, method):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        r = requests.request(method, self.upstream + self.path, data=body, timeout=30,
                             headers={k: v for k, v in self.headers.items() if k.lower() in ("authorization",
                                                                                           "content-type")})
        self.answer(r.status_code, r.content)

    def answer(self, status, body):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_hub_whose_results_are_not_ours_is_passed_over_and_the_loop_goes_on(hub, repo, lab_env, tmp_path):
    # a red team's proxy answered results with a val_bpb as text: a TypeError before the first experiment, at
    # every restart, and the night was lost
    GarbledHub.upstream = hub.url
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), GarbledHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    better = tmp_path / "better.sh"
    better.write_text("#!/bin/sh\nsed -i 's/^VAL_BPB = .*/VAL_BPB = 0.9/' train.py\n")
    better.chmod(0o755)
    try:
        initialised(repo, lab_env)
        url = f"http://127.0.0.1:{server.server_address[1]}"
        out = loop(repo, lab_env, "run", "--agent", str(better), "--hub", url, "--max-experiments", "1").stdout
    finally:
        server.shutdown()
    assert "hub: trying" not in out and [r["status"] for r in rows(repo)] == ["keep", "keep"], out


def test_a_hub_commit_whose_train_py_is_no_file_is_passed_over_and_the_loop_goes_on(hub, repo, lab_env, tmp_path):
    # a folder named train.py in a hostile lab's commit crashed `run` at the read of its "file"
    initialised(repo, lab_env)
    auth, clone = hub.register("hostile"), tmp_path / "hostile"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True, env=lab_env, capture_output=True)
    (clone / "train.py").unlink()
    (clone / "train.py").mkdir()
    (clone / "train.py" / "x").write_text("not a train.py\n")
    subprocess.run(["git", "add", "-A"], cwd=clone, check=True)
    subprocess.run(["git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "a folder"], cwd=clone,
                   check=True)
    subprocess.run(["git", "bundle", "create", "-q", "b.bundle", "HEAD"], cwd=clone, check=True)
    assert hub.post("/api/git/push", auth, data=(clone / "b.bundle").read_bytes()).status_code == 201
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True).stdout.strip()
    hub.post("/api/results", auth, json={"commit": sha, "val_bpb": 0.3, "platform": "here", "status": "keep"})
    out = loop(repo, lab_env, "run", "--agent", "true", "--hub", hub.url, "--hub-platform", "here",
               "--max-experiments", "1").stdout
    assert "hub: trying" not in out and (repo / "train.py").is_file(), out


def test_a_hub_claim_not_judged_here_is_tried_again(hub, repo, lab_env, tmp_path):
    if not Path("/proc/stat").exists():
        pytest.skip("needs /proc/stat (Linux)")
    load, flag = tmp_path / "load", tmp_path / "spin"
    load.write_text("")
    lab_env = dict(lab_env, STANDIN_LOAD=str(load), STANDIN_SPIN=str(flag))
    initialised(repo, lab_env, repeats=3, SIGMA=0.002, SLEEP=1.2)
    sha = claim_on_hub(hub, hub.register("alice"), repo, tmp_path / "other", lab_env, "VAL_BPB = 0.99", 0.99)
    here = ("run", "--agent", "true", "--hub", hub.url, "--hub-platform", "here", "--max-experiments", "1")
    load.write_text("1+spin\n0\n")  # its first run on a busy machine, the best's just after on a quiet one
    with spinning(flag):
        out = loop(repo, lab_env, *here).stdout
    assert "not judged" in rows(repo)[1]["note"] and rows(repo)[1]["description"].startswith(
        f"from the hub: {sha[:7]}"), out
    (state_path,) = (repo / ".git" / "autoresearch" / "t").glob("hub-*.json")
    state = json.loads(state_path.read_text())
    assert sha not in state["tried"] and state["after"] == {sha: "1"} and state["untried"] == ["1"], state
    posted = [n for n in state["posted"] if n != rows(repo)[1]["n"]]
    # that row not posted yet (the hub was down), and the commit taken again since (by another worker, say): the
    # row is published again, but never un-tries its commit twice
    state_path.write_text(json.dumps(dict(state, tried=[sha], after={}, posted=posted)))
    loop(repo, lab_env, *here[:-1], "0")
    assert json.loads(state_path.read_text())["tried"] == [sha]
    # as a loop killed between recording that row and publishing it would leave it: the next loop un-tries it
    state_path.write_text(json.dumps(dict(state, tried=[sha], after={}, untried=[], posted=posted)))
    # not at the very next experiment (the machine may still be as it was): the agent's, then the claim again,
    # on a steady machine, measured and kept
    agent = "sed -i 's/^VAL_BPB = .*/VAL_BPB = 1.05/' train.py && echo worse"
    out = loop(repo, lab_env, *here[:2], agent, *here[3:-1], "2").stdout
    assert [r["description"][:18] for r in rows(repo)[2:]] == ["worse", "from the hub: " + sha[:4]], out
    assert out.count(f"hub: trying {sha[:7]}") == 1 and rows(repo)[3]["status"] == "keep", out


def test_a_hub_that_goes_down_mid_run_never_stops_the_loop(hub, repo, lab_env, tmp_path):
    initialised(repo, lab_env)
    agent = tmp_path / "agent.sh"  # the hub dies while the agent works; the experiment goes on without it
    agent.write_text(f"#!/bin/sh\nkill -9 {hub.proc.pid}\nsed -i 's/^VAL_BPB = .*/VAL_BPB = 0.9/' train.py\n")
    agent.chmod(0o755)
    out = loop(repo, lab_env, "run", "--agent", str(agent), "--hub", hub.url, "--max-experiments", "2").stdout
    assert "the loop goes on without it" in out and [r["status"] for r in rows(repo)] == ["keep", "keep"], out
    hub.proc.wait()
    down = loop(repo, lab_env, "run", "--agent", "true", "--hub", hub.url, "--max-experiments", "1", check=False)
    assert down.returncode == 2 and f"the hub at {hub.url} cannot be used" in down.stderr  # but a bad start stops
    # back up (its data kept): the next run posts what the hub missed, once, and pushes the keeps
    hub.start(port=int(hub.url.rsplit(":", 1)[1]))
    out = loop(repo, lab_env, "run", "--agent", "true", "--hub", hub.url, "--max-experiments", "0").stdout
    saved = json.loads(next((Path(lab_env["HOME"]) / ".config/autoresearch/hubs").iterdir()).read_text())
    auth = {"Authorization": f"Bearer {saved['api_key']}"}
    posts = hub.get("/api/channels/results/posts", auth, params={"limit": "100"}).json()
    assert sorted(p["content"].rsplit("| ", 1)[1] for p in posts) == sorted(
        f"{r['status']}: {r['description']}" for r in rows(repo)), out  # the baseline and both keeps, once each
    best = git(repo, "rev-parse", "autoresearch/t")
    assert [c["hash"] for c in hub.get("/api/git/leaves", auth).json()] == [best], out


def test_a_key_saved_for_an_address_whose_hub_does_not_know_it_is_named_with_the_fix(hub, repo, lab_env):
    initialised(repo, lab_env)
    name = re.sub(r"[^A-Za-z0-9.]+", "_", hub.url.split("://", 1)[-1]).strip("_")
    saved = Path(lab_env["HOME"]) / ".config" / "autoresearch" / "hubs" / f"{name}.json"
    saved.parent.mkdir(parents=True)
    saved.write_text(json.dumps({"hub": hub.url, "id": "old", "api_key": "from-an-earlier-hub"}))
    out = loop(repo, lab_env, "run", "--agent", "true", "--hub", hub.url, "--max-experiments", "1", check=False)
    assert out.returncode == 2 and f"does not know the key saved in {saved}" in out.stderr, out.stderr
    assert "delete that file to register again" in out.stderr


def test_workers_post_every_row_push_their_keeps_and_try_a_hub_commit_on_one_worker_only(
        hub, repo, lab_env, tmp_path):
    initialised(repo, lab_env)
    alice = tmp_path / "alice"  # another lab's keep on the hub, better than this lab's baseline
    subprocess.run(["git", "clone", "-q", str(repo), str(alice)], check=True, env=lab_env, capture_output=True)
    (alice / "train.py").write_text((alice / "train.py").read_text().replace("VAL_BPB = 1.0", "VAL_BPB = 0.9"))
    subprocess.run(["git", "-c", "user.name=a", "-c", "user.email=a@a", "commit", "-qam", "better"], cwd=alice,
                   check=True)
    subprocess.run(["git", "bundle", "create", "-q", "a.bundle", "HEAD"], cwd=alice, check=True)
    auth = hub.register("alice")
    assert hub.post("/api/git/push", auth, data=(alice / "a.bundle").read_bytes()).status_code == 201
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=alice, capture_output=True, text=True).stdout.strip()
    hub.post("/api/results", auth, json={"commit": sha, "val_bpb": 0.9, "platform": "here", "status": "keep"})
    worse = tmp_path / "worse.sh"  # this lab's own agent: a worse train.py each time, never the same one
    worse.write_text("#!/bin/sh\nsed -i \"s/^VAL_BPB = .*/VAL_BPB = 1.$AUTORESEARCH_EXPERIMENT/\" train.py\n")
    worse.chmod(0o755)
    gpus = dict(lab_env, CUDA_VISIBLE_DEVICES="0,1")  # a worker each, on the stand-in: no cores to split
    p = loop(repo, gpus, "run", "--agent", str(worse), "--workers", "2", "--hub", hub.url, "--hub-platform", "here",
             "--max-experiments", "4")
    out = p.stdout + p.stderr
    mine = rows(repo)[1:]
    adopted = [r for r in mine if r["description"].startswith(f"from the hub: {sha[:7]}")]
    assert len(mine) == 4 and len(adopted) == 1 and adopted[0]["status"] == "keep", out  # tried on one worker
    assert out.count(f"hub: trying {sha[:7]}") == 1, out
    saved = json.loads(next((tmp_path / "home/.config/autoresearch/hubs").iterdir()).read_text())
    posted = [r for r in hub.get("/api/results", auth, params={"limit": "100"}).json()
              if r["agent_id"] == saved["id"]]
    assert sorted(r["status"] for r in posted) == sorted(r["status"] for r in rows(repo)), out  # all, once
    keep = git(repo, "rev-parse", "autoresearch/t")
    assert [c["hash"] for c in hub.get(f"/api/git/commits/{sha}/children", auth).json()] == [keep], out
    assert "hub: pushed autoresearch/t" in out


# every core, alone, like the demo: beside the other test process's work this machine's speed moved by up to 28%
# between the lab's runs, and the keep rule then found nothing at a comparable speed to judge a gain of 2.3 val_bpb.
# The other lab only pushes and claims (as in test_workers' real test): how a lab posts and pushes its own runs is
# the stand-in tests' above; here, a real train.py adopted from the hub, measured by this lab's evaluator, kept.
@pytest.mark.whole_machine
def test_a_lab_training_the_real_train_py_measures_a_hub_commit_before_keeping_it_and_builds_the_frontier_on_it(
        hub, smoke_cache, tmp_path):
    from test_readme import fresh_clone
    other = fresh_clone(tmp_path / "a")
    # the lab starts from learning rates 100x too small; the other lab's commit has them fixed (a gain of many
    # sigma: kept after one confirming pair, where a change of the usual size could go either way)
    handicap = {"MATRIX_LR = 0.04 ": "MATRIX_LR = 0.0004", "EMBEDDING_LR = 0.9 ": "EMBEDDING_LR = 0.009",
                "UNEMBEDDING_LR = 0.005 ": "UNEMBEDDING_LR = 0.00005"}
    fixed = (other / "train.py").read_text()
    slow = fixed
    for good, bad in handicap.items():
        assert f"\n{good}" in slow
        slow = slow.replace(f"\n{good}", f"\n{bad}")
    commit = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam"]
    (other / "train.py").write_text(slow)
    subprocess.run([*commit, "tiny learning rates"], cwd=other, check=True)
    b = tmp_path / "b" / "autoresearch"
    subprocess.run(["git", "clone", "-q", str(other), str(b)], check=True, capture_output=True)
    (other / "train.py").write_text(fixed)
    subprocess.run([*commit, "learning rates x100"], cwd=other, check=True)
    subprocess.run(["git", "bundle", "create", "-q", "../o.bundle", "HEAD"], cwd=other, check=True)
    other_auth = hub.register("other-lab")
    assert hub.post("/api/git/push", other_auth, data=(tmp_path / "a" / "o.bundle").read_bytes()).status_code == 201
    a_sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=other, capture_output=True, text=True).stdout.strip()
    platform = f"cpu{len(os.sched_getaffinity(0))}.smoke.synthetic"
    assert hub.post("/api/results", other_auth, json={"commit": a_sha, "val_bpb": 0.5, "platform": platform,
                                                      "status": "keep"}).status_code == 201
    env = user_env(tmp_path / "b", smoke_cache, HOME=str(tmp_path / "b"))

    # the lab's first experiment is the other lab's commit, from the hub, trained and evaluated here, kept and pushed
    loop(b, env, "init", "--tag", "real", "--repeats", "1", timeout=600)
    out_b = loop(b, env, "run", "--agent", "mutate", "--hub", hub.url, "--max-experiments", "1", timeout=600).stdout
    (base_b, adopted) = rows(b)
    assert adopted["description"].startswith(f"from the hub: {a_sha[:7]}") and adopted["status"] == "keep", out_b
    assert (b / "train.py").read_text() == fixed
    assert "===== evaluator" in (b / adopted["log"]).read_text() and adopted["heldout_gap"], adopted  # its own
    assert float(adopted["val_bpb"]) < float(base_b["val_bpb"]) - 0.3, (base_b, adopted)

    saved = json.loads(next((tmp_path / "b/.config/autoresearch/hubs").iterdir()).read_text())
    auth = {"Authorization": f"Bearer {saved['api_key']}"}
    results = hub.get("/api/results", auth, params={"limit": "100"}).json()
    assert sorted((r["val_bpb"], r["status"], r["platform"]) for r in results if r["agent_id"] == saved["id"]) == \
        sorted((float(r["val_bpb"]), "keep", platform) for r in (base_b, adopted)), results
    (leaf,) = hub.get("/api/git/leaves", auth).json()  # the keep builds on the other lab's: one frontier
    assert leaf["agent_id"] == saved["id"]
    assert [c["hash"] for c in hub.get(f"/api/git/commits/{a_sha}/children", auth).json()] == [leaf["hash"]]
