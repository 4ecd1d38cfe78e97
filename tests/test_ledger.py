"""The record of the night survives what an agent or a run does to the checkout: results.tsv is rendered from a
ledger under .git, logs and the commits of discarded experiments are kept beside it, and nothing a finished run
left running can write a row. Hostile stand-ins in real git repositories."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_agent_loop import REPO, env, git, initialised, loop, repo, rows, set_train  # noqa: E402,F401
pytestmark = pytest.mark.long(minutes=1.5)  # on one core; conftest hands out the longest files first


def commit_train(repo, env, message, **consts):
    set_train(repo, **consts)
    git(repo, env, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", message)


def test_results_and_logs_added_to_git_by_the_agent_come_back_after_the_reset(repo, env):
    initialised(repo, env)
    # the add is retried: the loop writes running.json (tmp file, then rename) while the agent starts, and a
    # git add that catches the tmp file gone fails (2 runs in 10 kept the change with nothing tracked)
    agent = ("for i in $(seq 50); do git add -f results.tsv logs 2>/dev/null && break; sleep 0.1; done; "
             "sed -i 's/^VAL_BPB = .*/VAL_BPB = 0.5/' train.py; echo sneaky")
    loop(repo, env, "run", "--agent", agent, "--max-experiments", "1")
    assert [r["status"] for r in rows(repo)] == ["keep", "discard"] and "results.tsv" in rows(repo)[1]["note"]
    assert list((repo / "logs" / "t").glob("000-*.log")) and list((repo / "logs" / "t").glob("001-*.log"))
    assert git(repo, env, "ls-files", "results.tsv", "logs") == ""
    # and the loop goes on from there
    loop(repo, env, "run", "--agent", "sed -i 's/^VAL_BPB = .*/VAL_BPB = 0.9/' train.py; echo next",
         "--max-experiments", "1")
    assert [r["status"] for r in rows(repo)] == ["keep", "discard", "keep"], rows(repo)[-1]["note"]


def test_deleted_logs_are_restored_and_an_edited_results_tsv_is_rendered_again(repo, env):
    initialised(repo, env)
    before = (repo / "results.tsv").read_text()
    subprocess.run(["rm", "-rf", str(repo / "logs" / "t")], check=True)
    with open(repo / "results.tsv", "a") as f:  # a forged keep, between two `step` calls
        f.write("f0f0f0f\t0.100000\t0.0\tkeep\tforged\tt\t1\n")
    commit_train(repo, env, "lower", VAL_BPB=0.99)
    out = loop(repo, env, "step", "-m", "lower").stdout
    assert "rendered again" in out and "restored" in out
    assert "forged" not in (repo / "results.tsv").read_text()
    assert (repo / "results.tsv").read_text().startswith(before)
    assert list((repo / "logs" / "t").glob("000-*.log"))


def test_a_discarded_experiment_survives_deleted_refs_and_gc(repo, env):
    initialised(repo, env)
    commit_train(repo, env, "worse", VAL_BPB=1.5)
    loop(repo, env, "step", "-m", "worse")
    assert rows(repo)[-1]["status"] == "discard"
    refs = git(repo, env, "for-each-ref", "--format=delete %(refname)", "refs/autoresearch/")
    subprocess.run(["git", "update-ref", "--stdin"], cwd=repo, env=env, input=refs + "\n", text=True, check=True)
    git(repo, env, "reflog", "expire", "--expire=now", "--all")
    git(repo, env, "gc", "-q", "--prune=now")
    patches = list((repo / ".git" / "autoresearch" / "t").glob("001-*.patch"))
    assert len(patches) == 1 and "VAL_BPB = 1.5" in patches[0].read_text()
    git(repo, env, "apply", "--check", str(patches[0]))  # still applies on the best commit


def test_the_morning_report_shows_the_rows_the_loop_wrote_not_a_keep_forged_after_its_last_command(repo, env):
    initialised(repo, env)
    commit_train(repo, env, "worse", VAL_BPB=1.5)
    loop(repo, env, "step", "-m", "worse")
    real = json.loads(loop(repo, env, "report", "--json").stdout)
    forged = "\t".join(["abcdef0", "0.500000", "0.0", "keep", "a breakthrough", "t", "2"]) + "\n"
    for path in (repo / "results.tsv", repo / ".git" / "autoresearch" / "results.tsv"):
        with open(path, "a") as f:  # the agent's last act of the night: no command of the loop comes after it
            f.write(forged)
        p = loop(repo, env, "report", "--json")
        assert json.loads(p.stdout) == dict(real, results=str(repo / ".git" / "autoresearch" / "results.tsv"))
        assert "results.tsv differs from the rows the loop last wrote" in p.stderr
        assert "a breakthrough" not in loop(repo, env, "report").stdout
    # and the branch moved to another commit after the loop's last command: said, with the fix
    best = git(repo, env, "rev-parse", "HEAD")
    other = git(repo, env, "-c", "user.name=t", "-c", "user.email=t@t", "commit-tree", "HEAD^{tree}", "-m", "x")
    git(repo, env, "reset", "-q", other)
    p = loop(repo, env, "report")
    assert f"autoresearch/t is at {other[:7]}, neither at the best nor past it" in p.stderr, p.stderr
    assert f"git checkout autoresearch/t && git reset --keep {best}" in p.stderr


def test_a_step_whose_shell_names_another_cache_is_refused_and_its_pythonpath_never_reaches_a_run(
        repo, env, tmp_path):
    initialised(repo, env)
    # a copy of the cache whose training data the agent garbled, for the best's re-runs only: refused
    copy = tmp_path / "copy"
    shutil.copytree(env["AUTORESEARCH_CACHE_DIR"], copy)
    commit_train(repo, env, "comment only", VAL_BPB=1.0)
    p = loop(repo, dict(env, AUTORESEARCH_CACHE_DIR=str(copy)), "step", "-m", "comment only", check=False)
    assert p.returncode == 2 and f"AUTORESEARCH_CACHE_DIR={copy}, but autoresearch/t was initialised with" in p.stderr
    assert len(rows(repo)) == 1
    # the pinned cache named another way is the same cache; a PYTHONPATH set now is not the one pinned at init
    # (none): a sitecustomize there would run in the best's re-runs alone
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(  # which scripts it ran in (the loop's own Python has it too)
        f"import atexit, sys\natexit.register(lambda: open({str(tmp_path / 'ran')!r}, 'a').write(sys.argv[0] + '\\n'))\n")
    named = Path(env["AUTORESEARCH_CACHE_DIR"]).parent / "." / Path(env["AUTORESEARCH_CACHE_DIR"]).name
    p = loop(repo, dict(env, AUTORESEARCH_CACHE_DIR=str(named), PYTHONPATH=str(site)), "step", "-m", "comment only")
    assert "the shell's PYTHONPATH not as pinned at init: every run of t has the pinned value" in p.stdout
    assert rows(repo)[-1]["description"] == "comment only" and "agent_loop.py" in (tmp_path / "ran").read_text()
    assert "train.py" not in (tmp_path / "ran").read_text()


def test_training_data_written_between_two_steps_even_changed_back_stops_the_tag_before_any_run(repo, env):
    from autoresearch.metricdata import file_stamps
    from autoresearch.valwatch import TRAIN_FILES
    from test_agent_loop import pin
    folder = Path(env["AUTORESEARCH_CACHE_DIR"]) / "prepared" / "synthetic" / "smoke"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.bin").write_bytes(bytes(range(256)) * 16)
    (folder / "train.offsets.npy").write_bytes(b"\0" * 64)
    initialised(repo, env)
    pin(repo, train_data=file_stamps(folder, TRAIN_FILES))  # as init pins them with the real prepare.py
    commit_train(repo, env, "lower", VAL_BPB=0.99)
    assert loop(repo, env, "step", "-m", "lower").stdout.startswith("keep")
    # the agent garbles the training data for the best's re-runs of its next step, and puts it back after
    data = (folder / "train.bin").read_bytes()
    (folder / "train.bin").write_bytes(data[::-1])
    (folder / "train.bin").write_bytes(data)
    commit_train(repo, env, "lower again", VAL_BPB=0.98)
    p = loop(repo, env, "step", "-m", "lower again", check=False)
    assert p.returncode == 2 and f"the training data of tag t changed since init (train.bin in {folder})" \
        in p.stderr and "nothing was run" in p.stderr, p
    assert len(rows(repo)) == 2


def test_the_patch_kept_is_the_change_from_the_best_whatever_parent_grafts_give_the_commit(repo, env):
    initialised(repo, env)
    best = git(repo, env, "rev-parse", "HEAD")
    ident = ("-c", "user.name=t", "-c", "user.email=t@t")
    set_train(repo, VAL_BPB=0.5)  # the change that runs, hidden in a shadow commit on the best
    git(repo, env, "add", "train.py")
    shadow = git(repo, env, *ident, "commit-tree", git(repo, env, "write-tree"), "-p", best, "-m", "shadow")
    git(repo, env, "reset", "-q")
    with open(repo / "train.py", "a") as f:
        f.write("# a comment\n")
    git(repo, env, *ident, "commit", "-qam", "a comment")
    # .git/info/grafts (git 2.39 reads it, --no-replace-objects or not): the commit's parent is the shadow, and
    # format-patch -1 would show the comment alone
    (repo / ".git" / "info" / "grafts").write_text(f"{git(repo, env, 'rev-parse', 'HEAD')} {shadow}\n")
    loop(repo, env, "step", "-m", "a comment")
    (patch,) = (repo / ".git" / "autoresearch" / "t").glob("001-*.patch")
    assert "+VAL_BPB = 0.5" in patch.read_text() and "+# a comment" in patch.read_text()
    (repo / ".git" / "info" / "grafts").unlink()
    git(repo, env, "checkout", "-q", best)
    git(repo, env, "apply", "--check", str(patch))  # on the best's train.py


@pytest.mark.parametrize("where", ["worktree", "ledger_env"])
def test_a_copy_of_the_tags_ledger_with_a_worse_best_runs_nothing(repo, env, where):
    initialised(repo, env)
    best = git(repo, env, "rev-parse", "HEAD")
    ledger = repo / ".git" / "autoresearch"
    if where == "worktree":  # a worktree's ledger is a folder of its own, with no record of the loop's
        checkout = repo / "worktrees" / "x"
        git(repo, env, "worktree", "add", "-q", "-f", str(checkout), "autoresearch/t")
        forged = repo / ".git" / "worktrees" / "x" / "autoresearch"
    else:  # AUTORESEARCH_LEDGER_DIR (the workers' coordinator's) set in the agent's shell
        checkout, forged = repo, repo / ".git" / "autoresearch-x"
        env = dict(env, AUTORESEARCH_LEDGER_DIR=str(forged))
    shutil.copytree(ledger, forged, dirs_exist_ok=True)
    results = forged / "results.tsv"
    results.write_text(results.read_text().replace("1.000000", "1.500000"))  # the best's runs made worse
    set_train(checkout, VAL_BPB=1.2)  # worse than the real best
    p = loop(checkout, env, "step", "-m", "a worse change", check=False)
    assert p.returncode == 2 and f"tag t's rows are in the ledger {ledger / 'results.tsv'}" in p.stderr, p
    assert "nothing was run" in p.stderr and f"run the loop in {repo}" in p.stderr
    assert git(repo, env, "rev-parse", "autoresearch/t") == best and len(rows(repo)) == 1
    assert len(results.read_text().splitlines()) == 2  # the copy got no row either


def test_a_run_that_edits_prepare_py_and_changes_it_back_is_rejected(repo, env):
    initialised(repo, env)
    commit_train(repo, env, "bend and restore", MODE="restore", VAL_BPB=0.5)
    loop(repo, env, "step", "-m", "bend and restore")
    row = rows(repo)[-1]
    assert row["status"] == "discard" and "wrote prepare.py while running" in row["note"], row


def test_a_run_that_writes_the_records_under_git_is_rejected_and_they_are_put_back(repo, env):
    initialised(repo, env)
    ledger = repo / ".git" / "autoresearch"
    pinned, before = (ledger / "t" / "init.json").read_bytes(), (ledger / "results.tsv").read_text()
    commit_train(repo, env, "rewrite the records", MODE="ledger", VAL_BPB=0.5)
    loop(repo, env, "step", "-m", "rewrite the records")
    row = rows(repo)[-1]
    assert row["status"] == "discard" and row["note"].startswith("rejected:"), row
    kernel = "u/compile-cache/0123456789abcdef/kernel.py"  # another tag's: the best's code there, say
    for written in ("results.tsv", "t/init.json", "t/planted.json", kernel):
        assert f".git/autoresearch/{written}" in row["note"], (written, row["note"])
    # put back: no forged row, the pinned budget, the plant kept aside (nothing lost), the kernel gone
    assert all("forged" not in path.read_text() for path in (ledger / "results.tsv", repo / "results.tsv"))
    assert (ledger / "results.tsv").read_text().startswith(before)
    assert (ledger / "t" / "init.json").read_bytes() == pinned
    assert not (ledger / "t" / "planted.json").exists()
    assert list((repo / "logs").glob("t/*-set-aside/t/planted.json"))
    assert not (ledger / "u" / "compile-cache" / "0123456789abcdef").exists()
    # a record rewritten and put back byte for byte is caught too (its ctime moved); honest runs go on as before
    commit_train(repo, env, "and back", MODE="ledgerback", VAL_BPB=0.5)
    loop(repo, env, "step", "-m", "and back")
    note = rows(repo)[-1]["note"]
    assert note.startswith("rejected:") and ".git/autoresearch/results.tsv" in note, note
    # the folder swapped for a link to a forged one: made again, from the records kept
    commit_train(repo, env, "swap", MODE="ledgerswap", VAL_BPB=0.5)
    loop(repo, env, "step", "-m", "swap")
    assert not ledger.is_symlink() and (ledger / "t" / "init.json").read_bytes() == pinned
    note = rows(repo)[-1]["note"]
    assert note.startswith("rejected:") and "was replaced while the run trained" in note, note
    commit_train(repo, env, "honest", MODE="ok", VAL_BPB=0.9)
    assert loop(repo, env, "step", "-m", "honest").stdout.startswith("keep")
    assert [r["status"] for r in rows(repo)] == ["keep", "discard", "discard", "discard", "keep"]
    assert "forged" not in (ledger / "results.tsv").read_text()


def test_a_run_that_writes_the_loops_records_outside_the_repository_is_rejected_and_they_are_put_back(repo, env):
    # a row in the ledger's record alone, a budget raised in the pinned config and in its copy: the next command
    # would have completed the row and put the raised budget in place
    initialised(repo, env)
    ledger = repo / ".git" / "autoresearch"
    pinned = (ledger / "t" / "init.json").read_bytes()
    commit_train(repo, env, "rewrite the records outside", MODE="records", VAL_BPB=0.5)
    loop(repo, env, "step", "-m", "rewrite the records outside")
    row = rows(repo)[-1]
    assert row["status"] == "discard" and row["note"].startswith("rejected:"), row
    assert ".local/state/autoresearch/ledgers/" in row["note"] and "t/init.json" in row["note"], row["note"]
    commit_train(repo, env, "train five budgets", MODE="ok", VAL_BPB=0.5, TRAINED=5.0)
    p = loop(repo, env, "step", "-m", "train five budgets")
    assert "written by something other than this loop" not in p.stdout, p.stdout
    assert (ledger / "t" / "init.json").read_bytes() == pinned
    assert rows(repo)[-1]["status"] == "crash" and "past the 1 s budget" in rows(repo)[-1]["note"], rows(repo)
    # the same, then the copies' folder and the record deleted: made again from what the seal kept
    commit_train(repo, env, "and delete them", MODE="recordsgone", VAL_BPB=0.5, TRAINED=1.0)
    note = loop(repo, env, "step", "-m", "and delete them") and rows(repo)[-1]["note"]
    assert note.startswith("rejected:") and "was replaced while the run trained" in note, note
    commit_train(repo, env, "train five budgets again", MODE="ok", VAL_BPB=0.6, TRAINED=5.0)
    p = loop(repo, env, "step", "-m", "train five budgets again")
    assert "written by something other than this loop" not in p.stdout, p.stdout
    assert "past the 1 s budget" in rows(repo)[-1]["note"], rows(repo)[-1]
    assert [r["description"] for r in rows(repo)] == [
        "baseline", "rewrite the records outside", "train five budgets", "and delete them",
        "train five budgets again"]
    assert "forged" not in (ledger / "results.tsv").read_text() and "forged" not in record_of(repo).read_text()


def forge_keep_row(ledger, *also):
    """A shell command that appends a keep row of val_bpb 0.1 for tag t, every column filled, to this ledger (and
    the same line to each file of `also`)."""
    code = ("import sys; path = sys.argv[1]; header = open(path).readline().rstrip().split('\\t'); "
            "row = dict.fromkeys(header, '1'); row.update(commit='f0f0f0f', val_bpb='0.100000', status='keep', "
            "description='forged', tag='t', note='forged'); "
            "[open(p, 'a').write('\\t'.join(row[c] for c in header) + '\\n') for p in sys.argv[1:]]")
    return f"{sys.executable} -c \"{code}\" {' '.join(map(str, (ledger, *also)))}"


def record_of(repo):
    """The ledger's record outside the repository (ledger.record_file)."""
    import hashlib
    from autoresearch import ledger
    key = hashlib.sha256(str((repo / ".git" / "autoresearch").resolve()).encode()).hexdigest()[:24]
    return ledger.record_folder() / key


