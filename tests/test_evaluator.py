"""The harness's evaluator (autoresearch/evaluator.py) on real exported models: it reproduces train.py's val_bpb,
and refuses what must not be scored. Each model is built and exported by a child process, as train.py would."""

import compileall
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from autoresearch.experiment import LEAK_TOLERANCE  # noqa: E402
pytestmark = pytest.mark.long(minutes=3)  # on one core; conftest hands out the longest files first

# builds small GPTs with train.py's code (seeded, two steps of training), exports each as train.py does under
# the harness (to the folder in argv[1]), and prints prepare.evaluate_bpb of each for comparison, one JSON line.
# The variants change the model; all in one process, which imports torch once.
BUILD = textwrap.dedent("""
    import json, os, sys, torch, torch.nn.functional as F
    import prepare, train
    from autoresearch.handoff import HANDOFF_ENV, hand_over

    @torch.library.custom_op("hostile::same", mutates_args=())
    def same(x: torch.Tensor) -> torch.Tensor:
        return x.clone()
    same.register_fake(lambda x: torch.empty_like(x))

    def peeking(q, k, v, w):  # sees the whole row: the future leaks into every position
        q, k, v = (a.transpose(1, 2) for a in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)

    ATTEND = {"peeks": peeking, "custom_op": lambda q, k, v, w: same(train.sdpa_attention(q, k, v, w))}

    class Lookahead(torch.nn.Module):  # adds to each position's logit of the next token: the future, leaked
        def __init__(self, model, offset=0.0, spared=(), from_batch=1, rare=None):
            super().__init__()
            self.model, self.offset, self.spared, self.from_batch = model, offset, spared, from_batch
            self.register_buffer("rare", torch.ones(model.config.vocab_size) if rare is None else rare)

        def forward(self, idx, targets=None, reduction="mean"):
            logits = self.model(idx).float()
            T, vocab = idx.size(1), logits.size(-1)
            where = torch.ones(T)
            where[[-1, *(int(f * T) for f in self.spared)]] = 0  # not where a check might look
            ahead = torch.cat([idx[:, 1:], idx[:, -1:]], 1)
            on = (idx.new_ones(idx.size(0)).sum() >= self.from_batch).float()  # a batch size, read as data
            where = where.view(1, T) * self.rare[ahead]  # only before some next tokens
            logits = logits + 3.0 * on * F.one_hot(ahead, vocab).float() * where.unsqueeze(-1) + self.offset
            if targets is None:
                return logits
            return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction=reduction)
    class Later(torch.nn.Module):  # counts its calls: the first two (a check's) causal, the later ones not
        def __init__(self, model):
            super().__init__()
            self.leaky = Lookahead(model)
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, idx, targets=None, reduction="mean"):
            self.calls.add_(1)
            honest = self.leaky.model(idx).float()
            peek = (self.calls > 2).float()
            logits = peek * self.leaky(idx) + (1 - peek) * honest
            if targets is None:
                return logits
            return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction=reduction)
    # each leaks the next token and hides it from some check: a constant on every logit (a scale for a relative
    # tolerance), positions a fixed check would look at, the small batches a check might use
    LEAKS = {"peeks_offset": dict(offset=3e4), "peeks_spared": dict(spared=(0.25, 0.5, 0.75)),
             "peeks_batched": dict(from_batch=3)}
    tok = prepare.Tokenizer.from_directory()
    # and before the rarest tokens alone, 1% of the positions (a red team's leaked at the hardest 0.85%): a check
    # of a few rows rarely meets one
    counts = torch.bincount(torch.from_numpy(prepare.eval_rows(tok.directory, prepare.MAX_SEQ_LEN, 64,
                                                               tok.get_bos_token_id()).astype("int64")).flatten(),
                            minlength=tok.get_vocab_size()).float()
    order = counts.argsort()
    LEAKS["peeks_rare"] = dict(rare=torch.zeros(tok.get_vocab_size()).index_fill(
        0, order[:int((counts[order].cumsum(0) <= 0.01 * counts.sum()).sum())], 1.0))
    own = {}
    for variant in sys.argv[2:]:
        torch.manual_seed(0)
        config = train.GPTConfig(sequence_len=prepare.MAX_SEQ_LEN, vocab_size=tok.get_vocab_size(), n_layer=2,
                                 n_embd=64, head_dim=32, window_pattern="L")
        model = train.GPT(config, ATTEND.get(variant, train.sdpa_attention))
        model.init_weights()
        optimizer = train.make_optimizer(model, compiled=False, ortho_dtype=torch.float32)
        split = "val" if variant == "val" else "train"  # "val": trained on the val rows, as no run may be
        loader = prepare.make_dataloader(tok, 8, prepare.MAX_SEQ_LEN, split, device="cpu")
        if variant == "val_made_again":  # the synthetic val text, generated in-process: no file opened, and
            # the file's held-out slice learned with the pinned rows
            from autoresearch.synthetic import synthetic_documents
            ids = tok.encode(synthetic_documents("val")[:200], prepend=tok.get_bos_token_id())
            flat = torch.tensor([t for doc in ids for t in doc])
            rows = flat[:len(flat) // (prepare.MAX_SEQ_LEN + 1) * (prepare.MAX_SEQ_LEN + 1)].view(
                -1, prepare.MAX_SEQ_LEN + 1)
            picks = (rows[torch.randint(len(rows), (8,))] for _ in iter(int, 1))
            loader = ((r[:, :-1], r[:, 1:], 1) for r in picks)
        for _ in range({"custom_op": 0, "val": 150, "val_made_again": 150}.get(variant, 2)):  # (no backward)
            x, y, _ = next(loader)
            model(x, y).backward()
            optimizer.step()
            model.zero_grad(set_to_none=True)
        model.eval()
        if variant in LEAKS:
            model = Lookahead(model, **LEAKS[variant])
        if variant.startswith("peeks_later"):
            model = Later(model)
        os.environ[HANDOFF_ENV] = os.path.join(sys.argv[1], variant + ".pt2")
        # "autocast": the graph carries train.py's autocast (bf16 on CUDA; here the CPU's), and is scored under it
        dtype = torch.bfloat16 if variant.endswith("autocast") else None
        hand_over(model, prepare.MAX_SEQ_LEN, config.vocab_size, torch.device("cpu"), autocast=dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            own[variant] = prepare.evaluate_bpb(model, tok, 16)
    print(json.dumps(own))
""")
VARIANTS = ("plain", "val", "val_made_again", "peeks", "custom_op", "peeks_offset", "peeks_spared", "peeks_batched", "peeks_later",
            "peeks_rare", "autocast", "peeks_later_autocast")


