"""Tests of `agent_loop.py run --workers N`: real git worktrees, real worker processes, the stand-in train.py
(tests/stand_in/) and shell agents whose change depends on the experiment number they are given."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import user_env
from test_agent_loop import (AGENT_LOOP, clean_tracked, env, git, initialised, loop, pid_gone, repo,  # noqa: F401
                             rows, set_train, wait_for)

sys.path.insert(0, str(AGENT_LOOP.parent))
from autoresearch import process  # noqa: E402
pytestmark = pytest.mark.long(minutes=5)  # on one core; conftest hands out the longest files first

# --workers 2 on CPU splits the cores: tests that do are whole_machine (the suite's other process waits). The
# tests of coordination give each worker a (fake) GPU instead: the stand-in never uses it, and they share.


@pytest.fixture
def gpus(env):
    """The test environment with two GPUs visible (made up): a worker on each, no share of the cores needed."""
    return dict(env, CUDA_VISIBLE_DEVICES="0,1")


def agent_script(tmp_path, body):
    """A shell agent: body sees $N (the experiment number); cwd is its worktree."""
    path = tmp_path / "agent.sh"
    path.write_text("#!/bin/sh\nN=$AUTORESEARCH_EXPERIMENT\n" + body)
    path.chmod(0o755)
    return str(path)


def edit(const, value):
    """A shell line that sets one of the stand-in's constants in the active profile block (or at the top)."""
    return f"sed -i 's/^\\( *\\){const} = .*/\\1{const} = {value}/' train.py"


def by_n(repo):
    return {int(r["n"]): r for r in rows(repo)}


def worker_pids(repo, tag="t"):
    """Pids of the worker processes, from their locks (state.lock writes the holder's pid)."""
    return [int(p.read_text()) for p in sorted((repo / "logs" / tag).glob("w*/lock")) if p.read_text().strip()]


def assert_all_at_best(repo, env):
    """The branch, and every worker's worktree, at the best commit with nothing uncommitted."""
    best = [r for r in rows(repo) if r["status"] == "keep"][-1]["commit"]
    assert git(repo, env, "rev-parse", "--short=7", "HEAD") == best and clean_tracked(repo, env)
    for tree in (repo / "worktrees").iterdir():
        assert git(tree, env, "rev-parse", "--short=7", "HEAD") == best and clean_tracked(tree, env), tree


# -----------------------------------------------------------------------------


def test_a_workers_records_forged_with_their_copies_are_put_back_by_that_worker_before_its_next_run(
        repo, gpus, tmp_path):
    # modules.json lists the untracked modules a worker knows of: each experiment from #3 on plants one in its
    # worktree and lists it, in the worker's record and its copy alike (as another worker's run could); each
    # experiment is worse than the baseline, so that none is tried again on a newer keep
    from test_ledger import record_of
    initialised(repo, gpus)
    ledger, copies = repo / ".git" / "autoresearch" / "t", Path(f"{record_of(repo)}.files") / "t"
    forge = tmp_path / "forge.py"
    forge.write_text(f"""
import hashlib, json, os, re
n, me = int(os.environ["AUTORESEARCH_EXPERIMENT"]), "w" + os.getcwd()[-1]
train = open("train.py").read()
open("train.py", "w").write(re.sub(r"(?m)^VAL_BPB = .*$", f"VAL_BPB = {{1 + n / 100}}", train))
if n >= 3:
    open(f"helper{{n}}.py", "w").write("BOOST = 1\\n")
    for folder in ({str(ledger)!r}, {str(copies)!r}):
        path = os.path.join(folder, me, "modules.json")
        listed = json.load(open(path)) if os.path.exists(path) else {{}}
        listed[f"helper{{n}}.py"] = hashlib.sha256(open(f"helper{{n}}.py", "rb").read()).hexdigest()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        json.dump(listed, open(path, "w"))
print(f"experiment {{n}}")
""")
    out = loop(repo, gpus, "run", "--agent", f"{sys.executable} {forge}", "--workers", "2",
               "--max-experiments", "4").stdout
    by = {r["n"]: r for r in rows(repo)}
    for n in ("3", "4"):
        assert by[n]["note"].startswith(f"rejected: changed untracked modules helper{n}.py"), (by[n], out)
    for worker in ("w1", "w2"):
        mine, copy = ledger / worker / "modules.json", copies / worker / "modules.json"
        assert "helper" not in mine.read_text() and mine.read_bytes() == copy.read_bytes(), out
    assert "outside the repository" in out and "put back as the loop left it" in out, out


