"""What a run leaves where later runs could read it (autoresearch/carryover.py): its compile cache loses whatever
changed after the run opened its training data, and keeps what came before (torch.compile's work); /dev/shm
loses what the run left there."""
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

from autoresearch.carryover import drop_carryover, drop_written_since
from test_agent_loop import env, initialised, loop, repo, rows, set_train  # noqa: F401  (fixtures)


def now_then_a_tick():
    """time.time_ns(), then a pause: before kernel 6.13 ctimes are a clock tick coarse, and lag the time."""
    t = time.time_ns()
    time.sleep(0.05)
    return t


def test_a_run_leaves_nothing_it_wrote_after_opening_its_training_data_for_the_next_run(repo, env):  # noqa: F811
    shm = Path("/dev/shm") / f"standin-{uuid.uuid4().hex[:8]}"
    env = dict(env, STANDIN_SHM=str(shm))
    initialised(repo, env)
    set_train(repo, MODE="carry", VAL_BPB=0.5)
    try:
        loop(repo, env, "step", "-m", "a run that saves its weights for the next")
        candidate = rows(repo)[-1]
        caches = [c for c in (repo / ".git" / "autoresearch" / "t" / "compile-cache").iterdir()
                  if c.name != "evaluator" and c.is_dir()]
        # its files went into the cache's top folder, which changed then: all of it goes, kernel.so too
        assert len(caches) == 1 and list(caches[0].iterdir()) == [], caches
        assert not shm.exists()  # (another test's loop, meanwhile, may have been the one to remove it)
        assert "file(s) and folder(s) this run changed in its compile cache after it opened the training data " \
               "were removed" in candidate["note"], candidate
        logs = (repo / candidate["log"]).read_text()
        assert logs.count("carried over: False") >= 1 and "carried over: True" not in logs, logs
    finally:
        shm.unlink(missing_ok=True)


def test_a_cache_file_written_through_a_mapping_made_before_the_data_goes(repo, env):  # noqa: F811
    # writing through a shared mapping moves no ctime (tmpfs; on disk, not before the pages are written back): the
    # loop compares the cache's bytes with those it read as the run opened the data
    initialised(repo, env)
    set_train(repo, MODE="mapped", VAL_BPB=0.5)
    loop(repo, env, "step", "-m", "a run that keeps its weights in a mapped file of its compile cache")
    candidate = rows(repo)[-1]
    (cache,) = [c for c in (repo / ".git" / "autoresearch" / "t" / "compile-cache").iterdir()
                if c.name != "evaluator" and c.is_dir()]
    assert not (cache / "index.bin").exists(), candidate
    assert "1 file(s) and folder(s) this run changed in its compile cache" in candidate["note"], candidate
    logs = (repo / candidate["log"]).read_text()
    assert logs.count("carried over: False") >= 2 and "carried over: True" not in logs, logs