@pytest.fixture
def cache(smoke_cache, tmp_path):
    """A private copy of the smoke cache: some tests damage it."""
    copy = tmp_path / "cache"
    shutil.copytree(smoke_cache, copy)
    return copy


@pytest.fixture(scope="module")
def exported(smoke_cache, tmp_path_factory):
    """{variant: (model file, train.py's own val_bpb)}, exported once for the tests, which only read them."""
    folder = tmp_path_factory.mktemp("exported")
    built = run(["-c", BUILD, str(folder), *VARIANTS], smoke_cache)
    assert built.returncode == 0, built.stderr[-3000:]
    own = json.loads(built.stdout.strip().splitlines()[-1])
    return {variant: (folder / f"{variant}.pt2", own[variant]) for variant in VARIANTS}


@pytest.fixture(scope="module")
def plain(exported):
    return exported["plain"]


def run(args, cache, input=None, **env):
    full = dict(os.environ, AUTORESEARCH_PROFILE="smoke", AUTORESEARCH_CACHE_DIR=str(cache), **env)
    return subprocess.run([sys.executable, *args], cwd=REPO, env=full, capture_output=True, text=True, timeout=300,
                          input=input)


def evaluate(cache, path):
    result = run(["-m", "autoresearch.evaluator", str(path)], cache)
    return result.returncode, json.loads(result.stdout.strip().splitlines()[-1])


def test_evaluator_gives_the_val_bpb_train_py_computes(cache, plain):
    path, own = plain
    code, result = evaluate(cache, path)
    assert code == 0, result
    assert result["val_bpb"] == pytest.approx(own, rel=1e-6) and result["restored"] == []
    assert 1.0 < result["val_bpb"] < 20.0
    assert abs(result["val_bpb"] / result["heldout_bpb"] - 1) < 0.05  # an honest model scores both slices alike