def test_two_workers_share_one_ledger_one_best_and_never_repeat_a_seed_or_a_version(repo, gpus):
    initialised(repo, gpus, repeats=2, SHAPED=True, SLEEP=0.2)
    out = loop(repo, gpus, "run", "--agent", "mutate", "--workers", "2", "--max-experiments", "6").stdout
    exps = rows(repo)[1:]
    assert {r["worker"] for r in exps} == {"1", "2"}, out             # both worked, in one ledger
    assert len({r["n"] for r in exps}) == len(exps) and len({r["train_py"] for r in exps}) == len(exps)
    seeds = [s for r in rows(repo) for c in ("seeds", "best_seeds") for s in r[c].split(",") if s]
    assert len(seeds) == len(set(seeds))                               # no seed used twice, across workers
    assert "worker w1: gpu 0" in out and "w2 (gpu 1" in out and "per experiment (ledger, git, answers)" in out
    assert_all_at_best(repo, gpus)
    keeps = [r["commit"] for r in rows(repo) if r["status"] == "keep"]
    chain = git(repo, gpus, "log", "--first-parent", "--format=%h", "--abbrev=7").split()
    assert all(k in chain for k in keeps)                              # every keep is on the branch
    for r in exps:
        if r["status"] != "keep":
            git(repo, gpus, "rev-parse", f"refs/autoresearch/t/discarded/{r['n']}")  # discarded, not lost
    report = json.loads(loop(repo, gpus, "report", "--json").stdout)
    assert sorted(report["workers"]) == ["1", "2"]
    assert sum(w["experiments"] for w in report["workers"].values()) == len(exps)


# a red team's agent: it finds its worker among its parents, commits a comment-only train.py without touching
# the worktree, and writes a keep of it in the worker's channel to the coordinator through /proc/PID/fd (which
# worked on the pipes the two had); it proposes nothing
FORGE_A_KEEP_IN_THE_CHANNEL = """
import json, os, subprocess, sys
pid = os.getpid()
while not any(b"worker_main" in part for part in open(f"/proc/{pid}/cmdline", "rb").read().split(b"\\0")):
    pid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
refused = []
try:
    fds = os.listdir(f"/proc/{pid}/fd")
except PermissionError:  # not root: the worker is not dumpable, and its descriptors are not even listed
    fds, refused = [], ["fd PermissionError"]
git = lambda *a, **k: subprocess.run(["git", *a], capture_output=True, text=True, check=True, **k).stdout.strip()
best = git("rev-parse", "HEAD")
blob = git("hash-object", "-w", "--stdin", input=open("train.py").read() + "# forged keep\\n")
row = {"commit": best[:7], "val_bpb": "0.300000", "status": "keep", "description": "forged", "tag": "t",
       "n": os.environ["AUTORESEARCH_EXPERIMENT"], "seeds": "900", "val_bpb_runs": "0.300000", "train_py": blob[:12]}
line = json.dumps({"op": "row", "row": row, "base": best, "sha": best}) + "\\n"
for fd in fds:  # every socket and pipe the worker holds: its channel among them
    path = f"/proc/{pid}/fd/{fd}"
    try:
        kind = os.readlink(path).split(":")[0]
    except OSError:  # closed since the listing (a git command of the worker's, say)
        continue
    if kind in ("socket", "pipe"):
        try:
            with open(path, "w") as f:
                f.write(line)
        except OSError as e:
            refused.append(f"{kind} {type(e).__name__}")
print(json.dumps(refused), file=open(sys.argv[1], "w"))
"""


def test_an_agent_cannot_write_in_its_workers_channel_to_the_coordinator(repo, gpus, tmp_path):
    initialised(repo, gpus)
    (tmp_path / "forge.py").write_text(FORGE_A_KEEP_IN_THE_CHANNEL)
    tried = tmp_path / "tried"
    agent = agent_script(tmp_path, f'[ "$N" = 1 ] && {sys.executable} {tmp_path / "forge.py"} {tried}\n'
                                   f'{edit("VAL_BPB", "1.5")}; echo "$N" >> train.py; echo "worse $N"')
    out = loop(repo, gpus, "run", "--agent", agent, "--workers", "2", "--max-experiments", "2").stdout
    refused = json.loads(tried.read_text())
    # ENXIO: a socket cannot be opened again, by root neither (and other users cannot list its descriptors)
    assert "socket OSError" in refused or refused == ["fd PermissionError"], refused
    assert [r["status"] for r in rows(repo)] == ["keep", "discard", "discard"], out
    assert_all_at_best(repo, gpus)


