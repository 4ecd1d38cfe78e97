"""What a run leaves where later runs could read it (autoresearch/carryover.py): its compile cache and /dev/shm
lose whatever it wrote after it opened its training data, and keep what came before (torch.compile's work)."""
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

from autoresearch.carryover import drop_written_since
from test_agent_loop import env, initialised, loop, repo, rows, set_train  # noqa: F401  (fixtures)


def test_a_run_leaves_nothing_it_wrote_after_opening_its_training_data_for_the_next_run(repo, env):  # noqa: F811
    train_bin = Path(env["AUTORESEARCH_CACHE_DIR"]) / "prepared" / "smoke" / "synthetic" / "train.bin"
    train_bin.parent.mkdir(parents=True)
    train_bin.write_bytes(b"\0" * 64)
    shm = Path("/dev/shm") / f"standin-{uuid.uuid4().hex[:8]}"
    env = dict(env, STANDIN_SHM=str(shm))
    initialised(repo, env)
    set_train(repo, MODE="carry", VAL_BPB=0.5)
    try:
        loop(repo, env, "step", "-m", "a run that saves its weights for the next")
        candidate = rows(repo)[-1]
        caches = list((repo / ".git" / "autoresearch").glob("t*/compile-cache/*/kernel.so"))
        assert len(caches) == 1, caches
        cache = caches[0].parent
        assert sorted(p.name for p in cache.iterdir() if p.name != "headers") == ["kernel.so"]
        assert not shm.exists()
        assert "3 file(s) this run wrote in its compile cache after it opened the training data were removed" \
            in candidate["note"] and "1 file(s) this run left in /dev/shm" in candidate["note"], candidate
        logs = (repo / candidate["log"]).read_text()
        assert logs.count("carried over: False") >= 1 and "carried over: True" not in logs, logs
    finally:
        shm.unlink(missing_ok=True)


def test_a_later_change_goes_and_an_earlier_file_stays_however_it_is_dated_or_locked(tmp_path):
    old = tmp_path / "cache" / "old"
    old.mkdir(parents=True)
    (old / "kernel.so").write_text("earlier")
    (old / "other.so").write_text("earlier")
    time.sleep(0.05)
    cutoff = time.time_ns()
    (old / "weights.pt").write_text("later")
    os.utime(old / "weights.pt", (0, 0))  # an mtime from 1970; the ctime no process can set
    (old / "other.so").write_text("rewritten later")
    locked = tmp_path / "cache" / "locked"
    locked.mkdir()
    (locked / "w.pt").write_text("later")
    (tmp_path / "cache" / "link").symlink_to(old / "kernel.so")
    locked.chmod(0)
    assert drop_written_since(tmp_path / "cache", cutoff) == 4
    assert sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "cache").rglob("*")) == \
        ["cache/old", "cache/old/kernel.so"]


def test_shared_memory_held_open_by_a_live_process_or_written_earlier_stays(tmp_path):
    names = [Path("/dev/shm") / f"carry-{uuid.uuid4().hex[:8]}-{what}" for what in ("early", "held", "left")]
    early, held, left = names
    try:
        early.write_text("before the run opened its data")
        time.sleep(0.05)
        cutoff = time.time_ns()
        held.write_text("Ray's object store, say")
        left.write_text("weights")
        holder = subprocess.Popen([sys.executable, "-c", f"f = open({str(held)!r}); import time; time.sleep(60)"])
        try:
            while not any(os.readlink(fd) == str(held) for fd in Path(f"/proc/{holder.pid}/fd").iterdir()):
                time.sleep(0.01)
            from autoresearch import carryover
            assert carryover.drop_carryover(cutoff, None) == [
                "1 file(s) this run left in /dev/shm after it opened the training data were removed: they could "
                "carry what it learned to later runs"]
        finally:
            holder.kill()
        assert early.exists() and held.exists() and not left.exists()
    finally:
        for name in names:
            name.unlink(missing_ok=True)
