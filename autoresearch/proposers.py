"""
Proposers: what makes the change to train.py that an experiment measures. Two kinds behind one interface,
`propose(loop, n, flight)`: edit train.py in the working tree and return a Proposal (description, error or
None, untracked files it created), or None when there is nothing new left to try (having said why).

    Mutate        --agent mutate: one seeded change of one hyperparameter, offline, no LLM (mutate.py)
    AgentCommand  --agent CMD: an external coding agent, run with a fresh prompt for each experiment
"""
import os
import random
from pathlib import Path
from typing import NamedTuple

from autoresearch.gitrepo import current_branch, git, row_commit, tree_status
from autoresearch.layout import PROGRAM, RESULTS, TRAIN
from autoresearch.ledger import LEDGER_ENV, measured_versions, one_line, render_results
from autoresearch.mutate import propose_mutation
from autoresearch.process import run_group
from autoresearch.report import format_report, summarize
from autoresearch.state import say

PROMPT_DIFF_LINES = 200
CRASH_TAIL_LINES = 40


class Proposal(NamedTuple):
    """What a proposer did: train.py in the working tree holds the change."""
    description: str
    error: str = None                   # it failed: the experiment is skipped and its edits saved
    untracked: frozenset = frozenset()  # new files git does not track: left in place, noted in the row
    log: str = None                     # where its own error output went


def make_proposer(agent, seed, timeout):
    """--agent: 'mutate', or a shell command."""
    return Mutate(seed) if agent == "mutate" else AgentCommand(agent, timeout)


# -----------------------------------------------------------------------------
# mutate


class Mutate:
    """The built-in offline proposer: seeded by (--seed, tag, experiment number), so a run is
    reproducible, and never a train.py that was measured before."""

    def __init__(self, seed):
        self.seed = seed

    def propose(self, loop, n, flight):
        rng = random.Random(f"{self.seed}/{loop.tag}/{n}")
        proposal = propose_mutation(Path(TRAIN).read_text(), loop.config["profile"],
                                    loop.config.get("max_seq_len"), rng, measured_versions(loop.rows))
        if proposal is None:
            say(loop, "mutate: no untried mutation left; stopping")
            return None
        source, description = proposal
        Path(TRAIN).write_text(source)
        return Proposal(description)


# -----------------------------------------------------------------------------
# An external coding agent


class AgentCommand:
    """A shell command, run in the repo root with a fresh context each time: the prompt on stdin and
    in $AUTORESEARCH_PROMPT_FILE; the last non-empty line of its stdout is the description."""

    def __init__(self, command, timeout):
        self.command, self.timeout = command, timeout

    def propose(self, loop, n, flight):
        _, before = tree_status()
        flight.mark(n=n, phase="agent")
        description, error = call_agent(loop, self.command, n, self.timeout, on_spawn=flight.spawned)
        untracked = frozenset(tree_status()[1] - before)
        if current_branch() != loop.checkout_branch:
            error = (f"the agent left {loop.checkout_branch or 'the detached HEAD at the best'} for "
                     f"{current_branch() or 'a detached HEAD'} (commits it made there stay there)")
            git("checkout", "-q", "--detach")  # save its uncommitted edits without moving that branch
        return Proposal(description, error, untracked, log=str(loop.dir / f"{n:03d}-agent.err"))


# -----------------------------------------------------------------------------
# The agent's prompt and its run


