"""The harness's evaluator (autoresearch/evaluator.py) on real exported models: it reproduces train.py's val_bpb,
and refuses what must not be scored. Each model is built and exported by a child process, as train.py would."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

# builds a small GPT with train.py's code (seeded, two steps of training), exports it like train.py does under
# the harness, and prints prepare.evaluate_bpb of the same model for comparison. VARIANT changes the model.
BUILD = textwrap.dedent("""
    import sys, torch, torch.nn.functional as F
    import prepare, train
    from autoresearch.handoff import hand_over
    variant = sys.argv[1]
    torch.manual_seed(0)
    tok = prepare.Tokenizer.from_directory()
    config = train.GPTConfig(sequence_len=prepare.MAX_SEQ_LEN, vocab_size=tok.get_vocab_size(), n_layer=2,
                             n_embd=64, head_dim=32, window_pattern="L")
    attend = train.sdpa_attention
    if variant == "peeks":  # sees the whole row: the future leaks into every position
        attend = lambda q, k, v, w: F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    if variant == "custom_op":
        @torch.library.custom_op("hostile::same", mutates_args=())
        def same(x: torch.Tensor) -> torch.Tensor:
            return x.clone()
        same.register_fake(lambda x: torch.empty_like(x))
        attend = lambda q, k, v, w: same(train.sdpa_attention(q, k, v, w))
    model = train.GPT(config, attend)
    model.init_weights()
    optimizer = train.make_optimizer(model, compiled=False, ortho_dtype=torch.float32)
    loader = prepare.make_dataloader(tok, 8, prepare.MAX_SEQ_LEN, "train", device="cpu")
    for _ in range(0 if variant == "custom_op" else 2):  # the custom operator has no backward
        x, y, _ = next(loader)
        model(x, y).backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
    model.eval()
    hand_over(model, prepare.MAX_SEQ_LEN, config.vocab_size, torch.device("cpu"))
    print(prepare.evaluate_bpb(model, tok, 16))
""")


@pytest.fixture
def cache(smoke_cache, tmp_path):
    """A private copy of the smoke cache: some tests damage it."""
    copy = tmp_path / "cache"
    shutil.copytree(smoke_cache, copy)
    return copy


def run(args, cache, **env):
    full = dict(os.environ, AUTORESEARCH_PROFILE="smoke", AUTORESEARCH_CACHE_DIR=str(cache), **env)
    return subprocess.run([sys.executable, *args], cwd=REPO, env=full, capture_output=True, text=True, timeout=300)


def export(cache, tmp_path, variant="plain"):
    path = tmp_path / f"{variant}.pt2"
    built = run(["-c", BUILD, variant], cache, AUTORESEARCH_HANDOFF=str(path))
    assert built.returncode == 0, built.stderr[-3000:]
    return path, float(built.stdout.strip().splitlines()[-1])


def evaluate(cache, path):
    result = run(["-m", "autoresearch.evaluator", str(path)], cache)
    return result.returncode, json.loads(result.stdout.strip().splitlines()[-1])


def test_evaluator_gives_the_val_bpb_train_py_computes(cache, tmp_path):
    path, own = export(cache, tmp_path)
    code, result = evaluate(cache, path)
    assert code == 0, result
    assert result["val_bpb"] == pytest.approx(own, rel=1e-6) and result["restored"] == []
    assert 1.0 < result["val_bpb"] < 20.0


def test_evaluator_refuses_a_model_that_sees_later_tokens(cache, tmp_path):
    path, own = export(cache, tmp_path, "peeks")
    code, result = evaluate(cache, path)
    assert code == 1 and "not causal" in result["error"], result


def test_evaluator_refuses_an_operator_it_does_not_know(cache, tmp_path):
    path, _ = export(cache, tmp_path, "custom_op")
    code, result = evaluate(cache, path)
    assert code == 1 and ("hostile::same" in result["error"] or "cannot be loaded" in result["error"]), result


def test_a_run_that_hands_over_nothing_is_refused_with_the_reason(cache, tmp_path):
    code, result = evaluate(cache, tmp_path / "missing.pt2")
    assert code == 1 and "handed over no model" in result["error"], result


def test_damaged_token_byte_counts_are_restored_before_the_metric_is_computed(cache, tmp_path):
    path, own = export(cache, tmp_path)
    token_bytes = cache / "prepared" / "synthetic" / "smoke" / "token_bytes.npy"
    np.save(token_bytes, np.load(token_bytes) * 2)  # what a run that wants half the val_bpb would write
    code, result = evaluate(cache, path)
    assert code == 0, result
    assert result["val_bpb"] == pytest.approx(own, rel=1e-6)
    assert any("token_bytes.npy" in line for line in result["restored"]), result
    code, again = evaluate(cache, path)  # the cache is whole again for the next run
    assert again["restored"] == [] and again["val_bpb"] == result["val_bpb"]


def lab_train_py(steps, split):
    """train.py stopping after `steps` steps (not seconds: the outcome must not depend on the machine's load),
    its batches from `split`."""
    text = (REPO / "train.py").read_text()
    stop = "if step > TIMED_FROM_STEP and training_time >= TIME_BUDGET:"
    assert stop in text and 'MAX_SEQ_LEN, "train", device=device)' in text
    return text.replace(stop, f"if step >= {steps}:").replace(
        'MAX_SEQ_LEN, "train", device=device)', f'MAX_SEQ_LEN, "{split}", device=device)')


def test_a_train_py_that_trains_on_the_val_rows_is_rejected_after_its_first_run(cache, tmp_path):
    """The real loop, train.py and evaluator on the smoke profile, its budget raised to 300 s so that runs of a
    fixed number of steps fit in it on a busy machine."""
    repo = tmp_path / "repo"
    shutil.copytree(REPO / "autoresearch", repo / "autoresearch", ignore=shutil.ignore_patterns("__pycache__"))
    prepare_py = (REPO / "prepare.py").read_text()
    assert '"smoke":     (128,        15,' in prepare_py
    (repo / "prepare.py").write_text(prepare_py.replace('"smoke":     (128,        15,', '"smoke": (128, 300,'))
    (repo / ".gitignore").write_text("results.tsv\nlogs/\n__pycache__/\n")
    (repo / "train.py").write_text(lab_train_py(20, "train"))
    (tmp_path / "gitconfig").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GIT_", "AUTORESEARCH_"))}
    env.update(GIT_CONFIG_GLOBAL=str(tmp_path / "gitconfig"), GIT_CONFIG_NOSYSTEM="1",
               AUTORESEARCH_CACHE_DIR=str(cache), AUTORESEARCH_PROFILE="smoke")

    def sh(*args):
        done = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    sh("git", "init", "-q", "-b", "main")
    sh("git", "add", ".")
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "lab")
    sh(sys.executable, str(REPO / "agent_loop.py"), "init", "--tag", "t", "--repeats", "1")
    (repo / "train.py").write_text(lab_train_py(120, "val"))  # about as long as smoke's 15 s
    out = sh(sys.executable, str(REPO / "agent_loop.py"), "step", "-m", "train on the val rows")
    header, *rows = (repo / "results.tsv").read_text().splitlines()
    baseline, row = (dict(zip(header.split("\t"), line.split("\t"))) for line in (rows[0], rows[-1]))
    assert row["status"] == "discard" and row["note"].startswith("rejected:"), out
    assert "held-out slice" in row["note"] and "training on the validation rows" in row["note"]
    assert len(row["seeds"].split(",")) == 1  # caught on its first run: no pairs spent on it
    assert abs(float(baseline["heldout_gap"])) < 0.1, baseline  # an honest model scores both slices alike
