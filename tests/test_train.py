"""train.py: model and optimizer pieces on tiny inputs, then one real smoke run end to end (CPU, offline)."""

import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from unittest import mock

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
pytestmark = pytest.mark.long(minutes=1.5)  # on one core; conftest hands out the longest files first
# prepare.py (imported by train.py) reads these at import time; the rest of the session keeps its environment
with mock.patch.dict(os.environ, AUTORESEARCH_PROFILE="smoke", AUTORESEARCH_CACHE_DIR=tempfile.mkdtemp()):
    import train  # importing must not start a training run
from autoresearch import attention  # noqa: E402

SUMMARY_KEYS = ["val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent", "total_tokens_M",
                "num_steps", "num_params_M", "depth", "profile", "device", "attention", "seed", "startup_seconds",
                "eval_seconds"]


def tiny_model(vocab_size=64, seq_len=32, depth=2, pattern="L", seed=0, attend=train.sdpa_attention,
               loss_chunk_tokens=0):
    torch.manual_seed(seed)
    config = train.GPTConfig(sequence_len=seq_len, vocab_size=vocab_size, n_layer=depth, n_embd=64, head_dim=32,
                             window_pattern=pattern, loss_chunk_tokens=loss_chunk_tokens)
    model = train.GPT(config, attend)
    model.init_weights()
    return model


def naive_attention(q, k, v, window):
    """Softmax attention written out: scores, a causal sliding-window mask, weights, sum. q, k, v: [B, T, H, D]."""
    T = q.size(1)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.size(-1))
    i = torch.arange(T)
    allowed = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", weights, v)


# ---------------------------------------------------------------------------
# Model and optimizer pieces
# ---------------------------------------------------------------------------

def test_forward_returns_logits_mean_loss_and_per_token_losses():
    model = tiny_model()
    idx = torch.randint(0, 64, (3, 32))
    assert model(idx).shape == (3, 32, 64)
    loss = model(idx, idx)
    per_token = model(idx, idx, reduction="none")
    assert loss.shape == ()
    assert per_token.shape == (3 * 32,)
    assert torch.allclose(per_token.mean(), loss)
    # zero-initialised output projections and a tiny lm_head: the untrained model is close to uniform
    assert abs(loss.item() - math.log(64)) < 0.1


def test_chunked_loss_gives_the_same_loss_and_gradients_as_whole_logits():
    idx, targets = torch.randint(0, 64, (3, 32)), torch.randint(0, 64, (3, 32))
    results = []
    for chunk in (0, 20, 32, 96):  # whole logits; uneven chunks (the last one shorter); even chunks; one chunk
        model = tiny_model(loss_chunk_tokens=chunk)
        assert model.mean_loss == (model.chunked_mean_loss if chunk else model.whole_mean_loss)
        torch.manual_seed(1)
        with torch.no_grad():  # a trained-looking lm_head, so that the softcap and the gradients are not trivial
            model.lm_head.weight.normal_(0, 1.0)
            for block in model.blocks:
                block.attn.c_proj.weight.normal_(0, 0.05)
        loss = model(idx, targets)
        (2.5 * loss).backward()  # an upstream factor (gradient accumulation) must pass through
        per_token = model(idx, targets, reduction="none")
        results.append((loss.detach(), per_token.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss0, per_token0, grads0) = results[0]
    assert loss0 > 1.0
    for loss, per_token, grads in results[1:]:
        torch.testing.assert_close(loss, loss0)
        torch.testing.assert_close(per_token, per_token0)
        for g, g0 in zip(grads, grads0):
            torch.testing.assert_close(g, g0, rtol=1e-4, atol=1e-6)


def test_window_pattern_gives_short_windows_and_a_full_last_layer():
    model = tiny_model(seq_len=64, depth=5, pattern="SSL")
    assert model.windows == [8, 8, 64, 8, 64]  # S = context/8; the last layer is always full
    assert [str(i) for i in (0, 2, 4)] == list(model.value_embeds.keys())  # alternating, last included


@pytest.mark.parametrize("window", [1, 5, 16, 40])
def test_windowed_attention_equals_naive_masked_softmax(window):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 40, 3, 16) for _ in range(3))
    expected = naive_attention(q, k, v, window)
    assert torch.allclose(train.sdpa_attention(q, k, v, window), expected, atol=1e-5)


