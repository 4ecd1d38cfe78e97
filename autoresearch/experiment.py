"""
One experiment, from a change proposed in the working tree to a row in results.tsv: check what changed,
commit it, train it and re-run the best as the keep rule asks (decide.py: a first run, then pairs), decide,
log, and keep the commit or save it under refs/autoresearch/TAG/ and move the branch back. Shared by `step`
(which may stop between runs and go on at its next call: pending.json) and `run`. Also the baseline,
experiment #0 of a tag, whose repeated runs give the first estimate of the noise.
"""
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

from autoresearch.decide import BUSY_LOAD, Obs, format_evidence, outcome_line, run_until_decided
from autoresearch.gitrepo import (blob_hash, changed_since, commands_in_config, commit, git, head, short,
                                  tree_status)
from autoresearch.installed import FIX as INSTALLED_FIX
from autoresearch.layout import PROGRAM, TRAIN, LoopError, now_iso, read_json, to_float
from autoresearch.ledger import (DESCRIPTION_MAX, REJECTED, append_row, keep_copies, keep_file, measured_versions,
                                 one_line, render_results, restore_logs)
from autoresearch.process import counted_cores
from autoresearch.resume import save_and_reset, spare_name
from autoresearch.metricdata import file_stamps
from autoresearch.runner import Run, metric_folder, train_once
from autoresearch.seal import (changed_modules, set_aside, symlinked_train, module_bytecode, untracked_modules,
                               write_times, written_since)
from autoresearch.state import InFlight, environment_changes, say

# program.md gives `step` a shell timeout of 15 minutes: a step starts no run that would end after this
# (AUTORESEARCH_STEP_LIMIT_S overrides, for a shorter shell timeout)
STEP_LIMIT_S = float(os.environ.get("AUTORESEARCH_STEP_LIMIT_S", 840))
# val_bpb / heldout_bpb may fall this far below the best's before the candidate counts as trained on the pinned
# val rows. Measured on smoke (15 s): honest versions and seeds 1.024-1.063 (synthetic, the file's slice),
# 0.928-0.945 (tinystories); trained on val 0.434-0.449 (synthetic). The synthetic dataset's held-out text is
# now fresh from each evaluation (prepare.synthetic_heldout_rows): 0.953-1.025 over 40 draws for one model.
LEAK_TOLERANCE = 0.10
# Fresh held-out text (init.json's fresh_heldout) does not allow less: 0.05 there (10 honest smoke versions
# averaged 0.997-1.002 over 10 draws each, one draw's sd 0.011-0.014) rejected an honest MATRIX_LR 0.05 of a
# worker on one core (0.950 against a baseline's 1.030), so a red team's 12% of val rows in its batches (ratio
# drop 0.076, val_bpb -6%) stays under the bar.


# -----------------------------------------------------------------------------
# One experiment


