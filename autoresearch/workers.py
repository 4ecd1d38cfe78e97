"""
Parallel workers: `agent_loop.py run --workers N` (or `--gpus 0,1,3`) runs N experiments at once, each in a git
worktree of its own (worktrees/TAG-wK, detached at the best commit) with its own device and its own agent call.

The coordinator (the `run` process) is the one writer: it hands out experiment numbers and seeds, refuses a
train.py that was measured or is running on another worker, records every row in the one ledger and moves the
branch on a keep. Each worker (a process of its own, started here) proposes, trains and decides as the single
loop does (experiment.py), pairs included, on its own device, against the best it started from. A keep whose
base is no longer the best (another worker's keep landed first) is recorded as a discard and tried again on top
of the new best. A worker dies with the coordinator (a kill -9 included); the next `run` finishes what each one
left in flight, as the single loop does.
"""
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from autoresearch.gitrepo import changed_since, current_branch, ensure_ignored, git, git_env
from autoresearch.layout import TRAIN, WORKTREES_DIR, LoopError, read_json
from autoresearch.ledger import (INTERRUPTED, LEDGER_ENV, append_row, ledger_dir, measured_versions, put_back,
                                 put_back_own, remember_records, render_results, tag_rows, write_atomic)
from autoresearch.experiment import run_experiment
from autoresearch.process import KILL_GRACE_S, Stop, raise_stop
from autoresearch.proposers import Proposal, make_proposer
from autoresearch.runner import PACKAGE_ROOT, evaluator_data, harness_python, pinned_config_files, worker_found
from autoresearch.resume import STOPPED, reconcile_worker, save_and_reset, save_failed_proposal, spare_name
from autoresearch.state import InFlight, Loop, first_free_seed, load_config, lock, say

MAX_RESTARTS = 3          # a worker that dies this many times in a row is not started again
DIED = f"{INTERRUPTED}: its worker process died during training (killed, out of memory?)"
# the worker's entry point (runner.harness_python): the harness is imported from the main checkout, never from the
# worktree, and the worker is out of other processes' reach (not dumpable) before it imports the rest
BOOT = (f"sys.path.insert(0, {PACKAGE_ROOT!r}); from autoresearch.handoff import dumpable; dumpable(False); "
        f"from autoresearch.workers import worker_main; sys.exit(worker_main(sys.argv[1]))")


# -----------------------------------------------------------------------------
# Devices: one per worker


@dataclass
class Device:
    label: str                                   # "gpu 3" or "cpus 0-7"
    env: dict = field(default_factory=dict)      # CUDA_VISIBLE_DEVICES for a GPU
    cpus: list = field(default_factory=list)     # CPU affinity (train.py uses as many threads as it may run on)


