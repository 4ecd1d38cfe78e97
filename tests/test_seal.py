"""The sealed repository: an experiment may change train.py and nothing else, whatever it tries. Hostile stand-in
agents and train.py runs in real git repositories; each case is not kept, loses nothing, and says what was caught."""

import importlib.util
import marshal
import os
import subprocess
import sys
import time
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_agent_loop import env, git, initialised, loop, repo, rows, set_train  # noqa: E402,F401  (fixtures)


def run_agent(repo, env, agent):
    return loop(repo, env, "run", "--agent", agent, "--max-experiments", "1").stdout


def test_a_change_to_an_untracked_module_that_train_py_imports_is_rejected_and_set_aside(repo, env):
    initialised(repo, env)
    agent = ("echo 'VAL = 0.5' > helper.py; sed -i 's/^VAL_BPB = .*/VAL_BPB = 0.5/' train.py; "
             "echo 'import helper' >> train.py; echo 'helper trick'")
    out = run_agent(repo, env, agent)
    row = rows(repo)[-1]
    assert row["status"] == "discard" and "untracked modules helper.py" in row["note"], out
    assert not (repo / "helper.py").exists()  # set aside, not deleted:
    assert list((repo / "logs" / "t").glob("*-set-aside/helper.py"))
    assert "import helper" not in (repo / "train.py").read_text()


def test_a_module_shadowed_by_forged_bytecode_or_an_extension_while_train_py_runs_is_rejected_and_never_loaded(
        repo, env):
    initialised(repo, env)
    set_train(repo, VAL_BPB=0.5, MODE="shadow")
    loop(repo, env, "step", "-m", "a prepare.py of my own")
    pyc, extension = f"__pycache__/prepare.{sys.implementation.cache_tag}.pyc", f"prepare{EXTENSION_SUFFIXES[0]}"
    row = rows(repo)[-1]
    assert row["status"] == "discard" and row["note"].startswith("rejected:"), row
    assert pyc in row["note"] and extension in row["note"], row["note"]
    # the forged bytecode is gone and the extension set aside: the next import of prepare, the loop's or the
    # evaluator's, is prepare.py's
    assert not (repo / extension).exists() and list((repo / "logs" / "t").glob(f"*-set-aside/{extension}"))
    imported = subprocess.run([sys.executable, "-c", "import prepare; print(hasattr(prepare, 'FORGED'))"],
                              cwd=repo, env=env, capture_output=True, text=True)
    assert imported.stdout.split() == ["False"], imported


def test_bytecode_an_agent_forged_is_compiled_again_and_an_extension_module_it_added_is_set_aside(
        repo, env, tmp_path):
    initialised(repo, env)
    extension, pyc = f"helper{EXTENSION_SUFFIXES[0]}", f"__pycache__/prepare.{sys.implementation.cache_tag}.pyc"
    forge = tmp_path / "forge.py"  # what the stand-in's MODE "shadow" writes, as the agent
    forge.write_text("import importlib.util, marshal, os\n"
                     "s = os.stat('prepare.py')\n"
                     "header = importlib.util.MAGIC_NUMBER + bytes(4) + int(s.st_mtime).to_bytes(4, 'little')"
                     " + s.st_size.to_bytes(4, 'little')\n"
                     "open(importlib.util.cache_from_source('prepare.py'), 'wb').write("
                     "header + marshal.dumps(compile('FORGED = True', 'prepare.py', 'exec')))\n")
    out = run_agent(repo, env, f"{sys.executable} {forge}; echo junk > {extension}; "
                               f"sed -i 's/^VAL_BPB = .*/VAL_BPB = 0.5/' train.py; echo 'modules of my own'")
    row = rows(repo)[-1]
    assert row["status"] == "discard" and f"untracked modules {extension}" in row["note"], out
    assert not (repo / extension).exists() and list((repo / "logs" / "t").glob(f"*-set-aside/{extension}"))
    # the bytecode is compiled again from prepare.py before anything of the experiment imports it
    assert b"FORGED" not in (repo / pyc).read_bytes()