def run_experiment(loop, flight, description, started, strict, untracked_new=(), deadline=None, n=None):
    """The tree holds a proposed change (from the agent, mutate, or a coding agent calling `step`).
    Returns the one-line outcome. flight records the phases in running.json; strict (`step`) refuses
    a change to another file instead of recording it. started = time.monotonic() when the loop took over;
    deadline (time.monotonic() seconds, `step`): start no run that would end after it. n: the experiment's
    number (a worker's comes from its coordinator), else the next row's."""
    description = one_line(description, DESCRIPTION_MAX) or "(no description)"
    commands = commands_in_config()
    if commands:
        raise LoopError(f"the repository's git config names commands git would run inside the loop, unconfined "
                        f"({', '.join(commands)}); nothing was run. Fix: "
                        + " && ".join(f"git config --unset-all {key}" for key in commands) + ", then run again")
    n, best = loop.next_n() if n is None else n, loop.best_commit
    if not strict and git("merge-base", "--is-ancestor", best, "HEAD", check=False) is None:
        git("reset", "-q", "--soft", best)  # the agent rewrote history (amend, rebase): keep its files only
    changed = changed_since(best)
    module_bytecode(force=True)  # what the agent may have left in __pycache__ is no module of ours
    modules = changed_modules(loop.known_modules(), untracked_modules())
    why, fixes = broken_rules(changed, best, modules)
    drift = environment_changes(loop.config)
    if drift:  # torch, say, is not the one the best was measured with: no run now compares with the best's
        why.append(f"the Python environment changed since init ({drift})")
        fixes.append("put it back with `uv sync --locked`, and remove a .pth file no package installed (or start "
                     "a new tag with `init` in the new environment)")
    edited = loop.installed_code.edited()
    if edited:  # the metric's own code (torch's cross-entropy, say), edited by an agent between runs
        why.append(f"code the evaluator runs was edited since the tag's first evaluation ({', '.join(edited)})")
        fixes.append(INSTALLED_FIX)
    if why and strict:
        if head() != best:
            fixes.insert(0, f"`git reset --soft {best}` (undoes the commits, keeps the changes)")
        raise LoopError(f"{' and '.join(why)}; nothing was run. Fix: {', then '.join(fixes)}, then step again")
    note_extra = f"; agent created untracked files (left in place): {', '.join(sorted(untracked_new))}" \
        if untracked_new else ""
    if not changed and not why:
        save_and_reset(loop, spare_name(loop, "skipped", n), f"[skipped: no change] {description}")
        return f"skip {TRAIN} is unchanged from the best commit: nothing to run"
    flight.mark(n=n, phase="commit", best=best)
    if why:
        moved = set_aside(modules, loop.dir / f"{n:03d}-set-aside")
        if moved:
            note_extra += f"; untracked modules moved to {loop.dir / f'{n:03d}-set-aside'}: {', '.join(moved)}"
        return reject(loop, n, best, description, " and ".join(why), started, note_extra)
    train_py = blob_hash(Path(TRAIN).read_bytes())
    if git("hash-object", TRAIN)[:12] != train_py:  # what runs is the file; what the branch keeps, git's blob
        raise LoopError(f"git would store a {TRAIN} other than the file (a clean filter or an end-of-line rule in "
                        f".gitattributes, .git/info/attributes or .git/config): the branch would keep code that "
                        f"never ran; nothing was run. Fix: remove that rule for {TRAIN}, then step again")
    # a worker's coordinator also knows what the other workers measured since, and what they run now
    twin = loop.link.claim(n, train_py, description) if loop.link else measured_versions(loop.rows).get(train_py)
    if twin:
        save_and_reset(loop, spare_name(loop, "skipped", n),
                       f"[skipped: identical to #{twin['n']}] {description}")
        return (f"skip identical to #{twin['n']} ({twin['commit']}, {twin['status']} val_bpb={twin['val_bpb']}): "
                f"not run again; {TRAIN} reset to the best")
    sha = commit([TRAIN], description) if TRAIN in tree_status()[0] else head()
    log = str(loop.dir / f"{n:03d}-{sha[:7]}.log")
    write_log_header(loop, log, n, sha, best, description)
    pending = {"n": n, "commit": sha, "log": log, "description": description, "note_extra": note_extra,
               "train_py": train_py, "best": best, "runs": []}
    return confirm(loop, flight, pending, started, deadline)