def test_a_row_that_is_none_of_the_experiment_its_worker_was_handed_is_named(repo, gpus):
    # what the coordinator checks before it records a worker's row (a worker running other code could send any)
    from autoresearch.workers import foreign_row
    initialised(repo, gpus)
    base = git(repo, gpus, "rev-parse", "HEAD")
    set_train(repo, VAL_BPB=0.5)
    git(repo, gpus, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "better")
    sha, blob = git(repo, gpus, "rev-parse", "HEAD"), git(repo, gpus, "rev-parse", "HEAD:train.py")[:12]
    task = {"n": 1, "train_py": blob, "seeds": ["43", "44"]}
    row = {"n": "1", "commit": sha[:7], "status": "keep", "train_py": blob, "seeds": "43", "best_seeds": "44"}
    os.chdir(repo)  # git runs here, as in the coordinator
    assert foreign_row(task, {"row": row, "base": base, "sha": sha}) is None
    assert foreign_row(dict(task, recorded=True), {"row": row, "base": base, "sha": sha}) == \
        "it was handed #1, already recorded"
    assert foreign_row(None, {"row": row, "base": base, "sha": sha}) == "it was handed none"
    assert foreign_row(task, {"row": dict(row, n="2"), "base": base, "sha": sha}) == "it was handed #1"
    assert foreign_row({"n": 1}, {"row": row, "base": base, "sha": sha}) == "not the train.py it claimed"
    assert foreign_row(task, {"row": dict(row, seeds="900"), "base": base, "sha": sha}) == "seeds it was not given"
    for forged in ({"sha": base}, {"base": sha}, {"row": dict(row, commit="f0f0f0f")}):
        message = {"row": row, "base": base, "sha": sha, **forged}
        assert foreign_row(task, message) == "its commit does not hold that train.py on top of its base", forged
    rejected = {"n": "1", "commit": sha[:7], "status": "discard", "train_py": "other", "seeds": ""}  # not run
    assert foreign_row(task, {"row": rejected, "base": base, "sha": sha}) is None


def test_a_change_an_agent_commits_on_the_tags_branch_itself_is_taken_off_it_and_kept_aside(repo, gpus, tmp_path):
    initialised(repo, gpus)
    agent = agent_script(tmp_path, f'''[ "$N" = 1 ] && cd {repo} && {edit("VAL_BPB", "0.5")} && git -c user.name=x \\
  -c user.email=x@x commit -qam "unmeasured" && git rev-parse HEAD > {tmp_path / "moved"} && cd - >/dev/null
{edit("VAL_BPB", "1.5")}; echo "$N" >> train.py; echo "worse $N"
''')
    out = loop(repo, gpus, "run", "--agent", agent, "--workers", "2", "--max-experiments", "3").stdout
    moved = (tmp_path / "moved").read_text().strip()
    assert f"was at {moved[:7]}, not at the best" in out and "put back at the best" in out, out
    assert [r["status"] for r in rows(repo)] == ["keep", "discard", "discard", "discard"], out
    assert_all_at_best(repo, gpus)  # the branch, this checkout and each worktree, clean
    (ref,) = git(repo, gpus, "for-each-ref", "--format=%(refname)", "refs/autoresearch/t/moved/").split()
    assert git(repo, gpus, "rev-parse", ref) == moved  # not lost


def test_a_row_forged_in_the_shared_ledger_and_the_pinned_config_edited_by_a_workers_agent_are_put_back(
        repo, gpus, tmp_path):
    from test_ledger import forge_keep_row
    initialised(repo, gpus)
    ledger = repo / ".git" / "autoresearch" / "results.tsv"
    pinned = ledger.parent / "t" / "init.json"
    before = pinned.read_bytes()
    raise_budget = f"sed -i 's/\"time_budget\": [0-9.]*/\"time_budget\": 100/' {pinned}"
    agent = agent_script(tmp_path, f"""
case $N in
  1) {forge_keep_row(ledger)}; {edit("VAL_BPB", "1.51")};;
  2) {raise_budget}; {edit("VAL_BPB", "1.52")};;
  *) {edit("VAL_BPB", "1.53")};;
esac
echo "worse $N"
""")
    out = loop(repo, gpus, "run", "--agent", agent, "--workers", "2", "--max-experiments", "3").stdout
    assert "was written by something other than this loop" in out, out
    (edited,) = ledger.parent.glob("results.tsv.edited-*")  # kept, not lost
    assert "f0f0f0f" not in ledger.read_text() and "f0f0f0f" in edited.read_text()  # the forged row
    assert [r["status"] for r in rows(repo)] == ["keep", "discard", "discard", "discard"], out
    # the pinned config too, for the next command (each worker holds the config it started with)
    assert "init.json was written by something other than this loop" in out and pinned.read_bytes() == before, out
    (raised,) = pinned.parent.glob("init.json.edited-*")
    assert '"time_budget": 100' in raised.read_text()
    assert_all_at_best(repo, gpus)