def test_flex_attention_model_matches_the_sdpa_model():
    # the CUDA path without Flash Attention 3 uses flex attention; its block masks must mean the same windows
    sdpa = tiny_model(seq_len=64, depth=3, pattern="SL")
    flex = tiny_model(seq_len=64, depth=3, pattern="SL", attend=attention.flex_attention_for(sdpa.windows, 64, "cpu"))
    for block in sdpa.blocks:  # zero-initialised projections would hide the attention output
        torch.nn.init.normal_(block.attn.c_proj.weight, std=0.05)
    flex.load_state_dict(sdpa.state_dict())
    idx = torch.randint(0, 64, (2, 64))
    assert flex.windows == [8, 64, 64]
    with torch.no_grad():  # flex attention has no CPU backward; the forward is what defines the windows
        assert torch.allclose(flex(idx, idx, reduction="none"), sdpa(idx, idx, reduction="none"), atol=1e-4)


def test_short_window_layer_ignores_tokens_outside_its_window():
    model = tiny_model(seq_len=64, depth=2, pattern="S")
    window = model.windows[0]
    assert window == 8
    attn = model.blocks[0].attn  # layer 0 of 2 has no value embedding
    nn_init = torch.nn.init
    for linear in (attn.c_proj,):
        nn_init.normal_(linear.weight)  # zero-initialised: make the output depend on the input
    x = torch.randn(1, 64, 64)
    changed = x.clone()
    changed[:, 0] += 1.0
    cos, sin = model.cos[:64], model.sin[:64]
    with torch.no_grad():
        y0, y1 = (attn(inp, None, cos, sin, window) for inp in (x, changed))
    differs = (y0 - y1).abs().amax(dim=-1)[0] > 1e-6
    assert differs[:window].all() and not differs[window:].any()


def test_polar_express_gives_singular_values_near_one():
    torch.manual_seed(0)
    for rows, cols in [(64, 256), (256, 64), (96, 96)]:  # wide, tall, square; stacked like Muon's shape groups
        k = min(rows, cols)
        U = torch.linalg.qr(torch.randn(3, rows, k)).Q
        V = torch.linalg.qr(torch.randn(3, cols, k)).Q
        spectrum = torch.logspace(-2, 0, k)  # condition number 100
        G = U @ torch.diag_embed(spectrum.expand(3, k)) @ V.mT
        s = torch.linalg.svdvals(train.polar_express(G))
        # 5 steps map every singular value in [1e-3, 1] (after normalisation) into [0.86, 1.14]
        assert s.min() > 0.85 and s.max() < 1.15, (rows, cols, s.min().item(), s.max().item())


def test_param_groups_cover_every_parameter_exactly_once():
    model = tiny_model(depth=3)
    optimizer = train.make_optimizer(model, compiled=False, ortho_dtype=torch.float32)
    grouped = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(grouped) == len({id(p) for p in grouped})
    assert {id(p) for p in grouped} == {id(p) for p in model.parameters()}
    for group in optimizer.param_groups:
        if group["kind"] == "muon":
            assert all(p.ndim == 2 and p.shape == group["params"][0].shape for p in group["params"])
    muon = {id(p) for g in optimizer.param_groups if g["kind"] == "muon" for p in g["params"]}
    assert muon == {id(p) for p in model.blocks.parameters()}


def test_loss_falls_on_a_repeating_sequence_with_muon_adamw():
    model = tiny_model(vocab_size=32, seq_len=32)
    optimizer = train.make_optimizer(model, compiled=False, ortho_dtype=torch.float32)
    pattern = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2, 6, 4, 3, 3, 8, 3])
    data = pattern.repeat(20)
    losses = []
    for step in range(40):
        starts = torch.randint(0, len(data) - 33, (8,))
        batch = torch.stack([data[s:s + 33] for s in starts])
        loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        for group in optimizer.param_groups:
            if group["kind"] == "muon":
                group["momentum"] = train.get_muon_momentum(step)
        optimizer.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0], losses