def confirm(loop, flight, pending, started, deadline=None):
    """Run the candidate and the best as the keep rule asks (decide.run_until_decided) until it decides, then
    record the row. With a deadline (`step`), stop before a run that would end past it: the experiment stays
    in pending.json, the branch on the candidate, and the next `step` goes on from there."""
    n, sha, log = pending["n"], pending["commit"], pending["log"]
    done = [(kind, Run(**fields)) for kind, fields in pending["runs"]]
    made_here = []

    def run(kind):
        seed = loop.next_seed(len(done))
        # an interrupted row records the seeds: no seed is used twice
        state = dict(n=n, phase="train", commit=sha, log=log, best=pending["best"],
                     seeds=[r.seed for _, r in done] + [seed])
        flight.mark(**state, running_best=kind == "best")
        t0 = time.monotonic()
        r = (best_run(loop, sha, seed, log, flight) if kind == "best"
             else sealed_run(loop, seed, log, flight, pending["train_py"]))
        flight.mark(**state)
        r.wall = time.monotonic() - t0  # train.py and the evaluator: what the next run will take
        done.append((kind, r))
        made_here.append(r)
        if kind == "candidate" and not r.error:
            r.error = outside_budget(loop, r)
        said = f"val_bpb={r.val:.6f}" if not r.error else f"crash {r.error}"
        if not r.error and r.speed:
            said += f" ({r.speed:,.0f} tokens/s)"
        if (load_share(r) or 0) >= BUSY_LOAD:
            said += f" [machine busy with other work: {r.other_cores:.1f} of {counted_cores()} cores]"
        print(f"#{n} {kind} run seed {seed}: {said}", file=sys.stderr, flush=True)
        rerun = [b for k, b in done if k == "best"]
        untrusted_run = r.tampered or r.edited_code or r.read_val
        if r.error or untrusted_run or (kind == "candidate" and leaked(loop, [r], rerun)):
            return None  # no measurement: the rule stops at once, and the row says why
        return observed(r)

    def more():
        if deadline is None or not made_here:
            return True
        longest = max(r.wall for _, r in done)
        return time.monotonic() + 1.25 * longest + 30 < deadline

    ok = [(kind, observed(r)) for kind, r in done if not r.error]
    step, cand, fresh = run_until_decided(loop.best_runs, loop.other_runs, run, loop.sigma_floor, loop.min_delta,
                                          [o for k, o in ok if k == "candidate"],
                                          [o for k, o in ok if k == "best"], more)
    if step.action in ("candidate", "best"):
        pending["runs"] = [(kind, dataclasses.asdict(r)) for kind, r in done]
        keep_file(loop.pending_path, json.dumps(pending).encode())
        return (f"confirming #{n}: {step.note}; so far {len(cand)} run(s) of it, {len(fresh)} of the best. "
                f"Run `uv run agent_loop.py step` again to go on (leave {TRAIN} as it is until then)")
    keep_file(loop.pending_path, None)
    runs = [r for kind, r in done if kind == "candidate"]
    best_runs = [r for kind, r in done if kind == "best"]
    distrust = untrusted(loop, n, sha, [r for _, r in done]) or leaked(loop, runs, best_runs)
    status, val, note = ("discard", 0.0, distrust) if distrust else verdict(step, done, loop)
    previous_best = loop.best_val
    row = experiment_row(loop, n, sha, status, pending["description"], runs, val,
                         note + pending["note_extra"], log, pending["train_py"])
    row.update(run_columns(best_runs, "best_"), best_train_py=loop.best.get("train_py", "") if best_runs else "",
               evidence=format_evidence(step.evidence) if not distrust else "")
    recorded = finish(loop, row, log, started, sum(r.wall for r in made_here))
    loop.prune_compile_caches()
    line = outcome_line(recorded["status"], val, note, log, previous_best, step.evidence, loop.best_val)
    if recorded["status"] != status:  # a worker's keep that another worker's keep overtook (workers.py)
        line += f"; {recorded['note'].split('; ')[0]}"
    return line


def load_share(run):
    """The share of the run's cores the harness saw other work take, or None where it cannot measure it (a run
    from before the share was recorded: over the cores this process may use)."""
    if run.load is not None or run.other_cores is None:
        return run.load
    return run.other_cores / counted_cores()


def observed(run):
    """A finished run as the keep rule sees it."""
    return Obs(run.val, run.speed, run.seed, load_share(run))


def read_pending(loop):
    """The experiment a `step` left undecided at its time limit, or None. The tree must still hold it."""
    pending = read_json(loop.pending_path)
    if pending is None:
        return None
    if head() != pending["commit"] or changed_since(pending["commit"]):
        raise LoopError(f"experiment #{pending['n']} ({pending['commit'][:7]}) is still being confirmed, but "
                        f"{'HEAD moved' if head() != pending['commit'] else f'{TRAIN} was edited'} since. Fix: "
                        f"save your edit (`cp {TRAIN} /tmp/next_train.py`), `git reset -q --hard "
                        f"{pending['commit'][:7]}`, run `uv run agent_loop.py step` until #{pending['n']} is "
                        f"decided, then bring your edit back")
    return pending