def forget_records(repo):
    """Remove what the loop keeps outside the repository about its ledger: as before records were kept."""
    import shutil
    record_of(repo).unlink()
    shutil.rmtree(f"{record_of(repo)}.files")


def test_a_row_an_agent_forges_in_the_ledger_during_run_is_put_back_before_the_next_row(repo, env):
    initialised(repo, env)
    forget_records(repo)  # a ledger from before records: run's first check adopts it
    ledger = repo / ".git" / "autoresearch" / "results.tsv"
    agent = f"{forge_keep_row(ledger)}; sed -i 's/^VAL_BPB = .*/VAL_BPB = 0.9/' train.py; echo better"
    out = loop(repo, env, "run", "--agent", agent, "--max-experiments", "1").stdout
    assert "was written by something other than this loop" in out, out
    assert [(r["status"], r["description"]) for r in rows(repo)] == [("keep", "baseline"), ("keep", "better")]
    (edited,) = ledger.parent.glob("results.tsv.edited-*")  # kept, not lost
    assert "f0f0f0f" not in ledger.read_text() and "f0f0f0f" in edited.read_text()  # the forged row


def test_a_row_an_agent_forges_in_the_ledger_and_its_record_alike_during_run_is_put_back(repo, env):
    # `run` lives across the experiments: it knows the record as it last wrote it, whatever was written since
    initialised(repo, env)
    ledger = repo / ".git" / "autoresearch" / "results.tsv"
    agent = (f"{forge_keep_row(ledger, record_of(repo))}; "
             f"sed -i 's/^VAL_BPB = .*/VAL_BPB = 0.9/' train.py; echo better")
    out = loop(repo, env, "run", "--agent", agent, "--max-experiments", "1").stdout
    assert "the ledger's record" in out and "was written by something other than this loop" in out, out
    assert [(r["status"], r["description"]) for r in rows(repo)] == [("keep", "baseline"), ("keep", "better")]
    assert "forged" not in ledger.read_text() and "forged" not in record_of(repo).read_text()


