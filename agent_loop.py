"""
agent_loop.py: the experiment loop of autoresearch. One experiment = one change to train.py: commit it,
train for the fixed time budget, keep it only if val_bpb beats the best kept result by more than the
measured noise, else save the commit under refs/autoresearch/TAG/ and move the branch back. Every
experiment is a row in results.tsv and a log in logs/TAG/; the loop resumes after any kill.

    uv run agent_loop.py demo                          # offline demo in a disposable worktree (smoke profile)
    uv run agent_loop.py init --tag mar5               # branch autoresearch/mar5 + baseline runs (noise)
    uv run agent_loop.py run --agent mutate            # autonomous loop; or --agent "claude -p ..." (run --help)
    uv run agent_loop.py run --agent mutate --workers auto   # one experiment per GPU at a time (or --workers N)
    uv run agent_loop.py step -m "raise MATRIX_LR"     # one experiment, for a coding agent following program.md
    uv run agent_loop.py report [--json] [--plot progress.png]
    uv run agent_loop.py hub --listen 127.0.0.1:8080   # a hub that many loops share (program_hub.md)
"""
# The command line only: what each command does lives in the modules of autoresearch/ (listed in
# autoresearch/__init__.py). Python puts this file's directory on sys.path, so they import from any cwd; last,
# not first: the checkout is the agent's, and a json.py or argparse.py left in it stood in for the standard
# library's inside the loop (a red team's rewrote the candidate's val_bpb before the row was written).
import sys

sys.path.append(sys.path.pop(0))

import argparse
import math
import json
import os
import re
import signal
import time
from pathlib import Path

from autoresearch.demo import run_demo
from autoresearch.experiment import STEP_LIMIT_S, confirm, read_pending, run_baseline, run_experiment
from autoresearch.gitrepo import current_branch, ensure_ignored, git, git_root, head, row_commit, short
from autoresearch.handoff import dumpable
from autoresearch.hubstore import Limits
from autoresearch.layout import BRANCH_PREFIX, LOGS_DIR, RESULTS, LoopError
from autoresearch.ledger import (as_last_written, best_row, ensure_results_header, put_back, refuse_another_ledger,
                                 tag_rows)
from autoresearch.preflight import check_clean, check_position, setup_problems, shared_environment
from autoresearch.process import Stop, raise_stop
from autoresearch.proposers import make_proposer
from autoresearch.report import default_results_path, format_report, pending_of, plot, rows_of_run, summarize
from autoresearch.resume import open_loop, save_failed_proposal, stop_cleanly
from autoresearch.runner import default_timeout
from autoresearch.state import InFlight, Loop, lock, pin_config, say
from autoresearch.workers import cores_per_run, pin_cores, run_workers

DEFAULT_REPEATS = 3                          # baseline runs: a first estimate of the noise
AGENT_TIMEOUT_S = 1800
MAX_AGENT_FAILURES = 3                       # consecutive: a broken agent command must not spin all night

AGENT_HELP = """\
--agent CMD runs CMD with `sh -c` in the repo root once per experiment, with a fresh context each
time. The prompt (program.md + the results so far + the best diff + the last crash's log tail) is
on stdin and in the file $AUTORESEARCH_PROMPT_FILE. CMD must edit train.py only and exit; the last
non-empty line of its stdout becomes the experiment's description. Working invocations:

  run --agent 'claude -p --dangerously-skip-permissions'      # Claude Code (a non-root user); or
  run --agent 'claude -p --permission-mode acceptEdits'       #   only allow file edits
  run --agent 'codex exec --sandbox workspace-write -'        # Codex CLI ('-' = prompt from stdin;
                                                              #   older versions: --full-auto)
  run --agent 'aider --yes-always --no-git --message-file "$AUTORESEARCH_PROMPT_FILE" train.py'
  run --agent mutate                                          # built-in offline proposer, no LLM

The loop (not the agent) commits, trains, decides and resets; it also kills the agent after
--agent-timeout seconds. Stop with Ctrl-C: the branch is left at the best commit.
"""

# -----------------------------------------------------------------------------
# Subcommands


