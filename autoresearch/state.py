"""
The loop's state for one tag: the Loop (this tag's rows of results.tsv, the config pinned at init in
.git/autoresearch/TAG/init.json, the limits and keep rule of this invocation), the lock that allows one agent_loop per
tag, the experiment in flight (.git/autoresearch/TAG/running.json) and the loop's own record (logs/TAG/loop.log).
"""
import ast
import fcntl
import functools
import importlib.metadata
import importlib.util
import json
import operator
import os
import shutil
import signal
import site
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from autoresearch.cachefiles import sha256_of
from autoresearch.carryover import drop_carryover, remove_tree, unchecked_mark
from autoresearch.confine import CONFINE_ENV
from autoresearch.decide import SIGMA_FLOOR, pooled_noise, row_runs, version_runs
from autoresearch.gitrepo import git, row_commit
from autoresearch.installed import RECORD_NAME as INSTALLED_RECORD, InstalledCode
from autoresearch.layout import (BRANCH_PREFIX, LOGS_DIR, PREPARE, REF_PREFIX, UV_LOCK, LoopError, now_iso,
                                 read_json)
from autoresearch.metricdata import file_stamps, seal_metric_files
from autoresearch.ledger import best_row, keep_file, ledger_dir, tag_rows, write_atomic
from autoresearch.process import KILL_GRACE_S, Stop, counted_cores, proc_start_time
from autoresearch.seal import harness_folder, untracked_modules
from autoresearch.valwatch import TRAIN_FILES

DEFAULT_SEED = 42                            # train.py's default; AUTORESEARCH_SEED overrides at init
EVALUATOR_CACHE = "evaluator"                # the evaluator's folder among the versions' compile caches
IN_FLIGHT = "running.json"                   # the run in flight, in the tag's (or worker's) ledger folder
AOTAUTOGRAD_CACHE = "aotautograd"            # AOTAutograd's entries in a version's (inductor's cache layout)


# -----------------------------------------------------------------------------
# The Loop