def test_a_row_forged_in_the_ledger_between_two_steps_is_put_back_by_the_next(repo, env):
    # each `step` is a process of its own: what the last one wrote is known from its record outside the repository
    initialised(repo, env)
    ledger = repo / ".git" / "autoresearch" / "results.tsv"
    subprocess.run(forge_keep_row(ledger), shell=True, check=True)  # a best of 0.1 that nothing measured
    commit_train(repo, env, "better", VAL_BPB=0.9)
    p = loop(repo, env, "step", "-m", "better")
    assert "was written by something other than this loop" in p.stdout, p.stdout
    assert p.stdout.splitlines()[-1].startswith("keep"), p.stdout  # judged against the baseline, not the forgery
    assert [(r["status"], r["description"]) for r in rows(repo)] == [("keep", "baseline"), ("keep", "better")]
    (edited,) = ledger.parent.glob("results.tsv.edited-*")  # kept, not lost
    assert "f0f0f0f" not in ledger.read_text() and "f0f0f0f" in edited.read_text()  # the forged row
    # a row deleted, and the whole ledger deleted: each put back by the next command of the loop
    ledger.write_text("".join(ledger.read_text().splitlines(keepends=True)[:-1]))
    commit_train(repo, env, "worse", VAL_BPB=1.5)
    assert loop(repo, env, "step", "-m", "worse").stdout.splitlines()[-1].startswith("discard")
    ledger.unlink()
    commit_train(repo, env, "worse again", VAL_BPB=1.6)
    assert loop(repo, env, "step", "-m", "worse again").stdout.splitlines()[-1].startswith("discard")
    assert [r["description"] for r in rows(repo)] == ["baseline", "better", "worse", "worse again"]
    # the file that names the repository rewritten too: the ledger still begins as its record does, so it is the same
    (repo / ".git" / "autoresearch-ledger-id").write_text("0123456789abcdef")
    subprocess.run(forge_keep_row(ledger), shell=True, check=True)
    commit_train(repo, env, "worse still", VAL_BPB=1.7)
    p = loop(repo, env, "step", "-m", "worse still")
    assert "was written by something other than this loop" in p.stdout, p.stdout
    assert p.stdout.splitlines()[-1].startswith("discard"), p.stdout
    assert "forged" not in ledger.read_text() and rows(repo)[-1]["description"] == "worse still"


