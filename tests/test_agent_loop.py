"""Tests of agent_loop.py: real git repos in temp dirs, real subprocesses, a stand-in train.py
(tests/stand_in/) that prints the summary its constants ask for. The end-to-end run of the real
train.py is the README's demo (tests/test_readme.py)."""
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
AGENT_LOOP = REPO / "agent_loop.py"
STAND_IN = Path(__file__).resolve().parent / "stand_in"
pytestmark = pytest.mark.long(minutes=5)  # on one core; conftest hands out the longest files first
sys.path.insert(0, str(REPO))
from autoresearch import gitrepo, installed, mutate, process, runner  # noqa: E402  (the pure functions)

UPSTREAM_TSV = ("commit\tval_bpb\tmemory_gb\tstatus\tdescription\n"
                "baseline\t0.997900\t44.0\tkeep\tbaseline\n"
                "a1b2c3d\t0.993200\t44.2\tkeep\tincrease LR to 0.04\n"
                "b2c3d4e\t1.005000\t44.0\tdiscard\tswitch to GeLU activation\n"
                "c3d4e5f\t0.000000\t0.0\tcrash\tdouble model width (OOM)\n")


# -----------------------------------------------------------------------------
# Helpers: a repo with the stand-ins, no git identity, and the loop as a real subprocess


@pytest.fixture
def env(tmp_path):
    """No git identity anywhere (the loop must bring its own), a private cache that is ready. Runs are not
    confined: what the stand-ins try is caught by the checks after a run, all there is where the kernel cannot
    confine (tests/test_confine.py tries them confined)."""
    (tmp_path / "gitconfig").write_text("")
    cache = tmp_path / "cache"
    (cache / "prepared" / "smoke" / "synthetic").mkdir(parents=True)
    (cache / "prepared" / "smoke" / "synthetic" / "train.bin").write_bytes(b"\0" * 64)  # the stand-in opens it
    (cache / "ready").write_text("")
    e = {k: v for k, v in os.environ.items() if not k.startswith(("GIT_", "AUTORESEARCH_"))}
    e.update(GIT_CONFIG_GLOBAL=str(tmp_path / "gitconfig"), GIT_CONFIG_NOSYSTEM="1",
             AUTORESEARCH_CACHE_DIR=str(cache), AUTORESEARCH_PROFILE="smoke", AUTORESEARCH_CONFINE="0")
    return e


@pytest.fixture
def repo(tmp_path, env):
    r = tmp_path / "repo"
    r.mkdir()
    for f in ("prepare.py", "train.py"):
        shutil.copy(STAND_IN / f, r / f)
    (r / "README.md").write_text("a lab\n")
    (r / ".gitignore").write_text("results.tsv\nlogs/\n__pycache__/\nworktrees/\n")
    git(r, env, "init", "-q", "-b", "main")
    git(r, env, "add", ".")
    git(r, env, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "stand-ins")
    return r


def git(repo, env, *args):
    return subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True).stdout.strip()


def loop(repo, env, *args, check=True, timeout=120, stdin=None):
    p = subprocess.run([sys.executable, str(AGENT_LOOP), *args], cwd=repo, env=env, capture_output=True,
                       text=True, timeout=timeout, input=stdin)
    if check:
        assert p.returncode == 0, f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    return p


def set_train(repo, **consts):
    """Edit the stand-in's top-level constants, e.g. VAL_BPB=0.99, MODE='crash'."""
    path = repo / "train.py"
    text = path.read_text()
    for name, value in consts.items():
        text, n = re.subn(rf"^{name} = .*?(  #.*)?$", lambda m: f"{name} = {value!r}{m[1] or ''}", text,
                          count=1, flags=re.M)
        assert n == 1, name
    path.write_text(text)


def rows(repo):
    lines = (repo / "results.tsv").read_text().split("\n")
    assert lines[-1] == "", "results.tsv must end with a newline"
    header = lines[0].split("\t")
    out = [dict(zip(header, line.split("\t"))) for line in lines[1:-1]]
    assert all(len(line.split("\t")) == len(header) for line in lines[1:-1]), "a partial row"
    return out


def initialised(repo, env, repeats=1, tag="t", **baseline):
    """init on a baseline train.py with these constants (committed on main first)."""
    if baseline:
        set_train(repo, **baseline)
        git(repo, env, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "baseline")
    return loop(repo, env, "init", "--tag", tag, "--repeats", str(repeats))


def clean_tracked(repo, env):
    return git(repo, env, "status", "--porcelain", "--untracked-files=no") == ""


def pid_gone(pid):
    """Gone, or a zombie waiting for a parent that never reaps (PID 1 in some containers)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:  # no such file, or ESRCH: the process ended between the open and the read (seen in CI)
        return True


@contextlib.contextmanager
def spinning(flag):
    """Other work on this test's cores whenever `flag` exists: the stand-in creates it for the length of a run
    whose STANDIN_LOAD level ends in "+spin". Not a process of the loop's, so the harness sees it as other work."""
    spinner = subprocess.Popen([sys.executable, "-c", f"import os, time\nwhile True:\n"
                                f"    if not os.path.exists({str(flag)!r}): time.sleep(0.005)"])
    try:
        yield
    finally:
        spinner.kill()
        spinner.wait()


def wait_for(predicate, seconds=30):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


# -----------------------------------------------------------------------------
# init


def test_init_creates_branch_header_and_baseline_with_noise(repo, env):
    out = initialised(repo, env, repeats=2, NOISE=0.002).stdout
    assert git(repo, env, "branch", "--show-current") == "autoresearch/t"
    assert (repo / "results.tsv").read_text().split("\n")[0].split("\t")[:5] == \
        ["commit", "val_bpb", "memory_gb", "status", "description"]
    (base,) = rows(repo)
    assert base["status"] == "keep" and base["description"] == "baseline" and base["seeds"] == "42,43"
    assert base["val_bpb_runs"] == "1.000000,1.002000" and base["val_bpb"] == "1.001000"
    assert base["memory_gb"] == "2.0"
    assert "sigma 0.001414 from 2 runs" in out and "sigma 0.001414 from 2 runs" in base["note"]
    assert base["tokens_per_s"] == "100000,100000"
    assert clean_tracked(repo, env)


def test_each_row_names_its_commit_by_the_full_id_the_loop_finds_it_by(repo, env):
    # 7 digits are not an identity: a red team made a commit sharing the baseline's in 33 s, put it on the branch
    # with a prepare.py that scaled the metric, and the loop took it for the baseline
    initialised(repo, env)
    set_train(repo, VAL_BPB=0.9)
    loop(repo, env, "step", "-m", "better")
    set_train(repo, VAL_BPB=1.9)
    loop(repo, env, "step", "-m", "worse")
    assert [r["status"] for r in rows(repo)] == ["keep", "keep", "discard"]
    for r in rows(repo):
        assert len(r["sha"]) == 40 and r["sha"].startswith(r["commit"]), r
        assert git(repo, env, "cat-file", "-t", r["sha"]) == "commit"
    assert rows(repo)[1]["sha"] == git(repo, env, "rev-parse", "HEAD")  # the best, where the branch is


def test_a_module_the_agent_leaves_in_the_checkout_never_stands_in_for_the_loops_own(repo, env, tmp_path):
    # a red team's argparse.py in the repository root ran in the loop before its first check, deleted itself, and
    # scaled the candidate's val_bpb: a comment-only change kept, -21%
    for harness in ("agent_loop.py", "autoresearch"):  # a checkout of the harness, as users have it
        copy = shutil.copy if harness.endswith(".py") else shutil.copytree
        copy(REPO / harness, repo / harness, **({} if harness.endswith(".py") else {
            "ignore": shutil.ignore_patterns("__pycache__")}))
    git(repo, env, "add", ".")
    git(repo, env, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "the harness")
    own = [sys.executable, str(repo / "agent_loop.py")]
    assert subprocess.run([*own, "init", "--tag", "t", "--repeats", "1"], cwd=repo, env=env).returncode == 0
    seen = tmp_path / "seen"
    for name in ("argparse", "json", "numpy"):  # the loop's first import, a later one, one prepare.py imports
        (repo / f"{name}.py").write_text(f"import sys; open({str(seen)!r}, 'a').write(repr(sys.argv) + chr(10))\n")
    subprocess.run([sys.executable, "-c", "import json"], cwd=repo, env=env, check=True)  # live: it runs here
    set_train(repo, VAL_BPB=0.9)
    subprocess.run([*own, "step", "-m", "better"], cwd=repo, env=env, capture_output=True)
    ran = seen.read_text().splitlines()
    assert ran[0] == "['-c']" and not [line for line in ran if "agent_loop.py" in line], ran


def test_init_lists_every_failed_check_with_its_fix(repo, env):
    (Path(env["AUTORESEARCH_CACHE_DIR"]) / "ready").unlink()
    (repo / "README.md").write_text("my unsaved notes\n")
    with open(repo / "prepare.py", "a") as f:
        f.write("# edited\n")
    p = loop(repo, env, "init", "--tag", "t", check=False)
    assert p.returncode == 1
    assert "uv run prepare.py --dataset synthetic" in p.stderr       # data not ready
    assert "git checkout -- prepare.py" in p.stderr                   # prepare.py changed
    assert "README.md" in p.stderr and "git stash" in p.stderr        # dirty tree
    assert git(repo, env, "branch", "--show-current") == "main"
    assert (repo / "README.md").read_text() == "my unsaved notes\n"


def test_init_refuses_zero_baseline_runs(repo, env):
    p = loop(repo, env, "init", "--tag", "t", "--repeats", "0", check=False)
    assert p.returncode == 2 and "at least one run" in p.stderr
    assert git(repo, env, "branch", "--show-current") == "main"


def test_init_refuses_an_existing_branch(repo, env):
    git(repo, env, "branch", "autoresearch/t")
    p = loop(repo, env, "init", "--tag", "t", check=False)
    assert p.returncode == 1 and "already exists" in p.stderr and "--tag tb" in p.stderr


def test_init_resumes_after_a_crashed_baseline(repo, env):
    set_train(repo, MODE="crash")
    git(repo, env, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "broken")
    p = loop(repo, env, "init", "--tag", "t", "--repeats", "1", check=False)
    assert p.returncode == 1 and "the baseline crashed" in p.stderr and "init --tag t` again" in p.stderr
    assert not rows(repo)                                   # no row for a baseline that never ran
    set_train(repo, MODE="ok")
    git(repo, env, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "fixed")
    out = loop(repo, env, "init", "--tag", "t", "--repeats", "1").stdout
    assert out.startswith("resuming branch autoresearch/t") and rows(repo)[0]["status"] == "keep"


def test_init_refuses_a_prepare_py_edited_and_hidden_from_git_status(repo, env):
    # a red team scaled bits_per_byte by 1.2 for the baseline alone, put it back, and a comment was kept (-9%)
    with open(repo / "prepare.py", "a") as f:
        f.write("# a metric scaled for the baseline\n")
    git(repo, env, "update-index", "--assume-unchanged", "prepare.py")
    p = loop(repo, env, "init", "--tag", "t", check=False)
    assert p.returncode == 1 and "prepare.py differs from the commit" in p.stderr, p.stderr
    assert not (repo / "results.tsv").exists() or not rows(repo)
    assert "prepare.py" in git(repo, env, "status", "--porcelain")  # and git shows it again


@pytest.mark.parametrize("mode", ["tamper", "selfedit"])
def test_a_baseline_run_that_changes_the_commits_files_is_no_baseline(repo, env, mode):
    # tamper: writes prepare.py; selfedit: rewrites train.py, so that the next run is other code (a red team's
    # process swapped in a train.py with tiny learning rates for the baseline's runs, and a comment was kept)
    set_train(repo, MODE=mode)
    git(repo, env, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "baseline")
    p = loop(repo, env, "init", "--tag", "t", "--repeats", "2", check=False)
    assert p.returncode == 1 and "the baseline crashed" in p.stderr, p.stdout + p.stderr
    assert "A baseline must be the commit as it is" in p.stderr and not rows(repo)
    assert ("prepare.py" if mode == "tamper" else "train.py") in p.stderr.split("the baseline crashed")[1]