def test_a_train_py_that_is_a_symlink_is_rejected_and_replaced_by_the_best(repo, env, tmp_path):
    initialised(repo, env)
    outside = tmp_path / "elsewhere.py"
    outside.write_text((repo / "train.py").read_text().replace("VAL_BPB = 1.0", "VAL_BPB = 0.5"))
    out = run_agent(repo, env, f"rm train.py; ln -s {outside} train.py; echo symlink")
    row = rows(repo)[-1]
    assert row["status"] == "discard" and "symlink" in row["note"], out
    assert not (repo / "train.py").is_symlink() and "VAL_BPB = 1.0" in (repo / "train.py").read_text()


def test_an_edit_hidden_with_assume_unchanged_is_found_and_undone(repo, env):
    initialised(repo, env)
    # any tracked file (here README.md; in the real repo e.g. agent_loop.py): git status no longer shows it
    agent = ("echo 'bent' >> README.md; git update-index --assume-unchanged README.md; "
             "sed -i 's/^VAL_BPB = .*/VAL_BPB = 0.5/' train.py; echo hidden")
    out = run_agent(repo, env, agent)
    row = rows(repo)[-1]
    assert row["status"] == "discard" and "README.md" in row["note"], out
    assert "bent" not in (repo / "README.md").read_text()
    assert "h README.md" not in git(repo, env, "ls-files", "-v")  # the flag is gone too


def test_git_hooks_never_run(repo, env, tmp_path):
    initialised(repo, env)
    hook = repo / ".git" / "hooks" / "post-commit"
    hook.write_text(f"#!/bin/sh\ntouch {tmp_path / 'hook-ran'}\n")
    hook.chmod(0o755)
    run_agent(repo, env, "sed -i 's/^VAL_BPB = .*/VAL_BPB = 0.99/' train.py; echo change")
    assert rows(repo)[-1]["status"] == "keep"
    assert not (tmp_path / "hook-ran").exists()


def test_the_evaluator_caches_record_holds_when_the_repository_moves_and_trusts_nothing_when_damaged(tmp_path):
    from autoresearch.seal import HarnessFolder
    cache = tmp_path / "a" / "compile-cache" / "evaluator"
    (cache / "fx").mkdir(parents=True)
    (cache / "fx" / "kernel.py").write_text("# the evaluator's")
    HarnessFolder(cache).settle()
    moved = tmp_path / "b"
    (tmp_path / "a").rename(moved)  # a repository moved elsewhere: same files, no run blamed, nothing emptied
    cache = moved / "compile-cache" / "evaluator"
    assert HarnessFolder(cache).written() == []
    (cache / "fx" / "kernel.py").write_text("# planted")
    assert HarnessFolder(cache).written() == [str(cache / "fx" / "kernel.py")]
    (cache.with_name("evaluator.json")).write_text("[1, 2]")  # not a record: nothing in the folder is trusted
    damaged = HarnessFolder(cache)
    assert damaged.written() == [] and not any(damaged.clean().iterdir())


def test_beside_a_confined_run_the_evaluators_new_kernels_pass_and_what_a_run_can_still_do_is_caught(tmp_path):
    # Landlock keeps a confined run from writing in the evaluator's cache (which the evaluator fills meanwhile),
    # not from a chmod: one of the harness's files changed or gone, or a new file made unreadable, is the run's
    from autoresearch.seal import HarnessFolder
    cache = HarnessFolder(tmp_path / "evaluator")
    cache.clean()
    for name in ("kept.py", "chmodded.py", "removed.py"):
        (cache.path / name).write_text("compiled by the evaluator")
    cache.settle()
    time.sleep(0.01)  # ctimes a tick apart
    (cache.path / "new").mkdir()
    (cache.path / "new" / "kernel.so").write_text("compiled by the warm-up")
    assert cache.altered() == []  # the warm-up's own files
    (cache.path / "chmodded.py").chmod(0o644)
    (cache.path / "removed.py").unlink()
    (cache.path / "new" / "kernel.so").chmod(0o000)
    assert cache.altered() == [str(cache.path / p) for p in ("chmodded.py", "new/kernel.so", "removed.py")]