def test_the_id_file_rewritten_with_the_whole_ledger_is_no_new_clone_and_both_are_put_back(repo, env):
    # a new clone at the same path has no rows yet when the loop first meets the old record; this ledger has
    initialised(repo, env)
    ledger = repo / ".git" / "autoresearch" / "results.tsv"
    before = ledger.read_text()
    header, baseline = before.splitlines()[:2]
    columns = header.split("\t")
    forged = dict(zip(columns, baseline.split("\t")), val_bpb="5.000000", val_bpb_runs="5.000000")
    (repo / ".git" / "autoresearch-ledger-id").write_text("0123456789abcdef")
    ledger.write_text(header + "\n" + "\t".join(forged[c] for c in columns) + "\n")  # a baseline anything beats
    commit_train(repo, env, "worse", VAL_BPB=1.5)
    p = loop(repo, env, "step", "-m", "worse")
    assert "was written by something other than this loop" in p.stdout, p.stdout
    assert p.stdout.splitlines()[-1].startswith("discard"), p.stdout
    assert ledger.read_text().startswith(before) and "5.000000" not in ledger.read_text()
    assert (repo / ".git" / "autoresearch-ledger-id").read_text() != "0123456789abcdef"


def test_runs_forged_into_an_experiment_a_step_left_half_confirmed_are_put_back_by_the_next_step(repo, env):
    initialised(repo, env, SLEEP=0.0)
    set_train(repo, VAL_BPB=0.99, SLEEP=1.5)
    env = dict(env, AUTORESEARCH_STEP_LIMIT_S="1")  # one run per call: the experiment waits in pending.json
    assert loop(repo, env, "step", "-m", "lower the loss").stdout.startswith("confirming #1:")
    pending = repo / ".git" / "autoresearch" / "t" / "pending.json"
    state = json.loads(pending.read_text())
    (kind, run), = state["runs"]
    state["runs"] += [[kind, dict(run, seed=900 + i, summary=dict(run["summary"], val_bpb=f"{0.5 + i / 100:.6f}"))]
                      for i in range(3)]  # three more candidate runs that no train.py made
    pending.write_text(json.dumps(state))
    outs = [loop(repo, env, "step").stdout]
    assert "pending.json was written by something other than this loop" in outs[0], outs[0]
    while outs[-1].splitlines()[-1].startswith("confirming"):
        outs.append(loop(repo, env, "step").stdout)
    assert outs[-1].splitlines()[-1].startswith("keep val_bpb=0.990000"), outs  # the honest runs' mean
    assert rows(repo)[-1]["val_bpb"] == "0.990000" and "900" not in rows(repo)[-1]["seeds"]
    (edited,) = pending.parent.glob("pending.json.edited-*")
    assert "0.510000" in edited.read_text()