def cmd_init(args):
    os.chdir(git_root())
    tag = args.tag or time.strftime("%b").lower() + str(int(time.strftime("%d")))
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", tag):
        raise LoopError(f"bad tag {tag!r}: use letters, digits, '.', '_' or '-' (e.g. `--tag mar5`)")
    if args.repeats < 1:
        raise LoopError(f"--repeats {args.repeats}: the baseline needs at least one run (2 or more measure "
                        f"the noise)")
    refuse_another_ledger(tag)
    branch = BRANCH_PREFIX + tag
    resume = current_branch() == branch and best_row(tag_rows(tag)) is None
    problems = setup_problems(tag, resume)
    if problems:
        print("init: cannot start:\n" + "\n".join(f"  - {p}" for p in problems), file=sys.stderr)
        return 1
    ensure_ignored(RESULTS, f"{LOGS_DIR}/")
    if not resume:
        git("checkout", "-q", "-b", branch)
    lock(Path(LOGS_DIR) / tag)
    for note in put_back():  # before the loop writes any record: what else wrote them is put back first
        print(f"warning: {note}", file=sys.stderr)
    share = cores_per_run(args.workers)
    config = pin_config(tag, args.repeats, cores_per_run=share)
    pin_cores(config)
    ensure_results_header()
    if warning := shared_environment():
        print(warning, file=sys.stderr)
    loop = Loop(tag, config, [], args.timeout or default_timeout(config))
    print(f"{'resuming' if resume else 'created'} branch {branch} at {head()[:7]}; profile {config['profile']}, "
          f"dataset {config['dataset']}, budget {config['time_budget']} s, timeout {loop.timeout:.0f} s"
          + (f"; {share} CPU core(s) per run, for {args.workers} workers" if share else ""))
    try:
        return run_baseline(loop, args.repeats)
    except (KeyboardInterrupt, Stop):
        print("interrupted: run the same init command again to resume the baseline", file=sys.stderr)
        return 130


def cmd_step(args):
    started = time.monotonic()
    loop = open_loop(args.timeout, args.min_delta)
    pin_cores(loop.config)
    try:
        pending = read_pending(loop)
        if pending is None and not args.message:
            raise LoopError('step needs -m "what you changed" (one line)')
        check_position(loop, allow_ahead=True)
        with InFlight(loop) as flight:
            deadline = started + STEP_LIMIT_S
            if pending:
                line = confirm(loop, flight, pending, started, deadline)
            else:
                line = run_experiment(loop, flight, args.message, started, strict=True, deadline=deadline)
        say(loop, line)
    except (KeyboardInterrupt, Stop):
        stop_cleanly(loop)
    return 0


def cmd_run(args):
    loop = open_loop(args.timeout, args.min_delta)
    try:
        pending = read_pending(loop)
        if pending:  # left by a `step` that stopped at its time limit: decided first
            with InFlight(loop) as flight:
                say(loop, f"#{pending['n']} {confirm(loop, flight, pending, time.monotonic())}")
    except (KeyboardInterrupt, Stop):
        stop_cleanly(loop)
    if parallel(args):
        check_clean(loop)
        return run_parallel(loop, args)
    check_clean(loop)
    pin_cores(loop.config)
    proposer = make_proposer(args.agent, args.seed, args.agent_timeout)
    hub = open_hub(loop, args)
    if hub:
        from autoresearch.hubclient import HubFirst
        proposer = HubFirst(hub, proposer)
    t0, done, failures = time.monotonic(), 0, 0
    noise = loop.noise()
    sigma = f"{noise.sigma:.4f} (df {noise.df})" if noise.df else "unknown (no version has two comparable runs yet)"
    say(loop, f"run on {loop.branch}: agent {args.agent!r}, best val_bpb={loop.best_val:.6f} "
              f"({len(loop.rows) - 1} experiments so far), noise sigma {sigma}, timeout {loop.timeout:.0f} s")
    try:
        while args.max_experiments is None or done < args.max_experiments:
            if args.hours is not None and time.monotonic() - t0 >= args.hours * 3600:
                say(loop, f"time limit of {args.hours} h reached")
                break
            check_clean(loop)
            n, done = loop.next_n(), done + 1
            with InFlight(loop) as flight:
                flight.mark(n=n, phase="propose")  # from here on, a stop saves what the proposer wrote
                proposal = proposer.propose(loop, n, flight)
                check_ledger(loop, n)  # what the agent wrote there: the loop's rows stay the file's
                if proposal is None:
                    break
                if proposal.error:
                    failures += 1
                    ref = save_failed_proposal(loop, n)
                    say(loop, f"#{n} skip {proposal.error}; log={proposal.log}"
                              + (f"; its changes saved at {ref}" if ref else ""))
                    if failures >= MAX_AGENT_FAILURES:
                        say(loop, f"the agent failed {failures} times in a row: stopping. Check the command "
                                  f"by hand: `{args.agent} < {loop.dir / f'{n:03d}-prompt.md'}`")
                        return 1
                    continue
                failures = 0
                # the loop's overhead is counted from here: the proposer's time is not the loop's
                line = run_experiment(loop, flight, proposal.description, time.monotonic(), strict=False,
                                      untracked_new=proposal.untracked)
            say(loop, f"#{n} {line} | {proposal.description}")
            if hub and loop.rows[-1].get("n") == str(n):
                hub.publish(loop.rows[-1])
            if proposal.untracked:
                say(loop, f"#{n} note: the agent created untracked files (left in place): "
                          f"{', '.join(sorted(proposal.untracked))}")
    except (KeyboardInterrupt, Stop):  # the ledger is checked by the next command (resume.repair_records)
        stop_cleanly(loop)
    else:
        check_ledger(loop, None)
    say_done(loop)
    return 0