def visible_gpus():
    """The CUDA device ids a worker may be given, as CUDA_VISIBLE_DEVICES would name them."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [x.strip() for x in listed.split(",") if x.strip() and x.strip() != "-1"]
    try:
        import torch
        return [str(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        return []


def cores_per_run(workers):
    """`init --workers N` on a machine without GPUs: the cores each run of the tag gets (its baseline's
    included), so that the runs of N parallel workers compare with the baseline's. None: all the cores, or a
    GPU each."""
    if workers in (None, "1") or visible_gpus():
        return None
    return len(plan_devices(workers, None)[0].cpus)


def pin_cores(config):
    """This process (and the runs it starts) on the cores a run of the tag has, when init pinned a share."""
    share = config.get("cores_per_run")
    if share and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:share])


def plan_devices(workers, gpus, share=None):
    """One Device per worker. --gpus names them; --workers auto takes every visible GPU; --workers N takes
    GPUs 0..N-1 when there are that many, else splits this machine's cores into N shares: equal ones, or of
    `share` cores each (the tag's cores per run, pinned at init)."""
    found = visible_gpus()
    if gpus:
        ids = [x.strip() for x in gpus.split(",") if x.strip()]
        if len(set(ids)) != len(ids) or (workers not in (None, "auto") and int(workers) != len(ids)):
            raise LoopError(f"--gpus {gpus}: name each GPU once, one per worker (--workers may be left out)")
        if os.environ.get("CUDA_VISIBLE_DEVICES") is not None and not set(ids) <= set(found):
            raise LoopError(f"--gpus {gpus}: CUDA_VISIBLE_DEVICES allows only {','.join(found) or 'none'} (a job "
                            f"scheduler's share?). Fix: `--gpus {','.join(found)}` or `--workers auto`")
        return [Device(f"gpu {i}", {"CUDA_VISIBLE_DEVICES": i}) for i in ids]
    if workers == "auto":
        if not found:
            raise LoopError("--workers auto starts one worker per visible GPU, and none is visible. Fix: "
                            "`--workers N` splits the CPU cores into N shares")
        return [Device(f"gpu {i}", {"CUDA_VISIBLE_DEVICES": i}) for i in found]
    n = int(workers)
    if len(found) >= n:
        return [Device(f"gpu {i}", {"CUDA_VISIBLE_DEVICES": i}) for i in found[:n]]
    if found:  # a GPU tag's baseline trained on a GPU: a worker on CPUs would measure nothing comparable
        raise LoopError(f"--workers {n}: {len(found)} GPU(s) visible, one per worker. Fix: `--workers "
                        f"{len(found)}` (or auto)")
    cores = sorted(os.sched_getaffinity(0))
    share = share or len(cores) // n
    if share < 1 or n * share > len(cores):
        most = max(len(cores) // (share or 1), len(found))
        raise LoopError(f"--workers {n}: this machine has {len(cores)} CPU cores and {len(found)} GPUs, so at "
                        f"most {most} workers" + (f" of {share} cores each (pinned at init)" if share > 1 else "")
                        + f". Fix: `--workers {most}`")
    return [Device(f"cpus {cores[i * share]}-{cores[(i + 1) * share - 1]}", {}, cores[i * share:(i + 1) * share])
            for i in range(n)]


# -----------------------------------------------------------------------------
# The worker: a process in its own worktree, asking its coordinator over two pipes


class Link:
    """The worker's side of its socket to the coordinator: one JSON line out, one JSON line back."""

    def __init__(self, fd, remote=False):
        channel = socket.socket(fileno=fd)
        self.inbox, self.outbox = channel.makefile("r"), channel.makefile("w")
        self.others, self.retry, self.remote = [], None, remote  # remote: runs are Ray tasks (rayexec.py)
        self.node = None  # the Ray node of the experiment's runs so far

    def ask(self, message):
        self.tell(message)
        line = self.inbox.readline()
        if not line:
            raise Stop()  # the coordinator is gone
        return json.loads(line)

    def tell(self, message):
        try:
            self.outbox.write(json.dumps(message) + "\n")
            self.outbox.flush()
        except ConnectionError:  # the coordinator is gone
            raise Stop() from None

    def seed(self):
        return self.ask({"op": "seed"})["seed"]

    def claim(self, n, train_py, description):
        """The row (or in-flight experiment) that already has this train.py, else None: then it is ours."""
        return self.ask({"op": "claim", "n": n, "train_py": train_py, "description": description})["twin"]

    def run_remote(self, loop, seed, log, version):
        """One run as a Ray task, through the coordinator (experiment.sealed_run's stand-in)."""
        from autoresearch.rayexec import remote_request, run_from_answer
        answer = self.ask(remote_request(loop, seed, version, self.node))
        self.node = answer.get("node_id") or self.node
        return run_from_answer(answer, log, seed)

    def record(self, row, base, sha):
        """The row as the coordinator recorded it: a keep whose base is no longer the best comes back a
        discard (and the coordinator has its change tried again on top of the new best)."""
        return self.ask({"op": "row", "row": row, "base": base, "sha": sha})["row"]


def foreign_row(task, message):
    """Why the row in a worker's `message` is none of `task` (what the coordinator handed the worker: the number,
    then the train.py it claimed and the seeds it was given), or None. A row with runs must be of that train.py,
    from those seeds, at a commit holding it on top of its base; one without (a proposal set aside unrun) and
    any row only once. A worker's socket is its own, so only a worker running code other than the harness's, or
    one taken over (by root), sends such a row."""
    task = task or {}
    row, sha = message["row"], message.get("sha") or ""
    if not task or str(row.get("n")) != str(task["n"]) or task.get("recorded"):
        return (f"it was handed #{task['n']}" + (", already recorded" if task.get("recorded") else "")
                if task else "it was handed none")
    seeds = [s for key in ("seeds", "best_seeds") for s in (row.get(key) or "").split(",") if s]
    if not seeds and row.get("status") != "keep":
        return None
    if not task.get("train_py") or row.get("train_py") != task["train_py"]:
        return "not the train.py it claimed"
    if set(seeds) - set(task.get("seeds", [])):
        return "seeds it was not given"
    blob = git("rev-parse", "-q", "--verify", f"{sha}:{TRAIN}", check=False) or ""
    base = message.get("base") or "-"
    on_base = base != sha and git("merge-base", "--is-ancestor", base, sha, check=False) is not None
    if not sha.startswith(row.get("commit") or "-") or not blob.startswith(task["train_py"]) or not on_base:
        return "its commit does not hold that train.py on top of its base"
    return None


def die_with_parent(parent):
    """SIGTERM when the coordinator dies, kill -9 included (Linux): the worker then ends its own run."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # it died before prctl
        raise Stop()


def worker_main(options):
    """A worker's whole life: ask for an experiment, propose, run it, report; until told to stop. A stop or a
    kill leaves running.json, and the next command finishes the experiment (resume.reconcile_worker)."""
    o = json.loads(options)
    signal.signal(signal.SIGTERM, raise_stop)
    try:
        die_with_parent(o["parent"])
        if o["cpus"]:
            os.sched_setaffinity(0, o["cpus"])
        link = Link(o["fd"], remote=o["remote"])
        loop = Loop(o["tag"], load_config(o["tag"]), [], o["timeout"], o["min_delta"], worker=o["worker"],
                    root=o["root"], link=link)
        for path in pinned_config_files(loop.private_dir):  # as found now, before any run: what its seal puts back
            worker_found(path)
        remember_records(loop.private_dir)
        lock(loop.dir)
        proposer = hub_first(loop, o.get("hub"), make_proposer(o["agent"], o["seed"], o["agent_timeout"]))
        while True:
            go = link.ask({"op": "next"})
            if go.get("stop"):
                return 0
            link.others, link.retry = go["others"], go.get("retry")
            loop.rows = tag_rows(loop.tag)
            if not one_experiment(loop, proposer, go["n"], link):
                return 0
    except (KeyboardInterrupt, Stop):
        return 130


def hub_first(loop, hub, proposer):
    """The proposer behind the coordinator's hub (run --hub): the hub's better commits are tried first. A hub
    this worker cannot use is said, and the worker goes on without it."""
    if not hub:
        return proposer
    from autoresearch.hubclient import HubClient, HubFirst  # requests: only a hub's client needs it
    try:
        client = HubClient(hub["url"], loop, hub["platform"], None if hub["trust"] is None else set(hub["trust"]))
    except LoopError as e:
        say(loop, f"hub: {e}; this worker goes on without it")
        return proposer
    return HubFirst(client, proposer)


def one_experiment(loop, proposer, n, link):
    """Experiment n from the best: the proposer's change (or the change a newer keep overtook, again), run and
    decided by experiment.py; its line goes to the coordinator. False when the proposer has nothing left."""
    start_from_best(loop, n)
    link.node = None
    render_results()  # the worktree's results.tsv, for the agent to read
    with InFlight(loop) as flight:
        flight.mark(n=n, phase="propose")
        retry = link.retry
        proposal = again(loop, retry) if retry else proposer.propose(loop, n, flight)
        if proposal is None:
            link.tell({"op": "exhausted"})
            return False
        if proposal.error:
            ref = save_failed_proposal(loop, n)
            text = f"skip {proposal.error}" + (f"; log={proposal.log}" if proposal.log else "")
            link.tell({"op": "line", "n": n, "failed": not retry,  # the agent's failure, not a merge's
                       "text": text + (f"; its changes saved at {ref}" if ref else "")})
            return True
        notes = put_back_own()  # its records as it wrote them: another worker's run may have written them
        line = run_experiment(loop, flight, proposal.description, time.monotonic(), strict=False,
                              untracked_new=proposal.untracked, n=n)
    link.tell({"op": "line", "n": n, "text": line, "description": proposal.description,
               "untracked": sorted(proposal.untracked), "notes": notes})
    return True


def start_from_best(loop, n):
    """Detached at the best commit with nothing uncommitted, so that whatever differs later is this experiment's
    proposal. What an earlier one left (a worker killed mid-experiment) is saved under a ref first."""
    if current_branch():
        git("checkout", "-q", "--detach")
    best = loop.best_commit
    if changed_since("HEAD") or git("merge-base", "--is-ancestor", "HEAD", best, check=False) is None:
        ref = save_and_reset(loop, spare_name(loop, "left-over", n), f"[left over before #{n}]")
        if ref:
            say(loop, f"#{n} what the worktree held before it is saved at {ref}")
    git("checkout", "-q", "--detach", best)


def again(loop, retry):
    """The train.py change of an experiment that beat its base after another keep landed, merged onto the new
    best (git merge-file: the base's train.py, the new best's, the experiment's). A Proposal; one with an error
    when the two changes overlap."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for name, rev in (("best", "HEAD"), ("base", retry["base"]), ("exp", retry["commit"])):
            paths.append(Path(tmp) / name)  # the bytes, final newline and line ends included
            paths[-1].write_bytes(subprocess.run(["git", "--no-replace-objects", "cat-file", "blob", f"{rev}:{TRAIN}"],
                                                 env=git_env(), check=True, capture_output=True).stdout)
        p = subprocess.run(["git", "merge-file", "-p", "-q", *map(str, paths)], capture_output=True)
    description = f"{retry['description']} (again, on top of the new best)"
    if p.returncode != 0:
        return Proposal(description, error=f"#{retry['n']}'s change does not merge with the new best's")
    Path(TRAIN).write_bytes(p.stdout)
    return Proposal(description)


# -----------------------------------------------------------------------------
# The coordinator's side


@dataclass
class Worker:
    number: int
    device: Device
    path: Path                       # its worktree
    proc: object = None
    inbox: object = None             # the pipe the coordinator answers on
    waiting: str = None              # the id of its run on Ray, while it waits for it
    task: dict = None                # the experiment in flight: n, and train_py and description once claimed
    failures: int = 0                # proposals failed in a row
    deaths: int = 0                  # exits without being told to stop, in a row
    finished: bool = False
    finished_ns: list = field(default_factory=list)  # the experiments it finished (with a row, or skipped)
    gave_up: bool = False            # its agent kept failing, or it kept dying


class Coordinator:
    """The one writer of a parallel run: see the module's docstring."""

    def __init__(self, loop, args, devices, executor=None, hub=None):
        self.loop, self.args, self.root, self.executor, self.hub = loop, args, os.getcwd(), executor, hub
        self.messages = queue.Queue()
        self.workers = [Worker(i, d, Path(self.root) / WORKTREES_DIR / f"{loop.tag}-w{i}")
                        for i, d in enumerate(devices, 1)]
        self.handed, self.busy_s, self.stopping, self.t0 = 0, 0.0, False, time.monotonic()
        # overtaken keeps whose change waits to be tried on top of the new best: kept across restarts
        self.retries_path = loop.private_dir / "retries.json"
        self.retries = read_json(self.retries_path) or []

    # ---- setting up and finishing each worker's worktree

    def worker_loop(self, w):
        return Loop(self.loop.tag, self.loop.config, [], self.loop.timeout, self.loop.min_delta, worker=w.number,
                    root=self.root)

    def prepare(self, w):
        """Its worktree, at the best; what its last process left in flight was finished by open_loop."""
        if not w.path.exists():
            git("worktree", "prune")
            git("worktree", "add", "-q", "--detach", str(w.path), self.loop.best_commit)

    def start(self, w):
        # a socket, not pipes: no other process can open it again through /proc/PID/fd (root neither), where an
        # agent's could write rows in a pipe and read the answers
        mine, theirs = socket.socketpair()
        options = dict(tag=self.loop.tag, worker=w.number, root=self.root, fd=theirs.fileno(),
                       parent=os.getpid(), cpus=w.device.cpus, agent=self.args.agent, seed=self.args.seed,
                       agent_timeout=self.args.agent_timeout, timeout=self.loop.timeout,
                       min_delta=self.loop.min_delta, remote=self.executor is not None,
                       hub=self.hub and dict(url=self.hub.url, platform=self.hub.platform,
                                             trust=None if self.hub.trust is None else sorted(self.hub.trust)))
        w.proc = subprocess.Popen(harness_python(BOOT, "-u") + [json.dumps(options)], cwd=w.path,
                                  env={**os.environ, **w.device.env},
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  pass_fds=(theirs.fileno(),))
        theirs.close()
        w.inbox, w.finished, w.task = mine.makefile("w"), False, None
        threading.Thread(target=self.listen, args=(w, mine.makefile("r")), daemon=True).start()
        mine.close()  # the two files hold it open
        threading.Thread(target=echo, args=(w.number, w.proc.stdout), daemon=True).start()

    def listen(self, w, pipe):
        """Its messages, then None when its socket closes (a line cut by its death ends it too)."""
        try:
            for line in pipe:
                self.messages.put((w, json.loads(line)))
        except ValueError:
            pass
        finally:
            pipe.close()
            self.messages.put((w, None))

    def answer(self, w, message):
        try:
            w.inbox.write(json.dumps(message) + "\n")
            w.inbox.flush()
        except (ConnectionError, ValueError):  # it died meanwhile: its end is handled when its socket closes
            pass

    # ---- the run

    def run(self):
        os.environ[LEDGER_ENV] = str(ledger_dir())  # workers (and reconcile in their worktrees) use this ledger
        ensure_ignored(f"{WORKTREES_DIR}/")
        for w in self.workers:
            self.prepare(w)
            if self.loop.config.get("harness_eval") and self.executor is None:
                evaluator_data(self.loop.config, w.path)  # its evaluator's copy, before any worker trains
        # after the experiments left in flight have their rows: no number or seed is used twice
        self.next_n = self.first_n = self.loop.next_n()
        self.next_seed = first_free_seed(self.loop.rows, self.loop.config["base_seed"])
        for w in self.workers:
            say(self.loop, f"worker w{w.number}: {w.device.label}, worktree {w.path.relative_to(self.root)}")
            self.start(w)
        try:
            while not all(w.finished and w.proc.poll() is not None for w in self.workers):
                try:
                    w, message = self.messages.get(timeout=1)
                except queue.Empty:
                    continue
                t = time.monotonic()
                self.handle(w, message)
                self.busy_s += time.monotonic() - t
            for w in self.workers:
                reconcile_worker(self.loop, w.number, STOPPED)  # each worktree at the best it ended on
            self.branch_at_best()
        except BaseException:  # Ctrl-C, SIGTERM, an error: no worker goes on without its coordinator
            self.stop_all(STOPPED)
            raise

    def handle(self, w, message):
        if message is None:
            return self.ended(w)
        op = message["op"]
        if op in ("next", "row"):  # before a worker reads the rows (to judge) or one is added
            self.check_ledger()
        if op == "next":
            self.branch_at_best()
            why = self.why_stop(w)
            if why:
                w.finished = True
                return self.answer(w, {"stop": why})
            w.task, self.next_n, self.handed = {"n": self.next_n}, self.next_n + 1, self.handed + 1
            taken = [o.task.get("retry") for o in self.workers if o.task]
            w.task["retry"] = next((r for r in self.retries if r not in taken), None)
            others = [f"#{o.task['n']} (w{o.number}): {o.task['description']}" for o in self.workers
                      if o is not w and o.task and o.task.get("description")]
            return self.answer(w, {"n": w.task["n"], "others": others, "retry": w.task["retry"]})
        if op == "seed":
            self.next_seed += 1
            if w.task is not None:
                w.task.setdefault("seeds", []).append(str(self.next_seed - 1))
            return self.answer(w, {"seed": self.next_seed - 1})
        if op == "claim":
            return self.answer(w, {"twin": self.claim(w, message)})
        if op == "row":
            why = foreign_row(w.task, message)
            if why:
                raise LoopError(f"w{w.number} sent a row for #{message['row'].get('n')} that is none of the "
                                f"experiment it was handed ({why}): not recorded, and the run stops. Its process "
                                f"runs code other than the harness's, or another process took it over (root's)")
            w.task["recorded"] = True
            recorded = self.record(w, message)
            self.answer(w, recorded)
            if self.hub:  # after the answer: a slow hub holds the worker back no longer than it must
                self.hub.publish(recorded["row"])
            return None
        if op == "train":  # a run on Ray: answered when its task ends
            w.waiting = message["id"]
            self.executor.submit(w.number, message, self.loop.config, self.loop.timeout,
                                 lambda result: self.messages.put((w, {"op": "trained", "id": message["id"],
                                                                       "result": result})))
            return None
        if op == "trained":
            if w.waiting == message["id"]:  # else its worker died meanwhile: nobody waits for it
                w.waiting = None
                self.answer(w, message["result"])
            return None
        if op == "line":
            if w.task and w.task.get("retry") in self.retries:  # tried again (or found not to merge): done
                self.retries.remove(w.task["retry"])
                write_atomic(self.retries_path, json.dumps(self.retries).encode())
            w.failures = w.failures + 1 if message.get("failed") else 0
            w.deaths, w.task = 0, None
            w.finished_ns.append(str(message["n"]))
            desc = f" | {message['description']}" if message.get("description") else ""
            text = message["text"].replace(f"{self.root}/", "")  # its logs are in this checkout
            say(self.loop, f"#{message['n']} w{w.number} {text}{desc}")
            if message.get("untracked"):
                say(self.loop, f"#{message['n']} note: the agent created untracked files in {w.path} (left in "
                               f"place): {', '.join(message['untracked'])}")
            for note in message.get("notes", []):
                say(self.loop, f"#{message['n']} w{w.number} note: {note}")
            return None
        if op == "exhausted":
            w.finished = True
            return say(self.loop, f"w{w.number}: the proposer has nothing new left to try")
        raise LoopError(f"worker w{w.number} sent an unknown message: {message}")

    def check_ledger(self):
        """What else wrote the ledger since the loop last did (a worker's run or agent), put back."""
        for edited in put_back():
            say(self.loop, f"note: {edited}")

    def why_stop(self, w):
        """Why this worker gets no new experiment, or None."""
        a = self.args
        if self.stopping:
            return "stopping"
        if a.max_experiments is not None and self.handed >= a.max_experiments:
            return f"{a.max_experiments} experiments handed out"
        if a.hours is not None and time.monotonic() - self.t0 >= a.hours * 3600:
            return f"time limit of {a.hours} h reached"
        if w.failures >= 3:
            w.gave_up = True
            say(self.loop, f"w{w.number}: the agent failed {w.failures} times in a row: this worker stops. Check "
                           f"the command by hand in {w.path}")
            return "the agent keeps failing"
        return None

    def claim(self, w, message):
        """The twin of a proposed train.py: a measured row, or an experiment in flight on another worker."""
        twin = measured_versions(self.loop.rows).get(message["train_py"])
        if twin:
            return twin
        for o in self.workers:
            if o is not w and o.task and o.task.get("train_py") == message["train_py"]:
                return {"n": o.task["n"], "commit": "-", "status": f"running on w{o.number}", "val_bpb": "-"}
        w.task.update(train_py=message["train_py"], description=message["description"])
        return None

    def record(self, w, message):
        """Append the worker's row to the ledger, the one write of it; on a keep move the branch (and this
        checkout) to the experiment's commit. A keep whose base is no longer the best becomes a discard here:
        it was never compared with the best it would replace."""
        row, base, best = dict(message["row"]), message["base"], self.loop.best_commit
        if row["status"] == "keep" and base != best:
            row["status"] = "discard"
            row["note"] = (f"superseded: better than its base {base[:7]}, but #{self.loop.best['n']} "
                           f"({self.loop.best['commit']}) was kept meanwhile; queued to be tried again on top of "
                           f"it; " + row["note"])
            self.retries.append({"commit": message["sha"], "base": base, "description": row["description"],
                                 "n": row["n"]})
            write_atomic(self.retries_path, json.dumps(self.retries).encode())
        if os.path.isabs(row.get("log", "")):
            row["log"] = os.path.relpath(row["log"], self.root)
        if row["status"] == "keep":  # from the best it was compared with, whatever else moved the branch since
            self.branch_at_best()
        append_row(row)
        self.loop.rows.append(row)
        if row["status"] == "keep":
            self.move_branch(row, message["sha"], base)
        return {"row": row}

    def branch_at_best(self):
        """The tag's branch back at the best, where anything but a keep moved it (an agent's `git merge` in this
        checkout, say): what it held is saved under a ref first. Left as it is, the branch would end the night
        at a change no run measured, and the next keep could not move it."""
        branch, best = self.loop.branch, self.loop.best_commit
        tip = git("rev-parse", "-q", "--verify", f"refs/heads/{branch}", check=False)
        if tip is None or tip == best or git("merge-base", "--is-ancestor", tip, best, check=False) is not None:
            return  # behind the best: a keep the user's checkout held back (move_branch said so)
        saved = git("for-each-ref", "--points-at", tip, "--format=%(refname)", self.loop.ref("moved/"))
        if saved:  # put back already, and in the way of a checkout's changes since: said once
            return
        ref = self.loop.ref(spare_name(self.loop, "moved", self.next_n))
        git("update-ref", ref, tip)
        back = (git("reset", "-q", "--keep", best, check=False) if current_branch() == branch
                else git("update-ref", f"refs/heads/{branch}", best, tip, check=False))
        say(self.loop, f"note: {branch} was at {tip[:7]}, not at the best {best[:7]}: moved by something other than "
                       f"the loop; " + ("put back at the best" if back is not None else
                                        f"left as it is (this checkout's changes are in the way: `git stash`, then "
                                        f"`git reset --keep {best[:7]}`)") + f"; what it held is kept at {ref}")

    def move_branch(self, row, sha, base):
        """The tag's branch to a keep: with this checkout (a fast-forward, as the single loop's keep leaves it),
        or alone if the user checked out something else here meanwhile (only from its base: nothing is lost)."""
        branch = self.loop.branch
        if current_branch() == branch and git("merge", "--ff-only", "-q", sha, check=False) is not None:
            return
        if git("update-ref", f"refs/heads/{branch}", sha, base, check=False) is None:
            raise LoopError(f"#{row['n']} was kept, but {branch} moved away from its base {base[:7]} (by hand?) "
                            f"and was left as it is. Fix: `git branch -f {branch} {sha[:7]}` if that is right, then "
                            f"run again")
        say(self.loop, f"#{row['n']} kept: {branch} moved to {sha[:7]}; this checkout is on "
                       f"{current_branch() or 'a detached HEAD'} (or has changes), and was left as it is")

    def ended(self, w):
        """A worker's process exited: told to stop, out of work, or dead (then its experiment is finished as
        an interrupted one, and it starts again)."""
        rc = w.proc.wait()
        w.inbox.close()
        if self.executor:
            self.executor.cancel(w.number)
            w.waiting = None
        if w.finished or self.stopping:
            w.finished = True
            return
        w.deaths += 1
        say(self.loop, f"w{w.number} exited with code {rc} without being told to stop"
                       + (f" during #{w.task['n']}" if w.task else ""))
        self.check_ledger()  # before reconcile reads the rows again
        reconcile_worker(self.loop, w.number, DIED)
        w.task = None
        if w.deaths >= MAX_RESTARTS:
            w.finished = w.gave_up = True
            say(self.loop, f"w{w.number} died {w.deaths} times in a row: not started again; its output above "
                           f"and {self.worker_loop(w).dir} say why")
            return
        self.start(w)

    def stop_all(self, reason):
        """Ctrl-C, SIGTERM or an error: every worker ends its run (SIGTERM), then what each left in flight is
        finished here, so that the branch and every worktree are at the best."""
        self.stopping = True
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if self.executor:
            self.executor.cancel()
        for w in self.workers:
            if w.proc and w.proc.poll() is None:
                w.proc.send_signal(signal.SIGTERM)
        for w in self.workers:
            if w.proc:
                try:
                    w.proc.wait(timeout=KILL_GRACE_S + 20)
                except subprocess.TimeoutExpired:
                    w.proc.kill()
                    w.proc.wait()
            reconcile_worker(self.loop, w.number, reason)

    def summary(self):
        """One line per worker (its rows of this run), and the coordinator's own cost."""
        hours = (time.monotonic() - self.t0) / 3600
        mine = [r for r in self.loop.rows if int(r.get("n") or 0) >= self.first_n]
        lines = []
        recorded = {r["n"] for r in mine}
        for w in self.workers:
            rows = [r for r in mine if r.get("worker") == str(w.number)]
            skipped = sum(n not in recorded for n in w.finished_ns)
            lines.append(f"w{w.number} ({w.device.label}): {len(rows)} experiments, "
                         f"{sum(r['status'] == 'keep' for r in rows)} kept, {skipped} skipped"
                         + (" (gave up: see above)" if w.gave_up else ""))
        per_device = f"{len(mine) / hours / len(self.workers):.1f} experiments per hour per worker" if hours else ""
        busy = f"{1000 * self.busy_s / max(self.handed, 1):.0f} ms"
        return lines + [f"{per_device}; coordinator: {busy} per experiment (ledger, git, answers)"]


def echo(number, pipe):
    """A worker's output on the coordinator's stderr, each line marked with its worker."""
    for line in iter(pipe.readline, b""):
        sys.stderr.write(f"[w{number}] {line.decode(errors='replace')}")
        sys.stderr.flush()


def run_workers(loop, args, hub=None):
    """run --workers N / --gpus (--executor ray): the coordinator's life, with a hub's client or None. Returns
    the per-worker summary lines, and whether every worker gave up (its agent kept failing, or it kept dying)."""
    if args.executor != "ray":
        devices = plan_devices(args.workers, args.gpus, loop.config.get("cores_per_run"))
        coordinator = Coordinator(loop, args, devices, hub=hub)
        coordinator.run()
        return coordinator.summary(), all(w.gave_up for w in coordinator.workers)
    if args.gpus:
        raise LoopError("--gpus names this machine's GPUs; with --executor ray, Ray gives each run a GPU of the "
                        "cluster. Fix: `--workers N` (or auto)")
    from autoresearch.rayexec import RayExecutor
    executor = RayExecutor(args.address, args.workers or "auto")
    try:
        nodes = executor.check_nodes(loop.best_commit, loop.config, loop.tag)
        say(loop, f"Ray: {executor.where}, {nodes} node(s); each run asks for {executor.label}")
        coordinator = Coordinator(loop, args, [Device(f"runs on Ray, {executor.label}")] * executor.workers,
                                  executor, hub)
        coordinator.run()
        return coordinator.summary(), all(w.gave_up for w in coordinator.workers)
    finally:
        executor.shutdown()