@dataclass
class Loop:
    tag: str
    config: dict          # .git/autoresearch/TAG/init.json: profile, dataset, budget... pinned at init
    rows: list            # this tag's rows of results.tsv
    timeout: float        # hard limit for one train.py run
    min_delta: float = 0.0
    # one worker of `run --workers N` (workers.py): its number (0: the single loop), the main checkout it
    # reports to (it runs in a worktree of its own), and its link to the coordinator
    worker: int = 0
    root: str = "."
    link: object = None

    @property
    def dir(self):
        """logs/TAG (a worker's: logs/TAG/wN, in the main checkout)."""
        folder = Path(self.root) / LOGS_DIR / self.tag
        return folder / f"w{self.worker}" if self.worker else folder

    @property
    def branch(self):
        return BRANCH_PREFIX + self.tag

    @property
    def checkout_branch(self):
        """The branch the working tree must be on: the tag's, or none (detached at the best) for a worker."""
        return "" if self.worker else self.branch

    def ref(self, name):
        """Where discarded, skipped or interrupted work stays reachable."""
        return f"{REF_PREFIX}{self.tag}/{name}"

    @property
    def private_dir(self):
        """The loop's own records, under .git: out of reach of the agent's edits and of `git clean`."""
        folder = ledger_dir() / self.tag / (f"w{self.worker}" if self.worker else "")
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def known_modules(self):
        """The untracked modules as the last experiment left them (first use: as they are now)."""
        known = read_json(self.private_dir / "modules.json")
        return known if known is not None else untracked_modules()

    def remember_modules(self):
        keep_file(self.private_dir / "modules.json", json.dumps(untracked_modules()).encode())

    @property
    def best(self):
        return best_row(self.rows)

    @property
    def best_runs(self):
        """Every run of the best's train.py: its own, and its re-runs while later experiments were judged."""
        return (version_runs(self.rows, counted_cores()).get(self.best.get("train_py"))
                or row_runs(self.best, cores=counted_cores()))

    @property
    def other_runs(self):
        """The runs of every other version, grouped by version (for the pooled noise)."""
        best = self.best.get("train_py")
        return [runs for version, runs in version_runs(self.rows, counted_cores()).items() if version != best]

    @property
    def best_val(self):
        """The mean of the best's runs, never one lucky run."""
        runs = self.best_runs
        return statistics.fmean(r.val for r in runs) if runs else float(self.best["val_bpb"])

    @property
    def best_commit(self):
        return row_commit(self.best, within=f"refs/heads/{self.branch}")

    def noise(self):
        """The pooled run-to-run noise, from every version's repeated runs."""
        return pooled_noise(self.other_runs + [self.best_runs], self.sigma_floor)

    @property
    def sigma_floor(self):
        return SIGMA_FLOOR * self.best_val

    def next_n(self):
        """The next experiment's number: one past the highest row's (a parallel run leaves gaps where a worker
        skipped an experiment)."""
        return max((int(r["n"]) for r in self.rows if str(r.get("n", "")).isdigit()), default=-1) + 1

    def next_seed(self, made=0):
        """A fresh seed for every run of the tag: one past the highest recorded so far (the base seed at first),
        plus the `made` runs of the experiment under way. A worker asks its coordinator, which hands out seeds
        to all workers."""
        if self.link:
            return self.link.seed()
        return first_free_seed(self.rows, self.config["base_seed"]) + made

    def compile_cache(self, version):
        """torch.compile's cache folder (inductor's and triton's) for runs of the train.py whose blob hash is
        `version`: a version of its own, so that no run can slow down or change another version's compiled
        code. Seeded from the same version's cache in another tag or worker (a new night of the code an
        earlier one ended on starts warm: 8.3 s of start-up instead of 52.1 s on the cpu profile), else from
        the best's, so that a change that leaves the graphs alone compiles warm, less its AOTAutograd entries
        (AOTAUTOGRAD_CACHE): their key covers a custom autograd.Function's body as traced, not the helpers it
        calls by name, so another version's could run code this one changed. Never from a cache that a run of a
        killed loop wrote in unchecked (carryover.unchecked_mark): this loop's own such caches are dropped."""
        root = self.private_dir / "compile-cache"
        folder = root / version[:16]
        best = root / ((self.best or {}).get("train_py") or "")[:16]
        for cache in {folder, best} - {root}:  # a run of a loop killed before its sweep wrote there
            if unchecked_mark(cache).exists() and remove_tree(cache):
                unchecked_mark(cache).unlink()
        if not folder.exists():
            root.mkdir(exist_ok=True)
            staging = root / f".{version[:16]}.partial"
            shutil.rmtree(staging, ignore_errors=True)
            try:
                seed, skip = newest_cache_of(version[:16], but=root), None
                if seed is None and best != root and best.is_dir() and not unchecked_mark(best).exists():
                    seed, skip = best, shutil.ignore_patterns(AOTAUTOGRAD_CACHE)
                if seed:
                    shutil.copytree(seed, staging, symlinks=True, ignore=skip)
                    if unchecked_mark(seed).exists():  # a run of its own loop began meanwhile
                        raise shutil.Error("written meanwhile")
            except (OSError, shutil.Error):  # pruned or written meanwhile by another loop: it compiles cold
                shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(exist_ok=True)
            staging.rename(folder)
        return folder

    @functools.cached_property
    def installed_code(self):
        """The code the evaluator runs from outside the repository, as at the tag's first evaluation (one record
        per tag: its workers share one environment), keyed by the uv.lock it was installed from."""
        lock = sha256_of(UV_LOCK) if os.path.exists(UV_LOCK) else None
        return InstalledCode(ledger_dir() / self.tag / INSTALLED_RECORD, lock)

    @property
    def evaluator_cache(self):
        """The evaluator's torch.compile cache, shared by every version (its graphs are the models'), which
        the loop empties when anything but the evaluator wrote in it (seal.HarnessFolder)."""
        return harness_folder(self.private_dir / "compile-cache" / EVALUATOR_CACHE, kin=evaluator_caches)

    def other_compile_caches(self, version):
        """{path: ctime_ns} of every file in the compile caches of versions other than `version`: a run of one
        version writes only in its own (the evaluator's is watched by evaluator_cache)."""
        root, own = self.private_dir / "compile-cache", version[:16]
        return {str(path): path.lstat().st_ctime_ns for folder in (root.iterdir() if root.is_dir() else ())
                if folder.is_dir() and folder.name not in (own, EVALUATOR_CACHE) for path in folder.rglob("*")}

    def forget_killed_run(self, started_ns=None):
        """After a loop (or a Ray task) was killed while a run trained, whose writes were never checked: the
        evaluator's cache is emptied (the run may have rewritten its record), every version's compile cache goes
        (the next runs compile cold), and what changed in /dev/shm and /dev/mqueue since the run started
        (carryover.py). Returns the notes of that sweep."""
        self.evaluator_cache.forget()
        root = self.private_dir / "compile-cache"
        for folder in root.iterdir() if root.is_dir() else ():
            if folder.is_dir() and not folder.is_symlink() and folder.name != EVALUATOR_CACHE:
                remove_tree(folder)  # through folders the run locked
        for mark in root.glob("*.unchecked"):
            mark.unlink(missing_ok=True)
        return drop_carryover(started_ns, None, None) if started_ns else []

    def prune_compile_caches(self, keep=()):
        """Drop the compile caches of every version but the best's and `keep`'s (they run no more)."""
        root = self.private_dir / "compile-cache"
        wanted = {v[:16] for v in ((self.best or {}).get("train_py") or "", *keep) if v} | {EVALUATOR_CACHE}
        for folder in root.iterdir() if root.is_dir() else ():
            if folder.is_dir() and not folder.is_symlink() and folder.name not in wanted:  # not the record
                shutil.rmtree(folder, ignore_errors=True)

    @property
    def pending_path(self):
        """The experiment still being confirmed when `step` had to stop for its time limit."""
        return self.private_dir / "pending.json"