def test_a_budget_raised_in_the_pinned_config_between_two_steps_is_put_back_before_the_run_is_judged(repo, env):
    initialised(repo, env)
    pinned = repo / ".git" / "autoresearch" / "t" / "init.json"
    before = pinned.read_bytes()
    pinned.write_text(json.dumps(dict(json.loads(before), time_budget=100)))
    commit_train(repo, env, "train five budgets", VAL_BPB=0.5, TRAINED=5.0)
    p = loop(repo, env, "step", "-m", "train five budgets")
    assert "init.json was written by something other than this loop" in p.stdout, p.stdout
    assert pinned.read_bytes() == before
    row = rows(repo)[-1]
    assert row["status"] == "crash" and "past the 1 s budget" in row["note"], row
    # deleted: made again; a half-confirmed experiment forged where the loop left none: set aside
    pinned.unlink()
    (pinned.parent / "pending.json").write_text("{}")
    commit_train(repo, env, "honest", VAL_BPB=0.9, TRAINED=1.0)
    p = loop(repo, env, "step", "-m", "honest")
    assert "made again (it was deleted)" in p.stdout and "set aside (the loop never wrote it)" in p.stdout, p.stdout
    assert pinned.read_bytes() == before and not (pinned.parent / "pending.json").exists()
    assert p.stdout.splitlines()[-1].startswith("keep"), p.stdout


def test_the_budget_and_profile_edited_with_their_copy_are_put_back_as_prepare_py_pins_them(repo, env):
    # the stand-in's constants from a profile table, as the real prepare.py sets them (the table is all the loop
    # reads of it, as text: importing the real one imports torch)
    stand_in = (repo / "prepare.py").read_text()
    assert "\nMAX_SEQ_LEN = 128\nTIME_BUDGET = 1\n" in stand_in
    (repo / "prepare.py").write_text(stand_in.replace(
        "\nMAX_SEQ_LEN = 128\nTIME_BUDGET = 1\n",
        "\nPROFILES = {\"smoke\": (2**7, 1, 1024), \"cpu\": (256, 300, 4096)}\n"
        "MAX_SEQ_LEN, TIME_BUDGET, _ = PROFILES[PROFILE]\n"))
    git(repo, env, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "a profile table")
    initialised(repo, env)
    pinned = repo / ".git" / "autoresearch" / "t" / "init.json"
    copy = Path(f"{record_of(repo)}.files") / "t" / "init.json"
    before = pinned.read_bytes()
    assert copy.read_bytes() == before
    for path in (pinned, copy):  # an agent between two steps: both alike, so no copy tells the edit apart
        path.write_text(json.dumps(dict(json.loads(before), time_budget=100, max_seq_len=256)))
    commit_train(repo, env, "train five budgets", VAL_BPB=0.5, TRAINED=5.0)
    p = loop(repo, env, "step", "-m", "train five budgets")
    assert "init.json was edited, it and its copy alike: time_budget 100 (pinned: 1), max_seq_len 256" in p.stdout
    assert json.loads(pinned.read_bytes()) == json.loads(copy.read_bytes()) == json.loads(before)
    row = rows(repo)[-1]
    assert row["status"] == "crash" and "past the 1 s budget" in row["note"], row
    # another profile's budget, the profile named too: the baseline's row says which profile the tag runs
    for path in (pinned, copy):
        path.write_text(json.dumps(dict(json.loads(before), profile="cpu", time_budget=300, max_seq_len=256)))
    commit_train(repo, env, "train on the cpu budget", VAL_BPB=0.5, TRAINED=5.0)
    p = loop(repo, env, "step", "-m", "train on the cpu budget")
    assert "profile 'cpu' (pinned: 'smoke')" in p.stdout, p.stdout
    assert json.loads(pinned.read_bytes()) == json.loads(before)
    assert "past the 1 s budget" in rows(repo)[-1]["note"], rows(repo)[-1]


def test_harness_eval_is_only_ever_put_back_on():
    from autoresearch.state import pins_to_put_back
    pins = {"time_budget": 10, "max_seq_len": 128, "harness_eval": True}
    assert pins_to_put_back(dict(pins, harness_eval=False), pins) == {"harness_eval": True}
    assert pins_to_put_back(dict(pins, time_budget=20), pins) == {"time_budget": 10}
    # a prepare.py whose metric the text reading missed never turns the harness's evaluation off
    assert pins_to_put_back(pins, dict(pins, harness_eval=False)) == {}