def test_a_workers_run_that_writes_a_row_and_the_pinned_config_with_their_records_outside_is_put_back(
        repo, gpus, tmp_path):
    # the ledger's record written with the ledger, the pinned config with its copy: consistent pairs, which only
    # the coordinator's memory of its own writes and the worker's seal tell from the loop's
    initialised(repo, gpus)
    ledger = repo / ".git" / "autoresearch"
    pinned = (ledger / "t" / "init.json").read_bytes()
    agent = agent_script(tmp_path, f"""
case $N in
  1) {edit("MODE", '"records"')}; {edit("VAL_BPB", "0.5")};;
  2) {edit("VAL_BPB", "1.52")};;
  *) {edit("VAL_BPB", "1.53")};;
esac
echo "try $N"
""")
    out = loop(repo, gpus, "run", "--agent", agent, "--workers", "2", "--max-experiments", "3").stdout
    # the coordinator says what it put back: the row (the record too, unless the worker's seal put that back
    # first, or the coordinator's next row was written over it: which of them comes first is the machine's)
    assert f"the ledger ({ledger / 'results.tsv'}) was written by something other than this loop" in out, out
    assert "forged" not in (ledger / "results.tsv").read_text() and "forged" not in (repo / "results.tsv").read_text()
    assert (ledger / "t" / "init.json").read_bytes() == pinned
    # rejected: the run that wrote them (and, as the config is the tag's, any other worker's run meanwhile)
    (first,) = [r for r in rows(repo) if r["description"] == "try 1"]
    assert first["status"] == "discard" and first["note"].startswith("rejected:"), first
    assert "t/init.json" in first["note"], first["note"]
    # the next command finds the pinned config and its copy as init wrote them
    p = loop(repo, gpus, "report")
    assert "written by something other" not in p.stdout + p.stderr, p.stdout + p.stderr
    assert (ledger / "t" / "init.json").read_bytes() == pinned


def test_a_keep_on_one_worker_is_the_base_of_the_next_and_an_overtaken_keep_is_tried_again_on_top(
        repo, gpus, tmp_path):
    initialised(repo, gpus, repeats=2, SHAPED=True, SLEEP=0.3)
    # #1 improves at once. #2 waits for #1's keep, then improves another line (judged against the baseline, its
    # base) and runs slowly; #3 and #4 change nothing that counts; #5 takes long, so that #6 goes to #2's worker
    agent = agent_script(tmp_path, f"""
case $N in
  1) {edit("MATRIX_LR", "0.03")}; echo "matrix lr 0.03";;
  2) until [ "$(grep -c '	keep	' {repo}/results.tsv)" -ge 2 ]; do sleep 0.1; done
     {edit("WARMDOWN_RATIO", "0.6")}; {edit("SLEEP", "1.0")}; echo "warmdown 0.6";;
  5) sleep 12; {edit("ADAM_BETAS", "(0.8, 0.9$N)")}; echo "betas $N";;
  *) {edit("ADAM_BETAS", "(0.8, 0.9$N)")}; echo "betas $N";;
esac
""")
    out = loop(repo, gpus, "run", "--agent", agent, "--workers", "2", "--max-experiments", "6", timeout=120).stdout
    r = by_n(repo)
    assert 1 in r and r[1]["status"] == "keep", out
    c1 = git(repo, gpus, "rev-parse", r[1]["commit"])
    assert f"parent best {c1[:7]}" in (repo / r[3]["log"]).read_text()  # the next experiment starts from #1
    assert r[2]["status"] == "discard" and r[2]["note"].startswith("superseded: better than its base"), out
    assert r[6]["description"] == "warmdown 0.6 (again, on top of the new best)" and r[6]["status"] == "keep"
    assert git(repo, gpus, "rev-parse", f"{r[6]['commit']}^") == c1
    assert git(repo, gpus, "rev-parse", "--short=7", "HEAD") == r[6]["commit"]
    source = (repo / "train.py").read_text()
    assert "MATRIX_LR = 0.03" in source and "WARMDOWN_RATIO = 0.6" in source  # both changes
    prompt = next((repo / "logs" / "t").glob("w*/004-prompt.md")).read_text()
    assert "Running now on the other workers" in prompt and "warmdown 0.6" in prompt  # #2, still training
    assert_all_at_best(repo, gpus)