def test_a_cache_file_swapped_for_a_fifo_or_a_link_to_dev_zero_goes_without_hanging_the_loop(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    for name in ("fifo", "endless", "kept"):
        (cache / name).write_text("compiled")
    code = ("import os, sys; sys.path.insert(0, sys.argv[1]); from autoresearch.carryover import digests, "
            "drop_rewritten; cache = sys.argv[2]; before = digests(cache); "
            "os.unlink(cache + '/fifo'); os.mkfifo(cache + '/fifo'); "
            "os.unlink(cache + '/endless'); os.symlink('/dev/zero', cache + '/endless'); "
            "print(sorted(os.path.basename(p) for p in drop_rewritten(before)[0]))")
    done = subprocess.run([sys.executable, "-c", code, str(Path(__file__).resolve().parents[1]), str(cache)],
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.split("\n")[0] == "['endless', 'fifo']", done.stdout + done.stderr
    assert sorted(p.name for p in cache.iterdir()) == ["kept"]


def test_a_later_change_goes_with_all_beneath_it_and_an_earlier_file_stays_however_dated_or_locked(tmp_path):
    cache = tmp_path / "cache"
    for folder in ("kept", "old", "older/deep"):
        (cache / folder).mkdir(parents=True)
        (cache / folder / "kernel.so").write_text("earlier")
    cutoff = now_then_a_tick()
    (cache / "old" / "kernel.so").write_text("rewritten later")
    (cache / "old" / "kernel.so").rename(cache / "old" / "weights.pt")
    os.utime(cache / "old" / "weights.pt", (0, 0))  # an mtime from 1970; the ctime no process can set
    (cache / "locked").mkdir()
    (cache / "locked" / "w.pt").write_text("later")
    (cache / "locked").chmod(0)
    (cache / "link").symlink_to(cache / "kept" / "kernel.so")
    (cache / "new").mkdir()
    (cache / "older").rename(cache / "new" / "older")  # earlier files, in a place that says something new
    removed, failed = drop_written_since(cache, cutoff)
    assert failed == [] and len(removed) == 9, removed
    assert sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*")) == ["kept", "kept/kernel.so"]
    # the top folder changed too: with root_too, nothing stays
    assert drop_written_since(cache, cutoff, root_too=True)[0] == [str(cache / "kept" / "kernel.so"),
                                                                   str(cache / "kept")]


def test_a_run_that_never_opened_the_training_data_is_judged_from_its_start(tmp_path):
    cache = tmp_path / "cache"
    for folder in ("a", "b"):
        (cache / folder).mkdir(parents=True)
        (cache / folder / "kernel.so").write_text("before the run")
    started = now_then_a_tick()
    (cache / "a" / "weights.pt").write_text("trained on a copy of the data made elsewhere")
    notes = drop_carryover(started, None, cache, run_only=())
    assert [p.relative_to(cache).as_posix() for p in cache.rglob("*")] == ["b", "b/kernel.so"], notes
    assert notes[0].startswith("3 file(s) and folder(s) this run changed in its compile cache"), notes


def test_what_a_run_left_in_shared_memory_goes_unless_a_live_process_holds_it_or_it_was_there_before(tmp_path):
    shm = tmp_path / "shm"
    shm.mkdir()
    early, held, left = (shm / what for what in ("early", "held", "left"))
    early.write_text("before the run")
    time.sleep(0.1)  # more than the margin the sweep allows a coarse ctime
    started = now_then_a_tick()
    held.write_text("Ray's object store, say")
    (shm / "folder").mkdir()
    left.write_text("weights")
    (shm / "folder" / "more").write_text("weights")
    holder = subprocess.Popen([sys.executable, "-c", f"f = open({str(held)!r}); import time; time.sleep(60)"])
    try:
        while not any(os.readlink(fd) == str(held) for fd in Path(f"/proc/{holder.pid}/fd").iterdir()):
            time.sleep(0.01)
        assert drop_carryover(started, started, None, run_only=(shm,)) == [
            f"removed what this run left in {shm}, where it could carry what it learned to later runs: "
            f"{left}, {shm / 'folder' / 'more'}, {shm / 'folder'}"]
    finally:
        holder.kill()
    assert sorted(p.name for p in shm.iterdir()) == ["early", "held"]


def test_a_file_mapped_under_a_name_that_is_not_utf8_is_held_and_a_locked_folder_goes(tmp_path):
    shm = tmp_path / "shm"
    shm.mkdir()
    started = now_then_a_tick()
    odd = os.path.join(os.fsencode(shm), b"\xff-mapped")
    with open(odd, "wb") as f:
        f.write(b"\0" * 4096)
    (shm / "locked").mkdir()
    (shm / "locked" / "w.pt").write_text("weights")
    (shm / "locked").chmod(0o400)  # listable, not enterable (for its owner; root enters anyway)
    code = ("import mmap, sys, time; f = open(sys.argv[1], 'r+b'); m = mmap.mmap(f.fileno(), 4096); f.close(); "
            "print('mapped', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, odd], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "mapped\n"
        notes = drop_carryover(started, started, None, run_only=(shm,))
    finally:
        holder.kill()
    assert os.listdir(os.fsencode(shm)) == [b"\xff-mapped"], notes  # held; the rest went


def test_folders_a_run_locked_against_its_own_user_are_swept_too(tmp_path):
    # as root a chmod locks nothing, so the sweep runs as another user here, on that user's files
    import pytest
    import shutil
    import tempfile
    if os.getuid() != 0:
        pytest.skip("needs root, to act as another user")
    nobody = 65534
    base = Path(tempfile.mkdtemp(prefix="carryover-"))
    try:
        base.chmod(0o755)
        cache = base / "cache"
        (cache / "kept").mkdir(parents=True)
        (cache / "kept" / "kernel.so").write_text("earlier")
        cutoff = now_then_a_tick()
        for folder, mode in (("listable", 0o400), ("closed", 0o000), ("readonly", 0o500)):
            (cache / "kept" / folder).mkdir()
            (cache / "kept" / folder / "w.pt").write_text("weights")
        for path in [base, *base.rglob("*")]:
            os.chown(path, nobody, nobody)
        for folder, mode in (("listable", 0o400), ("closed", 0o000), ("readonly", 0o500)):
            (cache / "kept" / folder).chmod(mode)
        code = ("import sys; sys.path.insert(0, sys.argv[1]); from autoresearch.carryover import drop_carryover; "
                "print(drop_carryover(int(sys.argv[3]), int(sys.argv[3]), sys.argv[2], run_only=()))")
        repo = str(Path(__file__).resolve().parents[1])
        # the venv's Python may live where that user cannot go (/root): the system's runs the stdlib-only module
        def usable(python):
            try:
                return subprocess.run([python, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                                       "import autoresearch.carryover", repo], capture_output=True,
                                      user=nobody).returncode == 0
            except OSError:
                return False
        python = next((p for p in (sys.executable, shutil.which("python3", path="/usr/bin:/bin")) if p and usable(p)),
                      None)
        if python is None:
            pytest.skip("no Python and repository that another user can run here")
        done = subprocess.run([python, "-c", code, repo, str(cache), str(cutoff)],
                              capture_output=True, text=True, timeout=60, user=nobody)
        assert done.returncode == 0, done.stderr
        assert sorted(p.name for p in cache.rglob("*")) == [], done.stdout  # "kept" changed too: all goes
        assert "(the whole cache" not in done.stdout, done.stdout
    finally:
        for path in [base, *base.rglob("*")]:
            path.chmod(0o700) if path.is_dir() else None
        shutil.rmtree(base, ignore_errors=True)