def test_hyperparameters_are_plain_literals_that_a_regex_can_edit():
    # agent_loop's mutate proposer edits `NAME = value` lines: top level for the reference profile, indented
    # inside the one `if PROFILE == "cpu": ... elif PROFILE == "smoke":` block for the small ones
    source = (REPO / "train.py").read_text()
    names = ["DEPTH", "ASPECT_RATIO", "HEAD_DIM", "WINDOW_PATTERN", "TOTAL_BATCH_SIZE", "DEVICE_BATCH_SIZE",
             "EMBEDDING_LR", "UNEMBEDDING_LR", "MATRIX_LR", "SCALAR_LR", "WEIGHT_DECAY", "ADAM_BETAS",
             "WARMUP_RATIO", "WARMDOWN_RATIO", "FINAL_LR_FRAC"]
    literal = r"(\d[\d.e*+-]*|\"[SL]+\"|\([\d., ]+\)|True|False)"
    for name in names:
        assert len(re.findall(rf"^{name} = {literal}\s", source, flags=re.M)) == 1, name
    assert source.count('if PROFILE == "cpu":') == 1 and source.count('elif PROFILE == "smoke":') == 1
    block = source.split('if PROFILE == "cpu":')[1].split("\n\n")[0]
    assert all(re.match(rf"    ([A-Z_0-9]+ = {literal}|#)", line) for line in block.splitlines()[1:] if line.strip() and not line.startswith("elif"))


