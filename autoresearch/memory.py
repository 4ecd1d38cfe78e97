"""
Peak memory of a training step, counted before anything is allocated. The model is built from fake tensors
(torch's FakeTensorMode: shapes, dtypes and devices, no storage) on the target device, one forward pass under the
run's autocast records every tensor autograd saves for backward, and the rest is counted from the parameters:

    peak = weights + gradients + optimizer state + saved activations + the largest transient of backward

train.py checks it before compiling; the fake-CUDA tests check the reference defaults with it on a CPU. Measured
against the peak RSS of real CPU steps (tests/test_memory.py) it comes within 8-14% below; it counts eager
execution (a compiled step saves less) and misses the temporaries of the chunked loss (cpu profile: 0.26 GiB
counted, 0.66 GiB measured), which only matter where memory is plentiful.
"""

import contextlib
import functools
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

GiB = 2**30


class FlashLikeAttention(torch.autograd.Function):
    """Stands in for a flash kernel (FA3, SDPA's flash, flex): the output, plus exactly what those kernels save
    for backward: q, k, v, the output and a float32 log-sum-exp per query. q, k, v: [B, T, H, D]."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = torch.empty(q.size(0), q.size(2), q.size(1), dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


def flash_like_attention(q, k, v, window):
    return FlashLikeAttention.apply(q, k, v)


@dataclass
class MemoryEstimate:
    weights: int
    gradients: int
    optimizer: int
    saved: int           # activations autograd keeps from the forward pass for the backward pass
    transient: int       # the largest saved tensor, twice: its gradient and one temporary at the same time
    saved_by_dtype: dict

    @property
    def peak(self):
        return self.weights + self.gradients + self.optimizer + self.saved + self.transient

    def describe(self):
        parts = ", ".join(f"{name} {getattr(self, name) / GiB:.1f}" for name in
                          ("weights", "gradients", "optimizer", "saved", "transient"))
        return f"{self.peak / GiB:.1f} GiB ({parts})"


@contextlib.contextmanager
def autocast_rules(device_type, dtype):
    """The autocast rules of `device_type` (e.g. CUDA's) without its availability check, so they also apply to
    fake tensors on a machine without that device. dtype None: autocast off."""
    before = torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    torch.set_autocast_enabled(device_type, dtype is not None)
    if dtype is not None:
        torch.set_autocast_dtype(device_type, dtype)
    try:
        yield
    finally:
        torch.clear_autocast_cache()
        torch.set_autocast_enabled(device_type, before[0])
        torch.set_autocast_dtype(device_type, before[1])


def saved_tensor_bytes(forward):
    """(result of forward(), {dtype: bytes} of the distinct storages autograd saves while it runs)."""
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[id(storage)] = (storage, t.dtype)  # the storage object stays alive, so its id stays unique
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = forward()
    by_dtype = {}
    for storage, dtype in storages.values():
        by_dtype[dtype] = by_dtype.get(dtype, 0) + storage.nbytes()
    return result, by_dtype, max((s.nbytes() for s, _ in storages.values()), default=0)


def adamw_state_bytes(model, muon_params):
    """Muon keeps one momentum buffer like the parameter (plus a small second moment); AdamW two float32 moments."""
    total = 0
    for p in model.parameters():
        if id(p) in muon_params:
            total += p.numel() * p.element_size() + p.numel() // min(p.shape) * 4
        else:
            total += 2 * p.numel() * 4
    return total


def estimate_training_memory(build_model, batch_size, seq_len, vocab_size, device, autocast_dtype=None):
    """MemoryEstimate of one forward + backward + optimizer step. build_model() makes the model (its attention
    replaced by flash_like_attention where the real kernel cannot run on fake tensors); it is called inside a
    FakeTensorMode on `device`, so a model of any size costs nothing. Muon takes the 2-D block matrices."""
    device = torch.device(device)
    with FakeTensorMode(allow_non_fake_inputs=True):
        with device:
            model = build_model()
        idx = torch.randint(0, vocab_size, (batch_size, seq_len), device=device)
        with autocast_rules(device.type, autocast_dtype):
            _, by_dtype, largest = saved_tensor_bytes(lambda: model(idx, idx))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    muon = {id(p) for p in model.blocks.parameters() if p.ndim == 2} if hasattr(model, "blocks") else set()
    return MemoryEstimate(weights=weights, gradients=weights, optimizer=adamw_state_bytes(model, muon),
                          saved=sum(by_dtype.values()), transient=2 * largest, saved_by_dtype=by_dtype)


def memory_problem(estimate_for, device_batch_size, available, usable=0.95):
    """None when estimate_for(device_batch_size) fits in `usable` of `available` bytes; else one line that says
    what it needs and the largest power-of-two divisor of the batch that fits (gradient accumulation then keeps
    the total batch), or that none does."""
    limit = usable * available
    needed = estimate_for(device_batch_size).peak
    if needed <= limit:
        return None
    smaller = [device_batch_size >> i for i in range(1, device_batch_size.bit_length())]
    fits = next((b for b in smaller if device_batch_size % b == 0 and estimate_for(b).peak <= limit), None)
    fix = (f"set DEVICE_BATCH_SIZE = {fits} (gradient accumulation keeps TOTAL_BATCH_SIZE)" if fits else
           "make the model smaller (DEPTH, ASPECT_RATIO)")
    return (f"DEVICE_BATCH_SIZE = {device_batch_size} needs ~{needed / GiB:.1f} GiB but the device has "
            f"{available / GiB:.1f} GiB: {fix} in train.py")


def check_memory(build_model, device_batch_size, seq_len, vocab_size, device, autocast_dtype, compiled):
    """Print what a training step needs on `device` (counted on fake tensors: nothing is allocated) and return
    memory_problem's line when it will not fit, else None. The count is of an eager step: a compiled one saves
    less, so a compiled run is refused only when the count exceeds the device's memory by a quarter (the
    reference model at 128 rows counts 1.12x an H100, and may fit). Devices of unknown memory (MPS) pass."""
    from autoresearch.device import device_memory_bytes
    available = device_memory_bytes(device)
    if not available:
        return None
    @functools.cache  # the line printed and the check share one count (~0.3 s each at the reference size)
    def estimate(batch):
        return estimate_training_memory(build_model, batch, seq_len, vocab_size, device, autocast_dtype)
    print(f"memory: a step needs ~{estimate(device_batch_size).describe()} of {available / GiB:.1f} GiB"
          f"{' (counted eager; compiled needs less)' if compiled else ''}")
    return memory_problem(estimate, device_batch_size, available, usable=1.25 if compiled else 0.95)

