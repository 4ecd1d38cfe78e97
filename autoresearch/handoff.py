"""
The hand-over of a trained model from train.py to the harness's evaluator. Under agent_loop.py, the environment
names a file (AUTORESEARCH_HANDOFF); train.py exports its forward pass (tokens [B, T] -> logits [B, T, vocab])
there with torch.export, weights included, and skips its own evaluation: the evaluator computes val_bpb from
that file in a separate process. Standalone (`uv run train.py`), nothing is handed over.
"""

import os
import time

HANDOFF_ENV = "AUTORESEARCH_HANDOFF"  # read by the loop too, which must not pay for importing torch
PR_SET_DUMPABLE = 4


def dumpable(flag):
    """PR_SET_DUMPABLE: while off, other processes of the user (not root) cannot ptrace this one or open its
    /proc/PID/fd and /proc/PID/mem."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, int(flag), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux
        pass


def stand_aside():
    """The evaluator's first act when it starts beside train.py, before any import: out of train.py's reach (not
    dumpable), and niced, so that its imports take only the CPU time train.py leaves idle."""
    dumpable(False)
    if hasattr(os, "nice"):
        os.nice(19)


def handoff_path():
    """Where the harness wants the model, or None when train.py runs on its own."""
    return os.environ.get(HANDOFF_ENV) or None


def export_logits(model, seq_len, vocab_size, device):
    """torch.export program of model(idx) -> logits, for any batch size at this sequence length."""
    import torch

    class Logits(torch.nn.Module):  # the one signature the evaluator calls: tokens -> logits
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, idx):
            return self.model(idx)

    example = torch.randint(0, vocab_size, (2, seq_len), device=device)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with torch.no_grad():
        return torch.export.export(Logits(model).eval(), (example,), dynamic_shapes={"idx": {0: batch}})


def hand_over(model, seq_len, vocab_size, device):
    """Export the model to the harness's file. Returns the seconds it took, or None when there is no harness."""
    path = handoff_path()
    if path is None:
        return None
    import torch
    start = time.time()
    torch.export.save(export_logits(model, seq_len, vocab_size, device), path)
    return time.time() - start