def verdict(step, done, loop):
    """(status, val_bpb, note) of a decided experiment: the rule's decision, or the crash that ended it."""
    cand = [r for kind, r in done if kind == "candidate" and not r.error]
    val = statistics.fmean(r.val for r in cand) if cand else 0.0
    crashed = next(((kind, r) for kind, r in done if r.error), None)
    if any(r.tampered or r.edited_code or r.read_val for _, r in done):  # untrusted() says which files
        return "discard", val, "discard: a run wrote outside train.py or read the validation split"
    if step.action == "crash":
        first = crashed[1]
        return "crash", 0.0, f"crash: {first.error}" + "".join(f" | {t.strip()}" for t in first.tail[:-1])
    if crashed and step.action == "discard" and "crashed" in step.note:
        kind, r = crashed
        who = "the best's re-run" if kind == "best" else "a confirmation run"
        return "discard", val, f"discard: {who} (seed {r.seed}) crashed: {r.error}"
    seeds = ",".join(str(r.seed) for kind, r in done)
    if step.note.startswith(REJECTED):  # its runs are no measurement: the note's first word says so
        return "discard", val, f"{step.note} (seeds {seeds})"
    return step.action, val, f"{step.action}: {step.note} (seeds {seeds})"


def broken_rules(changed, best, modules=()):
    """(what the proposal did that only train.py may do, how to undo each): other files changed, untracked
    modules (that train.py could import) changed, train.py deleted or made a symlink."""
    why, fixes = [], []
    if modules:
        why.append(f"changed untracked modules {', '.join(modules)} (only {TRAIN} may change)")
        fixes.append("move them out of the repository (or commit them on a branch of your own)")
    if symlinked_train():
        why.append(f"made {TRAIN} a symlink")
        fixes.append(f"replace it with a regular file: `git checkout {best} -- {TRAIN}`")
    others = sorted(changed - {TRAIN})
    if others:
        why.append(f"changed {', '.join(others)} (only {TRAIN} may change)")
        fixes.append(f"set them aside with `git stash push -- {' '.join(others)}` (or undo them with "
                     f"`git checkout {best} -- {' '.join(others)}`)")
    if not Path(TRAIN).exists():
        why.append(f"deleted {TRAIN}")
        fixes.append(f"restore {TRAIN} with `git checkout {best} -- {TRAIN}`")
    return why, fixes


def best_run(loop, sha, seed, log, flight):
    """One run of the best's train.py, checked out in place of the candidate's for the run and put back
    after (reconcile puts it back too, if the loop is killed meanwhile)."""
    with open(log, "a") as f:
        f.write(f"\n===== the best, #{loop.best['n']} ({loop.best['commit']}), runs again for a pair =====\n")
    git("checkout", loop.best_commit, "--", TRAIN)
    try:
        # the version the ledger measured (the file's own for a ledger from before the column)
        version = loop.best.get("train_py") or blob_hash(Path(TRAIN).read_bytes())
        return sealed_run(loop, seed, log, flight, version)
    finally:
        git("checkout", sha, "--", TRAIN)