def test_init_refuses_a_results_tsv_tracked_by_git(repo, env):
    (repo / "results.tsv").write_text("commit\tval_bpb\tmemory_gb\tstatus\tdescription\n")
    git(repo, env, "add", "-f", "results.tsv")
    git(repo, env, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "results")
    p = loop(repo, env, "init", "--tag", "t", check=False)
    assert p.returncode == 1 and "results.tsv tracked by git" in p.stderr and "git rm -r -q --cached" in p.stderr
    assert git(repo, env, "branch", "--show-current") == "main"


def test_step_outside_an_autoresearch_branch_names_init(repo, env):
    p = loop(repo, env, "step", "-m", "x", check=False)
    assert p.returncode == 2 and "agent_loop.py init --tag" in p.stderr


# -----------------------------------------------------------------------------
# step: keep, discard, crash, timeout, NaN, duplicates


@pytest.mark.parametrize("stand_in", ["tag", "replace"])
def test_a_commit_standing_in_for_the_best_never_runs_as_the_best(repo, env, stand_in):
    # git takes a ref before an abbreviated id of the same name (a warning on stderr only), and a replacement
    # object (`git replace`) for the commit itself: an agent's shadow commit, whose train.py is far worse, would
    # run as the best's re-runs, and a change that is no better would be kept beside them
    initialised(repo, env)
    best = rows(repo)[0]["commit"]
    set_train(repo, VAL_BPB=3.0)
    git(repo, env, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "the shadow")
    if stand_in == "tag":
        git(repo, env, "tag", best, "HEAD")
    else:
        git(repo, env, "replace", git(repo, env, "rev-parse", "HEAD~1"), "HEAD")
    git(repo, env, "reset", "-q", "--hard", "HEAD~1")
    set_train(repo, VAL_BPB=0.99)
    out = loop(repo, env, "step", "-m", "lower the loss").stdout
    exp = rows(repo)[1]
    assert exp["best_val_bpb_runs"] == "1.000000" and exp["best_train_py"] == rows(repo)[0]["train_py"], out
    assert git(repo, env, "rev-parse", "HEAD~1") == git(repo, env, "rev-parse", "--disambiguate=" + best)


def test_a_smudge_filter_that_checks_out_another_best_train_py_runs_nothing_as_the_best(repo, env):
    # git writes what a smudge filter makes of the blob: the best's re-run would be other code than the ledger's.
    # The filters of these tests are in the user's git config (an unconfined agent can write it), which the loop
    # does not refuse as it refuses the repository's own: what they do is caught all the same
    initialised(repo, env)
    git(repo, env, "config", "--global", "filter.sm.smudge", "sed 's/^VAL_BPB = 1.0 /VAL_BPB = 3.0 /'")
    git(repo, env, "config", "--global", "filter.sm.clean", "cat")
    (repo / ".git" / "info").mkdir(exist_ok=True)
    (repo / ".git" / "info" / "attributes").write_text("train.py filter=sm\n")
    set_train(repo, VAL_BPB=0.99)
    p = loop(repo, env, "step", "-m", "lower the loss", check=False)
    assert p.returncode == 2 and "is not the version its runs would be recorded under" in p.stderr, p.stderr
    assert len(rows(repo)) == 1 and "#1 candidate run" in p.stderr and "#1 best run" not in p.stderr


def test_an_edit_to_prepare_py_hidden_from_git_by_a_clean_filter_is_caught(repo, env, tmp_path):
    # the filter hands git the committed bytes, so `git status` shows nothing; a red team's edit of the metric
    # in prepare.py, hidden so, got a comment-only change kept
    initialised(repo, env)
    original = tmp_path / "prepare.py"
    original.write_bytes((repo / "prepare.py").read_bytes())
    git(repo, env, "config", "--global", "filter.rt.clean", f"cat {original}")
    git(repo, env, "config", "--global", "filter.rt.smudge", "cat")
    (repo / ".git" / "info").mkdir(exist_ok=True)
    (repo / ".git" / "info" / "attributes").write_text("prepare.py filter=rt\n")
    with open(repo / "prepare.py", "a") as f:
        f.write("TIME_BUDGET = 2\n")
    git(repo, env, "add", "prepare.py")
    assert git(repo, env, "status", "--porcelain", "--untracked-files=no") == ""  # hidden from git
    set_train(repo, VAL_BPB=0.99)
    p = loop(repo, env, "step", "-m", "a comment", check=False)
    assert p.returncode == 2 and "changed prepare.py (only train.py may change); nothing was run" in p.stderr, \
        p.stdout + p.stderr
    assert len(rows(repo)) == 1


def test_a_clean_filter_that_would_commit_another_train_py_than_the_one_that_runs_stops_the_step(repo, env):
    # git stores what a clean filter (or an end-of-line rule) makes of the file: the branch would keep code that
    # never ran
    initialised(repo, env)
    git(repo, env, "config", "--global", "filter.sneak.clean", "sed 's/^VAL_BPB = .*/VAL_BPB = 0.5/'")
    (repo / ".git" / "info").mkdir(exist_ok=True)
    (repo / ".git" / "info" / "attributes").write_text("train.py filter=sneak\n")
    head = git(repo, env, "rev-parse", "HEAD")
    set_train(repo, VAL_BPB=0.99)
    p = loop(repo, env, "step", "-m", "lower the loss", check=False)
    assert p.returncode != 0 and "git would store a train.py other than the file" in p.stderr, p.stderr
    assert len(rows(repo)) == 1 and git(repo, env, "rev-parse", "HEAD") == head


def test_step_keeps_a_real_improvement_after_a_confirming_pair_and_prints_one_line(repo, env):
    initialised(repo, env)
    set_train(repo, VAL_BPB=0.99)
    out = loop(repo, env, "step", "-m", "lower the loss").stdout
    assert out.count("\n") == 1
    assert re.match(r"keep val_bpb=0\.990000 delta=-0\.0100 \(2 run\(s\) vs 2 of the best, p=0\.00\d\d\) "
                    r"best=0\.990000 log=logs/t/001-\w{7}\.log", out), out
    base, exp = rows(repo)
    assert exp["status"] == "keep" and exp["description"] == "lower the loss" and exp["n"] == "1"
    assert git(repo, env, "rev-parse", "--short=7", "HEAD") == exp["commit"]
    assert git(repo, env, "log", "-1", "--format=%an <%ae>") == "autoresearch <autoresearch@localhost>"
    # first run, then the best and the candidate once more: every run with a fresh seed, all in the row
    assert (exp["seeds"], exp["best_seeds"], exp["best_val_bpb_runs"]) == ("43,45", "44", "1.000000")
    assert exp["best_train_py"] == base["train_py"] and "pairs=1" in exp["evidence"]
    assert exp["note"].startswith("keep: mean difference -0.010000")
    log = (repo / exp["log"]).read_text()
    assert "===== decision =====" in log and "loop overhead" in log and "-VAL_BPB = 1.0" in log
    assert clean_tracked(repo, env)


def test_each_version_compiles_in_a_cache_of_its_own_seeded_from_the_best(repo, env, tmp_path):
    env = dict(env, STANDIN_CACHE_LOG=str(tmp_path / "cache.log"))
    initialised(repo, env)
    (baseline,) = versions(repo / ".git" / "autoresearch" / "t")
    (baseline / "aotautograd" / "key").mkdir(parents=True)  # AOTAutograd's entries: never another version's
    set_train(repo, VAL_BPB=0.99)
    loop(repo, env, "step", "-m", "lower the loss")
    seen = [line.split(" ") for line in (tmp_path / "cache.log").read_text().splitlines()]
    assert [(val, found) for val, _, found in seen] == [
        ("1.0", ""),              # the baseline compiles cold
        ("0.99", "by-1.0"),       # the candidate finds the best's kernels (a warm start), not its AOT entries
        ("1.0", "aotautograd,by-1.0"),  # the best's re-run never finds what the candidate wrote
        ("0.99", "by-0.99,by-1.0")]
    assert seen[0][1] == seen[2][1] != seen[1][1] == seen[3][1]
    assert Path(seen[3][1]).is_dir() and not Path(seen[0][1]).exists()  # the old best's cache is gone


def test_a_candidate_far_better_on_the_pinned_val_rows_than_on_the_heldout_slice_is_rejected_at_once(repo, env):
    initialised(repo, env, HELDOUT_BPB=1.02)      # val/held-out 0.98: the baseline scores both alike
    set_train(repo, VAL_BPB=0.6, HELDOUT_BPB=0.95)  # 0.63: it learned the pinned rows, not the text
    out = loop(repo, env, "step", "-m", "train on val").stdout
    exp = rows(repo)[1]
    assert out.startswith("discard") and exp["note"].startswith("rejected:"), out
    assert "0.632, against 0.980" in exp["note"] and "training on the validation rows" in exp["note"]
    assert exp["seeds"] == "43" and exp["heldout_gap"] == "-0.3684"  # one run: no pairs spent on it
    set_train(repo, VAL_BPB=0.6, HELDOUT_BPB=0.62)  # both slices better alike: a better model
    assert loop(repo, env, "step", "-m", "a better model").stdout.startswith("keep")


def test_one_leaked_run_is_not_averaged_away_by_an_honest_one(repo, env):
    initialised(repo, env, HELDOUT_BPB=1.02)                     # 0.980
    set_train(repo, VAL_BPB=0.9, HELDOUT_BPB={43: 0.92, 45: 1.4})  # seed 43: 0.978; seed 45: 0.643
    loop(repo, env, "step", "-m", "val rows now and then")
    exp = rows(repo)[1]
    assert exp["seeds"] == "43,45" and exp["note"].startswith("rejected:") and "0.643" in exp["note"], exp


def test_small_leaks_cannot_walk_the_heldout_bar_down_keep_by_keep(repo, env):
    initialised(repo, env, HELDOUT_BPB=1.02)        # 0.980
    set_train(repo, VAL_BPB=0.92, HELDOUT_BPB=1.02)  # 0.902: within 0.10 of the best, kept
    assert loop(repo, env, "step", "-m", "a little val").stdout.startswith("keep")
    set_train(repo, VAL_BPB=0.84, HELDOUT_BPB=1.02)  # 0.824: within 0.10 of the best, not of the baseline
    loop(repo, env, "step", "-m", "a little more val")
    assert rows(repo)[2]["note"].startswith("rejected:") and "against 0.980" in rows(repo)[2]["note"]


def test_a_best_from_before_the_heldout_column_is_held_to_its_re_runs(repo, env):
    initialised(repo, env, HELDOUT_BPB=1.02)
    ledger = repo / ".git" / "autoresearch" / "results.tsv"
    header, baseline = ledger.read_text().splitlines()
    column = header.split("\t").index("heldout_gap")
    cells = baseline.split("\t")
    ledger.write_text("\n".join([header, "\t".join(cells[:column] + [""] + cells[column + 1:])]) + "\n")
    set_train(repo, VAL_BPB=0.6, HELDOUT_BPB=0.95)
    loop(repo, env, "step", "-m", "train on val")
    exp = rows(repo)[1]
    assert exp["note"].startswith("rejected:") and "against 0.980" in exp["note"], exp["note"]


def test_a_run_that_writes_in_another_versions_compile_cache_is_rejected(repo, env):
    initialised(repo, env)
    set_train(repo, VAL_BPB=0.9, MODE="cachepoison")
    loop(repo, env, "step", "-m", "poison the best's kernels")
    note = rows(repo)[1]["note"]
    assert note.startswith("rejected:") and "compile-cache" in note and "poisoned.py" in note, note