@pytest.mark.whole_machine
def test_two_workers_train_the_real_train_py_on_their_shares_and_the_harness_evaluates_each_run_a_hub_claim_too(
        smoke_cache, tmp_path):
    from test_hub import Hub
    from test_readme import fresh_clone
    lab = fresh_clone(tmp_path)
    e = user_env(tmp_path, smoke_cache, HOME=str(tmp_path / "home"))
    share = len(os.sched_getaffinity(0)) // 2
    loop(lab, e, "init", "--tag", "real", "--repeats", "1", "--workers", "2", timeout=600)
    # another lab's commit on a hub, claimed far better than anything here: one worker's experiment is that
    # train.py, trained and evaluated here (a claim is a hint), and every row goes to the hub with this
    # machine's platform; the other worker's is the agent's
    hub = Hub(tmp_path / "hub-data")
    other = tmp_path / "other"
    subprocess.run(["git", "clone", "-q", str(lab), str(other)], check=True, capture_output=True)
    subprocess.run(["sed", "-i", "s/^MATRIX_LR = 0.04 /MATRIX_LR = 0.02 /", "train.py"], cwd=other, check=True)
    subprocess.run(["git", "-c", "user.name=o", "-c", "user.email=o@o", "commit", "-qam", "matrix lr 0.02"],
                   cwd=other, check=True)
    subprocess.run(["git", "bundle", "create", "-q", "o.bundle", "HEAD"], cwd=other, check=True)
    auth = hub.register("other-lab")
    assert hub.post("/api/git/push", auth, data=(other / "o.bundle").read_bytes()).status_code == 201
    claim = subprocess.run(["git", "rev-parse", "HEAD"], cwd=other, capture_output=True, text=True).stdout.strip()
    platform = f"cpu{len(os.sched_getaffinity(0))}.smoke.synthetic"
    hub.post("/api/results", auth, json={"commit": claim, "val_bpb": 0.01, "platform": platform, "status": "keep"})
    # a learning rate each (the speed stays: no probe of the best), and --min-delta 1: no change can look that
    # much better, so each is judged on its first run: two real runs side by side, not a long confirmation
    agent = agent_script(tmp_path, f"""
case $N in
  1) {edit("MATRIX_LR", "0.03")}; echo "matrix lr 0.03";;
  *) {edit("MATRIX_LR", "0.05")}; echo "matrix lr 0.05";;
esac
""")
    try:
        out = loop(lab, e, "run", "--agent", agent, "--workers", "2", "--max-experiments", "2", "--min-delta", "1",
                   "--hub", hub.url, timeout=600).stdout
        posted = hub.get("/api/results", auth, params={"limit": "100"}).json()
    finally:
        hub.proc.kill()
        hub.proc.wait()
    exps = rows(lab)[1:]
    assert sorted(r["worker"] for r in exps) == ["1", "2"] and all(r["status"] == "discard" for r in exps), out
    assert sum(r["description"].startswith(f"from the hub: {claim[:7]} of other-lab") for r in exps) == 1, out
    assert sorted((p["status"], p["platform"], p["val_bpb"]) for p in posted if p["agent_id"] != "other-lab") \
        == sorted((r["status"], platform, float(r["val_bpb"])) for r in rows(lab)), posted  # the baseline too
    # each worker's evaluator reads a copy of its own, watched while that worker trains: no false alarm (a copy
    # made from the cache while the other worker trains would be one)
    assert not [r["note"] for r in exps if r["note"].startswith("rejected")], out
    for r in rows(lab):
        log = (lab / r["log"]).read_text()
        assert f"device cpu (cpu, {share} threads)" in log and "===== evaluator" in log, r["log"]
        assert float(r["val_bpb"]) > 0 and r["heldout_gap"]                # the harness's numbers, held-out too
        # the evaluator imports beside train.py on the same core: the harness's own work, never "other work"
        loads = [float(v) for v in (r["other_cores"] + "," + r["best_other_cores"]).split(",") if v]
        assert loads and max(loads) < 0.1, r
    assert_all_at_best(lab, e)


def test_a_train_py_in_flight_on_another_worker_or_measured_is_not_run_again(repo, gpus, tmp_path):
    initialised(repo, gpus, SLEEP=0.5)
    agent = agent_script(tmp_path, f'{edit("VAL_BPB", "1.5")}; echo "same idea"\n')
    out = loop(repo, gpus, "run", "--agent", agent, "--workers", "2", "--max-experiments", "3").stdout
    exps = rows(repo)[1:]
    assert len(exps) == 1 and exps[0]["status"] == "discard", out
    assert out.count("skip identical to #") == 2 and ("running on w" in out or "discard val_bpb" in out), out
    assert_all_at_best(repo, gpus)


def test_each_worktree_is_sealed_as_the_checkout_is(repo, gpus, tmp_path):
    initialised(repo, gpus)
    agent = agent_script(tmp_path, f"""
case $N in
  1) echo "# mine" >> prepare.py; {edit("VAL_BPB", "0.9")}; echo "better, with help";;
  *) {edit("VAL_BPB", "1.2")}; echo "worse";;
esac
""")
    out = loop(repo, gpus, "run", "--agent", agent, "--workers", "2", "--max-experiments", "2").stdout
    r = by_n(repo)
    assert r[1]["status"] == "discard" and r[1]["note"].startswith("rejected: changed prepare.py"), out
    assert "# mine" in git(repo, gpus, "show", "refs/autoresearch/t/discarded/1:prepare.py")   # saved, not lost
    assert r[2]["status"] == "discard" and "# mine" not in (repo / "prepare.py").read_text()
    assert_all_at_best(repo, gpus)


