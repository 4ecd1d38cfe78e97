"""Shared fixtures: a cache with the synthetic dataset prepared for the smoke profile, made once per session;
and import_train, train.py as another profile sets it. Also how the suite shares the machine: two test processes
(pytest-xdist), each on its own half of the cores, and a last phase for the tests that need every core."""

import fcntl
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from unittest import mock

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def smoke_cache(tmp_path_factory):
    """AUTORESEARCH_CACHE_DIR holding `prepare.py --dataset synthetic` for AUTORESEARCH_PROFILE=smoke."""
    cache = tmp_path_factory.mktemp("smoke-cache")
    env = {**os.environ, "AUTORESEARCH_CACHE_DIR": str(cache), "AUTORESEARCH_PROFILE": "smoke"}
    env.pop("AUTORESEARCH_DATASET", None)
    result = subprocess.run([sys.executable, "prepare.py", "--dataset", "synthetic"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return cache


def import_train(profile):
    """train.py (and the prepare.py it reads its profile from) as `profile` sets them, as modules of this file
    only: other test files keep the ones they imported with their own profile."""
    held = {name: sys.modules.pop(name) for name in ("train", "prepare") if name in sys.modules}
    try:
        env = dict(AUTORESEARCH_PROFILE=profile, AUTORESEARCH_CACHE_DIR=tempfile.mkdtemp())
        with mock.patch.dict(os.environ, env):
            import train
        return train
    finally:
        for name in ("train", "prepare"):
            sys.modules.pop(name, None)
        sys.modules.update(held)


# -----------------------------------------------------------------------------
# Two test processes on a machine of 2 cores or more (pyproject's addopts: `-n auto`, a file per unit of work),
# each pinned to its own half of the cores. The harness counts other work on the cores a process may run on
# (process.cpu_clock), so a run in one test process never sees the other's tests as a busy machine; a run's
# budget is wall-clock, so the real training runs take as long on one core as on two. Tests marked
# whole_machine (workers that split the cores between them) get every core, run last, and the other process
# waits meanwhile: they hold the lock below exclusively until their process ends.

ALL_CORES = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # gw0, gw1, ... in a test process of pytest-xdist
HOLD = pytest.StashKey[dict]()  # this test process's exclusive hold on the machine, once it has one


@pytest.hookimpl(optionalhook=True)  # a pytest without xdist (bench/gpu_check.py's) runs one process
def pytest_xdist_auto_num_workers(config):
    return 2 if len(ALL_CORES) >= 2 else 0  # 0: one process, all the cores, no lock


def half_of_the_cores():
    count, index = int(os.environ["PYTEST_XDIST_WORKER_COUNT"]), int(WORKER.removeprefix("gw"))
    share = len(ALL_CORES) // count
    return ALL_CORES[index * share:] if index == count - 1 else ALL_CORES[index * share:(index + 1) * share]


def pytest_configure(config):
    if WORKER and ALL_CORES:
        os.sched_setaffinity(0, half_of_the_cores())


def pytest_collection_modifyitems(items):
    """Tests marked long first, so that none of them ends the session alone; whole_machine tests last."""
    def phase(item):
        return 2 if item.get_closest_marker("whole_machine") else 0 if item.get_closest_marker("long") else 1
    items.sort(key=phase)  # stable: files stay together, in their order


@pytest.fixture(scope="session")
def cores_lock(tmp_path_factory):
    """The lock file both test processes open: in their common temporary folder (each has a folder of its own
    in it)."""
    return tmp_path_factory.getbasetemp().parent / "cores.lock"


@pytest.fixture(autouse=True)
def cores_of_this_test(request, cores_lock):
    """A shared hold on the machine for each test, an exclusive one for the whole_machine tests (to the end of
    this process's session). A waiting exclusive hold takes `.intent` first, so that no new shared hold passes
    it."""
    if not WORKER or not ALL_CORES:
        yield
        return
    whole = request.node.get_closest_marker("whole_machine") is not None
    held = request.config.stash.setdefault(HOLD, {})
    if "whole" in held:  # this process holds the machine already
        yield
        return
    with open(cores_lock.with_suffix(".intent"), "a") as intent:
        fcntl.flock(intent, fcntl.LOCK_EX)
        lock = open(cores_lock, "a")
        fcntl.flock(lock, fcntl.LOCK_EX if whole else fcntl.LOCK_SH)
    if whole:
        held["whole"] = lock  # kept to the end of this process's session: whole_machine tests are its last
        os.sched_setaffinity(0, ALL_CORES)
        yield
        return
    try:
        yield
    finally:
        lock.close()


def pytest_sessionfinish(session):
    """The exclusive hold ends with this process's tests: the process itself lives on until the other one's
    have ended (xdist closes them together), and the other one waits for the hold."""
    whole = session.config.stash.get(HOLD, {}).pop("whole", None)
    if whole:
        whole.close()
