"""
`run --workers N --executor ray [--address HOST:PORT]`: every train.py run of the workers becomes a Ray task on a
cluster (one GPU each; on a cluster without GPUs, an equal share of its CPUs). The workers and the coordinator
stay on this machine: agents, git, the keep rule and the ledger are here; only the runs travel.

- The code travels with the task: a git bundle of the commit and the train.py to run (the best's, for a pair).
  A node checks it out in a checkout of its own per tag and worker (AUTORESEARCH_RAY_HOME, default
  ~/.cache/autoresearch/ray), runs it sealed as the single loop does (experiment.sealed_run: the evaluator, the
  seal, the version's compile cache), and sends back the run and its log.
- The harness itself travels as Ray's py_modules, from this checkout: never from the bundle the agent wrote.
- The data must be prepared on every node (`uv run prepare.py` there, with the same profile and cache folder);
  before the first task, one check per node says which node lacks it, and how to prepare it.
- A task that ends without a result (its node died, its Ray worker was killed, it ran past the timeout) is a
  crash of that run, never a hung loop.
"""
import base64
import dataclasses
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from autoresearch.gitrepo import git, git_env
from autoresearch.layout import TRAIN, LoopError, read_json
from autoresearch.ledger import LEDGER_ENV, ledger_dir, write_atomic
from autoresearch.process import KILL_GRACE_S, kill_leftover, proc_start_time
from autoresearch.runner import PACKAGE_ROOT, child_env, evaluator_data

RAY_HOME_ENV = "AUTORESEARCH_RAY_HOME"
GRACE_S = 300               # beyond the run's own timeout, before a task's silence counts as a dead node


# -----------------------------------------------------------------------------
# On a node


def node_checkout(home, bundle, sha, train_py=None):
    """home (a git repository of its own) at commit sha from the bundle, nothing else in its tree (what an
    earlier run left is removed), with train_py's bytes as train.py when given. The caller's cwd is home."""
    if not (home / ".git").is_dir():
        home.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "init", "-q", str(home)], check=True)
    os.chdir(home)
    incoming = home / ".git" / "incoming.bundle"
    incoming.write_bytes(bundle)
    git("fetch", "-q", str(incoming), "+HEAD:refs/autoresearch-run/head")
    git("checkout", "-q", "-f", "--detach", sha)
    git("clean", "-q", "-ffdx")
    if train_py is not None:
        Path(TRAIN).write_bytes(train_py)


def node_home(name):
    """A checkout of this node's own, under AUTORESEARCH_RAY_HOME (default ~/.cache/autoresearch/ray)."""
    return Path(os.environ.get(RAY_HOME_ENV) or Path.home() / ".cache" / "autoresearch" / "ray") / name


class NodeFlight:
    """sealed_run's record of the run's process group, on the node: a task that Ray killed (a cancel, a dead
    coordinator) cannot end its train.py, which runs in a session of its own; the next task there does."""

    def __init__(self, home):
        self.path = home / ".git" / "autoresearch-running.json"

    def spawned(self, pid):
        write_atomic(self.path, json.dumps({"pgid": pid, "started": proc_start_time(pid),
                                            "started_ns": time.time_ns()}).encode())

    def end_leftover(self):
        """End what a killed task left training here; its record ({} if there was none)."""
        state = read_json(self.path) or {}
        kill_leftover(state)
        self.path.unlink(missing_ok=True)
        return state


def run_on_node(bundle, sha, train_py, tag, worker, config, timeout, seed, version, best_version):
    """One sealed run of train_py at sha, in this node's checkout for (tag, worker). Returns the Run's fields,
    the log of the run, and the node's address."""
    import ray
    from autoresearch.experiment import sealed_run
    from autoresearch.gitrepo import changed_since
    from autoresearch.seal import harness_folder
    from autoresearch.state import Loop
    home = node_home(f"{tag}-w{worker}")
    was, shared = os.getcwd(), os.environ.pop(LEDGER_ENV, None)  # a node keeps its own records
    flight = NodeFlight(home)
    try:
        killed = flight.end_leftover()
        node_checkout(home, bundle, sha, train_py)
        ledger_dir.cache_clear()  # Ray reuses its worker processes: this task's repository, not the last one's
        harness_folder.cache_clear()  # and the evaluator cache's record as the last task settled it, wherever
        log = ledger_dir() / "run.log"
        log.unlink(missing_ok=True)
        loop = Loop(tag, config, [{"status": "keep", "train_py": best_version}], timeout)
        if killed:  # what that run wrote was never checked: gone before the next run and evaluation
            loop.forget_killed_run(killed.get("started_ns"))
        run = sealed_run(loop, seed, str(log), flight, version)
        flight.path.unlink(missing_ok=True)
        run.tampered = sorted(set(run.tampered) | (changed_since("HEAD") - {TRAIN}))
        loop.prune_compile_caches(keep=[version])  # a night of versions would fill the node's disk
        return {"run": dataclasses.asdict(run), "log": log.read_text(errors="replace"),
                "node": ray.util.get_node_ip_address(), "node_id": ray.get_runtime_context().get_node_id()}
    finally:
        os.chdir(was)
        ledger_dir.cache_clear()
        if shared:
            os.environ[LEDGER_ENV] = shared