def evaluator_caches(but):
    """The evaluator's compile caches of the other tags and workers, the most recently recorded first: an emptied
    one (a new tag's first evaluation) starts from one of them (seal.HarnessFolder.seed_from checks it), warm
    instead of cold (~20 s of a new night's first run on the cpu profile)."""
    recorded = {}
    for pattern in ("*", "*/w*"):
        for folder in ledger_dir().glob(f"{pattern}/compile-cache/{EVALUATOR_CACHE}"):
            try:
                recorded[folder] = folder.with_name(f"{folder.name}.json").stat().st_mtime
            except FileNotFoundError:  # no record: nothing in it is trusted
                pass
    recorded.pop(Path(but), None)
    return sorted(recorded, key=recorded.get, reverse=True)


def newest_cache_of(name, but):
    """The most recently written compile cache named `name` (a version) of another tag or worker than `but`,
    swept after its last run: not one that a run is writing now, nor one a killed loop left unchecked."""
    found = [p for pattern in ("*", "*/w*") for p in ledger_dir().glob(f"{pattern}/compile-cache/{name}")
             if p.parent != but and p.is_dir() and not unchecked_mark(p).exists()]
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


def first_free_seed(rows, base):
    """One past the highest seed in these rows' seeds and best_seeds columns; base when there are none."""
    used = [int(x) for r in rows for c in ("seeds", "best_seeds") for x in (r.get(c) or "").split(",")
            if x.strip().lstrip("-").isdigit()]
    return max(used, default=base - 1) + 1


def say(loop, text):
    """Print one line and keep it in logs/TAG/loop.log (the overnight record of the loop itself)."""
    print(text, flush=True)
    with open(loop.dir / "loop.log", "a") as f:
        f.write(f"{now_iso()} {text}\n")


def lock(tag_dir):
    """One agent_loop per tag at a time (an agent calling `step` inside `run` is refused).
    flock is released by the kernel even after kill -9."""
    tag_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(tag_dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.read(fd, 32).decode().strip()
        os.close(fd)
        raise LoopError(f"another agent_loop.py (pid {pid}) is working on {tag_dir.name}: wait for it, "
                        f"or stop it with `kill {pid}` (it stops cleanly at the best commit)") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def take_lock(folder):
    """lock(folder), once the process holding it lets go: a worker ends its run on SIGTERM within
    KILL_GRACE_S; after that it is killed (the coordinator that started it is gone, or gave up on it)."""
    deadline = time.monotonic() + KILL_GRACE_S + 10
    while True:
        try:
            return lock(folder)
        except LoopError:
            if time.monotonic() > deadline:
                pid = (folder / "lock").read_text().strip()
                if pid.isdigit():
                    os.kill(int(pid), signal.SIGKILL)
                deadline = time.monotonic() + 5
            time.sleep(0.2)


# -----------------------------------------------------------------------------
# The config pinned at init


def import_prepare():
    """prepare.py, imported lazily (it imports torch) from the repo root; it reads
    AUTORESEARCH_PROFILE and AUTORESEARCH_CACHE_DIR. By its path: the repo root is not put on sys.path, so that a
    numpy.py the agent left there is not the one prepare.py, and the loop, import."""
    if "prepare" not in sys.modules:
        spec = importlib.util.spec_from_file_location("prepare", os.path.join(os.getcwd(), PREPARE))
        sys.modules["prepare"] = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(sys.modules["prepare"])
        except BaseException:
            del sys.modules["prepare"]
            raise
    return sys.modules["prepare"]


# The variables of the shell that starts `init` that decide what Python and the loader run in train.py, pinned
# for every run of the tag (runner.child_env): a later command's shell (the agent's) cannot set them for some
# runs only, the best's re-runs say.
RUN_ENV = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "PYTHONNOUSERSITE", "LD_PRELOAD",
           "LD_AUDIT")