def sealed_run(loop, seed, log, flight, version):
    """train_once, noting in run.tampered what the run wrote besides train.py (even if it changed it back; the
    repository's modules' bytecode too, compiled again), which untracked modules it created or changed (set aside
    beside the log), train.py itself if the run rewrote it (the next run would be other code under the same
    commit), files in another version's compile cache, and in the evaluator's (seal.HarnessFolder). A worker of
    `--executor ray` has the run made on a node of the cluster, which checks the same (rayexec.run_on_node)."""
    code, code_ctime = Path(TRAIN).read_bytes(), os.lstat(TRAIN).st_ctime_ns
    if blob_hash(code) != version:  # the runs are recorded under version: the file must be it, byte for byte
        raise LoopError(f"the {TRAIN} about to run ({blob_hash(code)}) is not the version its runs would be "
                        f"recorded under ({version}); nothing was run. Fix: stop what wrote it since it was checked "
                        f"out (a process left running?), or remove what changes {TRAIN} between git and the file "
                        f"(a filter or end-of-line rule in .gitattributes, .git/info/attributes or .git/config), "
                        f"then run again")
    pinned, folder = loop.config.get("train_data"), metric_folder(loop.config)
    changed = [name for name, stamp in (pinned or {}).items() if file_stamps(folder, [name])[name] != stamp]
    if changed:  # an agent between two steps garbled them for the best's re-runs alone, say
        raise LoopError(f"the training data of tag {loop.tag} changed since init ({', '.join(changed)} in "
                        f"{folder}): no run now trains on the data the best's runs did; nothing was run. Fix: "
                        f"prepare it again if it is damaged (`uv run prepare.py`), and start a new tag with `init`")
    if getattr(loop.link, "remote", False):
        return loop.link.run_remote(loop, seed, log, version)
    # forced before every run (0.3 s): a resumed step's runs and a worker's too never load what was left there
    modules = untracked_modules()
    bytecode = module_bytecode(force=True, untracked=modules)
    times = write_times([*modules, *bytecode])
    cache = loop.compile_cache(version)
    caches = loop.other_compile_caches(version)
    run = train_once(loop.config, loop.timeout, seed, log, flight.spawned, cache, loop.evaluator_cache,
                     loop.installed_code, loop.private_dir)
    after = loop.other_compile_caches(version)
    written, created = written_since(times), changed_modules(modules, untracked_modules())
    # no later import may load what the run left: forged bytecode is compiled again, new modules set aside
    if set(written) & set(bytecode):
        module_bytecode(force=True)
    set_aside(created, Path(log).with_name(f"{Path(log).stem}-set-aside"))
    run.tampered = sorted(set(run.tampered) | set(written) | set(created)
                          | ({TRAIN} if not Path(TRAIN).is_file() or Path(TRAIN).read_bytes() != code
                             or os.lstat(TRAIN).st_ctime_ns != code_ctime else set())
                          | {p for p in set(caches) | set(after) if caches.get(p) != after.get(p)})
    return run


def outside_budget(loop, run):
    """The error for a candidate run that spent far longer outside its reported training time than the
    baseline's runs did, by the harness's clock, else None. Start-up and compile are not in the budget, and only
    train.py says where they end: a train.py that trains past the budget and reports less must hide the rest
    there. Allowed: 1.5x the baseline's longest (its first run compiles cold; a loaded machine compiles slower)
    plus max(5 s, min(budget, 30 s), 10% of the budget). After the run first opened its training data (compile
    comes before that, compile_before_data) there is less to hide in: its first, untimed steps and the hand-over
    (torch.export, longer for a larger graph and on a busy machine). Allowed there: 2x the baseline's longest,
    over the square of the share of the cores other work left the run (at least half: a machine made busy on
    purpose buys at most 4x; two threads on two cores slow down more than the cores they lose), plus max(2 s,
    5% of the budget). A run that never opened the training data where the baseline's did (it trained on a copy
    the agent made, say) has all its time outside counted there."""
    budget, free = float(loop.config["time_budget"]), 1 - min(run.load or 0.0, 0.5)
    after_data, where_data = run.outside_after_data, (
        "after it first opened the training data (its first steps, the hand-over; compile before the data, as "
        "compile_before_data does)")
    if run.opened_data is False:
        after_data, where_data = run.outside, (
            "and it never opened the training data, which the baseline's runs did right after compiling: all "
            "of it counts as after the data")
    for column, spent, scale, slack, where in (
            ("outside_s", run.outside, 1.5, max(5.0, min(budget, 30.0), 0.1 * budget),
             "(start-up, compile, hand-over)"),
            ("after_data_s", after_data, 2.0 / free ** 2, max(2.0, 0.05 * budget), where_data)):
        base = [x for x in map(to_float, loop.rows[0].get(column, "").split(",")) if x is not None]
        if not base or spent is None or (column == "after_data_s" and loop.worker):
            continue  # a tag started before the column, a baseline that opened no training data (or a run,
            # where the watch could not tell), or one of several workers: inotify does not say who opened the
            # data, and another worker's run counts too
        allowed = scale * max(0.0, *base) + slack
        if spent > allowed:
            return (f"ran {spent:.0f} s outside the {budget:g} s of training it reports {where}, the "
                    f"baseline's runs at most {max(base):.0f} s (allowed {allowed:.0f} s): training past the budget "
                    f"cannot be told apart from that")
    return None