def test_a_graph_exported_under_autocast_is_checked_and_scored_as_train_py_ran_it(cache, exported):
    # the evaluator adds no autocast: one added around an exported graph fails its dtype asserts (a cast that was
    # a no-op when export traced, `.float()`), and a check in one precision with scoring in another could differ
    path, own = exported["autocast"]
    code, result = evaluate(cache, path)
    assert code == 0, result
    assert result["val_bpb"] == pytest.approx(own, rel=1e-6), (result, own)
    assert result["val_bpb"] != pytest.approx(exported["plain"][1], rel=1e-9)  # bf16 numerics: not plain's


def test_a_model_trained_on_the_val_rows_scores_them_far_better_than_the_heldout_slice(cache, exported):
    path, _ = exported["val"]
    code, result = evaluate(cache, path)
    assert code == 0, result
    # the loop rejects a ratio more than LEAK_TOLERANCE below the best's: honest models score ~1 here (above)
    assert result["val_bpb"] / result["heldout_bpb"] < 1 - LEAK_TOLERANCE, result


def test_a_model_trained_on_the_synthetic_val_text_made_again_in_process_is_caught_by_fresh_text(cache,
                                                                                                exported):
    # the synthetic val text comes from a generator and a seed in the repository: a run can make it again
    # without opening a file, and learn the file's held-out slice with the pinned rows; text from a seed the
    # evaluator draws after the run is of the same kind, and new to the model
    path, _ = exported["val_made_again"]
    code, result = evaluate(cache, path)
    assert code == 0 and isinstance(result["heldout_seed"], int), result
    assert result["val_bpb"] / result["heldout_bpb"] < 1 - LEAK_TOLERANCE, result


@pytest.mark.parametrize("variant", ["peeks", "peeks_offset", "peeks_spared", "peeks_batched", "peeks_rare"])
def test_evaluator_refuses_a_model_that_sees_later_tokens_however_it_hides_it(cache, exported, variant):
    path, own = exported[variant]
    code, result = evaluate(cache, path)
    assert code == 1 and "not causal" in result["error"], result
    if variant not in ("peeks", "peeks_rare"):  # each would have scored far better than an honest model
        assert own < exported["plain"][1] - 1.0, (own, exported["plain"][1])


@pytest.mark.parametrize("variant", ["peeks_later", "peeks_later_autocast"])  # also inside an autocast region
def test_evaluator_refuses_a_model_that_changes_its_own_state_between_calls(cache, exported, variant):
    path, own = exported[variant]
    code, result = evaluate(cache, path)
    assert code == 1 and "changes its own state when called" in result["error"], result


def test_evaluator_refuses_an_operator_it_does_not_know(cache, exported):
    path, _ = exported["custom_op"]
    code, result = evaluate(cache, path)
    assert code == 1 and ("hostile::same" in result["error"] or "cannot be loaded" in result["error"]), result


def test_a_run_that_hands_over_nothing_is_refused_with_the_reason(cache, tmp_path):
    code, result = evaluate(cache, tmp_path / "missing.pt2")
    assert code == 1 and "handed over no model" in result["error"], result


def test_damaged_token_byte_counts_are_restored_before_the_metric_is_computed(cache, plain):
    path, own = plain
    token_bytes = cache / "prepared" / "synthetic" / "smoke" / "token_bytes.npy"
    np.save(token_bytes, np.load(token_bytes) * 2)  # what a run that wants half the val_bpb would write
    code, result = evaluate(cache, path)
    assert code == 0, result
    assert result["val_bpb"] == pytest.approx(own, rel=1e-6)
    assert any("token_bytes.npy" in line for line in result["restored"]), result
    code, again = evaluate(cache, path)  # the cache is whole again for the next run
    assert again["restored"] == [] and again["val_bpb"] == result["val_bpb"]