def versions(tag_dir):
    """A tag's compile caches of train.py versions (not the evaluator's)."""
    return [p for p in (tag_dir / "compile-cache").iterdir() if p.is_dir() and re.fullmatch("[0-9a-f]+", p.name)]


def test_a_new_tag_starts_from_the_compiled_code_an_earlier_tag_ran_of_its_train_py_and_of_no_other(repo, env):
    initialised(repo, env)
    caches = repo / ".git" / "autoresearch"
    (version,) = versions(caches / "t")
    (version / "kernel.so").write_text("compiled by tag t")
    (version / "aotautograd" / "key").mkdir(parents=True)  # the same train.py's own: taken too
    loop(repo, env, "init", "--tag", "u", "--repeats", "1")  # the same train.py: its first run compiles warm
    assert (caches / "u" / "compile-cache" / version.name / "kernel.so").read_text() == "compiled by tag t"
    assert (caches / "u" / "compile-cache" / version.name / "aotautograd" / "key").is_dir()
    set_train(repo, VAL_BPB=0.97)
    git(repo, env, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "other code")
    loop(repo, env, "init", "--tag", "w", "--repeats", "1")  # kernels are never another version's
    (other,) = versions(caches / "w")
    assert other.name != version.name and [p.name for p in other.rglob("*")] == ["headers"]  # inductor's, empty


