"""
The hand-over of a trained model from train.py to the harness's evaluator. Under agent_loop.py, the environment
names a file (AUTORESEARCH_HANDOFF); train.py exports its forward pass (tokens [B, T] -> logits [B, T, vocab])
there with torch.export, weights included, and skips its own evaluation: the evaluator computes val_bpb from
that file in a separate process. Standalone (`uv run train.py`), nothing is handed over.

Where the evaluator compiles its scorer on the CPU (the cpu profile) and the run is confined, the harness also
names an early file (AUTORESEARCH_HANDOFF_EARLY): train.py exports the untrained model there before it compiles
its own step, and the evaluator compiles that graph meanwhile, on the core train.py's compile leaves idle. Its
compile cache then holds the kernels the trained model's graph needs, and the evaluation after training starts
warm (~15 s less, cold).
"""

import os
import time

HANDOFF_ENV = "AUTORESEARCH_HANDOFF"  # read by the loop too, which must not pay for importing torch
EARLY_ENV = "AUTORESEARCH_HANDOFF_EARLY"
COMPILE_FROM_TOKENS = 2**19  # a compile (~15 s on 2 cores) pays back on evaluations this long, not on smoke's
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


def export_logits(model, seq_len, vocab_size, device, autocast=None):
    """torch.export program of model(idx) -> logits, for any batch size at this sequence length; with autocast (a
    dtype), run under that autocast inside the graph (an autocast around the export would not be recorded)."""
    import torch

    class Logits(torch.nn.Module):  # the one signature the evaluator calls: tokens -> logits
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, idx):
            if autocast is None:
                return self.model(idx)
            with torch.autocast(device.type, dtype=autocast):
                return self.model(idx)

    example = torch.zeros(2, seq_len, dtype=torch.long, device=device)  # no draw: the run's RNG is left alone
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with torch.no_grad():
        return torch.export.export(Logits(model).eval(), (example,), dynamic_shapes={"idx": {0: batch}})


def hand_over(model, seq_len, vocab_size, device, path=None, autocast=None):
    """Export the model to the harness's file (or `path`), with autocast (a dtype: train.py's, bf16 on CUDA) in
    the graph: the evaluator adds none, and scores the computation the graph holds. Returns the seconds it took,
    or None when there is no harness. The file is whole or not there: the early one is read while train.py
    runs."""
    path = path or handoff_path()
    if path is None:
        return None
    import torch
    start = time.time()
    partial = os.path.join(os.path.dirname(path), f".partial-{os.path.basename(path)}")  # torch wants .pt2
    torch.export.save(export_logits(model, seq_len, vocab_size, device, autocast), partial)
    os.replace(partial, path)
    return time.time() - start


def scorer_compiled(device_type, eval_tokens):
    """Whether the evaluator compiles its scorer: on CUDA, and on an evaluation long enough to pay it back."""
    return device_type == "cuda" or eval_tokens >= COMPILE_FROM_TOKENS


def warms_up_early(device_type, eval_tokens):
    """Whether the evaluator compiles the early graph while train.py starts: where it compiles at all, and on the
    CPU only, since on a GPU its warm-up batch would take memory that train.py may be counting on."""
    return device_type == "cpu" and scorer_compiled(device_type, eval_tokens)


def early_handoff_path(device):
    """Where train.py hands over its untrained model before it compiles, for the evaluator to compile that graph
    meanwhile (weights do not matter to a compile; the model handed over at the end is the one evaluated). None
    when the harness did not ask, or would not use it here."""
    import prepare
    path = os.environ.get(EARLY_ENV)
    return path if path and warms_up_early(device.type, prepare.EVAL_TOKENS) else None