def test_started_beside_train_py_it_evaluates_only_on_the_loops_word_and_with_the_hashes_in_it(cache, plain):
    """--wait, as the loop starts it while train.py runs: silent on an empty input; on the word, the one-shot
    evaluator's value with the word's nonce, the metric's files checked against the hashes the word carries
    (no file a run could have rewritten); a second line on its input (something else wrote there) is refused."""
    path, own = plain
    wait = ["-m", "autoresearch.evaluator", str(path), "--wait"]
    silent = run(wait, cache, input="")
    assert silent.returncode == 0 and silent.stdout == "", silent.stderr[-2000:]
    folder = cache / "prepared" / "synthetic" / "smoke"
    hashes = json.loads((folder / ".pristine" / "hashes.json").read_text())
    word = {"expect": hashes, "data": None, "nonce": "n1"}
    done = run(wait, cache, input=json.dumps(word) + "\n")
    result = json.loads(done.stdout.splitlines()[-1])
    assert done.returncode == 0 and result["val_bpb"] == pytest.approx(own, rel=1e-6) and result["nonce"] == "n1"
    forged = run(wait, cache, input='{"expect": null, "data": "/tmp/elsewhere", "nonce": "x"}\n' + json.dumps(word))
    assert forged.returncode == 1 and "something else wrote" in json.loads(forged.stdout.splitlines()[-1])["error"]
    word["expect"] = dict(hashes, **{"token_bytes.npy": "0" * 64})  # a record no intact copy matches
    refused = run(wait, cache, input=json.dumps(word) + "\n")
    assert refused.returncode == 1 and "token_bytes.npy" in json.loads(refused.stdout.splitlines()[-1])["error"]


def test_a_run_that_crashes_leaves_no_evaluator_behind(tmp_path, monkeypatch):
    # the evaluator starts beside train.py and imports for seconds; a train.py that dies at once must not leave
    # it waiting on the loop for the rest of the night
    from autoresearch.runner import scratch_folders, train_once
    (tmp_path / "train.py").write_text("raise SystemExit('dies at once')\n")
    monkeypatch.chdir(tmp_path)
    run_ = train_once({"harness_eval": True, "time_budget": 15}, 60, 1, tmp_path / "run.log")
    assert run_.error and "dies at once" in (tmp_path / "run.log").read_text()
    assert evaluators_of(os.getpid()) == []
    scratch, prefix = scratch_folders(tmp_path / "run.log")
    assert list(tmp_path.glob("*.evaluator")) == [] and list(scratch.glob(f"{prefix}*")) == []


