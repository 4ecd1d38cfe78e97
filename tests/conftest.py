"""Shared fixtures: a cache with the synthetic dataset prepared for the smoke profile, made once per session."""

import os
import subprocess
import sys
from pathlib import Path

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