def test_schedules_follow_progress(monkeypatch):
    monkeypatch.setattr(train, "WARMUP_RATIO", 0.1)
    monkeypatch.setattr(train, "WARMDOWN_RATIO", 0.5)
    monkeypatch.setattr(train, "FINAL_LR_FRAC", 0.1)
    lr = train.get_lr_multiplier
    assert lr(0.0) == 0.0 and math.isclose(lr(0.05), 0.5)            # linear warmup over the first 10%
    assert lr(0.1) == lr(0.3) == lr(0.499) == 1.0                      # flat until the warmdown starts at 50%
    assert math.isclose(lr(0.75), 0.55) and math.isclose(lr(1.0), 0.1)  # linear down to FINAL_LR_FRAC
    grid = [lr(i / 100) for i in range(10, 101)]
    assert all(a >= b for a, b in zip(grid, grid[1:]))
    assert train.get_weight_decay(0.0) == train.WEIGHT_DECAY and train.get_weight_decay(1.0) == 0.0
    assert math.isclose(train.get_weight_decay(0.25), 0.75 * train.WEIGHT_DECAY)
    warm, (start, end) = train.MUON_MOMENTUM_WARMUP_STEPS, train.MUON_MOMENTUM
    assert train.get_muon_momentum(0) == start and train.get_muon_momentum(10**6) == end
    assert math.isclose(train.get_muon_momentum(warm // 2), start + (end - start) * (warm // 2) / warm)


# ---------------------------------------------------------------------------
# End to end: real prepare.py (synthetic data), real train.py, smoke profile
# ---------------------------------------------------------------------------

def run(args, cache, cwd=REPO, timeout=300, extra_env=None):
    env = dict(os.environ, AUTORESEARCH_PROFILE="smoke", AUTORESEARCH_CACHE_DIR=str(cache), PYTHONUNBUFFERED="1",
               **(extra_env or {}))
    env.pop("AUTORESEARCH_DATASET", None)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def parse_summary(stdout):
    block = stdout.split("\n---\n")[-1]
    return dict(re.findall(r"^(\w+):\s+(\S+)$", block, flags=re.M))


@pytest.fixture(scope="module")
def smoke_run(smoke_cache):  # smoke_cache (conftest.py): synthetic data prepared for the smoke profile
    trained = run(["train.py"], smoke_cache)
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-2000:]
    return trained


def unigram_bits_per_byte(cache):
    """Entropy of the val tokens' unigram distribution, in bits per byte: what a model with no context reaches."""
    script = (
        "import math, torch, prepare\n"
        "tok = prepare.Tokenizer.from_directory()\n"
        "nbytes = prepare.get_token_bytes()\n"
        "rows = prepare.EVAL_TOKENS // prepare.MAX_SEQ_LEN\n"
        "loader = prepare.make_dataloader(tok, rows, prepare.MAX_SEQ_LEN, 'val', device='cpu')\n"
        "y = next(loader)[1].flatten()\n"
        "y = y[nbytes[y] > 0]\n"
        "p = torch.bincount(y, minlength=tok.get_vocab_size()).double() / len(y)\n"
        "bits = -(p[p > 0] * p[p > 0].log2()).sum().item()\n"
        "print(bits * len(y) / nbytes[y].sum().item())\n"
    )
    result = run(["-c", script], cache)
    assert result.returncode == 0, result.stderr[-2000:]
    return float(result.stdout.strip().splitlines()[-1])


def test_smoke_run_prints_the_summary_block_in_order(smoke_run):
    lines = smoke_run.stdout.rstrip("\n").split("\n")
    block = lines[lines.index("---") + 1:]
    assert [line.split(":")[0] for line in block] == SUMMARY_KEYS
    values = [line.split(":", 1)[1] for line in block]
    assert len({len(line) - len(value.lstrip()) for line, value in zip(block, values)}) == 1  # values aligned
    summary = parse_summary(smoke_run.stdout)
    assert summary["profile"] == "smoke" and summary["device"] == "cpu" and summary["attention"] == "sdpa"
    assert summary["mfu_percent"] == "n/a" and summary["seed"] == "42"
    assert int(summary["num_steps"]) > train.TIMED_FROM_STEP
    assert_budget_kept_apart_from_startup_and_eval(summary, budget=train.TIME_BUDGET)


def assert_budget_kept_apart_from_startup_and_eval(summary, budget):
    training, total = float(summary["training_seconds"]), float(summary["total_seconds"])
    startup, evaluation = float(summary["startup_seconds"]), float(summary["eval_seconds"])
    assert budget <= training < budget + 5.0  # the loop stops at the first step past the budget
    assert startup > 0 and evaluation > 0
    # startup and eval are outside the budget, and together the three parts are the whole run (to rounding)
    assert startup + training + evaluation <= total + 0.3
    assert total - (startup + training + evaluation) < 3.0


def test_smoke_run_beats_the_unigram_entropy(smoke_run, smoke_cache):
    val_bpb = float(parse_summary(smoke_run.stdout)["val_bpb"])
    assert 0 < val_bpb < 0.8 * unigram_bits_per_byte(smoke_cache)


def test_diverging_run_fails_fast_with_fail(smoke_cache, tmp_path):
    source = (REPO / "train.py").read_text()
    diverging, count = re.subn(r"^(\s*)EMBEDDING_LR = [^#\n]+", r"\1EMBEDDING_LR = float('nan') ", source, flags=re.M)
    assert count >= 1
    (tmp_path / "train.py").write_text(diverging)
    shutil.copy(REPO / "prepare.py", tmp_path / "prepare.py")
    shutil.copytree(REPO / "autoresearch", tmp_path / "autoresearch")
    result = run([str(tmp_path / "train.py")], smoke_cache, cwd=tmp_path, timeout=120)
    assert result.returncode != 0
    assert any(line.startswith("FAIL") for line in result.stdout.splitlines()), result.stdout[-2000:]
    assert "---" not in result.stdout.splitlines()


def test_adamw_weight_decay_reaches_bf16_embeddings():
    # lr * wd = 1e-3 per step is below half a bf16 ulp: decayed in a separate bf16 step, weights never shrink
    # (the ratio below was exactly 1.0 then); in float32 with one rounding they shrink as in float32
    def final_norm(dtype, wd, lr=0.02, steps=500):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(64, 32).to(dtype))
        optimizer = train.MuonAdamW([dict(kind="adamw", params=[p], lr=lr, betas=(0.8, 0.95), eps=1e-10,
                                          weight_decay=wd)], compiled=False, ortho_dtype=torch.float32)
        for _ in range(steps):
            p.grad = (torch.randn(64, 32) * 0.1).to(dtype)
            optimizer.step()
        assert optimizer.state[p]["exp_avg"].dtype == torch.float32
        return p.detach().float().norm().item()
    shrink_fp32 = final_norm(torch.float32, 0.05) / final_norm(torch.float32, 0.0)
    shrink_bf16 = final_norm(torch.bfloat16, 0.05) / final_norm(torch.bfloat16, 0.0)
    assert shrink_fp32 < 0.7
    assert abs(shrink_bf16 - shrink_fp32) < 0.05, (shrink_bf16, shrink_fp32)


