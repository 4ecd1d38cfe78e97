"""
Pretrain a small GPT for a fixed wall-clock budget and report val_bpb. Single file, single device.
The agent edits this file; prepare.py (data, tokenizer, metric) stays fixed.

    uv run prepare.py --dataset synthetic     # once (or climbmix / --source PATH)
    uv run train.py                           # AUTORESEARCH_PROFILE=reference|cpu|smoke picks the scale

Runs on CUDA (bf16 autocast, torch.compile, Flash Attention 3 when loadable), Apple MPS and CPU.
"""

import os
os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")  # less fragmentation on CUDA

import contextlib
import gc
import math
import sys
import time
from dataclasses import dataclass, replace

import torch
import torch._functorch.config  # AOTAutograd's cache settings (main)
import torch.nn as nn
import torch.nn.functional as F

from prepare import (PROFILE, MAX_SEQ_LEN, TIME_BUDGET, Tokenizer, make_dataloader, evaluate_bpb, check_ready,
                     default_device)  # CUDA > MPS > CPU, decided once, the same for the dataloader
from autoresearch.attention import choose_attention, sdpa_attention  # FA3, flex or SDPA: decided once
from autoresearch.handoff import early_handoff_path, hand_over, handoff_path  # the harness evaluates it
from autoresearch.device import device_name, peak_flops, peak_memory_mb, synchronize
from autoresearch.memory import check_memory, flash_like_attention  # peak memory counted on fake tensors

# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------

@dataclass
class GPTConfig:
    sequence_len: int
    vocab_size: int
    n_layer: int
    n_embd: int
    head_dim: int
    window_pattern: str      # one letter per layer, repeated: S = short window, L = full context
    rope_base: float = 200000.0
    short_window_divisor: int = 8
    softcap: float = 15.0
    loss_chunk_tokens: int = 0  # 0: the whole batch's logits at once; else see ChunkedSoftcapCrossEntropy
    embedding_dtype: torch.dtype = torch.float32  # bf16 on CUDA: half the memory traffic of the lookups

    @property
    def n_head(self):
        return self.n_embd // self.head_dim


def norm(x):
    # RMS norm without learned gains: nothing to tune, nothing to decay. In x's dtype: CUDA autocast (torch >= 2.12)
    # would run it in float32, turning the residual stream and q, k float32 (which Flash Attention 3 refuses) and
    # saving a float32 copy of every normed activation for backward (~20 GiB at the reference size)
    with torch.autocast(x.device.type, enabled=False):
        return F.rms_norm(x, (x.size(-1),))


def has_value_embedding(layer_idx, n_layer):
    # alternating layers, always including the last one
    return layer_idx % 2 == (n_layer - 1) % 2


def rotary_tables(seq_len, head_dim, base):
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles.cos()[:, None, :], angles.sin()[:, None, :]  # [T, 1, head_dim/2], broadcast over heads


def apply_rotary(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)