def pinned_config(prepare, tag, repeats):
    """What makes two experiments comparable, from prepare.py, recorded at init. With the real prepare.py
    (it defines the metric), the harness evaluates every run itself, against the metric files' hashes. Whether
    runs are confined (confine.py) is decided here too, once: not by whoever starts a later `step`."""
    harness_eval = hasattr(prepare, "evaluate_bpb") and prepare.DATASET is not None
    hashes = seal_metric_files(prepare.prepared_dir(prepare.DATASET)) if harness_eval else None
    return {"tag": tag, "profile": prepare.PROFILE, "dataset": prepare.DATASET,
            "cache_dir": str(prepare.CACHE_DIR), "time_budget": prepare.TIME_BUDGET, "max_seq_len": prepare.MAX_SEQ_LEN,
            "base_seed": int(os.environ.get("AUTORESEARCH_SEED", DEFAULT_SEED)), "repeats": repeats,
            "harness_eval": harness_eval, "metric_hashes": hashes, "packages": installed_packages(),
            "startup_files": startup_files(),
            "fresh_heldout": harness_eval and prepare.DATASET in getattr(prepare, "FRESH_HELDOUT_DATASETS", ()),
            "train_data": harness_eval and file_stamps(prepare.prepared_dir(prepare.DATASET), TRAIN_FILES),
            "confine": os.environ.get(CONFINE_ENV) != "0", "run_env": {k: os.environ.get(k) for k in RUN_ENV},
            "created": now_iso()}


def installed_packages():
    """{distribution: version} of the Python that runs the loop and train.py, pinned at init: a package installed,
    removed or upgraded later (`uv pip install` by an agent between steps, an upgrade by hand) is then seen."""
    found = {}
    for dist in importlib.metadata.distributions():
        text = dist.read_text("METADATA") or dist.read_text("PKG-INFO") or dist.read_text("")  # "": an .egg-info file
        headers = metadata_headers(text or "")
        if headers.get("name"):
            found.setdefault(headers["name"].lower(), headers.get("version"))  # the first on sys.path is imported
    return found


def metadata_headers(text):
    """{name, version} from a distribution's METADATA headers, without email.parser's reading of the whole
    file: each command of the loop reads every installed package's (0.03-0.1 s instead of ~0.01 s)."""
    headers = {}
    for line in text.splitlines():
        if not line.strip():
            break
        key, sep, value = line.partition(":")
        if sep and key.lower() in ("name", "version"):
            headers.setdefault(key.lower(), value.strip())
    return headers


def startup_files():
    """{path: sha256 (its first 16 digits)} of what site runs at the start of every Python of the environment
    before any module of the loop's: the .pth files of site-packages (their `import` lines) and of the user's
    when site reads those, and sitecustomize and usercustomize as imported here from the installation (one on
    the shell's PYTHONPATH is that shell's: load_config names it). The harness's own Pythons start without
    them (runner.harness_python); the loop's command, which the user or the agent starts, not."""
    folders = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
    paths = [path for folder in folders for path in sorted(Path(folder).glob("*.pth"))]
    installed = tuple(os.path.join(os.path.realpath(p), "") for p in {*folders, sys.prefix, sys.base_prefix})
    paths += [Path(m.__file__) for m in map(sys.modules.get, ("sitecustomize", "usercustomize"))
              if isinstance(getattr(m, "__file__", None), str) and os.path.realpath(m.__file__).startswith(installed)]
    return {str(path): sha256_of(path)[:16] for path in paths if path.is_file()}


