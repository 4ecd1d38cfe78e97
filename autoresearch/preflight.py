"""
What must hold before the loop touches anything, each failure told with the command that fixes it: init's
setup checks, the loop's outputs kept out of git, and before each experiment the branch at the best commit
(with nothing uncommitted, for `run`), so that whatever differs later was written by the proposer.
"""
import importlib.util
import os
from pathlib import Path

from autoresearch.gitrepo import changed_since, current_branch, git, head, short
from autoresearch.layout import BRANCH_PREFIX, LOGS_DIR, PREPARE, RESULTS, TRAIN, LoopError
from autoresearch.ledger import COLUMNS, tag_rows
from autoresearch.state import import_prepare


def tracked_outputs():
    """results.tsv and logs/ change during every experiment: tracked, they would make every
    experiment look like it changed them, and a reset would take results rows back."""
    tracked = git("ls-files", "--", RESULTS, LOGS_DIR).splitlines()
    return (f"{', '.join(tracked)} tracked by git, but agent_loop.py writes them during every experiment. "
            f"Fix: `git rm -r -q --cached {' '.join(tracked)} && git commit -m 'untrack experiment outputs'`"
            if tracked else None)


def shared_environment():
    """A warning, or None: torch in this environment has hard links, as uv makes into its cache (an
    environment made before pyproject's link-mode = "copy"). Another install that links the same files moves
    their ctime, and the evaluator then rejects honest runs as having written torch."""
    spec = importlib.util.find_spec("torch")
    try:
        links = os.stat(spec.origin).st_nlink if spec and spec.origin else 1
    except OSError:
        return None
    return (f"warning: {spec.origin} has {links} hard links (this environment shares its files with uv's "
            f"cache): another install that links them moves their ctime, and the evaluator would reject honest "
            f"runs as having written torch. Fix: `uv sync --reinstall` (copies of its own)") if links > 1 else None


# -----------------------------------------------------------------------------
# Before init


def setup_problems(tag, resume):
    """Everything that stops init, each with the command that fixes it."""
    problems = []
    if git("rev-parse", "--verify", "-q", "HEAD", check=False) is None:
        return [f"the repository has no commit yet. Fix: `git add {PREPARE} {TRAIN} && git commit -m baseline`"]
    for f in (PREPARE, TRAIN):
        if git("ls-files", "--error-unmatch", f, check=False) is None:
            problems.append(f"{f} is not committed. Fix: `git add {f} && git commit -m 'add {f}'`")
    dirty = changed_since("HEAD")  # from the bytes on disk: git status believes --assume-unchanged
    if PREPARE in dirty:
        problems.append(f"{PREPARE} differs from the commit ({PREPARE} is the fixed contract). "
                        f"Fix: `git checkout -- {PREPARE}` (or commit it before starting)")
    if dirty - {PREPARE}:
        problems.append(f"uncommitted changes to tracked files: {', '.join(sorted(dirty - {PREPARE}))}. "
                        f"The baseline must be a commit. Fix: `git commit -am 'my change'` or set them aside "
                        f"with `git stash`")
    if problem := tracked_outputs():
        problems.append(problem)
    branch = BRANCH_PREFIX + tag
    if git("rev-parse", "--verify", "-q", f"refs/heads/{branch}", check=False) is not None and not resume:
        problems.append(f"branch {branch} already exists. Fix: pick another tag (`init --tag {tag}b`), "
                        f"or continue it: `git checkout {branch} && uv run agent_loop.py run --agent mutate`")
    if Path(RESULTS).exists() and Path(RESULTS).stat().st_size:
        header = Path(RESULTS).read_text(errors="replace").split("\n", 1)[0].split("\t")
        if header != COLUMNS:
            problems.append(f"{RESULTS} exists in another format. Fix: `mv {RESULTS} results.old.tsv`")
        elif tag_rows(tag) and not resume:
            problems.append(f"{RESULTS} already has rows for tag {tag}. "
                            f"Fix: pick another tag (`init --tag {tag}b`)")
    if Path(PREPARE).exists():
        try:
            problems += list(import_prepare().check_ready())
        except Exception as e:  # whatever prepare.py raises, the user must see it, with the file named
            problems.append(f"importing {PREPARE} failed: {type(e).__name__}: {e}")
    return problems


# -----------------------------------------------------------------------------
# Before each experiment


def check_position(loop, allow_ahead):
    """The branch must sit at the best commit (or, for `step`, on top of it)."""
    best, here = loop.best_commit, head()
    if here == best or (allow_ahead and git("merge-base", "--is-ancestor", best, here, check=False) is not None):
        return
    here_id, best_id = short(here), short(best)  # longer than 7 digits where 7 name more than one commit
    raise LoopError(f"{loop.branch} is at {here_id}, not at the best kept commit {best_id} "
                    f"(experiment #{loop.best['n']}). Fix: `git branch keep-{here_id} {here_id} && "
                    f"git reset --keep {best}` (your commits stay on branch keep-{here_id})")


def check_clean(loop):
    """Before each experiment of `run`: on the branch, at the best commit, nothing uncommitted. So
    whatever differs later was written by the proposer, and only that is ever saved and reset."""
    if current_branch() != loop.branch:
        raise LoopError(f"HEAD left {loop.branch} (now on {current_branch() or 'a detached HEAD'}); "
                        f"the loop stops and touches nothing. Fix: `git checkout {loop.branch}`, then run again")
    check_position(loop, allow_ahead=False)
    dirty = changed_since("HEAD")
    if dirty:
        fix = ("run that change first with `uv run agent_loop.py step -m \"...\"`, "
               "or set it aside with `git stash`"
               if dirty == {TRAIN} else "commit them elsewhere or set them aside with `git stash`")
        raise LoopError(f"uncommitted changes to {', '.join(sorted(dirty))}: nothing you wrote is ever "
                        f"thrown away, so the loop does not go on. Fix: {fix}, then run again")