def test_a_loop_remembers_the_records_of_its_own_folder_and_not_its_workers(repo, env, monkeypatch):
    from autoresearch import ledger
    initialised(repo, env)
    monkeypatch.chdir(repo)
    ledger.ledger_dir.cache_clear()
    try:
        tag = ledger.ledger_dir() / "t"
        ledger.remember_records(tag)
        assert tag / "init.json" in ledger.KEPT_WRITTEN
        # the coordinator forgets a killed worker's evaluator cache: that worker's own to check, not the coordinator's
        ledger.keep_file(tag / "w1" / "compile-cache" / "evaluator.json", None)
        ledger.keep_file(tag / "installed-code.json", b"{}")  # all the tag's workers write it
        assert not [p for p in ledger.KEPT_WRITTEN if "w1" in p.parts or p.name == "installed-code.json"]
        assert ledger.put_back() == []
    finally:
        ledger.KEPT_WRITTEN.clear()
        ledger.OWN_FOLDERS.clear()
        ledger.ledger_dir.cache_clear()


def test_a_record_an_agent_forges_with_its_copy_during_run_is_put_back_before_the_next_experiment(
        repo, env, tmp_path):
    # modules.json lists the untracked modules the loop knows of: listed there with its copy, a module the agent
    # planted for train.py to import would pass for one that was always there
    initialised(repo, env)
    known = repo / ".git" / "autoresearch" / "t" / "modules.json"
    copy = Path(f"{record_of(repo)}.files") / "t" / "modules.json"
    forge = tmp_path / "forge.py"
    forge.write_text(f"""
import hashlib, json, os, re
n = int(os.environ["AUTORESEARCH_EXPERIMENT"])
train = open("train.py").read()
open("train.py", "w").write(re.sub(r"(?m)^VAL_BPB = .*$", f"VAL_BPB = {{1 - n / 100}}", train))
if n == 2:
    open("helper.py", "w").write("BOOST = 1\\n")
    for path in ({str(known)!r}, {str(copy)!r}):
        listed = json.load(open(path))
        listed["helper.py"] = hashlib.sha256(open("helper.py", "rb").read()).hexdigest()
        json.dump(listed, open(path, "w"))
print(f"experiment {{n}}")
""")
    out = loop(repo, env, "run", "--agent", f"{sys.executable} {forge}", "--max-experiments", "2").stdout
    assert f"the copy of {known} outside the repository" in out and "put back as the loop left it" in out, out
    first, second = rows(repo)[1:]
    assert first["status"] == "keep" and second["status"] != "keep", second
    assert second["note"].startswith("rejected: changed untracked modules helper.py"), second
    assert "helper.py" not in known.read_text() and known.read_bytes() == copy.read_bytes()
    (edited,) = known.parent.glob("modules.json.edited-*")  # the forgery is kept beside it, not lost
    assert "helper.py" in edited.read_text()


def test_a_row_forged_by_a_run_that_kills_the_loop_is_put_back_by_the_next_command(repo, env):
    initialised(repo, env)
    set_train(repo, VAL_BPB=0.5, MODE="ledgerkill")
    killed = loop(repo, env, "step", "-m", "forge a keep, kill the loop", check=False)
    assert killed.returncode == -signal.SIGKILL, killed
    assert "forged" in (repo / ".git" / "autoresearch" / "results.tsv").read_text()
    set_train(repo, VAL_BPB=0.9, MODE="ok")
    p = loop(repo, env, "step", "-m", "honest, after the kill")
    assert "was written by something other than this loop" in p.stdout, p.stdout
    assert [(r["status"], r["description"]) for r in rows(repo)] == [
        ("keep", "baseline"), ("crash", "forge a keep, kill the loop"), ("keep", "honest, after the kill")]


def test_a_new_repository_where_one_was_does_not_get_the_old_ones_ledger(repo, env, tmp_path):
    import shutil
    shutil.copytree(repo, tmp_path / "fresh")
    initialised(repo, env, VAL_BPB=0.8)
    shutil.rmtree(repo)  # the lab deleted, and cloned again at the same path
    shutil.copytree(tmp_path / "fresh", repo)
    old = json.loads(record_of(repo).read_text().split("\n", 1)[0])["repository"]
    p = initialised(repo, env)
    assert "written by something other" not in p.stdout + p.stderr
    assert [(r["description"], r["val_bpb"]) for r in rows(repo)] == [("baseline", "1.000000")]
    kept = record_of(repo).with_name(f"{record_of(repo).name}.old-{old}")  # the old lab's record, not lost
    assert "\tbaseline\t" in kept.read_text() and "0.800000" in kept.read_text()


def test_a_lab_moved_where_another_was_keeps_its_own_ledger(repo, env, tmp_path):
    import ctypes
    import os
    import shutil
    other = tmp_path / "other"
    shutil.copytree(repo, other)
    initialised(repo, env, VAL_BPB=0.8)
    initialised(other, env)
    # its rows and its id file name another repository than the record at this path. Swapped in one step: a
    # moment without a repository here, and another test's new repository would drop this path's record
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.renameat2(-100, bytes(other), -100, bytes(repo), 2) == 0, os.strerror(ctypes.get_errno())
    shutil.rmtree(other)
    commit_train(repo, env, "worse", VAL_BPB=1.5)
    p = loop(repo, env, "step", "-m", "worse")
    assert "written by something other" not in p.stdout + p.stderr, p.stdout
    assert [(r["description"], r["val_bpb"]) for r in rows(repo)] == [("baseline", "1.000000"), ("worse", "1.500000")]


