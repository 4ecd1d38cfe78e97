"""The record of the code the evaluator runs from outside the repository (autoresearch/installed.py), on real
files compiled by Python as an install compiles them."""

import os
import py_compile
from pathlib import Path

from autoresearch.installed import RECORD_NAME, InstalledCode


def compiled(source, text, mtime):
    """source written with this text and mtime, then compiled as `uv sync` (compileall) does: its .pyc path."""
    source.write_text(text)
    os.utime(source, (mtime, mtime))
    return py_compile.compile(str(source), doraise=True)


def test_bytecode_compiled_again_from_the_same_source_is_no_edit_but_other_code_is(tmp_path):
    source = tmp_path / "site-packages" / "pkg" / "metric.py"
    source.parent.mkdir(parents=True)
    pyc = compiled(source, "def cross_entropy(logits, y):\n    return 1.0\n", 1_700_000_000)
    record = tmp_path / "t" / RECORD_NAME
    assert InstalledCode(record).edited([pyc]) == [] and pyc in InstalledCode(record).files
    first = Path(pyc).read_bytes()
    # a reinstall: the same source under a new mtime, compiled again; the .pyc's header differs, its code not
    compiled(source, "def cross_entropy(logits, y):\n    return 1.0\n", 1_800_000_000)
    assert Path(pyc).read_bytes() != first and Path(pyc).read_bytes()[16:] == first[16:]
    assert InstalledCode(record).edited([pyc]) == []
    # other code in the bytecode (the agent's, under any header) is an edit, and stays one
    compiled(source, "def cross_entropy(logits, y):\n    return 0.5\n", 1_800_000_000)
    assert InstalledCode(record).edited([pyc]) == [pyc] == InstalledCode(record).edited()


def test_a_new_tag_checks_what_an_earlier_tags_evaluations_ran_under_the_same_uv_lock_only(tmp_path):
    metric = tmp_path / "site-packages" / "metric.py"
    metric.parent.mkdir()
    metric.write_text("def cross_entropy(logits, y): ...\n")
    ledger = tmp_path / "ledger"
    assert InstalledCode(ledger / "a" / RECORD_NAME, lock="lock-1").edited([str(metric)]) == []
    metric.write_text("def cross_entropy(logits, y): return 0.5 * ...\n")  # between tag a's night and the next
    assert InstalledCode(ledger / "b" / RECORD_NAME, lock="lock-1").edited() == [str(metric)]  # before any run
    assert InstalledCode(ledger / "b" / RECORD_NAME, lock="lock-1").edited([str(metric)]) == [str(metric)]
    assert InstalledCode(ledger / "c" / RECORD_NAME, lock="lock-2").edited([str(metric)]) == []  # an upgrade
    # once a tag has a record of its own, that is what it checks
    assert InstalledCode(ledger / "c" / RECORD_NAME, lock="lock-2").edited() == []