def build_prompt(loop, n):
    """A fresh context for the agent: the rules of this call, program.md, and the state of the run."""
    program = Path(PROGRAM).read_text() if Path(PROGRAM).exists() else "(this repository has no program.md)"
    report = format_report(summarize(loop.rows), RESULTS, recent=12)
    base, best = row_commit(loop.rows[0], within=f"refs/heads/{loop.branch}"), loop.best_commit
    diff = git("diff", base, best, "--", TRAIN).split("\n") if base != best else []
    if len(diff) > PROMPT_DIFF_LINES:
        more = len(diff) - PROMPT_DIFF_LINES
        diff = diff[:PROMPT_DIFF_LINES] + [f"... ({more} more lines: git diff {base[:7]} {best[:7]})"]
    crash = ""
    last = loop.rows[-1]
    log = Path(loop.root) / last.get("log", "")  # a worker runs in a worktree: logs are in the main checkout
    if last["status"] == "crash" and last.get("log") and log.is_file():
        tail = log.read_text(errors="replace").splitlines()[-CRASH_TAIL_LINES:]
        crash = (f"\n## The last experiment (#{last['n']}) crashed; the end of its log\n```\n"
                 + "\n".join(tail) + "\n```\n")
    others = getattr(loop.link, "others", None)
    if others:
        crash += ("\n## Running now on the other workers (do not try these again)\n"
                  + "".join(f"- {one_line(text, 200)}\n" for text in others))
    rules = (f"You are called by `agent_loop.py run` for experiment #{n} on branch {loop.branch}, with a "
             f"fresh context. Make ONE experimental change to {TRAIN} (edit only {TRAIN}: a change to any "
             f"other file gets the experiment rejected). Do NOT run {TRAIN}, agent_loop.py or git yourself: "
             f"the loop commits, trains for the fixed budget, measures val_bpb and keeps or discards the "
             f"change. Identical versions of {TRAIN} are never run twice. End your reply with ONE line that "
             f"describes the change; it becomes the description in results.tsv.")
    return (f"# Instructions for this call\n{rules}\n\n# program.md\n{program}\n\n"
            f"# The run so far\n```\n{report}\n```\n"
            f"\n## Kept changes to {TRAIN} so far (git diff baseline best)\n```diff\n"
            f"{chr(10).join(diff) or '(none yet: the best is still the baseline)'}\n```\n{crash}"
            f"\n# Reminder\n{rules}\n")


def nonblank_lines(f):
    """Read back through the open file: an agent that cleans up (`git clean -fdx`) may have deleted it."""
    f.seek(0)
    return [line.strip() for line in f.read().decode(errors="replace").splitlines() if line.strip()]


def call_agent(loop, cmd, n, timeout, on_spawn=None):
    """Run the agent command non-interactively. Returns (description, error or None)."""
    prompt = loop.dir / f"{n:03d}-prompt.md"
    prompt.write_text(build_prompt(loop, n), errors="replace")
    out, err = loop.dir / f"{n:03d}-agent.log", loop.dir / f"{n:03d}-agent.err"
    env = dict(os.environ, AUTORESEARCH_PROMPT_FILE=str(prompt.resolve()), AUTORESEARCH_TAG=loop.tag,
               AUTORESEARCH_EXPERIMENT=str(n))
    env.pop(LEDGER_ENV, None)  # a worker's: the agent has no business with the ledger
    record = Path(RESULTS).read_bytes()
    with open(prompt) as stdin, open(out, "w+b") as stdout, open(err, "w+b") as stderr:
        rc, _ = run_group(cmd, stdout, stderr, env, timeout, stdin=stdin, shell=True, on_spawn=on_spawn)
        lines, errs = nonblank_lines(stdout), nonblank_lines(stderr)
    loop.dir.mkdir(parents=True, exist_ok=True)
    # the loop's record is not the agent's (in a worker's worktree, other workers' rows arrive meanwhile: those
    # are no change of the agent's)
    changed = not Path(RESULTS).is_file() or Path(RESULTS).read_bytes() != record
    render_results()
    if changed:
        say(loop, f"#{n} the agent changed or deleted {RESULTS}: restored")
    description = lines[-1] if lines else ""
    if rc is None:
        return description, f"agent timed out after {timeout:.0f} s (killed with its process group)"
    if rc != 0:
        return description, f"agent exited with code {rc}: {(errs or lines or [''])[-1][:200]}"
    return description, None

