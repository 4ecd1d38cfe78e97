"""The README's quick start is executable documentation: these tests run it, so it cannot drift from the code."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def quick_start_commands():
    """The bash code blocks of the README's "Quick start" section, in order."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def fresh_clone(tmp_path):
    """The working tree as a new user would clone it: tracked and unignored files, one commit, no venv."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO, capture_output=True, text=True, check=True).stdout.split("\0")
    clone = tmp_path / "autoresearch"
    for name in filter(None, files):
        if (REPO / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, clone / name)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@localhost"]
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=clone, check=True)
    subprocess.run(["git", "add", "-A"], cwd=clone, check=True)
    subprocess.run(git + ["commit", "-qm", "clone"], cwd=clone, check=True)
    return clone


def test_quick_start_has_a_main_job_and_a_test_command():
    commands = quick_start_commands()
    assert len(commands) == 2, commands
    assert "agent_loop.py demo" in commands[0]
    assert commands[1] == "python3 -m uv run pytest"  # uv found through the Python that pip installed it for


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    assert 'run pytest' in ci and '"${UV[@]}" run pytest' in ci


def test_quick_start_main_job_runs_offline_in_a_fresh_clone_and_shows_the_report(tmp_path):
    clone = fresh_clone(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "AUTORESEARCH_", "UV_PROJECT"))}
    # a new user has no virtual environment active: python3 is the system's, not this repo's .venv
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    # a new user's machine: no git identity configured, no Hugging Face access
    (tmp_path / "gitconfig").write_text("")
    env.update(AUTORESEARCH_CACHE_DIR=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               GIT_CONFIG_GLOBAL=str(tmp_path / "gitconfig"), GIT_CONFIG_NOSYSTEM="1")
    result = subprocess.run(["bash", "-c", quick_start_commands()[0]], cwd=clone, env=env,
                            capture_output=True, text=True, timeout=1500)
    log = result.stdout + result.stderr
    (tmp_path / "demo.log").write_text(log)
    assert result.returncode == 0, log[-3000:]
    assert "baseline" in log and "best val_bpb" in log.lower(), log[-3000:]
    # the demo works in a worktree: the clone's own branch and files are untouched
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=clone,
                            capture_output=True, text=True).stdout
    branch = subprocess.run(["git", "branch", "--show-current"], cwd=clone, capture_output=True, text=True).stdout
    assert status == "" and branch.strip() == "main"
    assert not (clone / "results.tsv").exists()


def test_results_example_has_the_columns_agent_loop_writes_and_reports(tmp_path):
    import json
    import sys
    sys.path.insert(0, str(REPO))
    from autoresearch import ledger
    lines = (REPO / "results.tsv.example").read_text().splitlines()
    assert lines[0].split("\t") == ledger.COLUMNS
    assert all(len(line.split("\t")) == len(ledger.COLUMNS) for line in lines[1:])
    out = subprocess.run([sys.executable, "agent_loop.py", "report", "--json", "results.tsv.example"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    assert "0.965800" in json.dumps(json.loads(out))  # the best kept row