def test_the_records_of_repositories_that_are_gone_are_dropped_when_a_new_one_starts(repo, env, tmp_path):
    import json
    import shutil
    from autoresearch import ledger
    for name in ("gone", "new"):
        shutil.copytree(repo, tmp_path / name)
    initialised(repo, env)
    initialised(tmp_path / "gone", env)

    def recorded():  # the repositories under this test's folder with a record of their ledger, of their records
        found = []
        for path in ledger.record_folder().glob("*"):
            kind = "copies" if path.is_dir() else "ledger"
            try:  # another test process's repositories are made (and dropped) here meanwhile
                head = Path((path / ".ledger").read_text() if path.is_dir() else
                            json.loads(path.read_bytes().partition(b"\n")[0])["ledger"])
            except (OSError, ValueError):
                continue
            if head.is_relative_to(tmp_path):
                found.append((head.parent.parent.parent.name, kind))
        return sorted(found)

    assert recorded() == [("gone", "copies"), ("gone", "ledger"), ("repo", "copies"), ("repo", "ledger")]
    shutil.rmtree(tmp_path / "gone")
    initialised(tmp_path / "new", env)
    assert recorded() == [("new", "copies"), ("new", "ledger"), ("repo", "copies"), ("repo", "ledger")]


def test_a_row_recorded_but_cut_from_the_ledger_by_a_kill_is_completed_not_taken_for_an_edit(repo, env,
                                                                                             monkeypatch):
    from autoresearch import ledger
    initialised(repo, env)
    monkeypatch.chdir(repo)
    ledger.ledger_dir.cache_clear()
    try:
        before = ledger.ledger_path().read_bytes()
        row = "\t".join(["x"] * len(ledger.COLUMNS)).encode() + b"\n"
        ledger.remember(before + row)  # append_row records the row first: killed before the ledger's write
        assert ledger.put_back() == [] and ledger.ledger_path().read_bytes() == before + row
        assert not list(ledger.ledger_dir().glob("results.tsv.edited-*"))
    finally:
        ledger.ledger_dir.cache_clear()


def test_a_row_written_between_the_check_and_the_loops_own_row_never_becomes_the_loops(repo, env, monkeypatch):
    # a worker's run may time a forged row to the instant between the coordinator's check and its write
    from autoresearch import ledger
    initialised(repo, env)
    monkeypatch.chdir(repo)
    ledger.ledger_dir.cache_clear()
    try:
        header = ledger.ledger_path().read_text().split("\n")[0].split("\t")
        row = dict.fromkeys(header, "1") | dict(commit="f0f0f0f", status="keep", tag="t", note="forged")
        forged = ("\t".join(row[c] for c in header) + "\n").encode()
        checked = ledger.end_last_line

        def and_then_a_forged_row(path):
            with open(path, "ab") as f:
                f.write(forged)
            return checked(path)

        monkeypatch.setattr(ledger, "end_last_line", and_then_a_forged_row)
        ledger.append_row(dict(commit="0123456", status="discard", tag="t", note="honest"))
        monkeypatch.setattr(ledger, "end_last_line", checked)
        assert forged not in ledger.last_written()
        notes = ledger.put_back()
        assert any("was written by something other than this loop" in n for n in notes), notes
        text = ledger.ledger_path().read_text()
        assert "forged" not in text and "honest" in text
    finally:
        ledger.ledger_dir.cache_clear()


def test_two_different_summary_blocks_are_not_kept(repo, env):
    initialised(repo, env)
    commit_train(repo, env, "two stories", MODE="twice", VAL_BPB=0.9)
    loop(repo, env, "step", "-m", "two stories")
    assert rows(repo)[-1]["status"] == "crash" and "summary blocks" in rows(repo)[-1]["note"]


def test_a_daemon_started_by_train_py_cannot_write_a_row_after_the_run(repo, env):
    initialised(repo, env)
    commit_train(repo, env, "daemon", MODE="daemon", VAL_BPB=1.5)
    loop(repo, env, "step", "-m", "daemon")
    time.sleep(3)  # the daemon would have written by now
    assert "forged" not in (repo / "results.tsv").read_text()
    assert [r["status"] for r in rows(repo)] == ["keep", "discard"]


def test_a_val_bpb_that_is_not_positive_is_a_crash_not_a_keep(repo, env):
    initialised(repo, env)
    commit_train(repo, env, "negative", VAL_BPB=-1.0)
    loop(repo, env, "step", "-m", "negative")
    row = rows(repo)[-1]
    assert row["status"] == "crash" and "not a finite positive number" in row["note"], row


def test_training_past_the_budget_is_a_crash_not_a_keep(repo, env):
    initialised(repo, env)
    commit_train(repo, env, "three budgets", TRAINED=3.0, VAL_BPB=0.5)  # budget 1 s, 10 steps
    loop(repo, env, "step", "-m", "three budgets")
    row = rows(repo)[-1]
    assert row["status"] == "crash" and "past the 1 s budget" in row["note"], row


def test_training_past_the_budget_while_reporting_less_is_caught_by_the_harness_clock(repo, env):
    initialised(repo, env)
    commit_train(repo, env, "hidden training", SLEEP=8.0, VAL_BPB=0.5)  # reports 1 s, runs 8 s
    loop(repo, env, "step", "-m", "hidden training")
    baseline, row = rows(repo)[0], rows(repo)[-1]
    assert float(baseline["outside_s"].split(",")[0]) < 2.0, baseline
    assert row["status"] == "crash" and "outside the 1 s of training it reports" in row["note"], row


def test_training_hidden_after_the_data_opens_is_caught_where_the_whole_runs_margin_would_hide_it(repo, env):
    # compile comes before the data (compile_before_data): after it opens, only a few untimed steps and the
    # hand-over lie outside the training train.py reports. A run that scales its own clock (0.55 of each step:
    # twice the budget, seen by a red team on the smoke profile) hides there
    initialised(repo, env, DATA_FIRST=True)
    commit_train(repo, env, "a slower clock", SLEEP=4.0, VAL_BPB=0.5)  # reports 1 s, trains 4 s after the data
    loop(repo, env, "step", "-m", "a slower clock")
    baseline, row = rows(repo)[0], rows(repo)[-1]
    assert float(baseline["after_data_s"]) < 0.5 and float(baseline["outside_s"]) < 2.0, baseline
    # the run's whole margin (5 s here) would let it pass; the margin after the data (2 s) does not
    assert row["status"] == "crash" and "after it first opened the training data" in row["note"], row