def environment_changes(config):
    """What changed in installed_packages() and startup_files() since init, as one phrase; None when nothing did
    (or the tag was made before init pinned them)."""
    changes = []
    for key, now in (("packages", installed_packages), ("startup_files", startup_files)):
        pinned = config.get(key)
        if pinned is None:
            continue
        now = now()
        changes += ([f"+{name} {now[name]}" for name in sorted(now.keys() - pinned.keys())]
                    + [f"-{name} {pinned[name]}" for name in sorted(pinned.keys() - now.keys())]
                    + [f"{name} {pinned[name]} -> {now[name]}" for name in sorted(now.keys() & pinned.keys())
                       if now[name] != pinned[name]])
    return ", ".join(changes) or None


def config_path(tag):
    """init.json beside the ledger, under .git: what decides how runs are judged stays out of the agent's reach."""
    folder = ledger_dir() / tag
    folder.mkdir(parents=True, exist_ok=True)
    return folder / "init.json"


def pin_config(tag, repeats, **extra):
    """Record the pinned config in init.json, with a readable copy in logs/TAG/ (the directory exists: lock()
    made it); only the one under .git is ever read."""
    config = dict(pinned_config(import_prepare(), tag, repeats), **extra)
    keep_file(config_path(tag), json.dumps(config, indent=1).encode())
    write_atomic(Path(LOGS_DIR) / tag / "init.json", json.dumps(config, indent=1).encode())
    return config


def load_config(tag):
    config = read_json(config_path(tag))
    if config is None:  # a tag from before the ledger: take its copy once, else rebuild it from prepare.py
        config = read_json(Path(LOGS_DIR) / tag / "init.json") or pin_config(tag, None)
        keep_file(config_path(tag), json.dumps(config, indent=1).encode())
    if note := put_back_profile_pins(tag, config):
        print(f"note: {note}", flush=True)
    for key, field in (("AUTORESEARCH_PROFILE", "profile"), ("AUTORESEARCH_DATASET", "dataset"),
                       ("AUTORESEARCH_CACHE_DIR", "cache_dir")):
        value, pinned = os.environ.get(key), config.get(field)
        if key == "AUTORESEARCH_CACHE_DIR" and value and pinned:  # the same folder, however it is named
            value, pinned = str(Path(value).expanduser().resolve()), str(Path(pinned).resolve())
        if value and pinned and value != pinned:
            raise LoopError(f"{key}={os.environ[key]}, but {BRANCH_PREFIX}{tag} was initialised with "
                            f"{config[field]}: results would not be comparable. Fix: `export {key}="
                            f"{config[field]}` (or `unset {key}`), or start a new tag with `init`")
    changed = [k for k, v in (config.get("run_env") or {}).items() if os.environ.get(k) != v]
    if changed:
        print(f"note: the shell's {', '.join(changed)} not as pinned at init: every run of {tag} has the pinned "
              f"value", flush=True)
    return config


# The values prepare.py decides for a profile are pinned in init.json, but init.json and its copy outside the
# repository are the loop's files, which an agent between two `step`s can edit alike (a budget of 20 s for a
# train.py that trains 20 s, say, or harness_eval false for one that scores itself). prepare.py cannot change
# during a tag (a proposal that edits it is set aside), so its text at the baseline's commit says what they are,
# for the profile the ledger's baseline row names.

ARITHMETIC = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Pow: operator.pow}


def literal(node):
    """The value of a literal that may use + - * ** on numbers, as prepare.py's PROFILES does (2**15)."""
    if isinstance(node, ast.BinOp) and type(node.op) in ARITHMETIC:
        return ARITHMETIC[type(node.op)](literal(node.left), literal(node.right))
    return ast.literal_eval(node)


def assigned_names(target):
    return [target.id] if isinstance(target, ast.Name) else [element.id for element in target.elts]


def profile_pins(source, profile):
    """{time_budget, max_seq_len, harness_eval} as this prepare.py source sets them for `profile`, read without
    importing it (it imports torch): the PROFILES table's row, read by the columns of the line that unpacks it
    (MAX_SEQ_LEN, TIME_BUDGET, ... = PROFILES[PROFILE]). None when it has no such table that names the profile
    (the tests' stand-in). A prepare.py that defines evaluate_bpb defines the metric, and the harness computes
    it."""
    try:
        tree = ast.parse(source)
        assigns = [node for node in tree.body if isinstance(node, ast.Assign) and len(node.targets) == 1]
        table = next(node.value for node in assigns if assigned_names(node.targets[0]) == ["PROFILES"])
        columns = next(assigned_names(node.targets[0]) for node in assigns if isinstance(node.value, ast.Subscript)
                       and getattr(node.value.value, "id", None) == "PROFILES")
        row = next(value for key, value in zip(table.keys, table.values) if literal(key) == profile)
        max_seq_len, time_budget = (literal(row.elts[columns.index(name)])
                                    for name in ("MAX_SEQ_LEN", "TIME_BUDGET"))
    except (SyntaxError, ValueError, StopIteration, AttributeError, TypeError, IndexError):
        return None
    evaluates = any(isinstance(node, ast.FunctionDef) and node.name == "evaluate_bpb" for node in tree.body)
    return {"time_budget": time_budget, "max_seq_len": max_seq_len, "harness_eval": evaluates}


