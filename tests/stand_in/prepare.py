"""Stand-in prepare.py for the agent_loop tests: only what agent_loop.py reads from the real one."""
import os

PROFILE = os.environ.get("AUTORESEARCH_PROFILE", "smoke")
DATASET = os.environ.get("AUTORESEARCH_DATASET", "synthetic")
CACHE_DIR = os.environ.get("AUTORESEARCH_CACHE_DIR", ".")
MAX_SEQ_LEN = 128
TIME_BUDGET = 1


def check_ready():
    if os.path.exists(os.path.join(CACHE_DIR, "ready")):
        return []
    return [f"no data for profile {PROFILE}: run `uv run prepare.py --dataset synthetic`"]