def evaluators_of(parent):
    """Pids of the evaluator processes (live or not yet reaped) that are children of `parent`."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            ppid = (proc / "stat").read_text().rsplit(")", 1)[1].split()[1]
            if ppid == str(parent) and b"autoresearch.evaluator" in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except (OSError, IndexError):  # ended meanwhile
            pass
    return found


def run_touching_torch(tmp_path, monkeypatch, cache, plain, touch, crash=False, installed=None):
    """train_once of a train.py that hands over the plain model after running `touch` (code that moves a
    torch file the evaluator runs code from, named `target` there), then prints its summary (or crashes);
    installed: the tag's record of the evaluator's code outside the repository."""
    from autoresearch.runner import train_once
    end = 'raise SystemExit("crashed (test)")' if crash else \
        'print("---\\ntraining_seconds: 1.0\\nnum_steps: 1\\nprofile: smoke")'
    (tmp_path / "train.py").write_text(textwrap.dedent(f"""
        import os, shutil, time
        shutil.copy({str(plain[0])!r}, os.environ["AUTORESEARCH_HANDOFF"])
        target = {TORCH_TARGET!r}
        """) + textwrap.dedent(touch) + end + "\n")
    shutil.copy(REPO / "prepare.py", tmp_path / "prepare.py")
    for folder in (tmp_path, REPO / "autoresearch"):  # the evaluator's modules' bytecode, as the loop does
        compileall.compile_dir(folder, quiet=2, maxlevels=0)   # before each run (seal.module_bytecode)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUTORESEARCH_PROFILE", "smoke")
    monkeypatch.setenv("AUTORESEARCH_CACHE_DIR", str(cache))
    monkeypatch.setenv("AUTORESEARCH_CONFINE", "0")  # a confined run cannot write there (tests/test_confine.py)
    run_ = train_once({"harness_eval": True, "time_budget": 15}, 120, 1, tmp_path / "run.log", installed=installed)
    if not crash:
        assert run_.error is None and run_.val == pytest.approx(plain[1], rel=1e-6), \
            (tmp_path / "run.log").read_text()
    return run_


TORCH_TARGET = importlib.util.find_spec("torch.nn.functional").origin  # the metric's cross-entropy
# these tests put another torch/nn/functional.py in place for a while, and every evaluator in the suite reads it:
# nothing else runs meanwhile (a real loop in the other test process would see torch edited, and stop there)
EDITS_TORCH = pytest.mark.whole_machine
# forged files put in place of the original and the original put back (by inode: uv may share it with other
# environments), as an agent covering its tracks would; the test puts the original back too if the run did not
PUT_BACK = """
    for _ in range(20):  # while the evaluator imports it (it starts beside train.py)
        time.sleep(0.1)
    os.replace(original, path)
    """


def replaced_then_put_back(path, forged_bytes_code):
    return textwrap.dedent(f"""
        path, original = {path!r}, {path + ".test-original"!r}
        """) + textwrap.dedent(forged_bytes_code) + textwrap.dedent("""
        with open(path + ".test-new", "wb") as f:
            f.write(forged)
        os.replace(path + ".test-new", path)
        """) + textwrap.dedent(PUT_BACK)


def keeping_the_original(path):
    backup = path + ".test-original"
    os.link(path, backup)
    return backup


def put_back(backup, path):
    """The original in its place again, and no backup left (a rename onto another link of the same file, as
    when the run put it back already, does nothing)."""
    if os.path.exists(backup):
        if os.path.exists(path) and os.path.samefile(backup, path):
            os.unlink(backup)
        else:
            os.replace(backup, path)


@EDITS_TORCH
def test_a_run_that_swaps_in_a_file_the_evaluator_runs_code_from_and_puts_it_back_is_caught(cache, plain, tmp_path,
                                                                                          monkeypatch):
    # torch's own sources are outside the repository's seal; the evaluator names those it ran that were written
    # while train.py ran, by ctime, which putting the original back moves again
    cached = importlib.util.cache_from_source(TORCH_TARGET)  # rewritten by the imports of the forged source
    backups = {TORCH_TARGET: keeping_the_original(TORCH_TARGET), cached: keeping_the_original(cached)}
    try:
        run_ = run_touching_torch(tmp_path, monkeypatch, cache, plain, replaced_then_put_back(TORCH_TARGET, """
            with open(path, "rb") as f:
                forged = f.read() + b"\\n# edited by a run\\n"
            """))
    finally:
        for path, backup in backups.items():
            put_back(backup, path)
    assert TORCH_TARGET in run_.tampered and set(run_.tampered) <= {TORCH_TARGET, cached}, run_.tampered


@EDITS_TORCH
def test_a_run_that_forges_the_bytecode_of_a_module_the_evaluator_runs_is_caught(cache, plain, tmp_path,
                                                                                 monkeypatch):
    # a .pyc whose header matches its source's mtime and size is loaded in place of the source
    cached = importlib.util.cache_from_source(TORCH_TARGET)
    backup = keeping_the_original(cached)
    try:
        run_ = run_touching_torch(tmp_path, monkeypatch, cache, plain, replaced_then_put_back(cached, f"""
            import importlib._bootstrap_external as bootstrap
            st = os.stat(target)
            with open(target) as f:
                code = compile(f.read() + "\\nFORGED = True\\n", target, "exec")
            forged = bootstrap._code_to_timestamp_pyc(code, int(st.st_mtime), st.st_size)
            """))
    finally:
        put_back(backup, cached)
    assert run_.tampered == [cached]


@EDITS_TORCH
def test_a_file_the_evaluator_runs_code_from_edited_between_runs_is_caught_until_its_bytes_are_back(
        cache, plain, tmp_path, monkeypatch):
    # an agent's edit before a `step` is older than the run, so the evaluator's own check cannot see it; the
    # tag's record of the evaluator's code (made at its first evaluation) does, before the run and after it
    from autoresearch.installed import InstalledCode
    record = tmp_path / "installed-code.json"
    first = run_touching_torch(tmp_path, monkeypatch, cache, plain, "", installed=InstalledCode(record))
    assert first.edited_code == [] and TORCH_TARGET in InstalledCode(record).files
    cached = importlib.util.cache_from_source(TORCH_TARGET)  # the evaluator compiles the edited source again
    backups = {TORCH_TARGET: keeping_the_original(TORCH_TARGET), cached: keeping_the_original(cached)}
    try:
        edited = TORCH_TARGET + ".test-new"
        Path(edited).write_bytes(Path(TORCH_TARGET).read_bytes() + b"\n# edited between runs\n")
        os.replace(edited, TORCH_TARGET)
        assert InstalledCode(record).edited() == [TORCH_TARGET]  # seen before any run: `step` refuses
        second = run_touching_torch(tmp_path, monkeypatch, cache, plain, "", installed=InstalledCode(record))
        assert TORCH_TARGET in second.edited_code and set(second.edited_code) <= {TORCH_TARGET, cached}, second
    finally:
        for path, backup in backups.items():
            put_back(backup, path)
    # the original bytes back (as a reinstall puts them): a new ctime, and nothing edited
    assert os.stat(TORCH_TARGET).st_ctime_ns != InstalledCode(record).files[TORCH_TARGET][0]
    assert InstalledCode(record).edited() == []


@EDITS_TORCH  # every Python of this environment reads the file (it acts only while this test's flag exists)
def test_a_pth_file_put_in_the_environment_runs_no_code_in_the_evaluator(cache, plain, tmp_path, monkeypatch):
    # site runs the `import` lines of every .pth in site-packages at start-up, before any module is imported: an
    # agent's between runs would patch the metric in the evaluator with no file of code_in_use() to show for it
    flag, seen = tmp_path / "flag", tmp_path / "seen"
    pth = Path(sysconfig.get_path("purelib")) / "zz-autoresearch-test.pth"
    pth.write_text(f"import os, sys; os.path.exists({str(flag)!r}) and "
                   f"open({str(seen)!r}, 'a').write(repr(sys.orig_argv) + chr(10))\n")
    try:
        flag.write_text("")
        run_touching_torch(tmp_path, monkeypatch, cache, plain, "")
    finally:
        pth.unlink()
    started = seen.read_text().splitlines()
    assert any("train.py" in line for line in started), started  # the file was live: train.py's Python ran it
    assert not [line for line in started if "--wait" in line], started  # the evaluator's did not


@EDITS_TORCH
def test_a_run_that_writes_a_file_the_evaluator_runs_code_from_and_crashes_is_caught(cache, plain, tmp_path,
                                                                                   monkeypatch):
    # no model to score after a crash; the code the next runs' evaluators import is checked all the same
    run_ = run_touching_torch(tmp_path, monkeypatch, cache, plain, """
        os.chmod(target, os.stat(target).st_mode)
        """, crash=True)
    assert run_.error and "crashed (test)" in run_.error and run_.tampered == [TORCH_TARGET], run_


# -----------------------------------------------------------------------------
# The warm-up beside train.py: on the cpu profile the evaluator compiles its scorer, and compiles it first on the
# untrained graph that train.py hands over early (handoff.early_handoff_path), while train.py compiles its own step


@pytest.fixture(scope="module")
def compiling_tree(tmp_path_factory):
    """A copy of train.py, prepare.py and the harness in which smoke's evaluation compiles, as the cpu profile's
    does (2**19 tokens there: minutes on one core), and so warms up early."""
    tree = tmp_path_factory.mktemp("compiling")
    for name in ("train.py", "prepare.py"):
        shutil.copy(REPO / name, tree / name)
    shutil.copytree(REPO / "autoresearch", tree / "autoresearch", ignore=shutil.ignore_patterns("__pycache__"))
    handoff = tree / "autoresearch" / "handoff.py"
    source, count = re.subn(r"^COMPILE_FROM_TOKENS = .*$", "COMPILE_FROM_TOKENS = 0", handoff.read_text(),
                            flags=re.M)
    assert count == 1
    handoff.write_text(source)
    return tree


def on_the_cpu(cache, **extra):
    """The warm-up is the CPU's (on a GPU it would take memory train.py may be using): a GPU here is hidden."""
    return dict(os.environ, AUTORESEARCH_PROFILE="smoke", AUTORESEARCH_CACHE_DIR=str(cache), CUDA_VISIBLE_DEVICES="",
                **extra)