def test_a_compile_cache_a_killed_loops_run_wrote_in_unchecked_seeds_no_tag_and_its_own_tag_drops_it(repo, env):
    caches = repo / ".git" / "autoresearch"
    initialised(repo, env, tag="k", SLEEP=1.5)
    set_train(repo, VAL_BPB=0.99)
    git(repo, env, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "lower the loss")
    proc = subprocess.Popen([sys.executable, str(AGENT_LOOP), "step", "-m", "lower the loss"], cwd=repo, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    running = repo / ".git" / "autoresearch" / "k" / "running.json"

    def training():
        state = json.loads(running.read_text()) if running.exists() else {}
        return state.get("n") == 1 and state.get("phase") == "train" and "pgid" in state

    assert wait_for(training, 60)
    proc.kill()  # kill -9 (or a power cut): the loop never sweeps what its run wrote
    proc.wait()
    os.killpg(json.loads(running.read_text())["pgid"], signal.SIGKILL)
    version = caches / "k" / "compile-cache" / gitrepo.blob_hash((repo / "train.py").read_bytes())[:16]
    (version / "learned.pt").write_text("weights, saved after the run opened its data")  # as the run could have
    loop(repo, env, "init", "--tag", "u", "--repeats", "1")  # the same train.py: not from the killed run's cache
    assert not (caches / "u" / "compile-cache" / version.name / "learned.pt").exists()
    (caches / "u" / "compile-cache" / version.name / "kernel.so").write_text("compiled by tag u")
    loop(repo, env, "init", "--tag", "v", "--repeats", "1")  # from a tag whose runs were all swept, as before
    assert (caches / "v" / "compile-cache" / version.name / "kernel.so").read_text() == "compiled by tag u"
    assert not (caches / "v" / "compile-cache" / version.name / "learned.pt").exists()
    running.unlink()  # k's record of its run in flight lost (an agent's `git clean -fdx`): the mark still tells
    git(repo, env, "checkout", "-q", "autoresearch/k")
    loop(repo, env, "step", "-m", "lower the loss")
    assert not (version / "learned.pt").exists() and not list(version.parent.glob("*.unchecked"))


@contextlib.contextmanager
def as_the_loop(repo):
    """This test process in the repository, as a process of its loop: what it writes with ledger.keep_file (and
    through it, seal.HarnessFolder's records) is kept as the loop's own."""
    from autoresearch import ledger
    here = os.getcwd()
    os.chdir(repo)
    ledger.ledger_dir.cache_clear()
    try:
        yield
    finally:
        os.chdir(here)
        ledger.ledger_dir.cache_clear()


def harness_evaluates(repo, tag="t"):
    """The tag's runs hand their model to the harness's evaluator, as with the real prepare.py (the stand-in's
    evaluation then fails: a crash row, unless a rejection comes first)."""
    pin(repo, tag, harness_eval=True)


def pin(repo, tag="t", **values):
    """These values in the tag's init.json, as the loop pins them: an edit by anything else would be put back."""
    from autoresearch import ledger
    config = repo / ".git" / "autoresearch" / tag / "init.json"
    with as_the_loop(repo):
        ledger.keep_file(config, json.dumps(dict(json.loads(config.read_text()), **values)).encode())


def test_a_run_that_writes_in_the_evaluators_compile_cache_crashed_or_not_is_rejected_and_nothing_else_is(
        repo, env):
    initialised(repo, env)
    harness_evaluates(repo)
    # the first step's evaluation leaves the cache as the harness knows it (recorded for the next step, a
    # process of its own); the next steps' runs poison it, then also crash (no evaluation follows a crash)
    set_train(repo, VAL_BPB=0.9)
    loop(repo, env, "step", "-m", "an honest change")
    planted = repo / ".git" / "autoresearch" / "t" / "compile-cache" / "evaluator" / "poisoned.py"
    for n, mode in ((2, "evalpoison"), (3, "evalpoisoncrash")):
        set_train(repo, VAL_BPB=0.9, MODE=mode)
        loop(repo, env, "step", "-m", f"a kernel for the evaluator ({mode})")
        note = rows(repo)[n]["note"]
        assert "evaluator/poisoned.py" in note and not planted.exists(), note
    assert rows(repo)[2]["note"].startswith("rejected:")
    set_train(repo, VAL_BPB=0.91)
    loop(repo, env, "step", "-m", "honest again")
    assert "compile-cache" not in rows(repo)[4]["note"], rows(repo)[4]
    # what an agent leaves there between steps is emptied out before the next run, blaming that run for none
    planted.write_text("")
    set_train(repo, VAL_BPB=0.92)
    loop(repo, env, "step", "-m", "honest, after a plant between steps")
    assert "compile-cache" not in rows(repo)[5]["note"] and not planted.exists(), rows(repo)[5]


def test_a_new_tags_first_evaluation_starts_from_the_evaluator_cache_another_tag_left_and_never_a_planted_one(
        repo, env):
    from autoresearch.seal import HarnessFolder
    ledger = repo / ".git" / "autoresearch"
    initialised(repo, env)
    harness_evaluates(repo)
    set_train(repo, VAL_BPB=0.9)
    loop(repo, env, "step", "-m", "an honest change")  # t's evaluator cache and its record, as its harness left them
    for tag, text in (("t", "compiled by t's evaluator"), ("v", "planted, with a record that lists it"),
                      ("x", "compiled by x's evaluator")):
        cache = ledger / tag / "compile-cache" / "evaluator"  # the real evaluator's kernels: the stand-in has none
        cache.mkdir(parents=True, exist_ok=True)
        (cache / "kernel.py").write_text(text)
        if tag == "v":  # by an agent, say: not the loop
            HarnessFolder(cache).settle()
        else:
            with as_the_loop(repo):
                HarnessFolder(cache).settle()
        time.sleep(0.05)  # the newer records are tried first
    (ledger / "x" / "compile-cache" / "evaluator" / "kernel.py").write_text("planted after x's harness recorded it")
    p = loop(repo, env, "init", "--tag", "u", "--repeats", "1")
    assert "v/compile-cache/evaluator.json was written by something other than this loop" in p.stderr, p
    harness_evaluates(repo, "u")
    set_train(repo, VAL_BPB=0.91)
    loop(repo, env, "step", "-m", "u's first evaluated run")
    seeded = ledger / "u" / "compile-cache" / "evaluator"
    assert (seeded / "kernel.py").read_text() == "compiled by t's evaluator"
    assert HarnessFolder(seeded).written() == []  # and recorded as the harness's own for u's next run


def test_a_run_that_forges_the_evaluator_caches_record_and_kills_the_loop_gets_its_kernel_emptied_out(
        repo, env):
    initialised(repo, env)
    harness_evaluates(repo)
    set_train(repo, VAL_BPB=0.9)
    loop(repo, env, "step", "-m", "an honest change")  # the cache and its record, as the harness left them
    set_train(repo, VAL_BPB=0.9, MODE="evalforge")     # plants a kernel, vouches for it, kills the step
    killed = loop(repo, env, "step", "-m", "a kernel, and the record that vouches for it", check=False)
    assert killed.returncode == -signal.SIGKILL, killed
    planted = repo / ".git" / "autoresearch" / "t" / "compile-cache" / "evaluator" / "poisoned.py"
    assert planted.exists()
    set_train(repo, VAL_BPB=0.92, MODE="ok")
    loop(repo, env, "step", "-m", "honest, after the kill")
    assert rows(repo)[2]["note"].startswith("interrupted"), rows(repo)[2]
    assert not planted.exists()  # emptied before the evaluator could load it: the record was not the harness's


def test_a_run_that_opens_the_validation_split_is_rejected_whatever_it_scores(repo, env):
    # the kernel's word (inotify), not the numbers: a train.py that trains on every val row, held-out slice
    # included, leaves no gap between them for the leak check to see
    if not Path("/proc/stat").exists():
        pytest.skip("inotify is Linux's")
    split = Path(env["AUTORESEARCH_CACHE_DIR"]) / "prepared" / "synthetic" / "smoke"
    split.mkdir(parents=True)
    (split / "val.bin").write_bytes(b"\0" * 4096)
    initialised(repo, env)  # the baseline does not open it: kept
    harness_evaluates(repo)  # the rejection says more than the crash, and comes first
    set_train(repo, VAL_BPB=0.5, MODE="readval")
    out = loop(repo, env, "step", "-m", "train on all of val").stdout
    note = rows(repo)[1]["note"]
    assert note.startswith("rejected:") and f"opened the validation split while running ({split / 'val.bin'})" \
        in note, note
    assert out.startswith("discard") and "VAL_BPB = 1.0" in (repo / "train.py").read_text(), out


def test_a_result_line_written_into_the_evaluators_output_by_train_py_does_not_count(repo, env):
    # the evaluator starts beside train.py; what it prints counts only with the nonce the loop sent it after
    # train.py ended (here it fails on the stand-in's prepare.py: a crash, never the forged 0.5)
    initialised(repo, env)
    harness_evaluates(repo)
    set_train(repo, VAL_BPB=0.5, MODE="forgeeval")
    loop(repo, env, "step", "-m", "forge the evaluator's word")
    row = rows(repo)[1]
    log = (repo / row["log"]).read_text()
    assert "forged a result in" in log and '"val_bpb": 0.5' in log, log[-2000:]  # the attempt was made
    assert row["status"] == "crash" and "ended without a result" in row["note"], row
    assert "has no attribute 'Tokenizer'" in row["note"] and "0.5" not in row["note"], row


def test_step_discards_a_change_within_the_noise_and_keeps_it_reachable(repo, env):
    initialised(repo, env, repeats=3, SIGMA=0.003)
    set_train(repo, VAL_BPB=0.9995)
    out = loop(repo, env, "step", "-m", "tiny gain").stdout
    assert out.startswith("discard val_bpb=") and "best=" in out, out
    exp = rows(repo)[1]
    assert exp["status"] == "discard" and ("not better on its first run" in exp["note"]
                                           or "not confirmed" in exp["note"]), exp["note"]
    assert "VAL_BPB = 1.0" in (repo / "train.py").read_text()          # back at the best
    assert git(repo, env, "rev-parse", "HEAD") == git(repo, env, "rev-parse", "main")
    saved = git(repo, env, "show", "refs/autoresearch/t/discarded/1:train.py")
    assert "VAL_BPB = 0.9995" in saved
    assert git(repo, env, "rev-parse", "--short=7", "refs/autoresearch/t/discarded/1") == exp["commit"]


def test_step_runs_a_change_the_agent_already_committed(repo, env):
    initialised(repo, env)
    set_train(repo, VAL_BPB=0.98)
    git(repo, env, "-c", "user.name=a", "-c", "user.email=a@a", "commit", "-qam", "agent's own commit")
    set_train(repo, VAL_BPB=1.03)                          # and more on top, uncommitted
    out = loop(repo, env, "step", "-m", "two commits").stdout
    assert out.startswith("discard val_bpb=1.030000")
    assert "VAL_BPB = 1.0" in (repo / "train.py").read_text() and clean_tracked(repo, env)
    saved = "refs/autoresearch/t/discarded/1"
    assert git(repo, env, "log", "--format=%s", f"{saved}~1", "-1") == "agent's own commit"


def test_crash_records_zero_values_and_the_traceback(repo, env):
    initialised(repo, env)
    set_train(repo, MODE="crash")
    out = loop(repo, env, "step", "-m", "double width").stdout
    assert out.startswith("crash exit code 1: RuntimeError: CUDA out of memory (stand-in)")
    exp = rows(repo)[1]
    assert (exp["val_bpb"], exp["memory_gb"], exp["status"]) == ("0.000000", "0.0", "crash")
    assert "RuntimeError: CUDA out of memory" in exp["note"] and 'File "' in exp["note"]
    assert git(repo, env, "show", "refs/autoresearch/t/discarded/1:train.py").count("MODE = 'crash'") == 1
    # the crash is undone: HEAD and train.py are the best commit's again, the crashed commit stays reachable
    best = git(repo, env, "rev-parse", rows(repo)[0]["commit"])
    assert git(repo, env, "rev-parse", "HEAD") == best
    assert git(repo, env, "hash-object", "train.py") == git(repo, env, "rev-parse", f"{best}:train.py")
    assert git(repo, env, "rev-parse", "--short=7", "refs/autoresearch/t/discarded/1") == exp["commit"]
    assert clean_tracked(repo, env)


def test_a_run_killed_by_sigkill_is_a_crash_that_suggests_out_of_memory(repo, env):
    initialised(repo, env)
    set_train(repo, MODE="oom")  # kills itself with SIGKILL, as the Linux OOM killer would
    out = loop(repo, env, "step", "-m", "too big").stdout
    assert out.startswith("crash killed by signal 9 (out of memory?)"), out
    exp = rows(repo)[1]
    assert exp["status"] == "crash" and "killed by signal 9 (out of memory?)" in exp["note"]


@pytest.mark.parametrize("mode, reason", [("fail", "FAIL: loss is nan at step 3"), ("nan", "val_bpb is nan"),
                                          ("nosummary", "no summary block")])
def test_fail_nan_and_missing_summary_are_crashes(repo, env, mode, reason):
    initialised(repo, env)
    set_train(repo, MODE=mode)
    out = loop(repo, env, "step", "-m", mode).stdout
    assert out.startswith(f"crash {reason}")
    assert rows(repo)[1]["status"] == "crash"


def test_each_run_says_how_busy_the_machine_was_with_other_work(repo, env):
    # the harness's own measure (/proc/stat less the run's CPU time), not the run's word
    if not Path("/proc/stat").exists():
        pytest.skip("needs /proc/stat (Linux)")
    initialised(repo, env, SLEEP=1.2)  # the harness measures runs of 1 s or more
    set_train(repo, SLEEP=1.2, VAL_BPB=1.1)
    quiet = loop(repo, env, "step", "-m", "quiet machine")
    assert "busy with other work" not in quiet.stderr, quiet.stderr
    log = next((repo / "logs" / "t").glob("001-*.log")).read_text()
    (cores,) = re.findall(r"other work on the machine while train.py ran: ([\d.]+) CPU cores", log)
    assert float(cores) < 0.3, log
    # half of the cores this run may use, busy with someone else's work
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                for _ in range(max(1, len(os.sched_getaffinity(0)) // 2))]
    try:
        time.sleep(0.5)
        set_train(repo, SLEEP=1.2, VAL_BPB=1.2)
        busy = loop(repo, env, "step", "-m", "busy machine")
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    (line,) = [x for x in busy.stderr.splitlines() if "candidate run" in x]
    assert float(re.search(r"busy with other work: ([\d.]+) of \d+ cores", line).group(1)) >= 0.7, busy.stderr
    # and the ledger keeps it, a value per run
    assert float(rows(repo)[1]["other_cores"]) < 0.3 and float(rows(repo)[2]["other_cores"]) >= 0.7
    # the keep rule heard it: a first run on a busy machine is judged against the best run now, on the same
    # machine, not against the best's runs on a quiet one (train.py's speed is the same in every run here)
    assert "#2 best run" in busy.stderr, busy.stderr
    assert float(rows(repo)[2]["best_other_cores"]) >= 0.7
    assert "from 1 pair(s) at another machine speed" in rows(repo)[2]["note"], rows(repo)[2]["note"]
    # a run too short to measure records nothing (a stray process's few ms would read as a busy machine)
    set_train(repo, SLEEP=0.0, VAL_BPB=1.3)
    loop(repo, env, "step", "-m", "short run")
    assert rows(repo)[3]["other_cores"] == "" and "other work on the machine" not in \
        (repo / rows(repo)[3]["log"]).read_text()


def test_timeout_kills_train_and_its_children(repo, env, tmp_path):
    initialised(repo, env)
    set_train(repo, MODE="hang")
    env = dict(env, STANDIN_CHILD_PID=str(tmp_path / "child.pid"))
    out = loop(repo, env, "step", "-m", "hang", "--timeout", "2").stdout
    assert out.startswith("crash timeout: killed with its whole process group after 2 s")
    child = int((tmp_path / "child.pid").read_text())
    assert wait_for(lambda: pid_gone(child), 15), "train.py's child survived the timeout"
    assert rows(repo)[1]["status"] == "crash"
    assert clean_tracked(repo, env)


def test_timeout_kills_a_train_py_that_ignores_sigterm(repo, env, tmp_path):
    initialised(repo, env)
    set_train(repo, MODE="stubborn")           # it and its child ignore SIGTERM
    env = dict(env, STANDIN_CHILD_PID=str(tmp_path / "child.pid"))
    t0 = time.monotonic()
    # without the SIGKILL step the step would never end: the call's own timeout bounds the test
    out = loop(repo, env, "step", "-m", "stubborn", "--timeout", "1", timeout=60).stdout
    # SIGTERM at the timeout, SIGKILL to the whole group KILL_GRACE_S later; slack for startup and git
    assert time.monotonic() - t0 < 1 + process.KILL_GRACE_S + 15
    assert out.startswith("crash timeout: killed with its whole process group after 1 s"), out
    exp = rows(repo)[1]
    assert exp["status"] == "crash" and "timeout" in exp["note"]
    child = int((tmp_path / "child.pid").read_text())
    assert wait_for(lambda: pid_gone(child), 5), "train.py's child survived SIGKILL"
    assert clean_tracked(repo, env)


def test_identical_train_py_is_never_run_twice(repo, env):
    initialised(repo, env)
    set_train(repo, VAL_BPB=1.01)
    loop(repo, env, "step", "-m", "worse")
    set_train(repo, VAL_BPB=1.01)
    out = loop(repo, env, "step", "-m", "worse again").stdout
    assert out.startswith("skip identical to #1")
    assert len(rows(repo)) == 2 and len(list((repo / "logs" / "t").glob("0*.log"))) == 2
    assert "VAL_BPB = 1.0" in (repo / "train.py").read_text()
    out = loop(repo, env, "step", "-m", "nothing").stdout
    assert out.startswith("skip train.py is unchanged")


def test_a_version_not_judged_runs_again_when_submitted_again_and_twice_at_most(repo, env, tmp_path):
    if not Path("/proc/stat").exists():
        pytest.skip("needs /proc/stat (Linux)")
    # run 1 slowed by other work the harness sees, the best's run just after on a quiet machine: nothing
    # compares with run 1, and the note says to submit it again when the machine is steady
    load, flag = tmp_path / "load", tmp_path / "spin"
    load.write_text("")
    env = dict(env, STANDIN_LOAD=str(load), STANDIN_SPIN=str(flag))
    initialised(repo, env, repeats=3, SIGMA=0.002, SLEEP=1.2)  # runs of 1 s or more have their load measured
    with spinning(flag):
        for n, description in enumerate(["better", "better, again"], 1):
            load.write_text("1+spin\n0\n")
            if n == 1:
                set_train(repo, VAL_BPB=0.99)
            else:  # as program.md says: the discarded train.py back, unchanged
                git(repo, env, "checkout", "refs/autoresearch/t/discarded/1", "--", "train.py")
            out = loop(repo, env, "step", "-m", description).stdout
            assert "not judged: no run of the best" in rows(repo)[n]["note"], rows(repo)[n]["note"]
            # the line the agent reads says so, and no delta that would read as a verdict on the change
            assert out.startswith("discard not judged: no run of the best") and "delta" not in out, out
            assert "submit it again when the machine is steady" in out
    # the second submission ran (and was not judged again, as the load came back): the third is a known version
    set_train(repo, VAL_BPB=0.99)
    out = loop(repo, env, "step", "-m", "better, a third time").stdout
    assert out.startswith("skip identical to #2"), out
    assert [r["seeds"] for r in rows(repo)[1:]] == ["45", "47"]  # each submission ran, with its own seed


def test_a_run_on_a_faster_machine_is_compared_with_the_best_run_again_not_with_its_old_mean(repo, env, tmp_path):
    # the baseline ran under load (slow, val_bpb +0.3); the load is gone when the unchanged code runs again
    load = tmp_path / "load"
    load.write_text("1\n1\n1\n")
    env = dict(env, STANDIN_LOAD=str(load))
    initialised(repo, env, repeats=3, SIGMA=0.002)
    assert rows(repo)[0]["tokens_per_s"] == "33000,33000,33000"
    (repo / "train.py").write_text((repo / "train.py").read_text() + "# a comment\n")
    out = loop(repo, env, "step", "-m", "comment only").stdout
    exp = rows(repo)[1]
    # judged on val_bpb alone, 1.0 against the baseline's 1.3 would be a keep
    assert float(exp["val_bpb"]) < float(rows(repo)[0]["val_bpb"]) - 0.25
    assert out.startswith("discard"), out
    # the best, run again at once (and in the pairs, if run 1 passed the screen against it), on the fast machine
    assert exp["best_val_bpb_runs"] and set(exp["best_tokens_per_s"].split(",")) == {"100000"}
    assert "pair(s) at another machine speed" in exp["note"], exp["note"]


def test_step_stops_at_its_time_limit_and_the_next_step_goes_on_confirming(repo, env):
    initialised(repo, env, SLEEP=0.0)
    set_train(repo, VAL_BPB=0.99, SLEEP=1.5)
    env = dict(env, AUTORESEARCH_STEP_LIMIT_S="1")          # room for one run per call
    out = loop(repo, env, "step", "-m", "lower the loss").stdout
    assert out.startswith("confirming #1:") and "`uv run agent_loop.py step` again" in out, out
    assert len(rows(repo)) == 1 and "VAL_BPB = 0.99" in (repo / "train.py").read_text()
    assert "confirming #1" in loop(repo, env, "report").stdout        # the report shows what is under way
    assert json.loads(loop(repo, env, "report", "--json").stdout)["pending"]["runs"] == [0.99]
    p = loop(repo, env, "step", "-m", "something else")          # -m is ignored: #1 is decided first
    outs = [p.stdout]
    while outs[-1].startswith("confirming"):
        outs.append(loop(repo, env, "step").stdout)
    assert outs[-1].startswith("keep val_bpb=0.990000"), outs
    assert len(rows(repo)) == 2 and rows(repo)[1]["best_seeds"]
    assert json.loads(loop(repo, env, "report", "--json").stdout)["pending"] is None


def test_editing_train_py_while_a_step_is_confirming_is_refused_with_the_fix(repo, env):
    initialised(repo, env)
    set_train(repo, VAL_BPB=0.99, SLEEP=1.5)
    env = dict(env, AUTORESEARCH_STEP_LIMIT_S="1")
    assert loop(repo, env, "step", "-m", "lower the loss").stdout.startswith("confirming #1:")
    set_train(repo, VAL_BPB=0.98)
    p = loop(repo, env, "step", "-m", "next idea", check=False)
    assert p.returncode == 2 and "still being confirmed" in p.stderr and "git reset -q --hard" in p.stderr
    assert "VAL_BPB = 0.98" in (repo / "train.py").read_text()          # the edit is not touched


def test_min_delta_asks_for_an_improvement_larger_than_it(repo, env):
    initialised(repo, env, repeats=2, NOISE=0.001)
    set_train(repo, VAL_BPB=0.99, NOISE=0.0)
    assert loop(repo, env, "step", "-m", "-0.01", "--min-delta", "0.02").stdout.startswith("discard")
    set_train(repo, VAL_BPB=0.991, NOISE=0.0001)       # the seed must move val_bpb (else: rejected)
    assert loop(repo, env, "step", "-m", "-0.009").stdout.startswith("keep")


# -----------------------------------------------------------------------------
# Integrity: other files, dirty trees


def test_step_refuses_changes_outside_train_py_and_leaves_them(repo, env):
    initialised(repo, env)
    set_train(repo, VAL_BPB=0.9)
    with open(repo / "prepare.py", "a") as f:
        f.write("# easier metric\n")
    p = loop(repo, env, "step", "-m", "cheat", check=False)
    assert p.returncode == 2 and "prepare.py" in p.stderr and "git stash push -- prepare.py" in p.stderr
    assert (repo / "prepare.py").read_text().endswith("# easier metric\n")
    assert "VAL_BPB = 0.9" in (repo / "train.py").read_text()
    assert len(rows(repo)) == 1


def test_a_package_installed_after_init_stops_the_step_and_names_the_fix(repo, env, tmp_path):
    initialised(repo, env)
    site = tmp_path / "site"  # what `uv pip install sneaky` adds, on a path the loop's Python reads
    (site / "sneaky-1.0.dist-info").mkdir(parents=True)
    (site / "sneaky-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: sneaky\nVersion: 1.0\n")
    set_train(repo, VAL_BPB=0.9)
    p = loop(repo, dict(env, PYTHONPATH=str(site)), "step", "-m", "faster, with a new package", check=False)
    assert p.returncode != 0 and "Python environment changed since init (+sneaky 1.0)" in p.stderr, p.stderr
    assert "uv sync --locked" in p.stderr and len(rows(repo)) == 1  # nothing was run
    loop(repo, env, "step", "-m", "the same, in the environment of init")
    assert len(rows(repo)) == 2 and "environment" not in rows(repo)[1]["note"]


# every core, alone: while the file is there, a step of the other test process's would see it and stop
@pytest.mark.whole_machine
def test_a_pth_file_put_in_site_packages_after_init_stops_the_step_and_names_it(repo, env):
    # its `import` lines would run in the loop's own Python before any module of the loop's (this one has none)
    initialised(repo, env)
    pth = Path(sysconfig.get_path("purelib")) / "zz-autoresearch-test.pth"
    pth.write_text("# an agent's: import lines here run at the start of every Python of the environment\n")
    try:
        set_train(repo, VAL_BPB=0.9)
        p = loop(repo, env, "step", "-m", "faster, with a startup hook", check=False)
    finally:
        pth.unlink()
    assert p.returncode != 0 and f"Python environment changed since init (+{pth} " in p.stderr, p.stderr
    assert "remove a .pth file" in p.stderr and len(rows(repo)) == 1  # nothing was run
    loop(repo, env, "step", "-m", "the same, without it")
    assert len(rows(repo)) == 2


def test_code_the_evaluator_runs_edited_between_steps_stops_the_step_until_its_bytes_are_back(repo, env, tmp_path):
    initialised(repo, env)
    # what an evaluation recorded of the code it ran outside the repository (torch's cross-entropy, say)
    metric = tmp_path / "site-packages" / "metric.py"
    metric.parent.mkdir()
    metric.write_text("def cross_entropy(logits, y): ...\n")
    with as_the_loop(repo):
        installed.InstalledCode(repo / ".git" / "autoresearch" / "t" / installed.RECORD_NAME).edited([str(metric)])
    original = metric.read_bytes()
    metric.write_text("def cross_entropy(logits, y): return 0.5 * ...\n")  # an agent's edit before the step
    set_train(repo, VAL_BPB=0.9)
    p = loop(repo, env, "step", "-m", "better, with an easier metric", check=False)
    assert p.returncode != 0 and f"code the evaluator runs was edited since the tag's first evaluation ({metric})" \
        in p.stderr, p.stderr
    assert "uv sync --reinstall --locked" in p.stderr and len(rows(repo)) == 1  # nothing was run
    metric.write_bytes(original)  # as a reinstall puts it back: the same bytes, a new ctime
    loop(repo, env, "step", "-m", "the same, with the metric as installed")
    assert len(rows(repo)) == 2 and "evaluator" not in rows(repo)[1]["note"]


def test_code_an_earlier_tags_evaluations_ran_edited_between_tags_stops_the_next_init(repo, env, tmp_path):
    initialised(repo, env)
    ledger = repo / ".git" / "autoresearch"
    metric = tmp_path / "site-packages" / "metric.py"  # what tag t's evaluations ran (torch's cross-entropy, say)
    metric.parent.mkdir()
    metric.write_text("def cross_entropy(logits, y): ...\n")
    with as_the_loop(repo):
        installed.InstalledCode(ledger / "t" / installed.RECORD_NAME).edited([str(metric)])
    original = metric.read_bytes()
    metric.write_text("def cross_entropy(logits, y): return 0.5 * ...\n")  # edited during t's night
    p = loop(repo, env, "init", "--tag", "t2", check=False)
    assert p.returncode != 0 and str(metric) in p.stderr and "uv sync --reinstall --locked" in p.stderr, p.stderr
    assert "nothing was run" in p.stderr and [r["tag"] for r in rows(repo)] == ["t"]
    # the record of another uv.lock (an upgrade between tags) does not apply: that tag starts its own
    with as_the_loop(repo):
        assert installed.InstalledCode(ledger / "t3" / installed.RECORD_NAME, lock="0" * 64).edited([str(metric)]) \
            == []
    metric.write_bytes(original)  # as a reinstall puts it back: the same bytes, a new ctime
    loop(repo, env, "init", "--tag", "t2")
    assert [r["tag"] for r in rows(repo)] == ["t", "t2"]


def test_run_refuses_a_dirty_tree_and_keeps_the_users_change(repo, env):
    initialised(repo, env)
    (repo / "README.md").write_text("my unsaved notes\n")
    p = loop(repo, env, "run", "--agent", "mutate", "--max-experiments", "1", check=False)
    assert p.returncode == 2 and "README.md" in p.stderr and "git stash" in p.stderr
    assert (repo / "README.md").read_text() == "my unsaved notes\n"
    assert len(rows(repo)) == 1


def test_run_rejects_an_agent_that_edits_prepare_py(repo, env, tmp_path):
    initialised(repo, env)
    before = (repo / "prepare.py").read_text()
    agent = tmp_path / "evil.sh"
    agent.write_text("#!/bin/sh\necho '# tampered' >> prepare.py\n"
                     "sed -i 's/^VAL_BPB = .*/VAL_BPB = 0.5/' train.py\necho 'tamper with the metric'\n")
    agent.chmod(0o755)
    out = loop(repo, env, "run", "--agent", str(agent), "--max-experiments", "1").stdout
    assert "discard rejected: changed prepare.py" in out and "| tamper with the metric" in out
    assert (repo / "prepare.py").read_text() == before
    exp = rows(repo)[1]
    assert exp["status"] == "discard" and exp["note"].startswith("rejected: changed prepare.py")
    assert exp["description"] == "tamper with the metric"
    ref = "refs/autoresearch/t/discarded/1"
    assert git(repo, env, "show", f"{ref}:prepare.py").endswith("# tampered")
    assert "VAL_BPB = 0.5" in git(repo, env, "show", f"{ref}:train.py")
    assert "VAL_BPB = 1.0" in (repo / "train.py").read_text() and clean_tracked(repo, env)


def test_agent_that_deletes_train_py_is_rejected_and_train_py_restored(repo, env):
    initialised(repo, env)
    out = loop(repo, env, "run", "--agent", "rm train.py; echo 'start from scratch'", "--max-experiments", "1").stdout
    assert "#1 discard rejected: deleted train.py; saved at refs/autoresearch/t/discarded/1" in out
    assert rows(repo)[1]["note"].startswith("rejected: deleted train.py")
    assert "VAL_BPB = 1.0" in (repo / "train.py").read_text() and clean_tracked(repo, env)
    (repo / "train.py").unlink()
    p = loop(repo, env, "step", "-m", "gone", check=False)
    assert p.returncode == 2 and "git checkout" in p.stderr and "-- train.py" in p.stderr
    assert not (repo / "train.py").exists() and len(rows(repo)) == 2


def test_agent_that_amends_the_best_commit_keeps_the_history(repo, env):
    initialised(repo, env)
    baseline = git(repo, env, "rev-parse", "HEAD")
    agent = ("sed -i 's/^VAL_BPB = .*/VAL_BPB = 0.9/' train.py && "
             "git -c user.name=a -c user.email=a@a commit -q --amend -am 'amended' && echo amend")
    out = loop(repo, env, "run", "--agent", agent, "--max-experiments", "1").stdout
    assert "#1 keep val_bpb=0.900000" in out and clean_tracked(repo, env)
    assert git(repo, env, "rev-parse", "HEAD~1") == baseline
    assert git(repo, env, "log", "-1", "--format=%s") == "amend"


def test_agent_that_switches_branch_never_gets_that_branch_moved(repo, env):
    initialised(repo, env)
    main = git(repo, env, "rev-parse", "main")
    agent = ("git checkout -q main && sed -i 's/^VAL_BPB = .*/VAL_BPB = 0.5/' train.py && "
             "git -c user.name=a -c user.email=a@a commit -qam 'on main' && echo '# more' >> train.py && echo moved")
    out = loop(repo, env, "run", "--agent", agent, "--max-experiments", "1").stdout
    assert "#1 skip the agent left autoresearch/t for main" in out
    assert git(repo, env, "branch", "--show-current") == "autoresearch/t" and clean_tracked(repo, env)
    assert git(repo, env, "rev-parse", "main~1") == main           # its commit on main is left there
    assert git(repo, env, "rev-parse", "HEAD") == main and len(rows(repo)) == 1
    saved = git(repo, env, "show", "refs/autoresearch/t/agent-failed/1.1:train.py")
    assert "VAL_BPB = 0.5" in saved and saved.endswith("# more")   # with its uncommitted edit


def test_train_py_that_writes_prepare_py_while_running_is_rejected(repo, env):
    initialised(repo, env)
    set_train(repo, MODE="tamper", VAL_BPB=0.5)
    out = loop(repo, env, "step", "-m", "tamper at run time").stdout
    assert out.startswith("discard rejected: train.py changed prepare.py while running; "
                          "saved at refs/autoresearch/t/discarded/1")
    assert "tampered" not in (repo / "prepare.py").read_text() and clean_tracked(repo, env)
    assert "tampered" in git(repo, env, "show", "refs/autoresearch/t/discarded/1:prepare.py")


def test_train_py_that_rewrites_itself_while_running_is_rejected_before_another_run(repo, env):
    initialised(repo, env)
    set_train(repo, MODE="selfedit", VAL_BPB=0.5)
    out = loop(repo, env, "step", "-m", "rewrites itself").stdout
    assert out.startswith("discard rejected: train.py changed train.py while running"), out
    exp = rows(repo)[1]
    assert exp["seeds"] == "43" and not exp["best_seeds"]       # no run of anything after the rewrite
    assert not (repo / "train.py").read_text().endswith("# rewritten while running\n") and clean_tracked(repo, env)


def test_train_py_swapped_and_put_back_while_it_runs_is_rejected(repo, env):
    # a process the agent left could run other code from the checkout and put the bytes back before the check
    initialised(repo, env)
    set_train(repo, MODE="swapback", VAL_BPB=0.5)
    out = loop(repo, env, "step", "-m", "swaps itself").stdout
    assert out.startswith("discard rejected: train.py wrote train.py while running (even if it changed them back)")


def test_commands_the_repositorys_git_config_names_never_run_inside_the_loop(repo, env, tmp_path):
    # an agent confined to the checkout can still write .git/config: a red team's fsmonitor command ran inside
    # the loop, unconfined, and left a process that swapped the runs' models
    initialised(repo, env)
    ran = tmp_path / "ran"
    hook = tmp_path / "hook.sh"
    hook.write_text(f"#!/bin/sh\ntouch {ran}\n")
    hook.chmod(0o755)
    git(repo, env, "config", "core.fsmonitor", str(hook))
    git(repo, env, "config", "diff.x.textconv", str(hook))
    set_train(repo, VAL_BPB=0.99)
    p = loop(repo, env, "step", "-m", "lower the loss", check=False)
    assert p.returncode == 2 and "names commands git would run inside the loop" in p.stderr, p.stderr
    assert "git config --unset-all diff.x.textconv" in p.stderr and len(rows(repo)) == 1
    git(repo, env, "config", "--unset-all", "diff.x.textconv")
    assert loop(repo, env, "step", "-m", "lower the loss").stdout.startswith("keep")
    assert not ran.exists()  # the fsmonitor command, set all along, never ran


# -----------------------------------------------------------------------------
# run: agents, mutate, interruption and resume


def test_agent_gets_the_prompt_on_stdin_and_in_a_file(repo, env, tmp_path):
    initialised(repo, env)
    (repo / "program.md").write_text("PROGRAM: lower val_bpb.\n")
    agent = tmp_path / "agent.sh"
    agent.write_text(f"#!/bin/sh\ncat > {tmp_path}/stdin.txt\ncp \"$AUTORESEARCH_PROMPT_FILE\" {tmp_path}/file.txt\n"
                     "sed -i 's/^VAL_BPB = .*/VAL_BPB = 0.95/' train.py\necho 'thinking...'\necho\n"
                     "echo 'lower VAL_BPB to 0.95'\necho '' \n")
    agent.chmod(0o755)
    out = loop(repo, env, "run", "--agent", str(agent), "--max-experiments", "1").stdout
    prompt = (tmp_path / "stdin.txt").read_text()
    assert prompt == (tmp_path / "file.txt").read_text()
    assert "PROGRAM: lower val_bpb." in prompt and "edit only train.py" in prompt and "baseline + 0 experiments" in prompt
    assert "#1 keep val_bpb=0.950000" in out and out.rstrip().split("\n")[-2].endswith("| lower VAL_BPB to 0.95")
    assert rows(repo)[1]["description"] == "lower VAL_BPB to 0.95"


def test_agent_that_deletes_results_and_logs_gets_them_back(repo, env):
    initialised(repo, env)
    before = (repo / "results.tsv").read_text()
    agent = "git clean -fdqx; sed -i 's/^VAL_BPB = .*/VAL_BPB = 0.9/' train.py; echo 'clean up and lower'"
    out = loop(repo, env, "run", "--agent", agent, "--max-experiments", "1").stdout
    assert "#1 the agent changed or deleted results.tsv: restored" in out and "#1 keep val_bpb=0.900000" in out
    assert (repo / "results.tsv").read_text().startswith(before)
    assert [(r["n"], r["description"]) for r in rows(repo)] == [("0", "baseline"), ("1", "clean up and lower")]



def test_agent_that_changes_nothing_is_skipped_without_training(repo, env):
    initialised(repo, env)
    out = loop(repo, env, "run", "--agent", "echo 'I changed nothing'", "--max-experiments", "2").stdout
    assert out.count("skip train.py is unchanged") == 2 and len(rows(repo)) == 1


def test_failing_agent_stops_the_loop_after_three_tries(repo, env):
    initialised(repo, env)
    p = loop(repo, env, "run", "--agent", "echo half >> train.py; exit 3", check=False)
    assert p.returncode == 1 and p.stdout.count("agent exited with code 3") == 3
    assert "failed 3 times in a row" in p.stdout and clean_tracked(repo, env) and len(rows(repo)) == 1
    refs = git(repo, env, "for-each-ref", "--format=%(refname)", "refs/autoresearch/t/agent-failed").split()
    assert len(refs) == 3  # the half-done edits are saved, not thrown away


def test_agent_timeout_kills_the_agent_and_its_children(repo, env, tmp_path):
    initialised(repo, env)
    agent = tmp_path / "slow.sh"
    agent.write_text(f"#!/bin/sh\necho '# half an idea' >> train.py\nsleep 300 &\necho $! > {tmp_path}/child.pid\n"
                     "wait\n")
    agent.chmod(0o755)
    out = loop(repo, env, "run", "--agent", str(agent), "--agent-timeout", "1", "--max-experiments", "1").stdout
    assert "#1 skip agent timed out after 1 s" in out and "its changes saved at refs/autoresearch/t/" in out
    assert wait_for(lambda: pid_gone(int((tmp_path / "child.pid").read_text())), 15)
    assert "# half an idea" not in (repo / "train.py").read_text() and len(rows(repo)) == 1


def test_kill_9_during_the_agent_saves_its_partial_edit_on_resume(repo, env, tmp_path):
    initialised(repo, env)
    agent = tmp_path / "busy.sh"
    agent.write_text(f"#!/bin/sh\necho '# half an idea' >> train.py\necho $$ > {tmp_path}/agent.pid\nsleep 300\n")
    agent.chmod(0o755)
    proc = subprocess.Popen([sys.executable, str(AGENT_LOOP), "run", "--agent", str(agent)], cwd=repo, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    running = repo / ".git" / "autoresearch" / "t" / "running.json"
    assert wait_for(lambda: (tmp_path / "agent.pid").exists() and "pgid" in running.read_text())
    proc.kill()
    proc.wait()
    out = loop(repo, env, "run", "--agent", "mutate", "--max-experiments", "0").stdout
    assert "#1 interrupted before training; its changes are saved at refs/autoresearch/t/interrupted/1.1" in out
    assert wait_for(lambda: pid_gone(int((tmp_path / "agent.pid").read_text())), 15)
    assert "# half an idea" in git(repo, env, "show", "refs/autoresearch/t/interrupted/1.1:train.py")
    assert "# half an idea" not in (repo / "train.py").read_text() and clean_tracked(repo, env)
    assert len(rows(repo)) == 1


def test_hours_limit_stops_before_starting_an_experiment(repo, env):
    initialised(repo, env)
    out = loop(repo, env, "run", "--agent", "mutate", "--hours", "1e-9").stdout  # 3.6 microseconds: already past
    assert "time limit of 1e-09 h reached" in out and len(rows(repo)) == 1


def test_hours_limit_lets_the_running_experiment_finish_and_starts_no_other(repo, env):
    initialised(repo, env, SLEEP=1.5)          # every run takes 1.5 s: longer than the limit
    # 0.0003 h = 1.08 s: the first experiment starts at once and is still training when the limit passes;
    # --max-experiments 3 only bounds the test if the limit were ignored
    out = loop(repo, env, "run", "--agent", "mutate", "--hours", "0.0003", "--max-experiments", "3").stdout
    lines = out.split("\n")
    started = [i for i, line in enumerate(lines) if re.match(r"#\d+ ", line)]
    limit = [i for i, line in enumerate(lines) if "time limit of 0.0003 h reached" in line]
    assert [lines[i].split()[0] for i in started] == ["#1"] and len(limit) == 1, out
    assert started[0] < limit[0], out                   # said when it stopped, after the one experiment
    assert [r["n"] for r in rows(repo)] == ["0", "1"]
    assert sorted(p.name[:3] for p in (repo / "logs" / "t").glob("0*.log")) == ["000", "001"]
    assert not (repo / ".git" / "autoresearch" / "t" / "running.json").exists() and clean_tracked(repo, env)


def test_mutate_loop_runs_distinct_experiments_and_leaves_the_best(repo, env):
    initialised(repo, env, SHAPED=True)
    out = loop(repo, env, "run", "--agent", "mutate", "--max-experiments", "4").stdout
    assert "noise sigma unknown (no version has two comparable runs yet)" in out.split("\n")[0]  # 1 baseline run
    lines = [line for line in out.split("\n") if line.startswith("#")]
    assert len(lines) == 4 and all(re.search(r" \| [A-Z_]+ .+ -> .+$", line) for line in lines), out
    exps = rows(repo)[1:]
    assert len({r["train_py"] for r in exps}) == 4 and [r["n"] for r in exps] == ["1", "2", "3", "4"]
    best = [r for r in rows(repo) if r["status"] == "keep"][-1]
    assert git(repo, env, "rev-parse", "--short=7", "HEAD") == best["commit"] and clean_tracked(repo, env)
    for r in exps:
        if r["status"] != "keep":
            git(repo, env, "rev-parse", f"refs/autoresearch/t/discarded/{r['n']}")


def test_kill_9_mid_run_then_resume_loses_and_repeats_nothing(repo, env, request):
    initialised(repo, env, tag="k", SLEEP=1.5)
    proc = subprocess.Popen([sys.executable, str(AGENT_LOOP), "run", "--agent", "mutate", "--max-experiments", "10"],
                            cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    running = repo / ".git" / "autoresearch" / "k" / "running.json"

    def training_second_experiment():  # experiment #2's train.py is running, its row not yet written
        state = json.loads(running.read_text()) if running.exists() else {}
        return (state.get("n") == 2 == len(rows(repo)) and state.get("phase") == "train" and "pgid" in state
                and process.proc_start_time(state["pgid"]) is not None)
    assert wait_for(training_second_experiment, 60)
    state = json.loads(running.read_text())
    # its output goes to the loop's pipe: killed, the loop would end it at its next line. Stopped, it is a run
    # that prints nothing for a while, which only the resume can end
    os.killpg(state["pgid"], signal.SIGSTOP)
    request.addfinalizer(lambda: pid_gone(state["pgid"]) or os.killpg(state["pgid"], signal.SIGKILL))  # failed
    proc.kill()
    proc.wait()
    finished = rows(repo)
    assert state == json.loads(running.read_text()) and state["n"] == 2 == len(finished)
    assert process.proc_start_time(state["pgid"]) is not None  # the orphan train.py still runs
    scratch, prefix = runner.scratch_folders((repo / state["log"]).resolve())
    assert list(scratch.glob(f"{prefix}*"))  # its scratch folder
    caches = versions(repo / ".git" / "autoresearch" / "k")
    for cache in caches:  # what the killed run wrote there was never checked (autoresearch/carryover.py)
        (cache / "learned.pt").write_text("weights for the next run")
    assert caches
    shm = Path("/dev/shm") / f"killed-run-{os.getpid()}-{state['pgid']}"
    shm.write_text("weights for the next run")  # as the killed run could have
    out = loop(repo, env, "run", "--agent", "mutate", "--max-experiments", "1").stdout
    assert wait_for(lambda: pid_gone(state["pgid"]), 15), "the orphaned train.py was not stopped"
    after = rows(repo)
    assert after[:len(finished)] == finished                            # nothing rewritten
    interrupted, new = after[len(finished):]
    assert interrupted["n"] == str(state["n"]) and interrupted["status"] == "crash"
    assert interrupted["note"].startswith("interrupted") and "interrupted" in out
    assert new["n"] == str(state["n"] + 1) and new["status"] in ("keep", "discard")
    assert [r["n"] for r in after] == [str(i) for i in range(len(after))]  # no duplicate, no gap
    git(repo, env, "rev-parse", f"refs/autoresearch/k/discarded/{state['n']}")
    assert not running.exists() and clean_tracked(repo, env)
    assert not list(scratch.glob(f"{prefix}*"))  # the killed run's too
    assert not [c for c in caches if (c / "learned.pt").exists()]  # its compile cache, and the best's
    assert not shm.exists() or shm.unlink()


def test_a_process_that_left_the_runs_group_and_dropped_its_token_ends_with_the_run(repo, env, tmp_path):
    initialised(repo, env)
    set_train(repo, MODE="vanish", VAL_BPB=1.5)  # its child: a new session, an empty environment
    git(repo, env, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "vanish")
    loop(repo, dict(env, STANDIN_CHILD_PID=str(tmp_path / "child.pid")), "step", "-m", "vanish")
    assert pid_gone(int((tmp_path / "child.pid").read_text()))  # when step returns, not later
    assert "killed 1 process(es) of this run that outlived it" in (repo / rows(repo)[-1]["log"]).read_text()


def test_a_process_an_agent_left_behind_without_its_token_ends_with_the_agent_call(repo, env, tmp_path):
    initialised(repo, env)
    agent = tmp_path / "agent.sh"
    agent.write_text(f"#!/bin/sh\nsetsid env -i sh -c 'echo $$ > {tmp_path}/left.pid; exec sleep 600' &\n"
                     f"sleep 0.5\nsed -i 's/^VAL_BPB = .*/VAL_BPB = 1.5/' train.py\n")
    agent.chmod(0o755)
    loop(repo, env, "run", "--agent", str(agent), "--max-experiments", "1")
    assert pid_gone(int((tmp_path / "left.pid").read_text()))
    assert rows(repo)[-1]["status"] == "discard"


def test_an_environment_hard_linked_to_uvs_cache_is_named_with_the_fix(repo, env, tmp_path):
    # torch's files shared with another install (uv's default hard links): its ctime moves under the evaluator
    fake = tmp_path / "site" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    os.link(fake / "__init__.py", tmp_path / "uv-cache-copy.py")
    shared = dict(env, PYTHONPATH=str(tmp_path / "site"))
    init = loop(repo, shared, "init", "--tag", "t", "--repeats", "1")
    step = loop(repo, shared, "step", "-m", "same")
    for p in (init, step):
        assert f"{fake / '__init__.py'} has 2 hard links" in p.stderr and "Fix: `uv sync --reinstall`" in p.stderr
    assert "hard links" not in loop(repo, env, "step", "-m", "same again").stderr  # copies: nothing said


def test_a_running_json_the_agent_writes_between_steps_records_no_run_that_never_happened(repo, env):
    initialised(repo, env)
    # a commit on no branch, named in a record of a run "killed" during training: it would get a crash row (a
    # finding on record that never ran), and its seed would move every later seed
    ghost = git(repo, env, "-c", "user.name=t", "-c", "user.email=t@t", "commit-tree", "HEAD^{tree}", "-p", "HEAD",
                "-m", "4x wider MLP (val_bpb would have been 0.30)")
    (repo / ".git" / "autoresearch" / "t" / "running.json").write_text(json.dumps(
        {"n": 1, "phase": "train", "commit": ghost, "log": "logs/t/001-ghost.log", "seeds": [900]}))
    set_train(repo, VAL_BPB=0.9)
    p = loop(repo, env, "step", "-m", "lower")
    assert "running.json was written by something other than this loop since it last wrote it: set aside" in p.stdout
    assert [(r["n"], r["status"], r["description"]) for r in rows(repo)] == [
        ("0", "keep", "baseline"), ("1", "keep", "lower")]
    assert all(int(seed) < 900 for seed in rows(repo)[1]["seeds"].split(","))


def test_a_stale_running_json_never_kills_a_process_that_is_not_ours(repo, env, tmp_path, monkeypatch):
    from autoresearch import ledger
    initialised(repo, env)
    # someone else's process (a group leader, as a shell job is) now holds the pid that running.json names:
    # the killed loop's child is long gone and the pid was reused, so the start time differs
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)
    monkeypatch.chdir(repo)
    ledger.ledger_dir.cache_clear()
    try:
        started = int(process.proc_start_time(other.pid))
        ledger.keep_file(repo / ".git" / "autoresearch" / "t" / "running.json", json.dumps(  # as a loop wrote it
            {"n": 1, "phase": "propose", "pgid": other.pid, "started": str(started - 1)}).encode())
        p = loop(repo, env, "run", "--agent", "mutate", "--max-experiments", "0")
        time.sleep(0.5)                                  # a SIGTERM sent would have ended sleep by now
        assert other.poll() is None and process.proc_start_time(other.pid) == str(started)
        assert "killed the leftover" not in p.stderr and len(rows(repo)) == 1
        assert not (repo / ".git" / "autoresearch" / "t" / "running.json").exists()   # reconciled all the same
    finally:
        ledger.ledger_dir.cache_clear()
        other.kill()
        other.wait()


def kill_9_during_training(repo, env, *args):
    """Start agent_loop with these arguments, kill -9 it while experiment #1's train.py runs."""
    proc = subprocess.Popen([sys.executable, str(AGENT_LOOP), *args], cwd=repo, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    running = repo / ".git" / "autoresearch" / "t" / "running.json"

    def training():
        state = json.loads(running.read_text()) if running.exists() else {}
        return state.get("phase") == "train" and process.proc_start_time(state.get("pgid", 0)) is not None
    assert wait_for(training, 60)
    proc.kill()
    proc.wait()
    return json.loads(running.read_text())


def test_resume_never_resets_files_edited_after_a_kill(repo, env):
    initialised(repo, env)
    set_train(repo, VAL_BPB=0.9, SLEEP=60.0)
    state = kill_9_during_training(repo, env, "step", "-m", "slow")
    (repo / "README.md").write_text("notes written after the crash\n")
    p = loop(repo, env, "run", "--agent", "mutate", "--max-experiments", "0", check=False)
    assert p.returncode == 2 and "README.md" in p.stderr and "git stash" in p.stderr
    assert (repo / "README.md").read_text() == "notes written after the crash\n"
    assert wait_for(lambda: pid_gone(state["pgid"]), 15)               # the orphan is stopped all the same
    git(repo, env, "stash", "-q")
    loop(repo, env, "run", "--agent", "mutate", "--max-experiments", "0")
    git(repo, env, "stash", "pop", "-q")
    assert (repo / "README.md").read_text() == "notes written after the crash\n"
    assert [(r["n"], r["status"]) for r in rows(repo)] == [("0", "keep"), ("1", "crash")]
    assert "VAL_BPB = 0.9" in git(repo, env, "show", "refs/autoresearch/t/discarded/1:train.py")


@pytest.mark.parametrize("running_json", ["left", "deleted"])
def test_step_after_a_killed_step_runs_the_new_edit_of_train_py(repo, env, running_json):
    initialised(repo, env)
    set_train(repo, VAL_BPB=0.95, SLEEP=60.0)
    kill_9_during_training(repo, env, "step", "-m", "slow")
    if running_json == "deleted":  # the agent erasing the attempt (its seed would then be used again)
        (repo / ".git" / "autoresearch" / "t" / "running.json").unlink()
    set_train(repo, VAL_BPB=0.9, SLEEP=0.0)                 # the coding agent moves on to its next idea
    out = loop(repo, env, "step", "-m", "next idea").stdout
    assert "your uncommitted edit of train.py is kept" in out and "keep val_bpb=0.900000" in out
    assert ("running.json was written by something other than this loop since it last wrote it: made again"
            in out) == (running_json == "deleted")
    assert [(r["n"], r["status"]) for r in rows(repo)] == [("0", "keep"), ("1", "crash"), ("2", "keep")]
    assert "SLEEP = 60.0" in git(repo, env, "show", "refs/autoresearch/t/discarded/1~1:train.py")


def communicate_or_show_where_it_hangs(proc, timeout):
    """proc.communicate(); if the process (run with PYTHONFAULTHANDLER=1) is still there after `timeout`, fail
    with its Python stack, which SIGABRT makes faulthandler print (seen once in CI: a hang after Ctrl-C)."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        alive = proc.poll() is None
        proc.send_signal(signal.SIGABRT)
        out, err = proc.communicate(timeout=30)
        pytest.fail(f"no exit {timeout} s after the signal (alive: {alive})\nstdout:\n{out}\nstderr:\n{err[-6000:]}")


def test_ctrl_c_during_the_agent_saves_its_edit_and_stops_at_the_best(repo, env, tmp_path):
    initialised(repo, env)
    agent = tmp_path / "busy.sh"
    agent.write_text(f"#!/bin/sh\necho '# half an idea' >> train.py\necho $$ > {tmp_path}/agent.pid\nsleep 300\n")
    agent.chmod(0o755)
    # Ctrl-C as a terminal sends it: to a loop whose SIGINT is not ignored. A shell script's background job
    # (`bash .ci/run &`) starts with SIGINT ignored, every child inherits that, and Python then never raises
    # KeyboardInterrupt: the loop ignored the signal (seen twice, as a 30 s hang of this test).
    proc = subprocess.Popen([sys.executable, str(AGENT_LOOP), "run", "--agent", str(agent)], cwd=repo,
                            env=dict(env, PYTHONFAULTHANDLER="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert wait_for(lambda: (tmp_path / "agent.pid").exists())
    proc.send_signal(signal.SIGINT)
    out, _ = communicate_or_show_where_it_hangs(proc, 30)
    assert proc.returncode == 130 and "#1 interrupted before training" in out and "stopped: autoresearch/t" in out
    assert wait_for(lambda: pid_gone(int((tmp_path / "agent.pid").read_text())), 15)
    assert "# half an idea" in git(repo, env, "show", "refs/autoresearch/t/interrupted/1.1:train.py")
    assert "# half an idea" not in (repo / "train.py").read_text() and clean_tracked(repo, env)
    assert len(rows(repo)) == 1


CTRL_C_AT_LINE_N = """
import os, subprocess, sys, time
from autoresearch.process import run_group
left = {}
def tracer(frame, event, arg):  # a signal handler raises at whatever line runs: here, at the n-th one
    if event == "line" and left.get("n"):
        left["n"] -= 1
        if left["n"] == 0:
            raise KeyboardInterrupt
    return tracer
for n in range(1, 21):
    child, start = {}, time.monotonic()
    sys.settrace(tracer)
    try:
        run_group(["sleep", "30"], subprocess.DEVNULL, subprocess.DEVNULL, dict(os.environ), 60,
                  on_spawn=lambda pid: (child.update(pid=pid), left.update(n=n)))
    except KeyboardInterrupt:
        pass
    sys.settrace(None)
    print(n, round(time.monotonic() - start, 1), os.path.exists(f"/proc/{child['pid']}"), flush=True)
"""


def test_ctrl_c_at_any_line_of_a_childs_wait_ends_the_child_and_returns(tmp_path):
    # Popen.wait() left its lock held when Ctrl-C landed just after acquiring it, and the loop hung for ever
    proc = subprocess.run([sys.executable, "-c", CTRL_C_AT_LINE_N], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    trials = [line.split() for line in proc.stdout.splitlines()]
    assert len(trials) == 20, proc.stdout + proc.stderr
    assert all(float(seconds) < 5 and alive == "False" for _, seconds, alive in trials), proc.stdout


def test_sigterm_stops_cleanly_at_the_best_commit(repo, env, tmp_path):
    initialised(repo, env)
    set_train(repo, MODE="hang")
    env = dict(env, STANDIN_CHILD_PID=str(tmp_path / "child.pid"))
    proc = subprocess.Popen([sys.executable, str(AGENT_LOOP), "step", "-m", "hang"], cwd=repo, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda: (tmp_path / "child.pid").exists(), 30)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "stopped: autoresearch/t at the best commit" in out
    assert wait_for(lambda: pid_gone(int((tmp_path / "child.pid").read_text())), 15)
    exp = rows(repo)[1]
    assert exp["status"] == "crash" and exp["note"].startswith("interrupted: the loop was stopped")
    assert 'MODE = "ok"' in (repo / "train.py").read_text() and clean_tracked(repo, env)
    assert "MODE = 'hang'" in git(repo, env, "show", "refs/autoresearch/t/discarded/1:train.py")


def test_sigterm_during_the_demo_ends_its_training_run_without_a_traceback(repo, env, tmp_path):
    set_train(repo, MODE="hang")
    git(repo, env, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "a baseline that hangs")
    demo_cache = Path(env["AUTORESEARCH_CACHE_DIR"]) / "demo"
    demo_cache.mkdir()
    (demo_cache / "ready").write_text("")
    env = dict(env, STANDIN_CHILD_PID=str(tmp_path / "child.pid"))
    proc = subprocess.Popen([sys.executable, str(AGENT_LOOP), "demo"], cwd=repo, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda: (tmp_path / "child.pid").exists(), 60)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "demo stopped at stage 3; the worktree is kept" in err
    assert "Traceback" not in out + err
    assert wait_for(lambda: pid_gone(int((tmp_path / "child.pid").read_text())), 15)
    assert git(repo, env, "branch", "--show-current") == "main" and clean_tracked(repo, env)


def test_a_partial_last_row_is_ignored_then_repaired(repo, env):
    initialised(repo, env)
    with open(repo / "results.tsv", "a") as f:
        f.write("abc1234\t0.99")                      # what a power cut mid-write could leave
    s = json.loads(loop(repo, env, "report", "--json").stdout)
    assert s["experiments"] == 0
    set_train(repo, VAL_BPB=1.02)
    loop(repo, env, "step", "-m", "worse")
    assert [r["n"] for r in rows(repo)] == ["0", "1"]


def test_a_complete_last_row_without_its_newline_is_kept(repo, env):
    initialised(repo, env)
    text = (repo / "results.tsv").read_text()
    (repo / "results.tsv").write_text(text.rstrip("\n"))  # saved by an editor that drops the final newline
    set_train(repo, VAL_BPB=1.02)
    loop(repo, env, "step", "-m", "worse")
    assert [r["n"] for r in rows(repo)] == ["0", "1"] and rows(repo)[0]["description"] == "baseline"


# -----------------------------------------------------------------------------
# mutate proposals (pure functions)


def test_mutate_edits_the_active_profile_block_and_respects_batch_rules():
    source = (STAND_IN / "train.py").read_text()
    params = mutate.active_hyperparameters(source, "smoke")
    assert params["DEPTH"][2] == 2 and params["TOTAL_BATCH_SIZE"][2] == 2**13 and params["MATRIX_LR"][2] == 0.04
    assert mutate.active_hyperparameters(source, "reference")["DEPTH"][2] == 8
    assert mutate.active_hyperparameters(source, "cpu")["DEPTH"][2] == 4
    import random
    seen, descriptions = set(), set()
    for i in range(60):
        new, desc = mutate.propose_mutation(source, "smoke", 128, random.Random(i), seen)
        after = mutate.active_hyperparameters(new, "smoke")
        changed = [k for k in params if params[k][2] != after[k][2]]
        assert len(changed) == 1 and desc.startswith(changed[0] + " ")
        p = {k: v[2] for k, v in after.items()}
        assert p["TOTAL_BATCH_SIZE"] % (p["DEVICE_BATCH_SIZE"] * 128) == 0
        assert p["DEPTH"] >= 1 and 0 < p["MATRIX_LR"] <= 1 and all(0.5 <= b <= 0.999 for b in p["ADAM_BETAS"])
        if changed[0] == "DEPTH":  # the smoke block's line, not the top-level one
            assert "    DEPTH = 2" not in new and "DEPTH = 8" in new
        if changed[0] == "TOTAL_BATCH_SIZE":
            assert re.search(r"^    TOTAL_BATCH_SIZE = 2\*\*1[24]$", new, re.M)
        descriptions.add(desc)
        compile(new, "train.py", "exec")
    assert len(descriptions) > 10
    # never a train.py that was seen before
    first, _ = mutate.propose_mutation(source, "smoke", 128, random.Random(0), seen)
    again, _ = mutate.propose_mutation(source, "smoke", 128, random.Random(0), {gitrepo.blob_hash(first.encode())})
    assert again != first


def test_a_non_utf8_description_is_stored_as_valid_utf8(repo, env):
    initialised(repo, env)
    set_train(repo, VAL_BPB=1.02)
    loop(repo, env, "step", "-m", "caf\udce9 latin-1")      # the byte 0xe9 on the command line
    (repo / "results.tsv").read_bytes().decode("utf-8")
    assert rows(repo)[1]["description"] == "caf\ufffd latin-1"


def test_agent_that_writes_non_utf8_into_train_py_gets_a_crash_row(repo, env):
    initialised(repo, env)
    out = loop(repo, env, "run", "--agent", "printf '# caf\\351\\n' >> train.py; echo latin-1 comment",
               "--max-experiments", "1").stdout
    assert "#1 crash exit code 1: SyntaxError: Non-UTF-8 code" in out and "done: 1 experiments" in out
    assert rows(repo)[1]["status"] == "crash" and clean_tracked(repo, env)


def test_summary_block_parsing_takes_the_last_block():
    out = "step 1\r step 2\n---\nval_bpb: 9.0\n---\nval_bpb:          0.997900\npeak_vram_mb:     45060.2\nmfu_percent:      n/a\n"
    s = runner.parse_summary(out)
    assert s == {"val_bpb": "0.997900", "peak_vram_mb": "45060.2", "mfu_percent": "n/a"}


# -----------------------------------------------------------------------------
# report


def test_the_step_that_crosses_the_budget_may_end_past_it_by_two_mean_steps_or_a_second_not_more():
    def judged(trained, steps, budget=60):
        block = f"---\nval_bpb: 0.5\ntraining_seconds: {trained}\nnum_steps: {steps}\n"
        return runner.judge_run(block, 0, 600, budget=budget)[0]
    assert judged(61.0, 45) is None            # 2 mean steps: 2 x 61 / 45 = 2.7 s
    assert "past the 60 s budget by more than 2.80 s" in judged(63.0, 45)
    assert judged(61.1, 1000) is None          # 2% of the budget when steps are short
    assert "past the 60 s budget by more than 1.20 s" in judged(61.3, 1000)
    assert judged(10.7, 134, budget=10) is None  # smoke: a last step the load came on for (2% is 0.2 s)
    assert "past the 10 s budget by more than 1.00 s" in judged(11.1, 134, budget=10)


def test_a_train_py_that_pins_its_own_seed_is_a_crash_that_says_so(repo, env):
    # every run the same draw, and the luckiest seed of the night's rows chosen: noise that would pass for a gain
    initialised(repo, env, repeats=2, NOISE=0.01)             # seeds 42, 43: 1.0, 1.01
    set_train(repo, SEED=30, JITTER=0.0005)                   # ~0.88 on every run: not quite copies
    out = loop(repo, env, "step", "-m", "pin the seed for reproducibility").stdout
    exp = rows(repo)[1]
    assert exp["status"] == "crash" and "ran seed 30, not the seed 44 the loop gave it" in exp["note"], out
    assert "AUTORESEARCH_SEED" in out


@pytest.mark.whole_machine  # its spinners need the other core free to show what they took
def test_a_run_that_leaves_its_share_of_the_cores_is_a_crash_that_says_so(repo, env):
    # a worker of `run --workers` on a CPU trains on its share of the cores: more would be a bigger budget
    if len(os.sched_getaffinity(0)) < 2:  # as a whole_machine test runs: every core
        pytest.skip("a share of the cores needs two of them")
    initialised(repo, env)
    set_train(repo, MODE="escape")
    one = min(os.sched_getaffinity(0))
    p = subprocess.run([sys.executable, str(AGENT_LOOP), "step", "-m", "use every core"], cwd=repo, env=env,
                       capture_output=True, text=True, timeout=120, preexec_fn=lambda: os.sched_setaffinity(0, {one}))
    exp = rows(repo)[1]
    assert exp["status"] == "crash" and "more than the 1 it was given" in exp["note"], p.stdout + p.stderr


def test_report_reads_an_upstream_five_column_results_tsv(tmp_path, env):
    up = tmp_path / "up.tsv"
    up.write_text(UPSTREAM_TSV)
    s = json.loads(loop(tmp_path, env, "report", "--json", "--results", str(up)).stdout)
    assert s["best"]["val_bpb"] == 0.9932 and s["best"]["commit"] == "a1b2c3d"
    assert s["baseline"]["val_bpb"] == 0.9979 and s["improvement"] == 0.0047
    assert (s["experiments"], s["keeps"], s["discards"], s["crashes"]) == (3, 1, 1, 1)
    assert s["kept"][0]["delta"] == -0.0047 and s["crashed"][0]["description"] == "double model width (OOM)"
    text = loop(tmp_path, env, "report", str(up)).stdout
    assert "0.993200" in text and "improvement 0.004700 (0.47%)" in text and "double model width" in text
    up.write_text(UPSTREAM_TSV.rstrip("\n"))  # hand-written: no final newline
    assert json.loads(loop(tmp_path, env, "report", "--json", str(up)).stdout)["crashes"] == 1


def test_report_on_an_empty_file_and_on_one_without_a_keep(tmp_path, env):
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    p = loop(tmp_path, env, "report", str(empty), check=False)
    assert p.returncode == 2 and "has no rows yet" in p.stderr
    crashed = tmp_path / "crashed.tsv"
    crashed.write_text("commit\tval_bpb\tmemory_gb\tstatus\tdescription\n"
                       "a1b2c3d\t0.000000\t0.0\tcrash\tbaseline OOM\n")
    s = json.loads(loop(tmp_path, env, "report", "--json", str(crashed), "--plot", str(tmp_path / "p.png")).stdout)
    assert s["best"]["commit"] == "a1b2c3d" and s["experiments"] == 0
    assert (tmp_path / "p.png").exists()


def test_report_plot_and_json_of_our_results(repo, env, tmp_path):
    initialised(repo, env)
    for val, mode in ((0.99, "ok"), (1.0005, "ok"), (0.99, "crash"), (0.98, "ok")):
        set_train(repo, VAL_BPB=val, MODE=mode)
        loop(repo, env, "step", "-m", f"val {val} {mode}")
    s = json.loads(loop(repo, env, "report", "--json").stdout)
    assert (s["experiments"], s["keeps"], s["crashes"], s["best"]["val_bpb"]) == (4, 2, 1, 0.98)
    assert [k["description"] for k in s["kept"]] == ["val 0.99 ok", "val 0.98 ok"]
    assert s["loop_overhead_s_mean"] is not None
    p = loop(repo, env, "report", "--tag", "other", check=False)
    assert p.returncode == 2 and "no rows for tag other" in p.stderr
    png = tmp_path / "progress.png"
    loop(repo, env, "report", "--plot", str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