def test_kill_9_of_the_coordinator_stops_every_worker_and_the_next_run_resumes_them_all(repo, gpus):
    initialised(repo, gpus, SLEEP=3.0)
    proc = subprocess.Popen([sys.executable, str(AGENT_LOOP), "run", "--agent", "mutate", "--workers", "2"],
                            cwd=repo, env=gpus, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    running = [repo / ".git" / "autoresearch" / "t" / f"w{i}" / "running.json" for i in (1, 2)]

    def both_training():
        states = [json.loads(p.read_text()) if p.exists() else {} for p in running]
        return all(s.get("phase") == "train" and process.proc_start_time(s.get("pgid", 0)) for s in states)
    assert wait_for(both_training, 60)
    states = [json.loads(p.read_text()) for p in running]
    workers = worker_pids(repo)
    proc.kill()
    proc.wait()
    # without their coordinator, the workers end their runs and exit; nothing trains on
    assert wait_for(lambda: all(pid_gone(s["pgid"]) for s in states) and all(map(pid_gone, workers)), 20)
    finished = rows(repo)
    assert len(finished) == 1                                            # no experiment had finished
    shutil.rmtree(repo / "worktrees" / "t-w2")                          # even a worktree deleted by hand
    out = loop(repo, gpus, "run", "--agent", "mutate", "--max-experiments", "0").stdout  # any later command
    interrupted = [r for r in rows(repo) if r["note"].startswith("interrupted: the loop was killed")]
    assert sorted(int(r["n"]) for r in interrupted) == sorted(s["n"] for s in states), out
    out = loop(repo, gpus, "run", "--agent", "mutate", "--workers", "2", "--max-experiments", "2").stdout
    after = rows(repo)
    later = [int(r["n"]) for r in after[1:] if r not in interrupted]
    assert len(later) == 2 and min(later) > max(s["n"] for s in states)  # numbers never reused
    assert len({r["n"] for r in after}) == len(after)
    seeds = [x for r in after for c in ("seeds", "best_seeds") for x in r[c].split(",") if x]
    assert len(seeds) == len(set(seeds))                               # the killed runs' seeds too
    for s in states:
        git(repo, gpus, "rev-parse", f"refs/autoresearch/t/discarded/{s['n']}")
    assert not any(p.exists() for p in running)
    assert_all_at_best(repo, gpus)


def test_kill_9_of_the_coordinator_also_ends_the_agents_of_its_workers(repo, gpus, tmp_path):
    initialised(repo, gpus)
    agent = agent_script(tmp_path, f"echo $$ > {tmp_path}/agent-$N.pid\nsleep 300\n")
    proc = subprocess.Popen([sys.executable, str(AGENT_LOOP), "run", "--agent", agent, "--workers", "2"], cwd=repo,
                            env=gpus, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pids = [tmp_path / "agent-1.pid", tmp_path / "agent-2.pid"]
    assert wait_for(lambda: all(p.exists() and p.read_text().strip() for p in pids), 60)
    proc.kill()
    proc.wait()
    assert wait_for(lambda: all(pid_gone(int(p.read_text())) for p in pids), 20)   # no agent edits on alone
    loop(repo, gpus, "run", "--agent", "mutate", "--max-experiments", "0")
    assert len(rows(repo)) == 1 and not list((repo / ".git" / "autoresearch" / "t").glob("w*/running.json"))
    assert_all_at_best(repo, gpus)


def test_each_gpu_worker_sees_only_its_gpu(repo, env):
    initialised(repo, env)
    gpus = dict(env, CUDA_VISIBLE_DEVICES="3,5")         # what a job scheduler gives: GPUs 3 and 5 of the node
    out = loop(repo, gpus, "run", "--agent", "mutate", "--workers", "auto", "--max-experiments", "2").stdout
    assert "worker w1: gpu 3" in out and "worker w2: gpu 5" in out, out
    for r in rows(repo)[1:]:  # every run of an experiment (the best's re-runs too) on its worker's GPU only
        own, other = ("3", "5") if r["worker"] == "1" else ("5", "3")
        log = (repo / r["log"]).read_text()
        assert f"visible GPUs {own}\n" in log and f"visible GPUs {other}\n" not in log
    wrong = loop(repo, gpus, "run", "--agent", "mutate", "--gpus", "0,1", check=False)
    assert wrong.returncode == 2 and "CUDA_VISIBLE_DEVICES allows only 3,5" in wrong.stderr
    fewer = loop(repo, gpus, "run", "--agent", "mutate", "--workers", "3", check=False)
    assert fewer.returncode == 2 and "2 GPU(s) visible, one per worker. Fix: `--workers 2`" in fewer.stderr


def test_a_workers_timeout_kills_its_train_py_and_children_and_the_other_worker_goes_on(repo, gpus, tmp_path):
    initialised(repo, gpus)
    agent = agent_script(tmp_path, f"""
case $N in
  1) {edit("MODE", '"hang"')}; echo "hangs";;
  *) {edit("VAL_BPB", "1.5")}; echo "worse";;
esac
""")
    out = loop(repo, dict(gpus, STANDIN_CHILD_PID=str(tmp_path / "child.pid")), "run", "--agent", agent,
               "--workers", "2", "--max-experiments", "3", "--timeout", "3").stdout
    r = by_n(repo)
    assert len(r) >= 3 and r[1]["status"] == "crash", out
    assert r[1]["note"].startswith("crash: timeout: killed with its whole process"), out
    assert wait_for(lambda: pid_gone(int((tmp_path / "child.pid").read_text())), 15)  # train.py's child too
    assert [r[n]["status"] for n in sorted(r)[2:]] == ["discard"] * (len(r) - 2), out  # the other one went on
    assert_all_at_best(repo, gpus)


def test_a_worker_that_dies_gets_a_crash_row_and_is_started_again(repo, gpus):
    initialised(repo, gpus, SLEEP=2.0)
    proc = subprocess.Popen([sys.executable, str(AGENT_LOOP), "run", "--agent", "mutate", "--workers", "2",
                             "--max-experiments", "4"], cwd=repo, env=gpus, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    running = repo / ".git" / "autoresearch" / "t" / "w1" / "running.json"

    def training():
        state = json.loads(running.read_text()) if running.exists() else {}
        return state.get("phase") == "train" and process.proc_start_time(state.get("pgid", 0))
    assert wait_for(training, 60)
    state = json.loads(running.read_text())
    victim = int((repo / "logs" / "t" / "w1" / "lock").read_text())
    os.kill(victim, signal.SIGKILL)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert wait_for(lambda: pid_gone(state["pgid"]), 15)               # its orphaned train.py was ended
    r = by_n(repo)
    assert r[state["n"]]["status"] == "crash" and r[state["n"]]["note"].startswith("interrupted: its worker process "
                                                                                   "died"), out
    assert f"w1 exited with code -9 without being told to stop during #{state['n']}" in out
    assert len(r) == 1 + 4 and sum(x["worker"] == "1" for x in r.values()) >= 2, out  # w1 worked on after
    assert_all_at_best(repo, gpus)


@pytest.mark.whole_machine
def test_a_tag_initialised_for_cpu_workers_runs_everything_on_a_workers_share_of_the_cores(repo, env):
    share = len(os.sched_getaffinity(0)) // 2
    p = initialised(repo, env, SHAPED=True)
    assert "core(s) per run" not in p.stdout
    git(repo, env, "checkout", "-q", "main")
    p = loop(repo, env, "init", "--tag", "cpu2", "--repeats", "1", "--workers", "2")
    assert f"{share} CPU core(s) per run, for 2 workers" in p.stdout
    loop(repo, env, "run", "--agent", "mutate", "--workers", "2", "--max-experiments", "2")
    loop(repo, env, "run", "--agent", "mutate", "--max-experiments", "1")      # the single loop too
    logs = [(repo / r["log"]).read_text() for r in rows(repo) if r["tag"] == "cpu2"]
    assert len(logs) == 4 and all(f" on {share} cores" in text and " on 2 cores" not in text for text in logs)
    too_many = loop(repo, env, "run", "--agent", "mutate", "--workers", "3", check=False)
    assert too_many.returncode == 2 and "Fix: `--workers 2`" in too_many.stderr


def test_workers_refuse_what_they_cannot_do_and_say_the_fix(repo, env):
    initialised(repo, env)
    cores = len(os.sched_getaffinity(0))  # the cores this process may use, which the loop splits
    too_many = loop(repo, env, "run", "--agent", "mutate", "--workers", str(cores + 1), check=False)
    assert too_many.returncode == 2 and f"Fix: `--workers {cores}`" in too_many.stderr
    zero = loop(repo, env, "run", "--agent", "mutate", "--workers", "0", check=False)
    assert zero.returncode == 2 and "give a number of workers from 1, or auto" in zero.stderr
    auto = loop(repo, env, "run", "--agent", "mutate", "--workers", "auto", check=False)
    assert auto.returncode == 2 and "none is visible" in auto.stderr
    assert len(rows(repo)) == 1 and not (repo / "worktrees").exists()


# -----------------------------------------------------------------------------
# --executor ray, on a local Ray (the optional dependency group `ray`: `uv sync --group ray`)


# A local Ray's processes inherit the test process's cores (one of two under the suite): its runs queue there, and
# the other test process's timed runs never see them as other work.
def ray_env(env, tmp_path):
    """The node checkouts of the local Ray in this test's folder."""
    return dict(env, AUTORESEARCH_RAY_HOME=str(tmp_path / "nodes"))


def test_ray_executor_runs_every_run_as_a_task_and_records_it_here(repo, env, tmp_path):
    pytest.importorskip("ray")
    initialised(repo, env, repeats=2, SHAPED=True)
    out = loop(repo, ray_env(env, tmp_path), "run", "--agent", "mutate", "--workers", "2", "--executor", "ray",
               "--max-experiments", "4", timeout=240).stdout
    assert "Ray: a local Ray on this machine, 1 node(s); each run asks for 1 CPU(s)" in out, out
    exps = rows(repo)[1:]
    assert len(exps) == 4 and {r["worker"] for r in exps} == {"1", "2"}, out
    # the node's ledger holds the run's log and hand-over: its seal (seal.LedgerSeal) lets the run write those
    assert not [r["note"] for r in exps if r["note"].startswith("rejected")], out
    seeds = [s for r in rows(repo) for c in ("seeds", "best_seeds") for s in r[c].split(",") if s]
    assert len(seeds) == len(set(seeds))
    log = (repo / exps[0]["log"]).read_text()
    assert "===== on Ray node" in log and f"training smoke depth 2 seed {exps[0]['seeds'].split(',')[0]} " in log
    assert (tmp_path / "nodes" / "t-w1" / ".git").is_dir()      # the node's own checkout, not the worktree
    assert_all_at_best(repo, env)


def test_a_ray_task_that_dies_with_its_node_is_a_crash_row_and_the_loop_goes_on(repo, env, tmp_path):
    pytest.importorskip("ray")
    initialised(repo, env)
    agent = agent_script(tmp_path, f"""
case $N in
  1) {edit("MODE", '"killparent"')}; echo "dies";;
  *) {edit("VAL_BPB", "1.5")}; echo "worse";;
esac
""")
    out = loop(repo, ray_env(env, tmp_path), "run", "--agent", agent, "--workers", "1", "--executor", "ray",
               "--max-experiments", "2", timeout=240).stdout
    r = by_n(repo)
    assert r[1]["status"] == "crash" and "the Ray task ended without a result" in r[1]["note"], out
    assert r[2]["status"] == "discard", out
    assert_all_at_best(repo, env)


def test_ray_refuses_to_start_on_a_node_without_the_data_and_names_the_fix(repo, env, tmp_path):
    pytest.importorskip("ray")
    initialised(repo, env)
    (Path(env["AUTORESEARCH_CACHE_DIR"]) / "ready").unlink()
    p = loop(repo, ray_env(env, tmp_path), "run", "--agent", "mutate", "--workers", "1", "--executor", "ray",
             check=False, timeout=240)
    assert p.returncode == 2 and "nodes of the Ray cluster cannot run experiments yet" in p.stderr, p.stderr
    assert "no data for profile smoke" in p.stderr and "Fix: on each, in the repository" in p.stderr
    assert len(rows(repo)) == 1


def test_ray_makes_each_workers_evaluator_copy_on_every_node_before_any_run(smoke_cache, tmp_path):
    # made by a worker's first run instead, from the cache, it would be a read of the validation split while
    # another worker's run trains on that node: a false rejection of that run
    pytest.importorskip("ray")
    import hashlib
    import tempfile
    from test_readme import fresh_clone
    import uuid
    lab = fresh_clone(tmp_path)
    # the copy's name comes from the checkout's path, and a later pytest session can reuse this tmp_path while
    # the system temp folder still holds the copy made then: a folder name of this session's own
    nodes = tmp_path / f"nodes-{uuid.uuid4().hex[:8]}"
    e = user_env(tmp_path, smoke_cache, AUTORESEARCH_RAY_HOME=str(nodes))
    loop(lab, e, "init", "--tag", "real", "--repeats", "1", timeout=600)
    pinned = json.loads((lab / ".git" / "autoresearch" / "real" / "init.json").read_text())
    hashes = pinned["metric_hashes"]
    assert pinned["fresh_heldout"] is True  # synthetic data: its held-out text is fresh from each evaluation

    def copy_of(worker):  # metricdata.evaluation_copy's folder for the ledger of the worker's checkout on a node
        ledger = (nodes / f"real-w{worker}" / ".git").resolve() / "autoresearch"
        key = hashlib.sha256(json.dumps([hashes, str(ledger)], sort_keys=True).encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"autoresearch-{os.getuid()}" / "metric" / key

    assert not copy_of(1).exists() and not copy_of(2).exists()
    out = loop(lab, e, "run", "--agent", "mutate", "--workers", "2", "--executor", "ray", "--max-experiments", "0",
               timeout=600).stdout
    assert "1 node(s)" in out and len(rows(lab)) == 1, out
    for worker in (1, 2):
        assert (copy_of(worker) / "val.bin").is_file() and (copy_of(worker) / ".pristine" / "hashes.json").is_file()


def test_launch_recipes_parse_and_call_only_what_the_cli_has():
    import re
    import shlex
    import yaml
    from agent_loop import build_parser
    launch = AGENT_LOOP.parent / "autoresearch" / "launch"
    task = yaml.safe_load((launch / "skypilot.yaml").read_text())
    assert task["num_nodes"] >= 2 and ":" in task["resources"]["accelerators"] and task["workdir"] == "."
    assert "uv sync --group ray" in task["setup"] and "uv run prepare.py" in task["setup"]
    subprocess.run(["bash", "-n", str(launch / "slurm.sh")], check=True)
    for text in (task["setup"] + task["run"], (launch / "slurm.sh").read_text()):
        calls = [line.split("agent_loop.py", 1)[1] for line in text.splitlines()
                 if "uv run agent_loop.py" in line and not line.lstrip().startswith("#")]
        assert {c.split()[0] for c in calls} == {"init", "run", "report"}, calls
        for call in calls:
            argv = shlex.split(re.sub(r"\$\{?(\w+)\}?", "1", call))
            build_parser().parse_args(argv)  # exits (and fails the test) on a flag the CLI lacks
            if argv[0] == "run":
                assert argv[argv.index("--executor") + 1] == "ray" and "--address" in argv
