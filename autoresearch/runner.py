"""
One run of train.py: its environment (the seed, and the profile pinned at init), its time limit, its output
appended to the experiment's log, and the verdict read from that output: the summary block after the last
`---` line, or why the run counts as a crash. With the real prepare.py (config["harness_eval"]), train.py
hands its model over and val_bpb is the harness's evaluator's (autoresearch/evaluator.py), not train.py's.
"""
import contextlib
import functools
import getpass
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import site
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from autoresearch.carryover import RUN_ONLY, TICK_NS, digests, drop_carryover, unchecked_mark
from autoresearch.confine import CONFINE_ENV, confined, will_confine
from autoresearch.fa3 import could_load, download_folders, download_ports
from autoresearch.gitrepo import git_env
from autoresearch.handoff import EARLY_ENV, HANDOFF_ENV
from autoresearch.layout import LOGS_DIR, RESULTS, TRAIN, WORKTREES_DIR, LoopError, now_iso, to_float
from autoresearch.ledger import LEDGER_ENV, copies_folder, copy_of, ledger_dir, record_file, record_folder
from autoresearch.metricdata import PRISTINE, MetricDataError, evaluation_copy, verify_metric_files
from autoresearch.process import (cores_used, counted_cores, cpu_clock, cpu_seconds, end_group, other_work,
                                  run_group, start_group, wait_group)
from autoresearch.seal import LedgerSeal
from autoresearch.state import EVALUATOR_CACHE, IN_FLIGHT
from autoresearch.valwatch import DataWatch, cache_dir

# training may overrun the budget by 2%, or by the step that crossed it, if longer: up to STEP_SLACK mean steps
# (a step varies; measured: 45 steps of 342 ms on average on one core, the last one 371 ms, over by 0.4 s), and
# by OVERRUN_FLOOR_S at least: on smoke 2% is 0.2 s, and honest runs whose last steps met a load that came on
# late ended 0.1-0.3 s past (three busy loops from the last 1-2 s, 4 runs; 0.7 s seen on a loaded machine). The
# harness's clock (experiment.outside_budget) allows max(2 s, 5% of the budget) of hidden training anyway: this
# check is for a loop that runs on, not for a cheat
BUDGET_TOLERANCE = 0.02
STEP_SLACK = 2
OVERRUN_FLOOR_S = 1.0
PRINTED_TOLERANCE = 1e-4    # relative: train.py's own val_bpb against the evaluator's
# other work is measured on runs at least this long: over a tenth of a second, a daemon's 30 ms of CPU reads as
# 0.3 cores (seen: a 0.1 s stand-in run "busy", its first run thrown away by the keep rule)
LOAD_WINDOW_S = 1.0
SHARE_TOL, SHARE_SLACK_S = 0.10, 1.0  # a run may use its cores' time, plus this share and these CPU seconds
PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])  # where `autoresearch` is importable from


@dataclass
class Run:
    seed: int
    summary: dict
    error: str            # None when the run produced a finite val_bpb
    tail: list            # last lines of the traceback (or output), for crashes
    wall: float
    notes: list = field(default_factory=list)  # what the row's note must say about this run
    train_wall: float = 0.0  # train.py's own wall-clock seconds, by the harness's clock (wall adds the evaluator)
    tampered: list = field(default_factory=list)  # files outside train.py the run wrote (seal.py)
    other_cores: float = None  # CPU cores busy with other work while train.py ran (process.other_work)
    read_val: list = field(default_factory=list)  # validation files train.py opened (valwatch; None: not watched)
    load: float = None  # other_cores as a share of the cores it was counted over, when it was measured
    edited_code: list = field(default_factory=list)  # the evaluator's code outside the repo, edited (installed.py)
    # seconds from train.py's first opening of a training file to its end, by the harness's clock (all its run
    # where that opening was not seen as it happened); None: not watched, or it opened none
    after_data: float = None
    opened_data: bool = None  # whether it opened a training file at all; None: the watch cannot tell

    @property
    def val(self):
        return float(self.summary["val_bpb"])

    @property
    def heldout_gap(self):
        """How much better the pinned val rows score than the held-out slice (val/heldout - 1), or None."""
        heldout = to_float(self.summary.get("heldout_bpb"))
        return self.val / heldout - 1 if heldout and not self.error else None

    @property
    def speed(self):
        """Training tokens per second, from the summary (None when it lacks the numbers)."""
        tokens, seconds = to_float(self.summary.get("total_tokens_M")), to_float(self.summary.get("training_seconds"))
        speed = tokens * 1e6 / seconds if tokens and seconds else None
        return speed if speed and math.isfinite(speed) and speed > 0 else None

    @property
    def outside(self):
        """Seconds train.py ran outside the training time it reports (start-up, compile, hand-over), by the
        harness's clock: what a train.py that under-reports its training would have to hide. None if unknown."""
        trained = to_float(self.summary.get("training_seconds"))
        return self.train_wall - trained if self.train_wall and trained is not None else None

    @property
    def outside_after_data(self):
        """Seconds train.py ran after it first opened its training data, outside the training time it reports
        (its first, untimed steps, the hand-over): compiling comes before the data (compile_before_data), so
        there is little to hide training in. None if unknown."""
        trained = to_float(self.summary.get("training_seconds"))
        return self.after_data - trained if self.after_data is not None and trained is not None else None


