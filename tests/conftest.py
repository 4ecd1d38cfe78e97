"""Shared fixtures: a cache with the synthetic dataset prepared for the smoke profile, made once per session;
and import_train, train.py as another profile sets it."""

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