def check_ledger(loop, n):
    """What else wrote the ledger since the loop last did (ledger.put_back), put back, with a line."""
    for edited in put_back():
        say(loop, f"{f'#{n} ' if n is not None else ''}note: {edited}")


def parallel(args):
    """run --workers N (N > 1, or auto) or --gpus: experiments in parallel (autoresearch/workers.py)."""
    return bool(args.gpus) or args.workers not in (None, "1") or args.executor == "ray"


def open_hub(loop, args):
    """run --hub URL: the hub's client (registered on first use), or None without --hub."""
    if not args.hub:
        return None
    from autoresearch.hubclient import HubClient  # requests: only a hub's client needs it
    trust = set(filter(None, args.hub_trust.split(","))) if args.hub_trust else None
    hub = HubClient(args.hub, loop, args.hub_platform, trust)
    say(loop, f"hub: {hub.url} as platform {hub.platform}; better commits of "
              + (", ".join(sorted(trust)) if trust else "any agent on the hub (--hub-trust limits that)")
              + " are tried here")
    hub.publish()  # what the hub has not had yet: the baseline, a night run without --hub or while it was down
    return hub


def run_parallel(loop, args):
    hub = open_hub(loop, args)
    say(loop, f"run on {loop.branch} with workers: agent {args.agent!r}, best val_bpb={loop.best_val:.6f} "
              f"({loop.next_n() - 1} experiments so far), timeout {loop.timeout:.0f} s")
    try:
        lines, gave_up = run_workers(loop, args, hub)
    except (KeyboardInterrupt, Stop):
        stop_cleanly(loop)
    for line in lines:
        say(loop, line)
    say_done(loop)
    return 1 if gave_up else 0


def say_done(loop):
    s = summarize(loop.rows)
    say(loop, f"done: {s['experiments']} experiments, {s['keeps']} kept; best val_bpb={s['best']['val_bpb']:.6f} "
              f"at {s['best']['commit']} ({s['best']['description']}); see `uv run agent_loop.py report`")


def cmd_report(args):
    path, own_path = args.results or args.path, default_results_path()
    own = path is None or Path(path).resolve() == Path(own_path).resolve()
    path, text = path or own_path, None
    ledger = as_last_written() if own and git("rev-parse", "--git-dir", check=False) else None
    if ledger:  # the loop's rows, not the checkout's rendering of them, which anyone may have edited since
        if current_branch().startswith(BRANCH_PREFIX):
            refuse_another_ledger(current_branch()[len(BRANCH_PREFIX):])
        shown = Path(path).read_text(errors="replace") if Path(path).is_file() else None
        if shown != ledger[1]:
            print(f"warning: {path} differs from the rows the loop last wrote: the report reads those "
                  f"({ledger[0]}; the loop's next command writes {RESULTS} again)", file=sys.stderr)
            path = ledger[0]
        text = ledger[1]
    s = summarize(rows_of_run(path, args.tag, text))
    s["pending"] = pending_of(s["tag"]) if own else None
    if own and s["tag"] and s["best"]:
        warn_branch_not_at_best(BRANCH_PREFIX + s["tag"], s["best"])
    if args.json:
        print(json.dumps({"results": path, **s}, indent=1))
    else:
        print(format_report(s, path))
    if args.plot:
        plot(s, args.plot)
        print(f"plot: {args.plot}", file=sys.stderr if args.json else sys.stdout)
    return 0