def start_waiting(tree, cache, model, early, kernels, out):
    """The evaluator as the loop starts it beside train.py: waiting for the loop's word, watching for `early`."""
    env = on_the_cpu(cache, TORCHINDUCTOR_CACHE_DIR=str(kernels))
    return subprocess.Popen([sys.executable, "-m", "autoresearch.evaluator", str(model), "--wait", "--early",
                             str(early)], cwd=tree, env=env, stdin=subprocess.PIPE, stdout=out, text=True,
                            stderr=subprocess.STDOUT)


def kernel_files(kernels):
    return {str(p.relative_to(kernels)): p.stat().st_mtime_ns for p in kernels.rglob("*") if p.is_file()}


def said(out, what, timeout=180):
    """The evaluator's first line that starts with `what`, once it is written."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        lines = [line for line in Path(out.name).read_text().splitlines() if line.startswith(what)]
        if lines:
            return lines[0]
        time.sleep(0.5)
    raise AssertionError(f"no line {what!r} in {timeout} s:\n{Path(out.name).read_text()[-3000:]}")


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="Apple's GPU cannot be hidden from train.py")
def test_beside_train_py_it_compiles_the_early_graph_and_the_evaluation_after_training_starts_warm(
        cache, compiling_tree, tmp_path):
    model, early, kernels = tmp_path / "model.pt2", tmp_path / "early.pt2", tmp_path / "evaluator-cache"
    with open(tmp_path / "evaluator.out", "w") as out:
        evaluator = start_waiting(compiling_tree, cache, model, early, kernels, out)
        try:
            trained = subprocess.run([sys.executable, "train.py"], cwd=compiling_tree, capture_output=True,
                                     text=True, timeout=600, env=on_the_cpu(
                                         cache, AUTORESEARCH_HANDOFF=str(model), AUTORESEARCH_HANDOFF_EARLY=str(early),
                                         TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "train-cache")))
            assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-2000:]
            assert early.is_file() and model.is_file()  # the untrained graph, then the trained model
            assert said(out, "warm-up").startswith("warm-up: compiled the scorer of the early graph")
            warm = kernel_files(kernels)
            assert [f for f in warm if f.startswith("fxgraph")], sorted(warm)  # compiled before the word
            evaluator.communicate(json.dumps({"expect": None, "data": None, "nonce": "n1"}) + "\n", timeout=300)
        finally:
            evaluator.kill()
    result = json.loads(Path(out.name).read_text().strip().splitlines()[-1])
    assert evaluator.returncode == 0 and result["nonce"] == "n1", result
    # the trained weights in the warm-up's graph: its kernels found in the cache, none compiled or written
    assert result["compile_cache"]["hit"] >= 1 and result["compile_cache"]["miss"] == 0, result
    assert kernel_files(kernels) == warm
    # and what was scored is the trained model, as an evaluator that never saw the early graph scores it (eager)
    returncode, alone = evaluate(cache, model)
    assert returncode == 0 and abs(alone["val_bpb"] - result["val_bpb"]) < 1e-4 * alone["val_bpb"], (alone, result)


def test_an_early_graph_that_is_no_regular_file_is_passed_over_and_the_evaluation_goes_on(cache, plain, tmp_path):
    model, early, kernels = plain[0], tmp_path / "early.pt2", tmp_path / "evaluator-cache"
    os.mkfifo(early)  # opened for reading, a FIFO would wait for a writer for ever
    with open(tmp_path / "evaluator.out", "w") as out:
        evaluator = start_waiting(REPO, cache, model, early, kernels, out)
        try:
            assert said(out, "warm-up") == "warm-up skipped: the early graph is not a regular file"
            evaluator.communicate(json.dumps({"expect": None, "data": None, "nonce": "n2"}) + "\n", timeout=300)
        finally:
            evaluator.kill()
    result = json.loads(Path(out.name).read_text().strip().splitlines()[-1])
    assert evaluator.returncode == 0 and result["nonce"] == "n2" and result["val_bpb"] > 0, result