def test_the_bytecode_of_untracked_helper_modules_is_compiled_before_a_run_and_forged_bytecode_replaced(
        tmp_path, monkeypatch):
    from autoresearch.seal import module_bytecode
    monkeypatch.chdir(tmp_path)
    subprocess.run(["git", "init", "-q"], check=True)
    Path("tracked.py").write_text("A = 1\n")
    subprocess.run(["git", "add", "tracked.py"], check=True)
    Path("helper.py").write_text("B = 2\n")  # the user's own, never committed: train.py may import it
    found = module_bytecode()
    helper_pyc = importlib.util.cache_from_source("helper.py")
    assert sorted(found) == sorted([importlib.util.cache_from_source("tracked.py"), helper_pyc])
    assert Path(helper_pyc).is_file()  # no honest import writes it while train.py runs
    s = os.stat("helper.py")
    header = importlib.util.MAGIC_NUMBER + bytes(4) + int(s.st_mtime).to_bytes(4, "little") \
        + s.st_size.to_bytes(4, "little")
    Path(helper_pyc).write_bytes(header + marshal.dumps(compile("FORGED = True", "helper.py", "exec")))
    module_bytecode(force=True)
    assert b"FORGED" not in Path(helper_pyc).read_bytes()


def test_a_record_a_run_rewrote_is_put_back_so_the_next_process_empties_what_the_run_planted(tmp_path):
    # what the loop does when a run is cut short (Ctrl-C) before the cache was checked
    from autoresearch.seal import HarnessFolder
    cache = tmp_path / "evaluator"
    cache.mkdir()
    harness = HarnessFolder(cache)
    harness.settle()
    (cache / "kernel.py").write_text("# planted")
    HarnessFolder(cache).settle()  # the run's forged record, listing its plant
    harness.keep_record()
    assert HarnessFolder(cache).written() == [str(cache / "kernel.py")]


def test_the_ledgers_seal_makes_the_records_outside_again_when_their_whole_folder_is_deleted(tmp_path):
    from autoresearch.seal import LedgerSeal
    ledger, records = tmp_path / "repo" / ".git" / "autoresearch", tmp_path / "state" / "ledgers"
    (ledger / "t").mkdir(parents=True)
    (records / "key.files" / "t").mkdir(parents=True)
    (ledger / "results.tsv").write_text("header\nbaseline\n")
    (records / "key").write_text("{}\nheader\nbaseline\n")
    (records / "key.files" / "t" / "init.json").write_text('{"time_budget": 1}')
    seal = LedgerSeal(ledger, outside=(records / "key", records / "key.files"))
    with open(ledger / "results.tsv", "a") as f:  # the run: a forged row, then the records outside gone
        f.write("forged\n")
    import shutil
    shutil.rmtree(tmp_path / "state")
    written, lines = seal.put_back(tmp_path / "aside")
    assert str(ledger / "results.tsv") in written and str(records / "key") in written, written
    assert any("was replaced while the run trained" in line for line in lines), lines
    assert (ledger / "results.tsv").read_text() == "header\nbaseline\n"
    assert (records / "key").read_text() == "{}\nheader\nbaseline\n"
    assert (records / "key.files" / "t" / "init.json").read_text() == '{"time_budget": 1}'