def untrusted(loop, n, sha, runs):
    """The note that rejects a finished run whose number cannot be trusted, else None."""
    got = runs[0].summary.get("profile")
    if got and got != loop.config["profile"]:
        return f"{REJECTED}: ran profile {got}, expected {loop.config['profile']}"
    dirty = changed_since(sha)
    if dirty:  # train.py wrote to tracked files while it ran: its number cannot be trusted
        return (f"{REJECTED}: {TRAIN} changed {', '.join(sorted(dirty))} while running"
                + (f"; saved at {loop.ref(f'discarded/{n}')}" if n else ""))  # (n 0: the baseline, not saved)
    edited = sorted({p for r in runs for p in r.edited_code})
    if edited:
        return (f"{REJECTED}: the evaluator ran code edited since the tag's first evaluation (between runs): "
                f"{', '.join(edited)}; {INSTALLED_FIX}")
    written = sorted({p for r in runs for p in r.tampered})
    if written:
        return f"{REJECTED}: {TRAIN} wrote {', '.join(written)} while running (even if it changed them back)"
    read = sorted({p for r in runs for p in r.read_val or ()})
    if read:
        return (f"{REJECTED}: {TRAIN} opened the validation split while running ({', '.join(read)}): val_bpb is "
                f"measured on that text, and under the harness train.py needs none of it (the evaluator scores "
                f"the model it hands over)")
    return None


def heldout_gap(runs, worst=False):
    """The mean (or the lowest) of the runs' val_bpb / heldout_bpb - 1 (negative: the pinned rows score
    better), or None."""
    gaps = [r.heldout_gap for r in runs if r.heldout_gap is not None]
    return (min(gaps) if worst else statistics.fmean(gaps)) if gaps else None


def leaked(loop, runs, best_runs=()):
    """The note that rejects a candidate one of whose runs scores the pinned val rows far better than the
    held-out slice of val, compared with the best and with the baseline (the higher of the two, so that small
    steps cannot walk the bar down keep by keep; for a best from before the column, its re-runs made here):
    what training on the validation rows does, not a better model. Else None."""
    gap, best_gap = heldout_gap(runs, worst=True), to_float(loop.best.get("heldout_gap"))
    tolerance = LEAK_TOLERANCE
    best_gap = heldout_gap(best_runs) if best_gap is None else best_gap
    best_gap = max([g for g in (best_gap, to_float(loop.rows[0].get("heldout_gap"))) if g is not None],
                   default=None)
    if gap is None or best_gap is None or gap >= best_gap - tolerance:
        return None
    return (f"{REJECTED}: its val_bpb on the pinned val rows over its val_bpb on the held-out slice of val is "
            f"{1 + gap:.3f}, against {1 + best_gap:.3f} (the best's or the baseline's, the higher): the pinned rows "
            f"improved far more than val text no "
            f"run may see, a sign of training on the validation rows (allowed drop {tolerance:g})")


def reject(loop, n, best, description, why, started, note_extra):
    """The proposal changed files other than train.py (or deleted it): save all of it under a ref,
    restore them, and record a row that says so (no training run)."""
    dirty = changed_since("HEAD")
    sha = commit(sorted(dirty), f"[rejected] {description}") if dirty else head()
    log = str(loop.dir / f"{n:03d}-{sha[:7]}.log")
    write_log_header(loop, log, n, sha, best, description)
    ref = loop.ref(f"discarded/{n}")
    note = f"{REJECTED}: {why}; saved at {ref}, restore a file with `git checkout {ref} -- FILE`{note_extra}"
    train_py = blob_hash(Path(TRAIN).read_bytes()) if Path(TRAIN).exists() else ""
    row = experiment_row(loop, n, sha, "discard", description, [], 0.0, note, log, train_py)
    finish(loop, row, log, started, 0.0)
    return outcome_line("discard", 0.0, note, log, None, None, None)


# -----------------------------------------------------------------------------
# Recording: the log, the row, keep or reset


