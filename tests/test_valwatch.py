"""What a run does to the data its number is measured on (autoresearch/valwatch.py), by the kernel's word, and
the evaluator's own copy of that data (metricdata.evaluation_copy), one per loop, watched too."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from autoresearch.ledger import LEDGER_ENV  # noqa: E402
from autoresearch.metricdata import evaluation_copy, seal_metric_files  # noqa: E402
from autoresearch.runner import evaluator_data  # noqa: E402
from autoresearch.valwatch import DataWatch  # noqa: E402

pytestmark = pytest.mark.skipif(not Path("/proc/self").exists(), reason="inotify is Linux's")


def fake_cache(tmp_path):
    """A cache in prepare.py's layout, with a val shard named in its manifest."""
    prepared = tmp_path / "cache" / "prepared" / "synthetic" / "smoke"
    prepared.mkdir(parents=True)
    for name in ("val.bin", "val.offsets.npy", "token_bytes.npy", "tokenizer.pkl", "meta.json", "train.bin"):
        (prepared / name).write_bytes(name.encode())
    raw = tmp_path / "cache" / "datasets" / "synthetic"
    raw.mkdir(parents=True)
    (raw / "manifest.json").write_text('{"train": ["shard_00000.parquet"], "val": ["shard_00001.parquet"]}')
    for shard in ("shard_00000.parquet", "shard_00001.parquet"):
        (raw / shard).write_bytes(b"text")
    seal_metric_files(prepared)
    return tmp_path / "cache", prepared, raw


def in_child(code):
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_watch_names_every_val_file_a_child_opened_and_every_metric_file_it_wrote(tmp_path):
    cache, prepared, raw = fake_cache(tmp_path)
    with DataWatch(cache) as quiet:
        in_child(f"open({str(prepared / 'train.bin')!r}).read(); "
                 f"open({str(raw / 'shard_00000.parquet')!r}).read()")
    assert quiet.opened == [] and quiet.written == []  # training data is training data
    with DataWatch(cache) as watch:
        in_child(f"open({str(prepared / '.pristine' / 'val.bin')!r}, 'rb').read(); "
                 f"open({str(raw / 'shard_00001.parquet')!r}, 'rb').read(); "
                 f"open({str(prepared / 'token_bytes.npy')!r}, 'ab').write(b'x')")
    assert watch.opened == sorted([str(prepared / ".pristine" / "val.bin"), str(raw / "shard_00001.parquet")])
    assert watch.written == [str(prepared / "token_bytes.npy")]
    # a restore (another run's harness deletes and copies back a damaged file) opens nothing
    with DataWatch(cache) as restore:
        (prepared / "val.bin").unlink()
        (prepared / "val.bin").write_bytes(b"val.bin")
    assert restore.opened == []


@pytest.mark.parametrize("train_file", ["train.bin", "shard_00000.parquet"])
def test_the_watch_times_the_first_opening_of_training_data_and_nothing_else(tmp_path, train_file):
    import time
    cache, prepared, raw = fake_cache(tmp_path)
    path = prepared / train_file if train_file == "train.bin" else raw / train_file
    with DataWatch(cache) as other:
        in_child(f"open({str(prepared / 'val.bin')!r}).read(); open({str(prepared / 'tokenizer.pkl')!r}).read()")
    assert other.train_opened_ns is None and other.opened == [str(prepared / "val.bin")]
    with DataWatch(cache) as watch:
        in_child(f"import time; open({str(path)!r}, 'rb').close(); time.sleep(2); open({str(path)!r}).close()")
        after = time.time_ns()
    opened_by = after - watch.train_opened_ns  # the first opening, two seconds before the child ended
    assert watch.started_ns < watch.train_opened_ns and 1e9 < opened_by < 10e9, opened_by / 1e9


def test_the_evaluator_s_copy_is_sealed_named_by_the_hashes_and_made_once(tmp_path):
    cache, prepared, _ = fake_cache(tmp_path)
    hashes = seal_metric_files(prepared)
    copy = evaluation_copy(prepared, hashes)
    assert copy and not str(copy).startswith(str(cache)) and (copy / "val.bin").read_bytes() == b"val.bin"
    assert seal_metric_files(copy) == hashes
    with DataWatch(cache) as watch:  # another run's evaluator, later: it opens nothing in the cache
        assert evaluation_copy(prepared, hashes) == copy
    assert watch.opened == []
    # damaged with its own pristine copy (read-only, but the same user can): made again
    for path in (copy / "val.bin", copy / ".pristine" / "val.bin"):
        path.chmod(0o644)
        path.write_bytes(b"trained on")
    assert evaluation_copy(prepared, hashes) == copy and (copy / "val.bin").read_bytes() == b"val.bin"
    # hashes that the cache's pristine copies do not have: no copy, the evaluator reads (and repairs) the cache
    assert evaluation_copy(prepared, dict(hashes, **{"val.bin": "0" * 64})) is None


def test_the_evaluator_s_copy_is_watched_and_each_loop_has_its_own(tmp_path):
    cache, prepared, _ = fake_cache(tmp_path)
    hashes = seal_metric_files(prepared)
    copy = evaluation_copy(prepared, hashes, owner=str(tmp_path / "a" / ".git" / "autoresearch"))
    with DataWatch(cache, copy) as watch:  # train.py, reading the validation tokens where the evaluator will
        in_child(f"open({str(copy / 'val.bin')!r}, 'rb').read(); open({str(copy / 'meta.json')!r}).read()")
    assert watch.opened == [str(copy / "val.bin")]
    # another loop's (another clone's, a demo's worktree's): its evaluator reads a copy that this run never sees
    other = evaluation_copy(prepared, hashes, owner=str(tmp_path / "b" / ".git" / "autoresearch"))
    assert other != copy and seal_metric_files(other) == hashes
    with DataWatch(cache, copy) as watch:
        in_child(f"open({str(other / 'val.bin')!r}, 'rb').read()")
    assert watch.opened == []


def test_each_worker_reads_a_copy_of_its_own_which_its_coordinator_made_before_any_run(tmp_path, monkeypatch):
    # other workers' evaluators read theirs while this worker trains: its own copy can then be watched
    cache, prepared, _ = fake_cache(tmp_path)
    config = dict(cache_dir=str(cache), dataset="synthetic", profile="smoke", metric_hashes=seal_metric_files(prepared))
    monkeypatch.setenv(LEDGER_ENV, str(tmp_path / "lab" / ".git" / "autoresearch"))  # as a coordinator sets it
    for name in ("AUTORESEARCH_CACHE_DIR", "AUTORESEARCH_DATASET"):  # the user's would win over config's
        monkeypatch.delenv(name, raising=False)
    worktrees = [tmp_path / "lab" / "worktrees" / f"t-w{i}" for i in (1, 2)]
    made = [evaluator_data(config, w) for w in worktrees]  # by the coordinator
    assert made[0] != made[1] and all(seal_metric_files(m) == config["metric_hashes"] for m in made)
    worktrees[0].mkdir(parents=True)
    monkeypatch.chdir(worktrees[0])
    assert evaluator_data(config) == made[0]  # what worker 1's runs read and watch
    with DataWatch(cache, made[0]) as watch:
        in_child(f"open({str(made[1] / 'val.bin')!r}, 'rb').read()")  # the other worker's evaluator
    assert watch.opened == []