def test_training_on_a_copy_of_the_data_that_never_opens_it_counts_all_its_time_as_after_the_data(repo, env):
    # the agent is not confined: it can copy the training data where a run reads it (the checkout, /tmp,
    # $HOME), and the run trains on the copy in what looks like start-up. An honest train.py opens the data right
    # after compiling, as the baseline did: one that never opens it has all its time outside counted after it
    initialised(repo, env, DATA_FIRST=True)
    commit_train(repo, env, "a copy", DATA_FIRST=False, OPENS_DATA=False, SLEEP=4.0, VAL_BPB=0.5)  # trains 4 s
    loop(repo, env, "step", "-m", "a copy")
    row = rows(repo)[-1]
    assert row["status"] == "crash" and "never opened the training data" in row["note"], row


# Open (issue 10): the same run opening the real data at its end is timed from there. Only the whole run's
# margin bounds it (5 s here; ~13 s on smoke, ~65 s on the reference profile).
@pytest.mark.xfail(strict=True, reason="training on a copy of the data, then opening it late, is not caught yet")
def test_training_on_a_copy_of_the_data_before_opening_it_late_is_caught(repo, env):
    initialised(repo, env, DATA_FIRST=True)
    commit_train(repo, env, "a copy", DATA_FIRST=False, SLEEP=4.0, VAL_BPB=0.5)  # opens the data at its end
    loop(repo, env, "step", "-m", "a copy")
    row = rows(repo)[-1]
    assert row["status"] == "crash" and "outside the 1 s of training it reports" in row["note"], row


def test_the_record_of_the_evaluators_code_rewritten_to_vouch_for_an_edit_between_two_steps_is_put_back(
        repo, env, tmp_path, monkeypatch):
    from autoresearch import ledger
    from autoresearch.installed import InstalledCode, digest
    initialised(repo, env)
    code = tmp_path / "site" / "loss.py"  # stands in for a torch source the evaluator runs
    code.parent.mkdir()
    code.write_text("honest\n")
    record = repo / ".git" / "autoresearch" / "t" / "installed-code.json"
    monkeypatch.chdir(repo)
    ledger.ledger_dir.cache_clear()
    try:
        assert InstalledCode(record).edited([str(code)]) == []  # met at an evaluation: recorded, as the loop does
        # the agent edits the code, and the record so that it vouches for the new bytes
        code.write_text("scaled\n")
        forged = json.loads(record.read_text())
        forged["files"][str(code)] = [code.stat().st_ctime_ns, digest(str(code))]
        record.write_text(json.dumps(forged))
        assert InstalledCode(record).edited([str(code)]) == []  # the forgery alone would pass
        commit_train(repo, env, "better", VAL_BPB=0.9)
        p = loop(repo, env, "step", "-m", "better", check=False)
        assert "installed-code.json was written by something other than this loop" in p.stdout, p.stdout
        assert p.returncode == 2 and f"code the evaluator runs was edited since the tag's first evaluation ({code})" \
            in p.stderr and "nothing was run" in p.stderr, p  # the step is refused, with the fix
        assert InstalledCode(record).edited([str(code)]) == [str(code)]
    finally:
        ledger.ledger_dir.cache_clear()


def test_a_record_swapped_for_a_link_out_of_the_ledger_is_put_back_and_the_loop_goes_on(repo, env, tmp_path):
    initialised(repo, env)
    pinned = repo / ".git" / "autoresearch" / "t" / "init.json"
    before = pinned.read_bytes()
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps(dict(json.loads(before), time_budget=100)))
    pinned.unlink()
    pinned.symlink_to(forged)
    commit_train(repo, env, "train five budgets", VAL_BPB=0.5, TRAINED=5.0)
    p = loop(repo, env, "step", "-m", "train five budgets")
    assert "init.json was written by something other than this loop" in p.stdout, p.stdout
    assert not pinned.is_symlink() and pinned.read_bytes() == before
    assert rows(repo)[-1]["status"] == "crash" and "past the 1 s budget" in rows(repo)[-1]["note"]


def test_two_processes_and_two_threads_writing_one_record_at_once_each_write_it_whole(tmp_path):
    # a worker's seal and the coordinator put back the same record at once: a temporary file both used was
    # renamed away under one of them, and its write failed
    record = tmp_path / "init.json"
    left = tmp_path / "init.json.4194305-1.tmp"  # by a process killed mid-write (no such pid): it goes
    left.write_text("half")
    writing = tmp_path / f"init.json.{os.getpid()}-1.tmp"  # by a live process: it stays
    writing.write_text("half")
    writer = ("import sys, threading; sys.path.insert(0, sys.argv[1])\n"
              "from autoresearch.ledger import write_atomic\n"
              "def write(mark):\n"
              "    for i in range(300):\n"
              "        write_atomic(sys.argv[2], (mark * 1000).encode())\n"
              "threads = [threading.Thread(target=write, args=(m,)) for m in sys.argv[3:]]\n"
              "[t.start() for t in threads]; [t.join() for t in threads]\n")
    writers = [subprocess.Popen([sys.executable, "-c", writer, str(REPO), str(record), *marks],
                                stderr=subprocess.PIPE, text=True) for marks in (["a", "b"], ["c", "d"])]
    errors = [w.communicate(timeout=120)[1] for w in writers]
    assert errors == ["", ""], errors
    assert record.read_text() in {m * 1000 for m in "abcd"} and sorted(tmp_path.iterdir()) == [record, writing]