def pins_to_put_back(config, pins):
    """The pinned values that differ from prepare.py's. harness_eval is only ever put back on: a prepare.py that
    defines the metric some other way than the plain function this reads must not turn the harness off."""
    return {key: value for key, value in pins.items()
            if config.get(key) != value and (key != "harness_eval" or value)}


def put_back_profile_pins(tag, config):
    """Put back in init.json (and its copy) the profile of the ledger's baseline row and the values prepare.py at
    the baseline's commit pins for it, where they differ: the note that says so, or None (also before the
    baseline, and for a prepare.py without a PROFILES table)."""
    rows = tag_rows(tag)
    if not rows:
        return None
    baseline = rows[0]["commit"]
    try:
        commit = row_commit(rows[0], within=f"refs/heads/{BRANCH_PREFIX}{tag}")
    except LoopError:
        raise LoopError(f"the baseline's commit {baseline} of tag {tag} is not one commit of this repository: "
                        f"its {PREPARE} cannot vouch for {config_path(tag)}. Fix: start a new tag with `uv run "
                        f"agent_loop.py init --tag {tag}b`") from None
    source = git("show", f"{commit}:{PREPARE}", check=False)
    profile = rows[0].get("profile") or config.get("profile")
    pins = profile_pins(source, profile) if source else None
    if pins is None:
        return None
    wrong = pins_to_put_back(config, dict(pins, profile=profile))
    if not wrong:
        return None
    if wrong.get("harness_eval") and not config.get("metric_hashes"):
        raise LoopError(f"{config_path(tag)} says the harness does not evaluate runs and holds no hashes of the "
                        f"metric's files (an edit, or a tag from before the harness evaluated runs), but "
                        f"{PREPARE} defines the metric: its runs cannot be judged. Fix: start a new tag with "
                        f"`uv run agent_loop.py init --tag {tag}b`")
    edited = ", ".join(f"{key} {config.get(key)!r} (pinned: {value!r})" for key, value in wrong.items())
    config.update(wrong)
    keep_file(config_path(tag), json.dumps(config, indent=1).encode())
    return (f"{config_path(tag)} was edited, it and its copy alike: {edited}, against the baseline's profile and "
            f"what {PREPARE} at its commit {baseline} sets for it: put back")


# -----------------------------------------------------------------------------
# The experiment in flight


class InFlight:
    """.git/autoresearch/TAG/running.json (a worker's: TAG/wN/) names the experiment in flight, so that a killed
    loop can be resumed. A record of the loop's (ledger.KEPT): what the agent writes or deletes there between two
    `step`s (a crash row for code that never ran, a confirmation called off, an attempt erased) is put back.
    This is the one place that writes and removes it:

        with InFlight(loop) as flight:
            flight.mark(n=n, phase="train", ...)   # at each phase; flight.spawned(pid) adds the child

    A block that ends normally removes the file. An exception (Ctrl-C, SIGTERM, an error) or a kill
    leaves it behind, for reconcile() to finish the experiment on the stop or at the next start.
    resumable=False (the baseline, which init simply runs again) removes it on Ctrl-C and SIGTERM too."""

    def __init__(self, loop, resumable=True):
        self.path, self.resumable, self.state = loop.private_dir / IN_FLIGHT, resumable, {}

    def read(self):
        """What an earlier loop left in flight, or None."""
        return read_json(self.path)

    def mark(self, **state):
        self.state = state
        keep_file(self.path, json.dumps(state).encode())

    def spawned(self, pid):
        """A child started (train.py or the agent): its process group and start time let a resumed
        loop end it, and only it."""
        self.mark(**dict(self.state, pgid=pid, started=proc_start_time(pid), started_ns=time.time_ns()))

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        if kind is None or (not self.resumable and issubclass(kind, (KeyboardInterrupt, Stop))):
            keep_file(self.path, None)
        return False
