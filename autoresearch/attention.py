"""
Causal attention kernels behind one call, and the one place that picks among them for a run:

    attend(q, k, v, window) -> y        q, k, v, y: [B, T, H, D]; each query sees the last `window` tokens
                                         (itself included)

Flash Attention 3 on Hopper GPUs when the kernels hub provides it, flex attention on other CUDA GPUs when some
layer has a short window (it skips the masked blocks), SDPA otherwise (CPU and MPS with a dense window mask).
"""

import torch
import torch.nn.functional as F

from autoresearch.fa3 import load_flash_attention_3



def sliding_window_mask(seq_len, window, device):
    # True where query i may attend key j: causal and at most `window` tokens back, itself included
    i = torch.arange(seq_len, device=device)
    distance = i[:, None] - i[None, :]
    return (distance >= 0) & (distance < window)


def sdpa_attention(q, k, v, window):
    T = q.size(1)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if window >= T:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:  # a dense mask: fine at short contexts, where windows save little anyway
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=sliding_window_mask(T, window, q.device))
    return y.transpose(1, 2)


def flex_attention_for(windows, seq_len, device):
    """Flex attention with one block mask per distinct window: blocks outside a window are skipped."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # slow import: only if used

    def in_window(window):
        return lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & (q_idx - kv_idx < window)
    masks = {w: create_block_mask(in_window(w), B=None, H=None, Q_LEN=seq_len, KV_LEN=seq_len, device=device)
             for w in set(windows)}

    def flex(q, k, v, window):
        y = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=masks[window])
        return y.transpose(1, 2)
    return flex


def fa3_attention_for(fa3):
    """Flash Attention 3 (Hopper): takes [B, T, H, D] bf16 as is; window_size counts keys before the query."""
    def flash(q, k, v, window):
        y = fa3.flash_attn_func(q, k, v, causal=True, window_size=(window - 1, 0))
        return y[0] if isinstance(y, tuple) else y  # some builds also return the log-sum-exp
    return flash


def choose_attention(device, windows, seq_len):
    """The one place that picks the attention kernel: ("fa3" | "flex" | "sdpa", its attend function)."""
    if device.type == "cuda" and torch.cuda.get_device_capability() == (9, 0):  # Hopper
        fa3 = load_flash_attention_3()
        if fa3 is not None:
            return "fa3", fa3_attention_for(fa3)
    if device.type != "cuda" or min(windows) == seq_len:
        return "sdpa", sdpa_attention  # plain causal: SDPA's flash kernel; CPU/MPS: a dense window mask if needed
    return "flex", flex_attention_for(windows, seq_len, device)