class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx, attend):
        super().__init__()
        d, h = config.n_embd, config.n_head
        self.n_head, self.head_dim, self.attend = h, config.head_dim, attend
        self.c_q = nn.Linear(d, d, bias=False)
        self.c_k = nn.Linear(d, d, bias=False)
        self.c_v = nn.Linear(d, d, bias=False)
        self.c_proj = nn.Linear(d, d, bias=False)
        # value embeddings enter V through a per-head gate computed from the first channels of the input
        self.ve_gate_channels = min(32, d)
        self.ve_gate = (nn.Linear(self.ve_gate_channels, h, bias=False)
                        if has_value_embedding(layer_idx, config.n_layer) else None)

    def forward(self, x, ve, cos, sin, window):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_head, self.head_dim)
        if ve is not None:
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate_channels]))  # 1.0 at init (zero weights)
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_head, self.head_dim)
        q, k = norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin))  # QK norm keeps logits bounded
        y = self.attend(q, k, v, window)
        return self.c_proj(y.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        h = F.relu(self.c_fc(x))
        return self.c_proj(h * h)  # ReLU^2; not .square(): CUDA autocast runs pow in float32 (+22 GiB saved)


class Block(nn.Module):
    def __init__(self, config, layer_idx, attend):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx, attend)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos, sin, window):
        x = x + self.attn(norm(x), ve, cos, sin, window)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    """attend: one of the attention functions above (choose_attention picks it), called by every layer."""

    def __init__(self, config, attend=sdpa_attention):
        super().__init__()
        self.config = config
        self.windows = self.window_sizes(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd, dtype=config.embedding_dtype)
        self.blocks = nn.ModuleList([Block(config, i, attend) for i in range(config.n_layer)])
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)  # untied from wte
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        self.value_embeds = nn.ModuleDict({
            str(i): nn.Embedding(config.vocab_size, config.n_embd, dtype=config.embedding_dtype)
            for i in range(config.n_layer) if has_value_embedding(i, config.n_layer)
        })
        cos, sin = rotary_tables(config.sequence_len, config.head_dim, config.rope_base)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        # the training loss, chosen once: chunked where the whole batch's logits would not stay in cache
        self.mean_loss = self.chunked_mean_loss if config.loss_chunk_tokens else self.whole_mean_loss

    @staticmethod
    def window_sizes(config):
        T = config.sequence_len
        sizes = {"S": max(1, T // config.short_window_divisor), "L": T}
        windows = [sizes[config.window_pattern[i % len(config.window_pattern)]] for i in range(config.n_layer)]
        windows[-1] = T  # the last layer always sees the whole context
        return windows

    @torch.no_grad()
    def init_weights(self, init_scale=0.68, x0_init=0.05):
        """Initialise in place, on the device the model is on."""
        s = init_scale * (3 / self.config.n_embd) ** 0.5  # uniform(-s, s) has std init_scale/sqrt(d)
        nn.init.normal_(self.wte.weight, mean=0.0, std=1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.blocks:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(linear.weight, -s, s)
            nn.init.zeros_(block.attn.c_proj.weight)  # each block starts as the identity
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.zeros_(block.attn.ve_gate.weight)
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -s, s)
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.fill_(x0_init)

    def matmul_params(self):
        # parameters that cost a multiply-add per token: everything but embedding lookups and scalars
        return [p for name, p in self.named_parameters()
                if not name.startswith(("wte.", "value_embeds.")) and name not in ("resid_lambdas", "x0_lambdas")]

    def flops_per_token(self):
        """Forward + backward FLOPs per token: 6 per matmul weight, plus attention over each layer's window, each
        query counted against the whole window (upstream's convention; causal attention does about half of that in
        L layers, ~6% less in S layers of window T/8): for SSSSL at context 2048 it overstates MFU by ~5%."""
        c = self.config
        attn = sum(12 * c.n_head * c.head_dim * min(w, c.sequence_len) for w in self.windows)
        return 6 * sum(p.numel() for p in self.matmul_params()) + attn

    def forward(self, idx, targets=None, reduction="mean"):
        """Logits [B, T, vocab] without targets; else the mean loss, or per-token losses [B*T] (reduction none)."""
        T = idx.size(1)
        cos, sin = self.cos[:T].to(self.wte.weight.dtype), self.sin[:T].to(self.wte.weight.dtype)
        x = x0 = norm(self.wte(idx))
        for i, block in enumerate(self.blocks):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, self.windows[i])
        x = norm(x)
        if targets is None:
            return self.softcapped_logits(x)
        x, targets = x.flatten(0, 1), targets.flatten()
        return self.mean_loss(x, targets) if reduction == "mean" else self.token_losses(x, targets)

    def token_losses(self, x, targets):
        chunk = self.config.loss_chunk_tokens or x.size(0)
        return torch.cat([F.cross_entropy(self.softcapped_logits(xc), yc, reduction="none")
                          for xc, yc in zip(x.split(chunk), targets.split(chunk))])

    def whole_mean_loss(self, x, targets):
        return self.token_losses(x, targets).mean()

    def chunked_mean_loss(self, x, targets):
        return ChunkedSoftcapCrossEntropy.apply(x, self.lm_head.weight, targets, self.config.softcap,
                                                self.config.loss_chunk_tokens)

    def softcapped_logits(self, x):
        logits = self.lm_head(x).float()
        return self.config.softcap * torch.tanh(logits / self.config.softcap)


class ChunkedSoftcapCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of softcapped lm_head logits, `chunk` tokens at a time, with the gradients computed during
    the forward pass, so that the [tokens, vocab] logits never exist whole. On a CPU they do not fit in its caches
    (128 MB per 4096 tokens at vocab 8192) and the passes over them cost more than the lm_head matmul itself:
    chunked and compiled, the loss takes half the time. x: [N, d], weight: [vocab, d], targets: [N]."""

    @staticmethod
    def forward(ctx, x, weight, targets, softcap, chunk):
        losses, grad_x, grad_weight = [], [], torch.zeros_like(weight)
        for xc, yc in zip(x.split(chunk), targets.split(chunk)):
            t = torch.tanh((xc @ weight.t()).float() / softcap)
            logits = softcap * t
            lse = torch.logsumexp(logits, dim=-1)
            losses.append(lse - logits.gather(1, yc[:, None]).squeeze(1))
            is_target = torch.arange(logits.size(1), device=x.device) == yc[:, None]
            # d loss / d logits = softmax - onehot; the softcap contributes tanh' = 1 - t^2
            grad = ((logits - lse[:, None]).exp() - is_target.float()) * (1 - t * t)
            grad_x.append(grad @ weight)
            grad_weight = grad_weight + grad.t() @ xc
        ctx.save_for_backward(torch.cat(grad_x), grad_weight)
        return torch.cat(losses).mean()

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_weight = ctx.saved_tensors
        scale = grad_loss / grad_x.size(0)
        return grad_x * scale, grad_weight * scale, None, None, None

# ---------------------------------------------------------------------------
# Optimizer: Muon (Polar Express + NorMuon) for block matrices, AdamW for the rest
# ---------------------------------------------------------------------------

# Polar Express (Amsel et al., 2025): per-step (a, b, c) of X <- aX + b(XX^T)X + c(XX^T)^2 X, chosen so that
# 5 steps map every singular value in [1e-3, 1] into [0.86, 1.14] (they include a small safety margin).
POLAR_EXPRESS_COEFFS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def polar_express(G, steps=5, dtype=torch.float32):
    """Approximate the orthogonal polar factor U V^T of each matrix in G [..., m, n]."""
    X = G.to(dtype)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)  # all singular values now below 1
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT  # iterate on the wide orientation: the Gram matrix is the smaller one
    for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    return X.mT if tall else X


def muon_update(grads, params, momentum_buf, second_moment_buf, momentum_t, lr_t, wd_t, beta2_t, ortho_dtype):
    """One Muon step on a stack of same-shape matrices [n, rows, cols], in place on params and buffers."""
    # Nesterov momentum
    momentum = momentum_t.to(grads.dtype)
    momentum_buf.lerp_(grads, 1 - momentum)
    g = grads.lerp_(momentum_buf, momentum)
    g = polar_express(g, dtype=ortho_dtype).to(grads.dtype)
    # NorMuon: normalise each row (or column, along the longer side) by a running RMS, keep the overall norm
    reduce_dim = -1 if g.size(-2) >= g.size(-1) else -2
    v = g.float().square().mean(dim=reduce_dim, keepdim=True)
    second_moment_buf.lerp_(v.to(second_moment_buf.dtype), 1 - beta2_t.to(second_moment_buf.dtype))
    scale = second_moment_buf.float().clamp_min(1e-10).rsqrt()
    norm_before = v.sum(dim=(-2, -1), keepdim=True).sqrt()
    norm_after = (v * scale.square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    g = g * (scale * norm_before / norm_after.clamp_min(1e-10)).to(g.dtype)
    # cautious weight decay: only shrink weights where the update already points towards zero
    lr, wd = lr_t.to(g.dtype), wd_t.to(g.dtype)
    decay = (g * params >= 0).to(g.dtype)
    params.sub_(lr * g + lr * wd * params * decay)


def adamw_update(p, grad, exp_avg, exp_avg_sq, step_t, lr_t, beta1_t, beta2_t, eps_t, wd_t):
    # moments and arithmetic in float32, one rounding into p: in bf16 a decay of lr*wd ~ 1e-3 per step is below
    # half an ulp (2**-9) and would never move a weight
    grad = grad.float()
    exp_avg.lerp_(grad, 1 - beta1_t)
    exp_avg_sq.lerp_(grad.square(), 1 - beta2_t)
    denom = (exp_avg_sq / (1 - beta2_t ** step_t)).sqrt() + eps_t
    p.copy_(p.float() * (1 - lr_t * wd_t) + exp_avg / denom * (-lr_t / (1 - beta1_t ** step_t)))


class MuonAdamW:
    """Param groups have kind "muon" (a list of same-shape 2-D matrices, stepped as one stack) or "adamw".
    A plain class rather than a torch.optim.Optimizer: nothing here needs its machinery, whose import costs seconds.
    compiled: the updates become a few fused kernels (CUDA), their hyperparameters 0-D CPU tensors so that
    changing them every step does not recompile. ortho_dtype: Polar Express's matmuls (bf16 crawls on most CPUs)."""

    def __init__(self, param_groups, compiled, ortho_dtype):
        self.param_groups = param_groups
        self.state = {}  # per parameter (the first of each Muon stack): moment buffers and step counts
        compile_fn = (lambda f: torch.compile(f, dynamic=False, fullgraph=True)) if compiled else (lambda f: f)
        self._muon, self._adamw = compile_fn(muon_update), compile_fn(adamw_update)
        self._ortho_dtype = ortho_dtype
        scalar_device = "cpu" if compiled else param_groups[0]["params"][0].device  # eager: keep them with the data
        self._t = {name: torch.tensor(0.0, device=scalar_device)
                   for name in ("step", "lr", "beta1", "beta2", "eps", "wd", "momentum")}

    def _scalar(self, name, value):
        self._t[name].fill_(value)
        return self._t[name]

    def _step_adamw(self, group):
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state.setdefault(p, {})
            if not state:
                state.update(step=0, exp_avg=torch.zeros_like(p, dtype=torch.float32),
                             exp_avg_sq=torch.zeros_like(p, dtype=torch.float32))
            state["step"] += 1
            s = self._scalar
            self._adamw(p, p.grad, state["exp_avg"], state["exp_avg_sq"], s("step", state["step"]), s("lr", group["lr"]),
                        s("beta1", group["betas"][0]), s("beta2", group["betas"][1]), s("eps", group["eps"]),
                        s("wd", group["weight_decay"]))

    def _step_muon(self, group):
        params = group["params"]
        state = self.state.setdefault(params[0], {})
        rows, cols = params[0].shape
        if not state:
            state["momentum_buf"] = torch.zeros(len(params), rows, cols, dtype=params[0].dtype, device=params[0].device)
            moment_shape = (len(params), rows, 1) if rows >= cols else (len(params), 1, cols)
            state["second_moment_buf"] = torch.zeros(moment_shape, dtype=params[0].dtype, device=params[0].device)
        stacked = torch.stack(params)
        s = self._scalar
        lr = group["lr"] * max(1.0, rows / cols) ** 0.5  # tall matrices get a larger step (spectral-norm scaling)
        self._muon(torch.stack([p.grad for p in params]), stacked, state["momentum_buf"], state["second_moment_buf"],
                   s("momentum", group["momentum"]), s("lr", lr), s("wd", group["weight_decay"]),
                   s("beta2", group["beta2"]), self._ortho_dtype)
        torch._foreach_copy_(params, list(stacked.unbind(0)))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            if group["kind"] == "adamw":
                self._step_adamw(group)
            else:
                self._step_muon(group)

# ---------------------------------------------------------------------------
# Hyperparameters (edit these; values for the reference profile: one H100, context 2048, 5 minutes)
# ---------------------------------------------------------------------------

# Model
DEPTH = 9                  # transformer blocks
ASPECT_RATIO = 57          # d_model = DEPTH * ASPECT_RATIO, rounded up to a multiple of HEAD_DIM
HEAD_DIM = 128             # attention head dimension
WINDOW_PATTERN = "SSSSL"   # per-layer attention window, repeated: S = context/8, L = full; last layer always L
ROPE_BASE = 200000.0       # rotary base
SOFTCAP = 15.0             # logits = SOFTCAP * tanh(logits / SOFTCAP)
INIT_SCALE = 0.68          # block matrices ~ uniform(+-INIT_SCALE * sqrt(3 / d_model))
X0_INIT = 0.05             # initial weight of the first-layer input mixed into every block's input
LOSS_CHUNK_TOKENS = 0      # 0: logits for the whole batch at once; N: loss and its gradient N tokens at a time
COMPILE = True             # torch.compile the model (and the optimizer on CUDA): a slower start, faster steps

# Optimization
TOTAL_BATCH_SIZE = 2**18   # tokens per optimizer step
DEVICE_BATCH_SIZE = 64     # rows per forward/backward; gradient accumulation makes up the rest (memory.py counts
                           # 128 at ~89 GiB, 64 at ~45 GiB eager; 64 compiled peaked at 31.7 GB on an H200)
EMBEDDING_LR = 0.9         # AdamW, token and value embeddings (scaled by 1/sqrt(d_model/768))
UNEMBEDDING_LR = 0.005     # AdamW, lm_head (scaled by 1/sqrt(d_model/768))
MATRIX_LR = 0.04           # Muon, block matrices
SCALAR_LR = 0.5            # AdamW, per-layer x0 scalars (residual scalars use 1% of it)
WEIGHT_DECAY = 0.2         # Muon cautious weight decay, decays linearly to zero over the run
LM_HEAD_WD = 0.01          # AdamW weight decay on lm_head
EMBEDDING_WD = 0.001       # AdamW weight decay on token embeddings
VALUE_EMBEDDING_WD = 0.003 # AdamW weight decay on value embeddings
ADAM_BETAS = (0.8, 0.95)   # AdamW betas
MUON_MOMENTUM = (0.85, 0.95)      # Muon momentum warms up from the first to the second value ...
MUON_MOMENTUM_WARMUP_STEPS = 200  # ... over this many optimizer steps
WARMUP_RATIO = 0.0         # fraction of the time budget spent warming the learning rates up
WARMDOWN_RATIO = 0.75      # fraction of the time budget spent decaying them (linearly) ...
FINAL_LR_FRAC = 0.05       # ... down to this fraction

if PROFILE == "cpu":
    # 2 CPU cores, context 256, vocab 4096, 300 s. 2 cores do ~115 GFLOP/s in fp32 matmuls: ~3M tokens in 300 s.
    # At equal FLOPs on gutenberg (vocab 8192), width 128 beat 192 (val loss 5.34 vs 5.79 nats) and batch 2**12
    # beat 2**13 (5.18 vs 5.34): small and many steps. Full windows: at context 256 short ones save almost nothing
    # on a CPU. Full 300 s runs at vocab 8192 (val_bpb 1.817-1.821 with these values) found worse: MATRIX_LR 0.06,
    # depth 6, UNEMBEDDING_LR 0.01, batch 2**11, WARMDOWN_RATIO 0.5 (1.827-1.842).
    DEPTH = 4
    ASPECT_RATIO = 32
    HEAD_DIM = 64
    WINDOW_PATTERN = "L"
    LOSS_CHUNK_TOKENS = 512    # logits stay in cache: the loss costs half (chunks of 256: +20%, of 1024: 2x)
    TOTAL_BATCH_SIZE = 2**12
    DEVICE_BATCH_SIZE = 16
    MUON_MOMENTUM_WARMUP_STEPS = 100
    # compiling takes ~40 s on 2 cores (~6 s from the on-disk caches) and makes steps 2.3x faster
elif PROFILE == "smoke":
    # seconds-long sanity run: tiny model, tiny batch, many steps
    DEPTH = 2
    ASPECT_RATIO = 64
    HEAD_DIM = 64
    WINDOW_PATTERN = "L"
    TOTAL_BATCH_SIZE = 2**11
    DEVICE_BATCH_SIZE = 16
    MUON_MOMENTUM_WARMUP_STEPS = 20
    WARMDOWN_RATIO = 0.5
    COMPILE = False            # a compile costs more than a 10 s run could win back

# ---------------------------------------------------------------------------
# Setup: model, optimizer
# ---------------------------------------------------------------------------

TIMED_FROM_STEP = 2  # steps 0-1 warm up (allocator, caches); the budget clock starts after them (startup)


def hyperparameters():
    """The values in effect (after the profile's overrides): every upper-case scalar setting of this file."""
    return {name: value for name, value in globals().items()
            if name.isupper() and isinstance(value, (bool, int, float, str, tuple))
            and name not in ("PROFILE", "MAX_SEQ_LEN", "TIME_BUDGET", "TIMED_FROM_STEP")}

def model_config(vocab_size, on_cuda):
    d_model = math.ceil(DEPTH * ASPECT_RATIO / HEAD_DIM) * HEAD_DIM
    return GPTConfig(sequence_len=MAX_SEQ_LEN, vocab_size=vocab_size, n_layer=DEPTH, n_embd=d_model,
                     head_dim=HEAD_DIM, window_pattern=WINDOW_PATTERN, rope_base=ROPE_BASE, softcap=SOFTCAP,
                     loss_chunk_tokens=LOSS_CHUNK_TOKENS,
                     # bf16 embeddings halve their memory traffic on GPUs; CPUs without bf16 units crawl
                     embedding_dtype=torch.bfloat16 if on_cuda else torch.float32)


def build_model(vocab_size, device):
    """(model with initialised weights on `device`, attention name)."""
    config = model_config(vocab_size, device.type == "cuda")
    attention, attend = choose_attention(device, GPT.window_sizes(config), MAX_SEQ_LEN)
    with device:  # parameters are created where they live
        model = GPT(config, attend)
    model.init_weights(INIT_SCALE, X0_INIT)
    return model, attention


def sdpa_twin(model):
    """The same weights behind SDPA, embeddings in float32: a kernel outside PyTorch's own operators (FA3)
    cannot be handed over, and bf16 embeddings (CUDA) meet float32 matrices outside autocast, where the
    evaluator runs its causality check."""
    device = next(model.parameters()).device
    # the twin's initial weights are overwritten: drawing them must not move the run's random numbers
    with device, torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        twin = GPT(replace(model.config, embedding_dtype=torch.float32), sdpa_attention)
    twin.load_state_dict(model.state_dict())
    return twin.eval()


def compile_before_data(model, train_model, optimizer, device, autocast, optimizer_too):
    """Compiles the training step on a batch of zeros, then undoes that step. Under the harness, what a run
    writes after it opens its training data is removed (it could carry weights to the next run), so torch's
    compile cache is written here, before: a compile during the first real step would be cold on every run."""
    saved = [p.detach().to("cpu", copy=True) for p in model.parameters()]
    x, y = torch.zeros(2, DEVICE_BATCH_SIZE, MAX_SEQ_LEN, dtype=torch.long, device=device)  # as the loader's
    with autocast:
        loss = train_model(x, y)
    loss.backward()
    if optimizer_too:
        optimizer.step()
    model.zero_grad(set_to_none=True)
    optimizer.state.clear()
    with torch.no_grad():
        for p, value in zip(model.parameters(), saved):
            p.copy_(value)


def make_optimizer(model, compiled, ortho_dtype):
    d_model = model.config.n_embd
    lr_scale = (d_model / 768) ** -0.5  # AdamW LRs were tuned at d_model 768
    matrices = [p for p in model.blocks.parameters()]

    def adamw(params, lr, wd, betas=ADAM_BETAS):
        return dict(kind="adamw", params=params, lr=lr, betas=betas, eps=1e-10, weight_decay=wd)
    groups = [
        adamw([model.lm_head.weight], UNEMBEDDING_LR * lr_scale, LM_HEAD_WD),
        adamw([model.wte.weight], EMBEDDING_LR * lr_scale, EMBEDDING_WD),
        adamw(list(model.value_embeds.parameters()), EMBEDDING_LR * lr_scale, VALUE_EMBEDDING_WD),
        adamw([model.resid_lambdas], SCALAR_LR * 0.01, 0.0),
        adamw([model.x0_lambdas], SCALAR_LR, 0.0, betas=(0.96, 0.95)),  # slower first moment: x0 weights drift
    ]
    for shape in sorted({p.shape for p in matrices}):
        groups.append(dict(kind="muon", params=[p for p in matrices if p.shape == shape], lr=MATRIX_LR,
                           momentum=MUON_MOMENTUM[0], beta2=0.95, weight_decay=WEIGHT_DECAY))
    for group in groups:
        group["initial_lr"] = group["lr"]
    return MuonAdamW(groups, compiled, ortho_dtype)


# ---------------------------------------------------------------------------
# Schedules, all driven by progress = training seconds / TIME_BUDGET (or by step for momentum)
# ---------------------------------------------------------------------------

def get_lr_multiplier(progress):
    if progress < WARMUP_RATIO:
        return progress / WARMUP_RATIO
    if progress < 1.0 - WARMDOWN_RATIO:
        return 1.0
    cooldown = (1.0 - progress) / WARMDOWN_RATIO  # 1 -> 0 across the warmdown
    return cooldown + (1.0 - cooldown) * FINAL_LR_FRAC


def get_muon_momentum(step):
    frac = min(step / MUON_MOMENTUM_WARMUP_STEPS, 1.0)
    return (1 - frac) * MUON_MOMENTUM[0] + frac * MUON_MOMENTUM[1]


def get_weight_decay(progress):
    return WEIGHT_DECAY * (1.0 - progress)


def apply_schedules(optimizer, progress, step):
    """Sets every group's learning rate (and Muon's momentum and weight decay) for this step; returns the lr
    multiplier."""
    lr_mult = get_lr_multiplier(progress)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lr_mult
        if group["kind"] == "muon":
            group["momentum"] = get_muon_momentum(step)
            group["weight_decay"] = get_weight_decay(progress)
    return lr_mult

# ---------------------------------------------------------------------------
# Training run: setup, training loop, evaluation, summary
# ---------------------------------------------------------------------------

def main():
    t_start = time.time()
    problems = check_ready()
    if problems:
        print("Not ready to train:\n" + "\n".join(f"  - {p}" for p in problems))
        sys.exit(1)
    seed = int(os.environ.get("AUTORESEARCH_SEED", "42"))
    torch.manual_seed(seed)
    torch.set_float32_matmul_precision("high")  # TF32 on CUDA
    # the chunked loss is a custom autograd.Function, which AOTAutograd's cache skips by default: its forward and
    # backward are traced into the cache key, so a warm start can skip tracing the joint graph (~5 s on cpu)
    torch._functorch.config.autograd_cache_allow_custom_autograd_functions = True
    device = default_device()
    on_cuda = device.type == "cuda"  # the one device flag: bf16 autocast, bf16 embeddings, compiled optimizer
    if device.type == "cpu":
        torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    autocast_dtype = torch.bfloat16 if on_cuda else None
    autocast = torch.amp.autocast("cuda", dtype=autocast_dtype) if on_cuda else contextlib.nullcontext()

    tokenizer = Tokenizer.from_directory()
    model, attention = build_model(tokenizer.get_vocab_size(), device)
    config = model.config
    num_params = sum(p.numel() for p in model.parameters())
    flops_per_token = model.flops_per_token()
    peak = peak_flops(device)
    tokens_per_micro_step = DEVICE_BATCH_SIZE * MAX_SEQ_LEN
    if TOTAL_BATCH_SIZE % tokens_per_micro_step:
        sys.exit(f"TOTAL_BATCH_SIZE ({TOTAL_BATCH_SIZE}) must be a multiple of DEVICE_BATCH_SIZE * MAX_SEQ_LEN "
                 f"({DEVICE_BATCH_SIZE} * {MAX_SEQ_LEN}): edit the hyperparameters in train.py")
    grad_accum_steps = TOTAL_BATCH_SIZE // tokens_per_micro_step
    compiled = COMPILE and device.type != "mps"  # inductor's MPS backend is not ready for this model
    problem = check_memory(lambda: GPT(config, flash_like_attention), DEVICE_BATCH_SIZE, MAX_SEQ_LEN,
                           config.vocab_size, device, torch.bfloat16 if on_cuda else None, compiled)
    if problem:  # before compiling: a step that cannot fit would die in the middle of the compile
        sys.exit(f"FAIL: {problem}")
    optimizer = make_optimizer(model, compiled=compiled and on_cuda,
                               ortho_dtype=torch.bfloat16 if on_cuda else torch.float32)
    early = early_handoff_path(device)
    if early:  # the harness's evaluator compiles this untrained copy's graph while train.py compiles (cpu profile)
        hand_over(sdpa_twin(model), MAX_SEQ_LEN, config.vocab_size, device, path=early)
    train_model = torch.compile(model, dynamic=False) if compiled else model
    if compiled:
        compile_before_data(model, train_model, optimizer, device, autocast, optimizer_too=on_cuda)
    train_loader = make_dataloader(tokenizer, DEVICE_BATCH_SIZE, MAX_SEQ_LEN, "train", device=device)
    x, y, epoch = next(train_loader)

    print(f"profile {PROFILE} | device {device.type} ({device_name(device)}) | attention {attention} | "
          f"compiled {compiled} | seed {seed}")
    print("hyperparameters: " + " ".join(f"{name}={value}" for name, value in hyperparameters().items()))
    print(f"model: depth {config.n_layer}, d_model {config.n_embd}, {config.n_head} heads of {config.head_dim}, "
          f"windows {model.windows}, vocab {config.vocab_size}, {num_params / 1e6:.2f}M params, "
          f"{flops_per_token / 1e6:.1f} MFLOP/token")
    print(f"batch: {TOTAL_BATCH_SIZE} tokens/step = {grad_accum_steps} x {DEVICE_BATCH_SIZE} x {MAX_SEQ_LEN} | "
          f"time budget {TIME_BUDGET}s (clock starts at step {TIMED_FROM_STEP})")
    if peak is None:
        print(f"mfu: n/a (no peak FLOPs known for {device_name(device)})")

    # -- training loop ------------------------------------------------------
    live = sys.stdout.isatty()  # \r-updated line on a terminal, a plain line every ~10% of the budget in logs
    next_log_progress = 0.0
    t_timed_start = None
    training_time = 0.0
    smooth_loss = 0.0
    step = 0
    while True:
        t0 = time.time()
        for _ in range(grad_accum_steps):
            with autocast:
                loss = train_model(x, y)
            train_loss = loss.detach()
            (loss / grad_accum_steps).backward()
            x, y, epoch = next(train_loader)
        progress = min(training_time / TIME_BUDGET, 1.0)
        lr_mult = apply_schedules(optimizer, progress, step)
        optimizer.step()
        model.zero_grad(set_to_none=True)

        loss_value = train_loss.item()  # one host sync per step
        if not math.isfinite(loss_value) or loss_value > 100:
            print(f"\nFAIL: training loss is {loss_value} at step {step}: the run diverged "
                  f"(lower the learning rates in train.py, or check the data with `uv run prepare.py`)")
            gc.unfreeze()  # frozen objects are never freed at exit, and triton's bindings then report them as leaks
            sys.exit(1)
        synchronize(device)
        dt = time.time() - t0
        if step >= TIMED_FROM_STEP:
            training_time += dt
        elif step == TIMED_FROM_STEP - 1:
            t_timed_start = time.time()
        if step == 0:  # everything allocated so far lives for the whole run: keep the collector off it
            gc.collect()
            gc.freeze()
            gc.disable()  # Python's cyclic GC otherwise stalls steps for hundreds of milliseconds

        smooth_loss = 0.9 * smooth_loss + 0.1 * loss_value
        tokens_per_s = TOTAL_BATCH_SIZE / dt
        mfu = f"{100 * flops_per_token * tokens_per_s / peak:.1f}%" if peak else "n/a"
        line = (f"step {step:05d} ({100 * progress:.1f}%) | loss {smooth_loss / (1 - 0.9 ** (step + 1)):.4f} | "
                f"lrm {lr_mult:.2f} | {dt * 1000:.0f} ms | {tokens_per_s:,.0f} tok/s | mfu {mfu} | epoch {epoch} | "
                f"remaining {max(0.0, TIME_BUDGET - training_time):.0f}s")
        if live:
            print(f"\r{line}   ", end="", flush=True)
        elif progress >= next_log_progress or step < TIMED_FROM_STEP:
            print(line, flush=True)
            next_log_progress = progress + 0.1
        step += 1
        if step > TIMED_FROM_STEP and training_time >= TIME_BUDGET:
            break
    if live:
        print()
    gc.unfreeze()
    gc.enable()

    # -- evaluation: the harness's evaluator when it asked for the model (AUTORESEARCH_HANDOFF), else here ----
    t_eval = time.time()
    model.eval()
    val_bpb = None
    if handoff_path():  # the graph carries the training's autocast, and is scored as it is
        hand_over(sdpa_twin(model), MAX_SEQ_LEN, config.vocab_size, device, autocast=autocast_dtype)
    else:
        with torch.no_grad(), autocast:
            val_bpb = evaluate_bpb(train_model, tokenizer, DEVICE_BATCH_SIZE)
    synchronize(device)
    t_end = time.time()

    # -- summary --------------------------------------------------------------
    timed_steps = step - TIMED_FROM_STEP
    mfu_percent = (f"{100 * flops_per_token * TOTAL_BATCH_SIZE * timed_steps / training_time / peak:.2f}"
                   if peak else "n/a")
    summary = dict(
        val_bpb=f"{val_bpb:.6f}" if val_bpb is not None else "harness", training_seconds=f"{training_time:.1f}",
        total_seconds=f"{t_end - t_start:.1f}", peak_vram_mb=f"{peak_memory_mb(device):.1f}", mfu_percent=mfu_percent,
        total_tokens_M=f"{step * TOTAL_BATCH_SIZE / 1e6:.3f}", num_steps=step, num_params_M=f"{num_params / 1e6:.1f}",
        depth=DEPTH, profile=PROFILE, device=device.type, attention=attention, seed=seed,
        startup_seconds=f"{t_timed_start - t_start:.1f}", eval_seconds=f"{t_end - t_eval:.1f}")
    print("---")
    for key, value in summary.items():
        print(f"{key + ':':<18}{value}")


if __name__ == "__main__":
    main()
    # everything is printed and handed over: skip the interpreter's teardown of torch (~1.2 s on 2 cores)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