def write_log_header(loop, log, n, sha, best, description):
    diff = git("diff", best, sha, "--", TRAIN) if sha != best else ""
    with open(log, "a", errors="replace") as f:
        f.write(f"experiment #{n} on {loop.branch}: {description}\n"
                f"commit {sha}  parent best {best[:7]} (val_bpb {loop.best_val:.6f}, #{loop.best['n']})\n"
                f"profile {loop.config['profile']}  python {sys.executable}  {now_iso()}\n"
                f"\n{diff or '(no diff to train.py)'}\n")


def run_columns(runs, prefix=""):
    """The ledger's columns of a list of runs: every seed, and the values, speeds, time outside the budget and
    other work on the machine of those that finished (decide.row_runs reads values and speeds back)."""
    ok = [r for r in runs if not r.error]
    return {prefix + "seeds": ",".join(str(r.seed) for r in runs),
            prefix + "val_bpb_runs": ",".join(f"{r.val:.6f}" for r in ok),
            prefix + "tokens_per_s": ",".join(f"{r.speed or 0:.0f}" for r in ok),
            prefix + "outside_s": ",".join(f"{r.outside:.1f}" for r in ok if r.outside is not None),
            prefix + "after_data_s": ",".join(f"{r.outside_after_data:.1f}" for r in ok
                                              if r.outside_after_data is not None),
            prefix + "other_cores": ",".join(f"{r.other_cores:.2f}" for r in ok if r.other_cores is not None)}


def experiment_row(loop, n, sha, status, description, runs, val, note, log, train_py):
    ok = [r for r in runs if not r.error]
    first = ok[0].summary if ok else {}
    memory = max((to_float(r.summary.get("peak_vram_mb")) or 0.0 for r in ok), default=0.0) / 1024
    return {"commit": short(sha), "sha": sha, "val_bpb": f"{val:.6f}",
            "memory_gb": f"{memory if status != 'crash' else 0:.1f}",
            "status": status, "description": description, "tag": loop.tag, "n": str(n), **run_columns(runs),
            "training_seconds": first.get("training_seconds", ""),
            "total_seconds": first.get("total_seconds", ""),
            "mfu_percent": first.get("mfu_percent", ""), "num_steps": first.get("num_steps", ""),
            "profile": first.get("profile", loop.config["profile"]), "train_py": train_py,
            "timestamp": now_iso(), "log": log, "note": "; ".join(dict.fromkeys([note] + [x for r in runs for x in r.notes])),
            "heldout_gap": "" if heldout_gap(ok) is None else f"{heldout_gap(ok):.4f}"}


def finish(loop, row, log, started, train_wall):
    """Write the row, then keep (branch stays) or save under refs/ and reset; explain in the log. Returns the
    row as recorded."""
    row["loop_s"] = f"{time.monotonic() - started - train_wall:.2f}"
    base = loop.best_commit
    if loop.link:  # the coordinator records it; a keep whose base is no longer the best becomes a discard
        row = loop.link.record(dict(row, worker=str(loop.worker)), base=base, sha=head())
    else:
        append_row(row)
    loop.rows.append(row)
    loop.remember_modules()
    sha = git("rev-parse", "HEAD")
    if row["status"] == "keep":
        after = f"branch {loop.branch} now at {row['commit']} (new best)"
    else:
        ref = save_and_reset(loop, f"discarded/{row['n']}", f"[{row['status']} #{row['n']}] {row['description']}")
        after = f"saved at {ref}; branch reset to the best {loop.best['commit']}"
        sha = git("rev-parse", ref) if ref else sha
        render_results()  # the reset deletes results.tsv and logs/ if the proposal had added them to git
        if not loop.worker:  # a worker's logs are in the main checkout, out of the reset's reach
            restore_logs(loop.rows[:-1])
    overhead = time.monotonic() - started - train_wall
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"\n===== decision =====\n{row['note']}\n{after}\n"
                f"loop overhead {overhead:.2f} s (git, parsing, logging; excludes training and the agent)\n")
    keep_copies(loop.tag, row["n"], log, sha, base)
    return row


# -----------------------------------------------------------------------------
# The baseline: experiment #0