def check_node(bundle, sha, config, tag, workers):
    """What stops this node from running experiments: prepare.check_ready() of the commit's prepare.py, with
    the profile, dataset and cache folder pinned at init. In a checkout of the node's own (homes may be shared).
    Then each worker's evaluator copy here (run_on_node's ledger, by worker): made by the worker's first run
    on this node, from the cache, it would be a read of the validation split while another worker trains here."""
    import ray
    node = ray.get_runtime_context().get_node_id()
    home = node_home(f"check-{node}")
    ledgers = [(node_home(f"{tag}-w{w}") / ".git").resolve() / "autoresearch" for w in range(1, workers + 1)]
    was = os.getcwd()
    try:
        node_checkout(home, bundle, sha)
        code = "import json, prepare; print(json.dumps(list(prepare.check_ready())))"
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env(config, 0),
                           timeout=600)
        lines = p.stdout.strip().splitlines()
        problems = (json.loads(lines[-1]) if p.returncode == 0 and lines else
                    [f"prepare.check_ready() failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}"])
        if config.get("harness_eval") and not problems:
            for ledger in ledgers:
                evaluator_data(config, ledger=ledger)
    finally:
        os.chdir(was)
    return ray.util.get_node_ip_address(), problems


# -----------------------------------------------------------------------------
# On the coordinator


def bundle_of_head():
    """A git bundle of HEAD and its history, from the current folder (this repository's scale: under a MB)."""
    return subprocess.run(["git", "bundle", "create", "-q", "-", "HEAD"], capture_output=True, env=git_env(),
                          check=True).stdout