def test_a_workers_seal_puts_back_the_pinned_config_as_the_worker_found_it_not_as_its_run_began(tmp_path):
    # another worker's run forged the config before this run began; that run's own seal then put it back
    from autoresearch.seal import LedgerSeal
    own, pinned = tmp_path / "t" / "w2", tmp_path / "t" / "init.json"
    own.mkdir(parents=True)
    pinned.write_text('{"time_budget": 100}')
    seal = LedgerSeal(own, outside=(pinned,), trusted={pinned: b'{"time_budget": 1}'})
    time.sleep(0.01)
    pinned.write_text('{"time_budget": 1}')
    written, _ = seal.put_back(tmp_path / "aside")
    assert written == [str(pinned)] and pinned.read_text() == '{"time_budget": 1}'


def test_an_emptied_evaluator_cache_starts_from_another_loops_that_holds_just_what_its_harness_left(repo, env):
    from test_agent_loop import as_the_loop
    from autoresearch.seal import HarnessFolder
    ledger = repo / ".git" / "autoresearch"
    trusted, forged, vouched, fresh = (ledger / tag / "compile-cache" / "evaluator" for tag in "tvwu")
    from autoresearch import ledger as records
    with as_the_loop(repo):
        records.put_back()  # what each command of the loop does first: the copies outside the repo are its own
        for folder in (trusted, forged):  # each left by its own loop's evaluator, and recorded by that loop
            (folder / "fx").mkdir(parents=True)
            (folder / "fx" / "kernel.py").write_text(f"# compiled by {folder.parts[-3]}'s evaluator")
            HarnessFolder(folder).settle()
    (forged / "fx" / "kernel.py").write_text("# planted after its harness recorded it")
    (vouched / "fx").mkdir(parents=True)
    (vouched / "fx" / "kernel.py").write_text("# planted, with a record that lists it")
    HarnessFolder(vouched).settle()  # written by something other than the loop (this process is outside the repo)
    with as_the_loop(repo):
        new = HarnessFolder(fresh, kin=lambda path: [vouched, forged, trusted])
        assert new.seed_from(new.kin(fresh)) == trusted and not new.written()  # nothing recorded here yet
        assert (fresh / "fx" / "kernel.py").read_text() == "# compiled by t's evaluator"
        assert HarnessFolder(trusted).written() == []  # the source is left as it was
        (fresh / "fx" / "kernel.py").write_text("# planted in the copy")  # before its harness ever recorded it
        assert new.clean() == fresh and (fresh / "fx" / "kernel.py").read_text() == "# compiled by t's evaluator"
        only_planted = HarnessFolder(ledger / "x" / "compile-cache" / "evaluator", kin=lambda p: [forged, vouched])
        assert not any(only_planted.clean().iterdir())


def test_a_commit_sharing_the_ledgers_short_id_is_told_apart_by_the_branchs_first_parent_history(repo, env):
    # a hub's lab made a commit sharing a best's 7 digits in 18 s (4 here: the test's own brute force), and
    # the tag could no longer name its best
    import hashlib
    from autoresearch.gitrepo import commit_named
    from autoresearch.layout import LoopError
    best = git(repo, env, "rev-parse", "HEAD")
    tree, prefix = git(repo, env, "rev-parse", "HEAD^{tree}"), best[:4]
    for nonce in range(10**7):
        body = f"tree {tree}\nparent {best}\nauthor e <e@e> 0 +0000\ncommitter e <e@e> 0 +0000\n\n{nonce}\n"
        if hashlib.sha1(b"commit %d\0" % len(body) + body.encode()).hexdigest().startswith(prefix):
            break
    twin = subprocess.run(["git", "hash-object", "-t", "commit", "-w", "--stdin"], cwd=repo, env=env, input=body,
                          capture_output=True, text=True, check=True).stdout.strip()
    git(repo, env, "update-ref", "refs/hub/twin", twin)  # fetched, off the branch's first-parent history
    assert twin != best and twin.startswith(prefix)
    cwd = os.getcwd()
    os.chdir(repo)
    try:
        assert commit_named(prefix, within="refs/heads/main") == best
        with pytest.raises(LoopError, match="more than one commit"):
            commit_named(prefix)
    finally:
        os.chdir(cwd)