def run_baseline(loop, repeats):
    """The unchanged train.py, `repeats` times with seeds base, base+1, ...: the baseline and the first
    estimate of the run-to-run noise (the best's re-runs improve it all night). An interrupted baseline is not
    resumed but run again by init, so its running.json goes on a stop too."""
    started, sha = time.monotonic(), head()
    version = git("rev-parse", f"{sha}:{TRAIN}")[:12]  # the commit's: every run must be it, byte for byte
    module_bytecode(force=True)  # a fresh clone has none: else the evaluator's imports write it during a run
    edited = loop.installed_code.edited()  # this tag's record, or an earlier tag's under the same uv.lock
    if edited:
        print(f"code the evaluator runs differs from what earlier evaluations ran under this uv.lock: "
              f"{', '.join(edited)}; nothing was run. Fix: {INSTALLED_FIX}, then run "
              f"`uv run agent_loop.py init --tag {loop.tag}` again", file=sys.stderr)
        return 1
    log = str(loop.dir / f"000-{sha[:7]}.log")
    with open(log, "a") as f:
        f.write(f"baseline of {loop.branch}: {repeats} run(s) of commit {sha}\n")
    with InFlight(loop, resumable=False) as flight:
        flight.mark(n=0, phase="train", commit=sha, log=log, baseline=True)
        runs = []
        for i in range(repeats):
            seed = loop.config["base_seed"] + i
            # sealed as every later run is: the baseline's runs are what every change is measured against (a
            # red team's process put a train.py with tiny learning rates in place for them alone, and a
            # comment-only change was kept, -56%)
            try:
                run = sealed_run(loop, seed, log, flight, version)
            except LoopError as e:
                print(f"the baseline was not run: {e}", file=sys.stderr)
                return 1
            distrust = None if run.error else untrusted(loop, 0, sha, [run])
            if distrust:
                run.error = (f"{distrust}. A baseline must be the commit as it is: stop what changed it, put back "
                             f"what it changed (`git status`, `git checkout {sha[:7]} -- FILE`)")
            print(f"baseline run {i + 1}/{repeats} seed {run.seed}: "
                  + (f"val_bpb={run.val:.6f}" if not run.error else f"crash {run.error}"), flush=True)
            if run.error:
                print(f"the baseline crashed: {run.error}\n" + "\n".join(run.tail) + f"\nlog: {log}\n"
                      f"Fix the cause, then run `uv run agent_loop.py init --tag {loop.tag}` again (it resumes).",
                      file=sys.stderr)
                return 1
            runs.append(run)
        train_wall = sum(r.wall for r in runs)
        loop.rows = [experiment_row(loop, 0, sha, "keep", "baseline", runs,
                                    statistics.fmean(r.val for r in runs), "", log, version)]
        sigma = statistics.stdev(r.val for r in runs) if repeats > 1 else None
        noise = (f"sigma {sigma:.6f} from {repeats} runs" if sigma is not None else
                 "1 run: the noise is unknown, so nothing can be judged on one run yet; the first experiment "
                 "that looks better is confirmed by pairs, which measure it")
        row = loop.rows[0]
        unchecked = (["no held-out slice (the val split is too small to spare one): training on the val rows is not "
                      "detected"] if loop.config.get("harness_eval") and heldout_gap(runs) is None else [])
        row["note"] = "; ".join(dict.fromkeys([f"baseline: {noise}; took {train_wall:.0f} s"] + unchecked
                                              + [x for r in runs for x in r.notes]))
        row["loop_s"] = f"{time.monotonic() - started - train_wall:.2f}"
        append_row(row)
    loop.remember_modules()
    with open(log, "a") as f:
        f.write(f"\n===== baseline =====\n{row['note']}\n")
    keep_copies(loop.tag, 0, log, sha)
    say(loop, f"baseline val_bpb={float(row['val_bpb']):.6f} runs={row['val_bpb_runs']} {noise} "
              f"({train_wall:.0f} s) log={log}")
    print(f"next: `uv run agent_loop.py run --agent mutate` (or an LLM agent: run --help), or point a coding "
          f"agent at {PROGRAM}")
    return 0