def warn_branch_not_at_best(branch, best):
    """A line when the tag's branch is not at its best commit (best: the report's, with its short and full
    id): the morning's code is the best's, whatever moved the branch after the loop's last command."""
    tip = git("rev-parse", "-q", "--verify", f"refs/heads/{branch}", check=False)
    try:
        best = row_commit(best, within=branch)
    except LoopError:
        return
    if tip is None or tip == best:
        return
    if git("merge-base", "--is-ancestor", best, tip, check=False) is not None:
        where = "past the best: a change not judged yet, or one being confirmed"
    else:
        where = (f"neither at the best nor past it (moved since). Fix: `git checkout {branch} && "
                 f"git reset --keep {best}`")
    print(f"warning: {branch} is at {short(tip)}, {where}; the best's code is {short(best)}", file=sys.stderr)


def cmd_demo(args):
    """prepare (synthetic) + init + run --agent mutate + report, on the smoke profile, in a
    disposable worktree on a new branch: the user's checkout and branch are never touched."""
    return run_demo(os.path.abspath(__file__), args.experiments)


def cmd_hub(args):
    """Serve the hub until Ctrl-C (autoresearch/hub.py)."""
    from autoresearch.hub import serve  # starlette and uvicorn: only the hub needs them
    serve(args.listen, args.data, Limits(**{name: getattr(args, name) for name in vars(Limits())}))
    return 0


# -----------------------------------------------------------------------------
# Command line


def positive(kind, unit):
    """An argparse type: a finite number of `kind` above 0 (argparse names the flag in its error)."""
    return bounded(kind, unit, lambda x: x > 0, "greater than 0")


def non_negative(kind, unit):
    return bounded(kind, unit, lambda x: x >= 0, "0 or more")


def bounded(kind, unit, allowed, words):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of {unit}") from None
        if not math.isfinite(value) or not allowed(value):
            raise argparse.ArgumentTypeError(f"{text} {unit}: must be a finite number {words}")
        return value
    parse.__name__ = kind.__name__  # argparse's own messages say "invalid int value"
    return parse


def workers_count(text):
    """--workers: auto, or a whole number of workers from 1."""
    if text == "auto" or (text.isdigit() and int(text) >= 1):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: give a number of workers from 1, or auto (one per visible GPU)")


