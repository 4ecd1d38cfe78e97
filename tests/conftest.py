"""Shared fixtures: a cache with the synthetic dataset prepared for the smoke profile, made once per session;
user_env, a new user's environment around a copy of it; and import_train, train.py as another profile sets
it. Also how the suite shares the machine: two test processes (pytest-xdist), each on its own half of the
cores, and a last phase for the tests that need every core."""

import fcntl
import os
import shutil
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


def user_env(folder, smoke_cache, **extra):
    """The environment of a new user whose lab lives in `folder`: no git identity, no AUTORESEARCH_ settings but
    the smoke profile and a cache of its own (a copy of smoke_cache, made in folder), plus `extra`."""
    folder = Path(folder)
    shutil.copytree(smoke_cache, folder / "cache")
    (folder / "gitconfig").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GIT_", "AUTORESEARCH_"))}
    env.update(AUTORESEARCH_PROFILE="smoke", AUTORESEARCH_CACHE_DIR=str(folder / "cache"),
               GIT_CONFIG_GLOBAL=str(folder / "gitconfig"), **extra)
    return env


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
# whole_machine (workers that split the cores between them) run last, with every core, while the other process
# waits: each test holds a lock (shared, or exclusive for whole_machine) over its setup and teardown at every
# scope, module and session fixtures included.

ALL_CORES = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # gw0, gw1, ... in a test process of pytest-xdist
HOLD = pytest.StashKey[dict]()  # this test process's hold on the machine: {"shared" or "whole": the open lock}


@pytest.hookimpl(optionalhook=True)  # a pytest without xdist (bench/gpu_check.py's) runs one process
def pytest_xdist_auto_num_workers(config):
    return 2 if len(ALL_CORES) >= 2 else 0  # 0: one process, all the cores, no lock


def half_of_the_cores():
    """This test process's share of the cores; all of them when `-n` asked for more processes than cores."""
    count, index = int(os.environ["PYTEST_XDIST_WORKER_COUNT"]), int(WORKER.removeprefix("gw"))
    share = len(ALL_CORES) // count
    if share == 0:
        return ALL_CORES
    return ALL_CORES[index * share:] if index == count - 1 else ALL_CORES[index * share:(index + 1) * share]


def pinned():
    return bool(WORKER and ALL_CORES)


def pytest_configure(config):
    if pinned():
        os.sched_setaffinity(0, half_of_the_cores())


def whole_machine(item):
    return item.get_closest_marker("whole_machine") is not None


def minutes(item):
    """The minutes its file takes on one core, as its `long` marker says (0 without one)."""
    marker = item.get_closest_marker("long")
    return marker.kwargs.get("minutes", 1) if marker else 0


def pytest_collection_modifyitems(items):
    """Files handed out longest first (xdist sends a file at a time, in the order its first test comes), so
    that the short ones even out the two processes' ends: test_workers sent last left one process idle for
    four minutes. In a file, whole_machine tests last."""
    items.sort(key=lambda item: (-minutes(item), whole_machine(item)))


def lock_path(config):
    """In the folder both test processes share: xdist gives each a temporary folder of its own in it."""
    return Path(config.option.basetemp).parent / "cores.lock"


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    """A shared hold on the machine for each test, an exclusive one for whole_machine tests, kept from one to the
    next (the other process waits) and given back, with this process's own cores, after the last. A waiting
    exclusive hold takes `.intent` first, so that no new shared hold passes it. xdist runs a test only once it
    knows the next one (or that there is none), so no hold is kept while this process waits for work."""
    if not pinned():
        return (yield)
    held = item.config.stash.setdefault(HOLD, {})
    whole = whole_machine(item)
    if not (whole and "whole" in held):
        path = lock_path(item.config)
        with open(path.with_suffix(".intent"), "a") as intent:
            fcntl.flock(intent, fcntl.LOCK_EX)
            lock = open(path, "a")
            fcntl.flock(lock, fcntl.LOCK_EX if whole else fcntl.LOCK_SH)
        held["whole" if whole else "shared"] = lock
        if whole:
            os.sched_setaffinity(0, ALL_CORES)
    try:
        return (yield)
    finally:
        if "shared" in held:
            held.pop("shared").close()
        elif nextitem is None or not whole_machine(nextitem):
            os.sched_setaffinity(0, half_of_the_cores())
            held.pop("whole").close()