class RayExecutor:
    """The coordinator's connection to Ray: one driver, whatever the number of workers."""

    def __init__(self, address, workers):
        """Connect (or start a local Ray, without an address); workers: a number, or auto (one per GPU)."""
        # Under `uv run`, Ray would ship the project as a working_dir and build a virtual environment of its own
        # from it for each session (GBs of torch in /tmp/ray, minutes): every node already has the project's
        # environment (`uv sync --group ray`), and runs get only this package (py_modules below)
        os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
        try:
            import ray
        except ImportError:
            raise LoopError("--executor ray needs Ray, an optional dependency. Fix: `uv sync --group ray` "
                            "(on this machine and on every node)") from None
        self.ray = ray
        package = str(Path(PACKAGE_ROOT) / "autoresearch")
        # a local Ray: this machine's CPUs, and a small object store (bundles and results are small)
        local = dict(num_cpus=os.cpu_count(), object_store_memory=256 * 2**20) if not address else {}
        ray.init(address=address or None, runtime_env={"py_modules": [package]}, include_dashboard=False,
                 logging_level=logging.WARNING, log_to_driver=False, **local)
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
        if workers == "auto" and not gpus:
            ray.shutdown()
            raise LoopError(f"--workers auto starts one worker per GPU of the cluster, and {cluster_name(address)} "
                            f"has none. Fix: `--workers N`")
        self.workers = gpus if workers == "auto" else int(workers)
        if gpus and self.workers > gpus:  # a run waiting for a GPU would count its wait against its timeout
            ray.shutdown()
            raise LoopError(f"--workers {self.workers}: {cluster_name(address)} has {gpus} GPUs, one per worker. "
                            f"Fix: `--workers {gpus}` (or auto)")
        self.resources = {"num_gpus": 1} if gpus else {"num_cpus": max(1, cpus // self.workers)}
        self.label = "1 GPU" if gpus else f"{self.resources['num_cpus']} CPU(s)"
        self.where = cluster_name(address)
        self.runs = ray.remote(max_retries=0)(run_on_node)
        self.in_flight = {}  # worker number -> ObjectRef

    def check_nodes(self, sha, config, tag):
        """Every alive node prepared for this tag's profile and dataset, else LoopError naming the nodes."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        check = self.ray.remote(max_retries=0)(check_node)
        bundle = bundle_of_head()
        nodes = [n for n in self.ray.nodes() if n.get("Alive")]
        refs = [check.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(bundle, sha, config, tag, self.workers) for n in nodes]
        try:
            bad = [(ip, problems) for ip, problems in self.ray.get(refs, timeout=900) if problems]
        except self.ray.exceptions.RayError as e:
            cause = getattr(e, "cause", None) or e
            raise LoopError(f"checking the Ray cluster's nodes failed: {type(cause).__name__}: "
                            f"{(str(cause).strip().splitlines() or [''])[0][:300]}") from None
        if bad:
            raise LoopError("nodes of the Ray cluster cannot run experiments yet:\n" + "\n".join(
                f"  - {ip}: {'; '.join(problems)}" for ip, problems in bad)
                + f"\nFix: on each, in the repository, `AUTORESEARCH_PROFILE={config['profile']} "
                + f"AUTORESEARCH_CACHE_DIR={config['cache_dir']} uv run prepare.py"
                + (f" --dataset {config['dataset']}`" if config.get("dataset") else "`"))
        return len(nodes)

    def submit(self, worker, request, config, timeout, done):
        """Start one run for this worker; done(result) is called from a thread of its own with the node's
        answer, or with a crash when the task ends without one."""
        bundle = Path(request["bundle"]).read_bytes()
        options = dict(self.resources)
        if request.get("node_id"):  # the experiment's other runs ran there: like with like, while it lives
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(request["node_id"], soft=True)
        ref = self.runs.options(**options).remote(
            bundle, request["sha"], base64.b64decode(request["train_py"]), request["tag"], worker, config, timeout,
            request["seed"], request["version"], request["best_version"])
        self.in_flight[worker] = ref

        def wait():
            try:
                result = self.ray.get(ref, timeout=timeout + GRACE_S)
            except self.ray.exceptions.GetTimeoutError:
                self.ray.cancel(ref, force=True)
                result = {"error": f"the Ray task gave no result within {timeout + GRACE_S:.0f} s: cancelled"}
            except self.ray.exceptions.RayError as e:
                cause = getattr(e, "cause", None) or e  # a task's own exception: its message, not Ray's wrapper
                first = (str(cause).strip().splitlines() or [""])[0][:300]
                result = {"error": f"the Ray task ended without a result ({type(e).__name__}: {first})"}
            self.in_flight.pop(worker, None)
            done(result)
        threading.Thread(target=wait, daemon=True).start()

    def cancel(self, worker=None):
        """End the runs of one worker (all: None), so that a stopped coordinator leaves nothing training: first as
        Ctrl-C would (the task ends its train.py's process group), then by force."""
        refs = [ref for number, ref in list(self.in_flight.items()) if worker is None or number == worker]
        for ref in refs:
            self.ray.cancel(ref)
        if refs:
            _, left = self.ray.wait(refs, num_returns=len(refs), timeout=KILL_GRACE_S + 5)
            for ref in left:
                self.ray.cancel(ref, force=True)

    def shutdown(self):
        self.cancel()
        self.ray.shutdown()


def cluster_name(address):
    return f"the Ray cluster at {address}" if address else "a local Ray on this machine"


def remote_request(loop, seed, version, node_id=None):
    """What a worker asks its coordinator to run: this worktree's HEAD as a bundle file (the pipe carries its
    path), the train.py in the tree now (the candidate's, or the best's for a pair), and the node the
    experiment's earlier runs ran on."""
    folder = loop.private_dir
    path = folder / "run.bundle"
    path.write_bytes(bundle_of_head())
    return {"op": "train", "bundle": str(path), "sha": git("rev-parse", "HEAD"), "tag": loop.tag, "seed": seed,
            "train_py": base64.b64encode(Path(TRAIN).read_bytes()).decode(), "version": version,
            "best_version": loop.best.get("train_py", ""), "id": os.urandom(8).hex(), "node_id": node_id}


def run_from_answer(answer, log, seed):
    """The Run a node sent back, its log appended to the experiment's; a crash when the task gave none."""
    from autoresearch.runner import Run
    if "error" in answer:
        with open(log, "a") as f:
            f.write(f"\n===== Ray task, seed {seed} =====\n{answer['error']}\n")
        return Run(seed, {}, answer["error"], [], 0.0)
    with open(log, "a") as f:
        f.write(f"\n===== on Ray node {answer['node']} =====\n{answer['log']}")
    return Run(**answer["run"])