def build_parser():
    p = argparse.ArgumentParser(prog="agent_loop.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    init = sub.add_parser("init", help="create branch autoresearch/TAG, check the setup, run the baseline")
    init.add_argument("--tag", help="run name; branch autoresearch/TAG (default: today, e.g. mar5)")
    init.add_argument("--repeats", type=int, default=DEFAULT_REPEATS,
                      help=f"baseline runs with seeds 42, 43, ... to measure noise (default {DEFAULT_REPEATS})")
    init.add_argument("--workers", type=workers_count, metavar="N",
                      help="on a machine without GPUs: the tag's runs will be made by N parallel workers, so each "
                           "run (the baseline's too) gets 1/N of the cores, and all of them compare")
    init.add_argument("--timeout", type=positive(float, "seconds"),
                      help="hard limit per train.py run, s (default max(2*budget, budget+120))")
    init.set_defaults(func=cmd_init)

    decide_flags = argparse.ArgumentParser(add_help=False)
    decide_flags.add_argument("--min-delta", type=non_negative(float, "val_bpb"), default=0.0,
                              help="keep only an improvement shown to be larger than this, in val_bpb "
                                   "(default 0: any improvement the runs show beyond the noise)")
    decide_flags.add_argument("--timeout", type=positive(float, "seconds"),
                              help="hard limit per train.py run, s (default max(2*budget, budget+120): "
                                   "600 s at the reference budget)")

    step = sub.add_parser("step", parents=[decide_flags],
                          help="commit the change to train.py, run it, keep or reset; print one line")
    step.add_argument("-m", "--message", help="one-line description of the change (not needed to go on "
                                               "confirming an experiment)")
    step.set_defaults(func=cmd_step)

    run = sub.add_parser("run", parents=[decide_flags], help="the autonomous loop", epilog=AGENT_HELP,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--agent", required=True, help="'mutate' or a shell command (see below)")
    run.add_argument("--max-experiments", type=non_negative(int, "experiments"),
                     help="stop after N iterations (default: until Ctrl-C)")
    run.add_argument("--hours", type=positive(float, "hours"), help="start no new experiment after H hours")
    run.add_argument("--agent-timeout", type=positive(float, "seconds"), default=AGENT_TIMEOUT_S,
                     help=f"s (default {AGENT_TIMEOUT_S})")
    run.add_argument("--seed", type=int, default=0, help="mutate's random seed (default 0)")
    run.add_argument("--workers", type=workers_count, metavar="N|auto",
                     help="experiments in parallel, each in a worktree of its own (worktrees/TAG-wK) on a device "
                          "of its own: one GPU each while there are enough, else an equal share of the CPU cores; "
                          "auto: one per visible GPU (default 1: this checkout, no worktree)")
    run.add_argument("--gpus", metavar="IDS", help="one worker per listed GPU, e.g. 0,1,3 (as CUDA_VISIBLE_DEVICES "
                                                   "numbers them)")
    run.add_argument("--executor", choices=("local", "ray"), default="local",
                     help="local: workers train on this machine (default); ray: each run is a Ray task on a cluster, "
                          "one GPU each (program and ledger stay here; `uv sync --group ray`)")
    run.add_argument("--address", metavar="HOST:PORT", help="the Ray cluster (default: a local Ray on this machine)")
    run.add_argument("--hub", metavar="URL", help="share results and keeps with a hub, and try its better commits "
                                                   "(program_hub.md)")
    run.add_argument("--hub-platform", metavar="NAME", help="what this machine's val_bpb is comparable with on the "
                                                            "hub (default: accelerator.profile.dataset)")
    run.add_argument("--hub-trust", metavar="IDS", help="adopt only commits of these hub agents (comma-separated; "
                                                         "default: any agent registered on the hub)")
    run.set_defaults(func=cmd_run)

    report = sub.add_parser("report", help="summary of results.tsv (ours or upstream's 5 columns)")
    report.add_argument("path", nargs="?", help="results.tsv to read (default: the repo's)")
    report.add_argument("--results", help="same as PATH")
    report.add_argument("--json", action="store_true", help="machine-readable, for agents")
    report.add_argument("--plot", metavar="FILE.png", help="write a progress plot")
    report.add_argument("--tag", help="which run of a results.tsv with several (default: the current branch's)")
    report.set_defaults(func=cmd_report)

    demo = sub.add_parser("demo", help="offline end-to-end demo (smoke profile) in a disposable worktree")
    demo.add_argument("--experiments", type=positive(int, "experiments"), default=3,
                      help="mutate experiments (default 3)")
    demo.set_defaults(func=cmd_demo)

    hub = sub.add_parser("hub", help="serve a hub that many loops share (agenthub-compatible API, program_hub.md)")
    hub.add_argument("--listen", default="127.0.0.1:8080", help="HOST:PORT (default 127.0.0.1:8080)")
    hub.add_argument("--data", default="hub-data", help="its database and git repository (default hub-data)")
    for name, value in vars(Limits()).items():
        unit = {"bundle_mb": "MiB", "post_chars": "characters", "channels": "channels on the hub",
                "registrations": "per client address per hour"}.get(name, "per agent per hour")
        hub.add_argument(f"--max-{name.replace('_', '-')}", dest=name, default=value,
                         type=positive(type(value), unit), help=f"limit (default {value:g} {unit})")
    hub.set_defaults(func=cmd_hub)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    # other processes of the user's (the agent's, left running) cannot open the loop's pipes and files through
    # /proc/PID/fd, nor its memory: its word to the evaluator, a worker's pipe
    dumpable(False)
    signal.signal(signal.SIGTERM, raise_stop)
    try:
        return args.func(args)
    except LoopError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Stop):  # commands with work to save catch this themselves; the rest just stop
        print("\nstopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