def test_seed_from_the_environment_changes_the_run_and_bench_train_reports_it(smoke_cache, smoke_run):
    env_seed = dict(AUTORESEARCH_SEED="7")
    result = run(["bench/bench_train.py", "--quiet"], smoke_cache, extra_env=env_seed)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "seed 7" in result.stdout and "training tokens/s:" in result.stdout, result.stdout
    bench_bpb = float(re.search(r"val_bpb:\s+(\S+)", result.stdout)[1])
    assert bench_bpb != float(parse_summary(smoke_run.stdout)["val_bpb"])  # seed 42 trained another model
    # then where a step's time goes: every category, shares that add up to the whole step
    split = re.search(r"^step time split \(smoke profile, cpu, .*\n  (.*)$", result.stdout, re.M)
    shares = dict((what, int(pct)) for what, pct in re.findall(r"(\w+) (\d+)%", split[1]))
    assert set(shares) == {"matmuls", "attention", "loss", "optimizer", "other"}, split[1]
    assert 97 <= sum(shares.values()) <= 103 and shares["matmuls"] >= 10, split[1]


def test_a_compiled_run_compiles_before_the_data_outside_the_budget_and_caches_it_whole_chunked_loss_included(
        smoke_cache, tmp_path):
    # the cpu and reference profiles compile; this is their path under the harness at smoke size, with the cpu
    # profile's loss. What a run writes in its compile cache after it opened its training data is removed
    # (carryover.py): a compile then would be cold on every run
    from autoresearch.valwatch import DataWatch
    source = (REPO / "train.py").read_text()
    compiled, count = re.subn(r"^(\s+)COMPILE = False", r"\1COMPILE = True \n\1LOSS_CHUNK_TOKENS = 512",
                              source, flags=re.M)
    assert count == 1
    (tmp_path / "train.py").write_text(compiled)
    shutil.copy(REPO / "prepare.py", tmp_path / "prepare.py")
    shutil.copytree(REPO / "autoresearch", tmp_path / "autoresearch")
    cache = tmp_path / "compile-cache"
    with DataWatch(smoke_cache) as watch:
        result = run([str(tmp_path / "train.py")], smoke_cache, cwd=tmp_path, timeout=600, extra_env={
            "TORCH_LOGS": "torch._functorch._aot_autograd.autograd_cache", "TORCHINDUCTOR_CACHE_DIR": str(cache),
            "AUTORESEARCH_HANDOFF": str(tmp_path / "model.pt2")})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "compiled True" in result.stdout and "LOSS_CHUNK_TOKENS=512" in result.stdout
    assert (tmp_path / "model.pt2").is_file()
    summary = parse_summary(result.stdout)
    assert_budget_kept_apart_from_startup_and_eval(summary, budget=train.TIME_BUDGET)
    assert float(summary["startup_seconds"]) > 2.0  # the compile happened, and the clock did not count it
    written = {p: p.lstat().st_ctime_ns for p in cache.rglob("*")}
    assert len(written) > 20 and watch.train_opened_ns is not None
    late = [str(p.relative_to(cache)) for p, ctime in written.items() if ctime >= watch.train_opened_ns]
    assert late == [], late
    step = {int(n): int(ms) for n, ms in re.findall(r"^step (\d+) .*? \| (\d+) ms", result.stdout, flags=re.M)}
    assert step[0] < 10 * step[1], step  # the first step on real data ran what was compiled before
    # AOTAutograd's cache takes the training graph with the loss's autograd.Function (by default it skips
    # those): the next run of this train.py skips tracing the joint graph (~5 s on cpu)
    cache_log = [line for line in result.stderr.splitlines() if "autograd_cache" in line]
    assert [line for line in cache_log if re.search("AOTAutograd cache (hit|miss)", line)], \
        "\n".join(cache_log)[-3000:]
    assert not [line for line in cache_log if "Bypassing" in line], "\n".join(cache_log)[-3000:]