# -----------------------------------------------------------------------------
# Launching


def child_env(config, seed, compile_cache=None):
    """train.py's environment: the seed, the profile/dataset/cache and the variables that decide what Python and
    the loader run (state.RUN_ENV) as pinned at init, whatever the shell of a later command says (a `step` whose
    AUTORESEARCH_CACHE_DIR named a copy of the cache with its training data garbled had the best's re-runs train
    on it, and a comment-only change kept), whether it is confined as pinned at init, and the folder
    torch.compile caches in (inductor's and triton's), when the loop gives one."""
    env = dict(os.environ, AUTORESEARCH_SEED=str(seed), PYTHONUNBUFFERED="1")
    env.pop(LEDGER_ENV, None)  # a run has no business with the ledger
    if "confine" in config:  # pinned at init
        env.pop(CONFINE_ENV, None)
        if not config["confine"]:
            env[CONFINE_ENV] = "0"
    if compile_cache:
        env.update(TORCHINDUCTOR_CACHE_DIR=str(compile_cache),
                   TRITON_CACHE_DIR=str(Path(compile_cache) / "triton"))
    for key, field in (("AUTORESEARCH_PROFILE", "profile"), ("AUTORESEARCH_DATASET", "dataset"),
                       ("AUTORESEARCH_CACHE_DIR", "cache_dir")):
        if config.get(field):
            env[key] = str(config[field])
    for key, value in (config.get("run_env") or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = str(value)
    return env


def default_timeout(config):
    """Twice the budget, and at least budget + 120 s for startup, compile and eval (10 min at 300 s)."""
    budget = float(config["time_budget"])
    return max(2 * budget, budget + 120)


def train_once(config, timeout, seed, log_path, on_spawn=None, compile_cache=None, evaluator_cache=None,
               installed=None, private=None):
    """One `python train.py` with this seed, output appended to the experiment's log, then (with the real
    prepare.py) the evaluator on the model it handed over. on_spawn(pid) is called with each child's pid as
    soon as it runs (to record it for a resumed loop). compile_cache: the version's torch.compile cache;
    evaluator_cache: the evaluator's (a seal.HarnessFolder); installed: the tag's record of the code the
    evaluator runs from outside the repository (installed.InstalledCode), checked after each evaluation;
    private: the loop's own folder in the ledger (state.Loop.private_dir), all a worker's run is sealed from."""
    env = child_env(config, seed, compile_cache)
    handoff = evaluator = early = None
    watched = evaluator_cache if config.get("harness_eval") else None  # the folder the evaluator compiles in
    checked = False  # the evaluator's cache was checked after train.py: what it holds from then on is ours
    scratch = new_scratch(log_path, seed, compile_cache)
    env["TMPDIR"] = str(scratch)
    if config.get("harness_eval"):
        handoff = scratch / "model.pt2"
        env[HANDOFF_ENV] = str(handoff)
        # the evaluator's warm-up writes its compile cache while train.py runs: only where train.py cannot (the
        # run does not start unconfined, and cannot truncate there either)
        if will_confine(env, truncate=True):
            early = scratch / "early.pt2"
            env[EARLY_ENV] = str(early)
        # left since the last run (between steps, or by a run cut short by Ctrl-C), or not known to be the
        # harness's (no record, a killed loop): emptied, blamed on none, before the evaluator reads it
        if watched and (watched.seen is None or watched.written()):
            watched.clean()
            watched.settle()
        evaluator = start_evaluator(config, seed, handoff, evaluator_cache, early)
    try:
        with open(log_path, "a") as log:
            log.write(f"\n===== train.py  seed {seed}  timeout {timeout:.0f} s  {now_iso()} =====\n")
            if config.get("confine") and os.environ.get(CONFINE_ENV) == "0":
                log.write(f"[agent_loop] {CONFINE_ENV}=0 is not heeded: tag {config.get('tag')} was started with "
                          f"confined runs (a tag started with it set at init runs unconfined)\n")
            log.flush()
            offset = log.tell()
            copy = evaluator_data(config) if handoff else None  # the evaluator's copy is watched too
            unchecked = unchecked_mark(compile_cache) if compile_cache else None
            if unchecked:  # before the seal: the run cannot remove it unseen
                unchecked.touch()
            ledger = ledger_seal([compile_cache, evaluator_cache.path if evaluator_cache else None, log_path,
                                  scratch, *in_flight_record(private)], private)
            # the compile cache's bytes as the run starts, and those of what it compiled as it opens the data:
            # written through a mapping made before then, a file keeps its ctime (carryover.py)
            before = digests(compile_cache) if compile_cache and sys.platform == "linux" else None
            clock, evaluator_cpu = cpu_clock(), cpu_seconds(evaluator.proc.pid) if evaluator else 0.0
            started_ns = time.time_ns()

            def data_opened():
                before.update(digests(compile_cache, since_ns=started_ns - TICK_NS))

            watch = DataWatch(cache_dir(env), copy, on_train_opened=data_opened if before is not None else None)
            try:
                with watch, relayed(log) as output:
                    rc, wall = run_group(confined_run([sys.executable, TRAIN], scratch, compile_cache, env,
                                                      require=early is not None),
                                         output, subprocess.STDOUT, env, timeout, on_spawn=on_spawn)
                    used = cores_used(clock, wall)
            finally:  # before anything reads the ledger again; also when the run stopped the loop (a SIGTERM)
                try:
                    aside = Path(log_path).with_name(f"{Path(log_path).stem}-set-aside")
                    wrote_ledger, put_back = ledger.put_back(aside) if ledger else ([], [])
                finally:  # on Linux, where runs are confined; unwatched, from the run's start
                    carried = drop_carryover(started_ns, watch.train_opened_ns if watch.watching else None,
                                             compile_cache, before=before) if sys.platform == "linux" else []
                    if unchecked:  # swept: other tags, and this one's next run, may start from it
                        unchecked.unlink(missing_ok=True)
            # the evaluator's imports beside train.py are the harness's own work, not other work on the machine
            ours = cpu_seconds(evaluator.proc.pid) - evaluator_cpu if evaluator else 0.0
            other = other_work(clock, wall, ours) if wall >= LOAD_WINDOW_S else None
        with open(log_path, "rb") as f:
            f.seek(offset)
            output = f.read().decode(errors="replace")
        if other is not None:  # after the output is read: the summary block stays train.py's own
            with open(log_path, "a") as log:
                log.write(f"[agent_loop] other work on the machine while train.py ran: {other:.2f} CPU cores "
                          f"(of {counted_cores()}; /proc/stat less this run's own CPU time)\n")
        error, summary, tail = judge_run(output, rc, timeout, config.get("time_budget"), bool(handoff), seed)
        if error is None and wall > 0 and used > counted_cores() * (1 + SHARE_TOL) + SHARE_SLACK_S / wall:
            error = (f"used {used:.2f} CPU cores on average, more than the {counted_cores()} it was given: it "
                     f"left its share of the machine (sched_setaffinity), which the other workers' runs were "
                     f"measured on")
        # under the hand-over train.py needs no val file; without it (an older tag) it evaluates itself
        # unknown where the watch was blind; all the run where the kernel dropped events (a run can make it)
        after_data = None if not watch.watching or watch.blind or watch.train_opened_ns is None else (
            wall - max(0, watch.train_opened_ns - started_ns) / 1e9 if watch.seen_as_it_happened else wall)
        opened = None if not watch.watching or watch.blind else watch.train_opened_ns is not None
        run = Run(seed, summary, error, tail, wall, train_wall=wall, other_cores=other, after_data=after_data,
                  opened_data=opened, read_val=watch.opened if handoff else [],
                  load=None if other is None else other / counted_cores())
        run.notes += restore_written(watch.written, config) + put_back
        run.notes += carried
        run.tampered += [os.path.relpath(p) if Path(p).is_relative_to(Path.cwd()) else p for p in wrote_ledger]
        if handoff and watch.opened is None:
            run.notes.append("the validation files were not watched during this run (no inotify here)")
        if watched:  # crashed or not: a run that wrote there is rejected, and it is emptied
            # beside a confined run the evaluator's warm-up wrote there: only what the run could still do counts
            blamed = watched.altered() if early else watched.written()
            run.tampered += blamed
            if blamed and early:  # the evaluator may be writing there yet: a new one reads it once emptied
                end_group(evaluator)
                evaluator.log.close()
                evaluator = start_evaluator(config, seed, handoff, evaluator_cache)
            if blamed or not early:
                watched.clean()
            checked = True
        if handoff:  # a crashed run too: the evaluator then only checks the code it runs for the run's writes
            code = evaluate_handoff(run, config, evaluator, timeout, log_path, on_spawn, started_ns)
            if installed is not None:
                run.edited_code = installed.edited(code)
    finally:
        if evaluator:
            end_group(evaluator)  # a no-op after an evaluation; else the end of its input, and of it
            evaluator.log.close()
        if checked:  # also on Ctrl-C during the evaluation: what the evaluator wrote is the harness's
            watched.settle()
        elif watched:
            watched.keep_record()
        shutil.rmtree(scratch, ignore_errors=True)  # the hand-over: hundreds of MB at the reference size
    return run


def scratch_folders(log_path):
    """The scratch folders of this log's runs (LOG's hash-seedN): a run's only folder besides its compile cache,
    its TMPDIR and where its model is handed over; short, for the sockets a TMPDIR holds (108 bytes at most)."""
    key = hashlib.sha256(str(Path(log_path).resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"autoresearch-{os.getuid()}" / "runs", f"{key}-seed"


def new_scratch(log_path, seed, compile_cache=None):
    """A run's empty scratch folder. Inductor keeps its precompiled headers in the temporary folder whatever
    TORCHINDUCTOR_CACHE_DIR says; made again each run they cost a cold compile 4.6 s more (smoke, 2 cores), so
    that folder is a link into the version's compile cache."""
    root, prefix = scratch_folders(log_path)
    scratch = root / f"{prefix}{seed}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    if compile_cache:
        headers = Path(compile_cache) / "headers"
        headers.mkdir(parents=True, exist_ok=True)
        (scratch / inductor_folder_name()).symlink_to(headers)
    return scratch


def inductor_folder_name():
    """What torch calls its default cache folder in the temporary folder (inductor's default_cache_dir)."""
    return "torchinductor_" + re.sub(r'[\\/:*?"<>|]', "_", getpass.getuser())


def remove_scratch(log_path):
    """The scratch folders of this log's runs, as a loop killed during one left them (hundreds of MB each)."""
    root, prefix = scratch_folders(log_path)
    for folder in root.glob(f"{prefix}*"):
        shutil.rmtree(folder, ignore_errors=True)


def confined_run(command, scratch, compile_cache, env, require=False, also=()):
    """`command` confined as a run of train.py is (confine.py): writes in `writable` (and `also`) and the
    character devices of /dev, TCP only to FA3's download where a GPU could load it, and sees `unreadable`
    empty."""
    return confined(command, [*writable(scratch, compile_cache, env), *also], require=require, devices=["/dev"],
                    ports=download_ports(env) if could_load(env) else (), hidden=unreadable(env))


@contextlib.contextmanager
def relayed(log):
    """A pipe for a run's output, which a thread appends to its log as it comes: the run holds no descriptor of
    the log, which it could open again through /proc/self/fd and read what the experiment's earlier runs printed
    there (weights, say)."""
    read, write = os.pipe()

    def copy():
        with os.fdopen(read, "rb", buffering=0) as source:
            while chunk := source.read(1 << 16):
                log.flush()
                os.write(log.fileno(), chunk)

    copier = threading.Thread(target=copy, daemon=True)
    copier.start()
    try:
        with os.fdopen(write, "wb", buffering=0) as output:
            yield output
    finally:
        copier.join(timeout=10)  # the run's whole group has ended by now: every writer is gone


def unreadable(env):
    """What earlier runs left that a run could read and learn from (a red team's run printed its weights, and the
    next read them back from its log): the logs and results of this checkout and of the repository's others (its
    worktrees), the repository's git folder (the ledgers, their logs and records; the run's compile cache in it
    stays), and the loop's records outside it. Never a folder that holds the checkout, the data or Python."""
    top, found = Path.cwd().resolve(), []
    try:
        common = Path(subprocess.run(["git", "rev-parse", "--git-common-dir"], capture_output=True, text=True,
                                     env=git_env(), check=True).stdout.strip()).resolve()
        found.append(common)
        tops = {top, common.parent}
    except (OSError, subprocess.CalledProcessError):  # not in a repository (bench/gpu_check.py): its folder
        tops = {top}
    checkouts = [*tops, *(worktree for t in tops if (t / WORKTREES_DIR).is_dir()
                           for worktree in sorted((t / WORKTREES_DIR).iterdir()))]
    for checkout in checkouts:
        found += [checkout / LOGS_DIR, checkout / RESULTS]
    # and the loop's own in the temporary folder: other runs' scratch (a worker's, say, with its model) and the
    # evaluators' copies of the val files; the run's own scratch stays
    found += [record_folder().parent, Path(tempfile.gettempdir()) / f"autoresearch-{os.getuid()}"]
    needed = [top, Path(cache_dir(env)).resolve(), Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve()]
    return [str(p) for p in found if os.path.lexists(p) and not any(n.is_relative_to(p) for n in needed)]


def writable(scratch, compile_cache, env):
    """All a confined run may write in (besides the character devices of /dev: a GPU's, /dev/null): its scratch
    folder, its version's compile cache, /dev/shm and /dev/mqueue (swept after it) and, where it could load FA3
    (an NVIDIA GPU), the kernel's download cache, unless that holds what the harness keeps or lies in it
    (HF_HOME=. set by an agent would open the repository; the home folder may hold it)."""
    kept = [Path.cwd(), cache_dir(env)]
    try:
        kept += [ledger_dir(), copies_folder()]
    except LoopError:
        pass
    kept = [k.resolve() for k in kept]
    home = Path.home().resolve()

    def apart(folder):
        folder = Path(folder).resolve()
        return not any(k.is_relative_to(folder) or folder.is_relative_to(k) for k in kept) and \
            not home.is_relative_to(folder)

    downloads = filter(apart, download_folders()) if could_load(env) else []
    return [scratch, compile_cache, *map(str, RUN_ONLY), *downloads]


def in_flight_record(private):
    """The loop's record of the run in flight (state.InFlight) and its copy: the loop writes them while the run
    trains (the run's process group, for a resumed loop to end it), after the seal, and over them after it."""
    if private is None:
        return []
    try:
        return [Path(private) / IN_FLIGHT, copy_of(Path(private) / IN_FLIGHT)]
    except (LoopError, ValueError):  # no repository, not in its ledger
        return []


def ledger_seal(skip, private=None):
    """The ledger's seal for one run (seal.LedgerSeal; skip: what the run writes there), with the loop's records of
    it outside the repository; None outside a repository (bench/, tests). A worker of `run --workers` shares the
    ledger with its coordinator and the other workers, who write it while its run trains: it is sealed from its
    own folder there (private), the tag's pinned config (put back as the worker found it when it started) and
    the record of the tag's evaluator cache (which seeds a new one), each with its copy, not from the rest."""
    try:
        folder = ledger_dir()
    except LoopError:
        return None
    if LEDGER_ENV not in os.environ:
        return LedgerSeal(folder, skip, outside=(record_file(), copies_folder()))
    if private is None:
        return None
    pinned = pinned_config_files(private)
    evaluator = Path(private).parent / "compile-cache" / f"{EVALUATOR_CACHE}.json"
    trusted = {path: worker_found(path) for path in pinned if worker_found(path) is not None}
    return LedgerSeal(private, skip, outside=(*pinned, copy_of(private), evaluator, copy_of(evaluator)),
                      trusted=trusted)


def pinned_config_files(private):
    """The tag's pinned config (init.json, beside a worker's own folder) and its copy outside the repository."""
    pinned = Path(private).parent / "init.json"
    return pinned, copy_of(pinned)


@functools.cache
def worker_found(path):
    """A file's bytes as this process first read it (None: not a regular file): a worker reads its tag's pinned
    config as it starts (workers.worker_main), before any run of the night could write it."""
    try:
        return Path(path).read_bytes() if Path(path).is_file() and not Path(path).is_symlink() else None
    except OSError:
        return None


def metric_folder(config):
    """The folder of the run's dataset and profile in the cache (prepare.py's layout), or None if not pinned."""
    env = child_env(config, 0)
    dataset, profile = env.get("AUTORESEARCH_DATASET"), env.get("AUTORESEARCH_PROFILE")
    return cache_dir(env) / "prepared" / dataset / profile if dataset and profile else None


def evaluator_data(config, checkout=None, ledger=None):
    """The folder the evaluator reads the metric files from (metricdata.evaluation_copy), or None: the cache.
    One per loop, watched while its runs train: a single loop's own, and for each worker of a `run --workers`
    one per worktree (checkout; default the current folder), made by the coordinator before the workers start,
    so that no worker reads the cache to make one while another trains. ledger: that of a checkout this process
    is not in (a Ray node's for a worker, made before any run there: rayexec.check_node)."""
    try:
        owner = str(ledger or ledger_dir())
    except LoopError:  # a run outside a repository (bench/, tests): the folder it runs in
        owner = os.getcwd()
    if LEDGER_ENV in os.environ and ledger is None:  # a worker's: other workers' evaluators read theirs meanwhile
        owner += "|" + os.path.realpath(checkout or os.getcwd())
    return evaluation_copy(metric_folder(config), config.get("metric_hashes"), owner)


def restore_written(written, config):
    """Lines saying which metric files a run wrote were restored (verify_metric_files on their folders, against
    the hashes pinned at init for the run's own dataset: a run may have rewritten the pristine record too)."""
    own, notes = metric_folder(config), []
    for folder in sorted({Path(p).parent.parent if Path(p).parent.name == PRISTINE else Path(p).parent
                          for p in written or ()}):
        try:
            notes += verify_metric_files(folder, config.get("metric_hashes") if folder == own else None)
        except MetricDataError as e:
            notes.append(str(e))
    return notes


def harness_python(code, *flags):
    """The command that runs `code` (after `import sys`) in a Python of the harness's own: the evaluator, a
    worker. -I: no PYTHON* variables, and neither the current folder nor a script's first on sys.path, so a
    module left in the repository (torch.py, numpy.py) cannot stand in for the real one. -S: no site, so no
    code in a .pth file of site-packages (nor a sitecustomize) runs before the harness's: one an agent wrote
    there between runs is no module, and no check of the code imported would show it. The environment and
    its packages are set as site sets them, from this process's."""
    return [sys.executable, "-I", "-S", *flags, "-c",
            f"import sys; sys.prefix, sys.exec_prefix = {sys.prefix!r}, {sys.exec_prefix!r}; "
            f"sys.path += {site.getsitepackages()!r}; {code}"]


def start_evaluator(config, seed, handoff, compile_cache=None, early=None):
    """The evaluator of this run's hand-over (autoresearch/evaluator.py --wait), started beside train.py: it
    imports while train.py starts, compiles the early graph if train.py puts one at `early`, and waits for
    evaluate_handoff's word. Its output goes to a file of its own, unnamed (nothing can open it by a path), so
    that nothing it prints can land inside train.py's."""
    # the folder of the run, then the harness's, on its path; before any other import it stands aside: no
    # /proc/PID/fd/0 for train.py to write in, and no timed step slowed
    command = harness_python(f"sys.path += [{os.getcwd()!r}, {PACKAGE_ROOT!r}]; "
                             f"from autoresearch.handoff import stand_aside; stand_aside(); "
                             f"from autoresearch.evaluator import run_and_exit; run_and_exit()")
    env = child_env(config, seed, compile_cache.path if compile_cache else None)  # read only after the word
    for key in ("LD_PRELOAD", "LD_AUDIT"):  # the harness's code only: no library the agent chose rides along
        env.pop(key, None)
    out = tempfile.TemporaryFile()
    command += [str(handoff), "--wait"]
    group = start_group(command + (["--early", str(early)] if early else []), out, subprocess.STDOUT, env,
                        stdin=subprocess.PIPE)
    os.set_blocking(group.proc.stdin.fileno(), False)  # a pipe something else filled cannot hang the loop
    return group


def evaluate_handoff(run, config, evaluator, timeout, log_path, on_spawn, since_ns=0):
    """val_bpb of the handed-over model by the evaluator started beside train.py; sets run.error when it refuses
    the model. train.py's own val_bpb, if it printed one, is kept beside it and a disagreement is noted. The
    word carries a nonce made now, after train.py has ended, that the result must echo: a line written by
    anything else (a forged result, a second word) does not count. since_ns: when train.py started; a file the
    evaluator ran code from that was written since (torch's sources, say) is noted in run.tampered, also for a
    run that crashed (run.error set: the evaluator then makes that check alone). Returns the files outside the
    repository that the evaluator ran code from (installed.py checks them), kept out of the log."""
    crashed = run.error is not None
    data = None if crashed else evaluator_data(config)  # nothing to score: no copy to verify
    nonce = secrets.token_hex(16)
    word = json.dumps({"expect": config.get("metric_hashes") or None, "data": str(data) if data else None,
                       "nonce": nonce, "since": since_ns, "check_only": crashed})
    if on_spawn:
        on_spawn(evaluator.proc.pid)  # recorded before it starts work: a resumed loop ends it
    start = now_iso()
    try:
        try:
            evaluator.proc.stdin.write(f"{word}\n".encode())
            evaluator.proc.stdin.close()
        except (BrokenPipeError, BlockingIOError):  # it ended, or its input is full of another's lines
            pass
        rc, _ = wait_group(evaluator, timeout)
    finally:  # also on Ctrl-C: what it printed belongs in the log
        evaluator.log.seek(0)
        lines = evaluator.log.read().decode(errors="replace").replace("\0", "").strip().splitlines()
        with open(log_path, "a") as log:
            log.write(f"\n===== evaluator  {start} =====\n" + "".join(f"{loggable(line)}\n" for line in lines))
    result = next((r for r in map(json_object, reversed(lines)) if r.get("nonce") == nonce), None)
    if result is None:  # its last words, not a line something else may have written in its output
        said = next((line for line in reversed(lines) if line.strip() and not json_object(line)), "")
        result = {"error": f"the evaluator ended without a result (exit {rc}): {said[:200]}"}
    if "error" in result:
        if crashed:  # the run's own error says more; the check could not be made
            run.notes.append(f"the evaluator could not check the code it runs: {result['error'][:200]}")
        else:
            run.error = f"evaluator: {result['error']}"
        return []
    run.tampered += result.get("code_written", [])
    code = [p for p in result.get("code_read") or () if isinstance(p, str)]
    if crashed:
        return code
    printed = to_float(run.summary.get("val_bpb"))
    run.summary.pop("heldout_bpb", None)  # the evaluator's, or none: never one train.py printed
    run.summary.update(val_bpb=f"{result['val_bpb']:.6f}", eval_seconds=f"{result['eval_seconds']:.1f}")
    if result.get("heldout_bpb"):
        run.summary["heldout_bpb"] = f"{result['heldout_bpb']:.6f}"
    run.notes += result.get("restored", [])
    if printed is not None:
        run.summary["printed_val_bpb"] = f"{printed:.6f}"
        if abs(printed - result["val_bpb"]) > PRINTED_TOLERANCE * result["val_bpb"]:
            run.notes.append(f"train.py printed val_bpb {printed:.6f}, the evaluator measured "
                             f"{result['val_bpb']:.6f}: the evaluator's counts")
    return code


# -----------------------------------------------------------------------------
# Reading the output


def json_object(line):
    """The line as a JSON object, or {} when it is not one."""
    try:
        value = json.loads(line)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def loggable(line):
    """An evaluator's output line for the log: its list of the files it ran code from (thousands) as a count."""
    result = json_object(line)
    if isinstance(result.get("code_read"), list):
        return json.dumps(dict(result, code_read=f"{len(result['code_read'])} files"))
    return line


def parse_summary(output):
    """The `key: value` lines after the last `---` line of train.py's output."""
    lines = output.splitlines()
    marks = [i for i, line in enumerate(lines) if line.strip() == "---"]
    summary = {}
    for line in lines[marks[-1] + 1:] if marks else []:
        m = re.match(r"^(\w+):\s+(\S.*?)\s*$", line)
        if m:
            summary[m[1]] = m[2]
    return summary


def crash_tail(lines, n=3):
    """The last lines of the last traceback, else of the output: what a human reads first."""
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    return (lines[starts[-1] + 1:] if starts else lines)[-n:]


def summary_blocks(output):
    """Every summary block in the output (a run may print only one)."""
    parts = re.split(r"^---[ \t]*$", output, flags=re.M)[1:]
    return [block for block in (parse_summary("---\n" + part) for part in parts) if block]


def judge_run(output, rc, timeout, budget=None, handed_over=False, seed=None):
    """(error or None, summary, tail). A missing block, FAIL, a non-zero exit, a val_bpb that is not finite
    and positive, two different summary blocks, training past the budget, or another seed than the loop gave
    (`seed`) is a crash. handed_over: the evaluator will measure val_bpb, so train.py need not print it."""
    summary = parse_summary(output)
    lines = [line.rstrip() for line in output.splitlines() if line.strip()]
    fail = next((line for line in reversed(lines) if line.startswith("FAIL")), None)
    val = to_float(summary.get("val_bpb"))
    blocks = summary_blocks(output)
    trained, steps = to_float(summary.get("training_seconds")), to_float(summary.get("num_steps"))
    allowed = (max(BUDGET_TOLERANCE * budget, STEP_SLACK * trained / max(steps or 1, 1), OVERRUN_FLOOR_S)
               if budget and trained else 0)
    overrun = budget and trained and trained > budget + allowed
    if rc is None:
        error = f"timeout: killed with its whole process group after {timeout:.0f} s"
    elif fail:
        error = fail
    elif rc > 0:
        error = f"exit code {rc}"
    elif rc < 0:
        error = f"killed by signal {-rc}" + (" (out of memory?)" if rc == -9 else "")
    elif not summary or (val is None and not handed_over):
        error = "no summary block (val_bpb missing)"
    else:
        error = None
    tail = crash_tail(lines) if error else []
    if error and tail and rc is not None and not fail:
        error = f"{error}: {tail[-1].strip()}"
    if error is None:  # a block that reads as a result but cannot be one
        if val is not None and not (math.isfinite(val) and val > 0):
            error = f"val_bpb is {summary['val_bpb']}: not a finite positive number"
        elif len({tuple(sorted(b.items())) for b in blocks}) > 1:
            error = f"{len(blocks)} different summary blocks: a run prints one"
        elif overrun:
            error = (f"trained {trained:.1f} s, past the {budget:g} s budget by more than {allowed:.2f} s "
                     f"({100 * BUDGET_TOLERANCE:g}% of it, or {STEP_SLACK} mean steps or {OVERRUN_FLOOR_S:g} s "
                     f"if longer)")
        elif seed is not None and summary.get("seed", str(seed)) != str(seed):
            # a pinned seed makes every run the same draw: the lucky one found once would pass for a gain
            error = (f"ran seed {summary['seed']}, not the seed {seed} the loop gave it: each run must use its "
                     f"own (AUTORESEARCH_SEED, as the shipped train.py reads it)")
    return error, summary, tail
