"""The reference profile at full size on fake CUDA tensors, on a machine without a GPU.

FakeTensorMode makes tensors with device="cuda", shapes and dtypes but no storage, so nothing is computed or
allocated; with CUDA's autocast rules switched on they get the dtypes a real H100 run would give them. What this
cannot run: the backward pass (autograd's stream bookkeeping needs a real CUDA context, pytorch#92627) and
compiled kernels. What autograd saves for backward is recorded, which is what the backward pass costs in memory.
"""

import sys
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


from conftest import import_train  # noqa: E402

train = import_train("reference")  # the reference hyperparameters: nothing below overrides them

from autoresearch import attention  # noqa: E402
from autoresearch.memory import GiB, autocast_rules, estimate_training_memory, flash_like_attention  # noqa: E402

VOCAB = 8192                 # the reference profile's vocabulary (prepare.py)
H100_BYTES = 85_520_809_984  # torch.cuda.get_device_properties(0).total_memory of an H100 80GB HBM3
B, T = train.DEVICE_BATCH_SIZE, train.MAX_SEQ_LEN


class FlashAttention3StandIn:
    """Enforces the input contract of FA3's flash_attn_func and saves for backward what it saves."""

    def __init__(self, windows):
        self.windows, self.calls = windows, []

    def flash_attn_func(self, q, k, v, causal, window_size):
        for name, t in zip("qkv", (q, k, v)):
            assert t.dtype in (torch.float16, torch.bfloat16, torch.float8_e4m3fn), f"{name} is {t.dtype}"
            assert t.stride(-1) == 1, f"{name}'s last dimension is not contiguous"
            assert t.device.type == "cuda"
        assert q.dtype == k.dtype == v.dtype, (q.dtype, k.dtype, v.dtype)
        assert q.shape == k.shape == v.shape and q.dim() == 4, "layout must be [B, T, H, D]"
        assert q.shape[1] == T and q.shape[3] == train.HEAD_DIM, f"not [B, T, H, D]: {tuple(q.shape)}"
        assert causal is True
        left, right = window_size
        assert right == 0 and left + 1 == self.windows[len(self.calls)], (window_size, len(self.calls))
        self.calls.append(q.dtype)
        return flash_like_attention(q, k, v, left + 1), None  # (out, lse) like some FA3 builds


def recording(attend, seen):
    def wrapped(q, k, v, window):
        seen.append((q.dtype, k.dtype, v.dtype, window))
        return attend(q, k, v, window)
    return wrapped


def fake_reference_model(attend):
    config = train.model_config(VOCAB, on_cuda=True)
    with torch.device("cuda"):
        model = train.GPT(config, attend)
    model.init_weights(train.INIT_SCALE, train.X0_INIT)
    return model


@pytest.fixture
def fake_cuda():
    with FakeTensorMode(allow_non_fake_inputs=True), autocast_rules("cuda", torch.bfloat16):
        yield


def batch(rows=B):
    return (torch.randint(0, VOCAB, (rows, T), device="cuda"), torch.randint(0, VOCAB, (rows, T), device="cuda"))


def test_fake_cuda_flash_attention_3_receives_bf16_bthd_and_the_layer_windows(fake_cuda):
    windows = train.GPT.window_sizes(train.model_config(VOCAB, on_cuda=True))
    fa3 = FlashAttention3StandIn(windows)
    model = fake_reference_model(attention.fa3_attention_for(fa3))
    x, y = batch()
    loss = model(x, y)
    assert fa3.calls == [torch.bfloat16] * train.DEPTH
    assert loss.dtype == torch.float32 and loss.shape == ()


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_fake_cuda_sdpa_and_flex_attention_receive_bf16(fake_cuda, backend):
    config = train.model_config(VOCAB, on_cuda=True)
    windows = train.GPT.window_sizes(config)
    attend = (attention.sdpa_attention if backend == "sdpa"
              else attention.flex_attention_for(windows, T, torch.device("cuda")))
    seen = []
    model = fake_reference_model(recording(attend, seen))
    x, y = batch(rows=2)  # no flash kernel on fake tensors: SDPA's math path and eager flex build [T, T] scores
    with torch.set_grad_enabled(backend == "sdpa"):  # flex under autograd compiles, which needs a real GPU
        loss = model(x, y)
    assert seen == [(torch.bfloat16,) * 3 + (w,) for w in windows]
    assert loss.dtype == torch.float32


def test_fake_cuda_residual_stream_and_block_outputs_stay_bf16(fake_cuda):
    model = fake_reference_model(flash_like_attention)
    dtypes = []
    for block in model.blocks:
        block.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    model(*batch())
    assert dtypes == [torch.bfloat16] * train.DEPTH


def test_fake_cuda_optimizer_step_keeps_parameter_dtypes_with_float32_adamw_moments(fake_cuda):
    model = fake_reference_model(flash_like_attention)
    optimizer = train.make_optimizer(model, compiled=False, ortho_dtype=torch.bfloat16)  # CUDA's dtypes, eagerly
    before = {name: p.dtype for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    assert {name: p.dtype for name, p in model.named_parameters()} == before
    assert model.wte.weight.dtype == torch.bfloat16 and model.blocks[0].mlp.c_fc.weight.dtype == torch.float32
    for group in optimizer.param_groups:
        if group["kind"] == "adamw":
            for p in group["params"]:
                state = optimizer.state[p]
                assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32


def test_fake_cuda_evaluation_gives_float32_per_token_losses(fake_cuda):
    model = fake_reference_model(flash_like_attention)
    model.eval()
    x, y = batch()
    with torch.no_grad():
        losses = model(x, y, reduction="none")
    assert losses.shape == (B * T,) and losses.dtype == torch.float32


def test_fake_cuda_reference_defaults_fit_an_80gb_h100_with_margin():
    estimate = estimate_training_memory(lambda: fake_reference_model(flash_like_attention), B, T, VOCAB, "cuda",
                                        torch.bfloat16)
    assert estimate.peak < 0.75 * H100_BYTES, estimate.describe()
    # the count sees the full size: saved activations dominate, and they are bf16 but for the float32 logits
    assert estimate.saved > 0.6 * estimate.peak
    assert estimate.saved_by_dtype[torch.bfloat16] > 2.5 * estimate.saved_by_dtype[torch.float32]
    # twice the batch would not fit: the same count is what train.py refuses to start with
    doubled = estimate_training_memory(lambda: fake_reference_model(flash_like_attention), 2 * B, T, VOCAB,
                                       "cuda", torch.bfloat16)
    assert doubled.peak > H100_BYTES > estimate.peak, (doubled.describe(), estimate.describe())
