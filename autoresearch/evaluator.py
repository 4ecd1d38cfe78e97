"""
The harness's evaluator: val_bpb computed from the model train.py handed over (a torch.export program, see
handoff.py), in a process of its own, so that none of the agent's Python runs while the metric is computed.

    python -m autoresearch.evaluator MODEL.pt2 [--expect HASHES.json] [--data FOLDER]  # one JSON line

The loop starts it beside train.py with --wait (niced, not dumpable): it imports torch and torch.export's
loader (~5 s on 2 cores) while train.py's single-threaded start leaves a core idle, touches no data, and
evaluates once the loop, after train.py has ended, writes the hashes, the data folder and a nonce to echo on
its stdin (empty input: it exits, silent).

In order: the files the metric reads are checked against their hashes (and restored from the pristine copies
made at prepare time when damaged), the graph may hold only standard (aten) operators, the model must be causal,
then val_bpb on the pinned validation rows (prepare.evaluate_bpb, as train.py computes it) and on a held-out
slice of the validation split that the dataloader never hands to training.
"""

import argparse
import getpass
import importlib
import json
import operator
import os
import re
import secrets
import select
import stat
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ALLOWED_HIGHER_ORDER = {"wrap_with_autocast", "wrap_with_set_grad_enabled"}  # torch.export's own wrappers
CAUSALITY_TOL = 2e-3  # nats: how far a log-probability may move when only later tokens change (rounding)
CAUSALITY_ROWS = 128  # rows the causality check probes (each at one random cut): 8 batches on the CPU, 2 on CUDA
COMPILE_CACHE_ENV = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")  # where this evaluation's kernels go
SHARED_LIBRARY = re.compile(r"\.so(\.[0-9.]+)?$")  # libtorch_cpu.so, libgomp.so.1
EARLY_POLL_S = 0.2  # how often, while train.py starts, the evaluator looks for its early graph
# imported beside train.py (--wait): torch.export's loader (it pulls in dynamo, ~2 s of the ~5), and what loading
# a program imports the first time (aot_autograd, networkx, sympy's tensors: ~0.6 s more, else paid after the run)
PRELOADED = ("torch.export.pt2_archive._package", "torch.export._trace", "torch.export._unlift",
             "torch._inductor.sizevars", "torch.fx.experimental.validator", "torch.utils.serialization",
             "sympy.tensor.tensor")


from autoresearch.handoff import dumpable, scorer_compiled, warms_up_early
from autoresearch.metricdata import MetricDataError, verify_metric_files


class EvaluationError(Exception):
    """The model cannot be evaluated (or must not be): the message says why."""

# ---------------------------------------------------------------------------
# The model: standard operators only, causal


def foreign_operators(graph_module):
    """Operators in the graph (and its nested graphs) that are not aten's: a custom operator could run Python."""
    found = set()
    for node in graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        target = node.target
        if isinstance(target, torch._ops.OpOverload) and target.namespace == "aten":
            continue
        if target is operator.getitem:
            continue
        if isinstance(target, torch._ops.HigherOrderOperator) and target.name() in ALLOWED_HIGHER_ORDER:
            continue
        found.add(str(target))
    for child in graph_module.children():
        if isinstance(child, torch.fx.GraphModule):
            found |= foreign_operators(child)
    return found


def written_inputs(graph_module, names=None):
    """The graph's inputs (weights, buffers, the tokens) that an in-place operator writes, directly or through a
    view of them: what would outlive a call. Also inside the subgraphs of export's wrappers (an autocast region:
    under hand_over(..., autocast=...) the whole model), whose inputs are the wrapper's operands, in order.
    names: what to call the graph's placeholders (a subgraph's: the outer inputs they stand for, or None)."""
    roots, written, placeholders = {}, set(), iter(names or [])
    for node in graph_module.graph.nodes:
        if node.op == "placeholder":
            name = next(placeholders, None) if names is not None else node.target
            if name is not None:
                roots[node] = name
        elif node.op == "call_function" and isinstance(node.target, torch._ops.HigherOrderOperator):
            subgraphs = [getattr(graph_module, a.target) for a in node.args
                         if isinstance(a, torch.fx.Node) and a.op == "get_attr"]
            operands = [roots.get(a) for a in node.args if isinstance(a, torch.fx.Node) and a.op != "get_attr"]
            for sub in subgraphs:
                if isinstance(sub, torch.fx.GraphModule):
                    written |= written_inputs(sub, operands)
        elif node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            schema = node.target._schema
            args = [(spec, node.kwargs.get(spec.name) if i >= len(node.args) else node.args[i])
                    for i, spec in enumerate(schema.arguments)]
            for spec, arg in args:
                if spec.alias_info is not None and spec.alias_info.is_write and arg in roots:
                    written.add(roots[arg])
            returned = schema.returns[0].alias_info if schema.returns else None
            for spec, arg in args:  # a view of an input (or of a view of one) is that input
                if returned is not None and spec.alias_info is not None and arg in roots and \
                        set(returned.before_set) & set(spec.alias_info.before_set):
                    roots[node] = roots[arg]
    return written


def load_model(path, device):
    """The handed-over model as a module on `device`, after checking what its graph may do."""
    try:
        program = torch.export.load(path)
    except FileNotFoundError:
        raise EvaluationError(f"train.py handed over no model (no {path}): the run must end with "
                              f"hand_over(...) from autoresearch.handoff, as the shipped train.py does") from None
    except Exception as e:
        raise EvaluationError(f"the handed-over model in {path} cannot be loaded: {type(e).__name__}: {e}") from e
    foreign = foreign_operators(program.graph_module)
    if foreign:
        raise EvaluationError(f"the handed-over model uses operators the evaluator does not run: "
                              f"{', '.join(sorted(foreign))} (only standard aten operators are allowed)")
    signature = program.graph_signature
    names = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}
    mutated = sorted({*signature.buffers_to_mutate.values(), *signature.user_inputs_to_mutate.values(),
                      *(names.get(name, name) for name in written_inputs(program.graph_module))})
    if mutated:  # one call could then behave unlike the next: causal while checked, not while scored
        raise EvaluationError(f"the handed-over model changes its own state when called ({', '.join(mutated)}): "
                              f"tokens to logits must be the same function on every call")
    return program.module().to(device)


def check_causal(model, rows, vocab_size, batch_size):
    """Log-probabilities at position p must not change when tokens after p change. Raises EvaluationError if they
    do. Batches of the evaluation's size, the first its first batch as scored, each beside a copy whose rows have
    everything after a cut replaced: the token after it by one drawn from the whole vocabulary, the rest by the
    text of other rows; the cut drawn at random for each row here, unknown to train.py. A model that sees later
    tokens only on some rows, at some positions, for some tokens or at some batch sizes cannot tell which it is
    being checked on; enough rows (causality_rounds) that one looking ahead at 1% of positions is caught. Compared
    as log-probabilities, which is all the score depends on (a constant added to every logit changes nothing)."""
    draw = torch.Generator().manual_seed(secrets.randbits(63))
    rounds = max(1, min(causality_rounds(batch_size), len(rows) // batch_size))
    for k in range(rounds):
        x = rows[k * batch_size:(k + 1) * batch_size, :-1]
        source = rows[(k + 1) * batch_size:(k + 2) * batch_size, :-1]
        # rows of their own (a val split so small that the rows wrap could give a row its own text back)
        source = source if len(source) == len(x) and not torch.equal(source, x) else x.roll(1, 0)
        n, T = x.shape
        cuts = torch.randint(0, T - 1, (n,), generator=draw).tolist()
        tokens = torch.randint(0, vocab_size, (n,), generator=draw).tolist()
        probe = x.clone()
        for i, (p, token) in enumerate(zip(cuts, tokens)):
            probe[i, p + 1:] = source[i, p + 1:]
            probe[i, p + 1] = token if token != x[i, p + 1] else (token + 1) % vocab_size
        with torch.no_grad():
            seen, changed = model(x), model(probe)
            for i, p in enumerate(cuts):  # a row at a time: a whole batch's log-probabilities in float32 are large
                before, after = (F.log_softmax(logits[i, :p + 1].float(), dim=-1) for logits in (seen, changed))
                drift = (after - before).abs().max().item()
                if not drift <= CAUSALITY_TOL:
                    raise EvaluationError(f"the model is not causal: its log-probabilities at positions up to {p} "
                                          f"change by {drift:.3g} nats when only tokens after position {p} change")
        del seen, changed


def causality_rounds(batch_size):
    """Batches check_causal probes: CAUSALITY_ROWS rows at least. A model that looks ahead at a share s of
    positions (for some next tokens) shows it on a probed row with probability ~2s: on 128 rows at s = 0.85%
    (a red team's), caught 9 times in 10 on each run, 99 in 100 over a keep's two."""
    return -(-CAUSALITY_ROWS // batch_size)


# ---------------------------------------------------------------------------
# val_bpb


class TokenLosses(nn.Module):
    """The model(x, y, reduction="none") contract of prepare.evaluate_bpb, from a logits-only model."""

    def __init__(self, logits_model):
        super().__init__()
        self.logits_model = logits_model

    def forward(self, x, y, reduction="none"):
        logits = self.logits_model(x).float()
        return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")


def scorer_for(model, device):
    """TokenLosses of the model, compiled where that pays (handoff.scorer_compiled): the evaluation and the warm-up
    on the early graph build it alike, so that the evaluation finds the warm-up's kernels in the cache."""
    import prepare
    scorer = TokenLosses(model)
    if scorer_compiled(device.type, prepare.EVAL_TOKENS):
        scorer = torch.compile(scorer, dynamic=False)  # cpu profile: 103 s eager, about half compiled
    return scorer


def scoring_autocast(device):
    """No autocast of the evaluator's own: the graph carries the numerics train.py exported it with (its bf16
    autocast on CUDA), so the causality check and the scoring run the same computation. An autocast added here
    would also fail the dtype asserts export leaves for casts that were no-ops when it traced (`.float()`)."""
    return torch.autocast(device.type, enabled=False)


def default_batch_size(device):
    return 64 if device.type == "cuda" else 16


def warm_up(path, batch_size=None):
    """Compile the scorer of the early graph (handoff.early_handoff_path) on a batch of zeros shaped as the
    evaluation's, while train.py runs: nothing is scored, and nothing is kept but the compile cache. Returns
    a line for the log. The file is train.py's, written while it runs: opened as a regular file only (a FIFO
    left there would hang the evaluator), read whole, then checked as the trained model will be."""
    import io
    import prepare
    start, device = time.time(), prepare.default_device()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return "warm-up skipped: the early graph is not a regular file"
            if not warms_up_early(device.type, prepare.EVAL_TOKENS):  # on a GPU, memory train.py may be using
                return "warm-up skipped: the evaluator warms up early on the CPU only, for profiles it compiles on"
            program = torch.export.load(io.BytesIO(f.read()))
        if foreign_operators(program.graph_module):
            return "warm-up skipped: the early graph uses operators the evaluator does not run"
        scorer = scorer_for(program.module().to(device), device)
        shape = (batch_size or default_batch_size(device), prepare.MAX_SEQ_LEN)
        x, y = (torch.zeros(shape, dtype=torch.int64, device=device) for _ in range(2))
        with torch.no_grad(), scoring_autocast(device):
            scorer(x, y, reduction="none")
    except Exception as e:  # a warm-up only: the evaluation of the trained model decides
        return f"warm-up failed ({type(e).__name__}: {str(e)[:200]}): the evaluation compiles cold"
    return f"warm-up: compiled the scorer of the early graph in {time.time() - start:.1f} s, beside train.py"


def evaluate(model_path, expect=None, batch_size=None, data=None):
    """{"val_bpb", "heldout_bpb", "heldout_seed", "eval_seconds", "restored": [...]} for the handed-over model
    (heldout_bpb None when the val split is too small for a held-out slice; heldout_seed: held_out_slice's);
    EvaluationError if refused. data: the folder of the metric's files (default: the prepared dataset's, in the
    cache)."""
    import prepare  # the contract: rows, byte counts and the metric itself
    from torch._dynamo.utils import counters
    start = time.time()
    tokenizer = prepare.Tokenizer.from_directory(data)
    try:
        restored = verify_metric_files(tokenizer.directory, expect)
    except MetricDataError as e:
        raise EvaluationError(str(e)) from None
    if restored:
        tokenizer = prepare.Tokenizer.from_directory(data)
    device = prepare.default_device()
    model = load_model(model_path, device)
    batch_size = batch_size or default_batch_size(device)
    rows = prepare.eval_rows(tokenizer.directory, prepare.MAX_SEQ_LEN,
                             (causality_rounds(batch_size) + 1) * batch_size, tokenizer.get_bos_token_id())
    check_causal(model, torch.from_numpy(rows.astype("int64")).to(device), tokenizer.get_vocab_size(), batch_size)
    scorer = scorer_for(model, device)
    cached = dict(counters["inductor"])
    heldout, heldout_seed = held_out_slice(tokenizer)
    if len(heldout) >= batch_size:
        heldout = heldout[:len(heldout) - len(heldout) % batch_size]  # whole batches: no recompile for the last
    with torch.no_grad(), scoring_autocast(device):
        val_bpb = prepare.evaluate_bpb(scorer, tokenizer, batch_size)
        heldout_bpb = (prepare.bits_per_byte(scorer, heldout, tokenizer.directory, batch_size)
                       if len(heldout) else None)
    # the compile cache's hits and misses: a warm-up that did its work leaves no miss
    looked_up = {kind: counters["inductor"][f"fxgraph_cache_{kind}"] - cached.get(f"fxgraph_cache_{kind}", 0)
                 for kind in ("hit", "miss")}
    return {"val_bpb": val_bpb, "heldout_bpb": heldout_bpb, "heldout_seed": heldout_seed,
            "eval_seconds": round(time.time() - start, 2), "restored": restored, "compile_cache": looked_up}


def held_out_slice(tokenizer):
    """(rows, seed) of the text scored beside the pinned rows: the val file's held-out slice (seed None), or for
    the synthetic dataset, whose val text a run can generate again, fresh text from a seed drawn now."""
    import prepare
    meta = json.loads((tokenizer.directory / "meta.json").read_text())  # a metric file: verified above
    if meta.get("dataset") in prepare.FRESH_HELDOUT_DATASETS:
        seed = secrets.randbits(32)
        return prepare.synthetic_heldout_rows(tokenizer, seed), seed
    return prepare.heldout_rows(tokenizer.directory, tokenizer.get_bos_token_id()), None


def code_in_use():
    """The files this process runs code from: the sources and extension modules it imported and the shared
    libraries mapped in, torch's included, and their bytecode, which uv compiles at install (pyproject's
    compile-bytecode), so that no honest import writes it. Not the kernels this evaluation compiled into its own
    cache (the loop watches that folder, seal.py)."""
    modules = [m for m in list(sys.modules.values()) if isinstance(getattr(m, "__file__", None), str)]
    paths = {m.__file__ for m in modules}
    bytecode = {m.__cached__ for m in modules if isinstance(getattr(m, "__cached__", None), str)}
    try:
        with open("/proc/self/maps") as maps:
            mapped = [line.split(maxsplit=5) for line in maps]
        paths |= {m[5].strip() for m in mapped if len(m) == 6 and SHARED_LIBRARY.search(m[5].strip())}
    except OSError:  # not Linux: the imported modules only
        pass
    caches = [os.environ.get(k) or "" for k in COMPILE_CACHE_ENV]
    caches[0] = caches[0] or inductor_default_cache()
    own = tuple(os.path.join(os.path.realpath(folder), "") for folder in caches if folder)
    return sorted(p for p in paths | bytecode if not os.path.realpath(p).startswith(own))


def code_written_since(code, since_ns):
    """The files of code_in_use() written after since_ns (ctime, which no process can set back), so that a run
    that edited one (the metric's cross-entropy, say) is caught, also when it put the file back. uv installs
    copies (link-mode): a hard link another install made to a shared file would move its ctime too."""
    written = []
    for path in code:
        try:
            if os.stat(path).st_ctime_ns > since_ns:
                written.append(path)
        except FileNotFoundError:  # bytecode never written (PYTHONDONTWRITEBYTECODE), a module made in memory
            pass
        except OSError:  # there, but kept from us (a chmod 000 moves its ctime too)
            written.append(path)
    return written


def installed_code(code):
    """The files of code_in_use() outside the repository (the virtual environment's, also inside it; the
    standard library's; shared libraries): the loop checks them against the tag's record between runs
    (installed.py). Not the repository's own, nor the harness's (a worker's worktree imports it from the main
    checkout): those are sealed (seal.py)."""
    ours = tuple(os.path.join(os.path.realpath(p), "") for p in (os.getcwd(), Path(__file__).parents[1]))
    environment = tuple(os.path.join(os.path.realpath(p), "") for p in {sys.prefix, sys.base_prefix})
    real = {p: os.path.realpath(p) for p in code}
    return [p for p in code if not real[p].startswith(ours) or real[p].startswith(environment)]


def inductor_default_cache():
    """Where inductor caches without TORCHINDUCTOR_CACHE_DIR: torch's own answer where it gives one."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
        return default_cache_dir()
    except ImportError:
        try:
            user = getpass.getuser()
        except (KeyError, OSError):  # a uid with no name (some containers)
            user = f"uid_{os.getuid()}"
        return os.path.join(tempfile.gettempdir(), f"torchinductor_{user}")


def wait_for_go(early=None, batch_size=None):
    """--wait: what the evaluation needs imported now (train.py is still starting), then the loop's word once
    train.py has ended: its input to the end, one JSON line {"expect": hashes or null, "data": folder or null,
    "nonce": ..., "since": ns when train.py started, "check_only": true when train.py crashed (the code check
    alone)}; None when the input is empty (nothing to evaluate). The
    hashes and folder arrive only now, so that nothing train.py could have rewritten on disk decides what the
    metric's files are; a second line means something else wrote to its input, and the word is refused.
    early: where train.py may put its early graph (--early); once it is there, the warm-up meanwhile."""
    for module in PRELOADED:
        try:
            importlib.import_module(module)
        except ImportError:  # another torch version: imported when loading, as without this
            pass
    chunks, fd = [], sys.stdin.fileno()
    while True:
        if early and os.path.lexists(early):
            print(warm_up(early, batch_size), flush=True)
            early = None
        if select.select([fd], [], [], EARLY_POLL_S if early else None)[0]:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    lines = b"".join(chunks).decode(errors="replace").splitlines()
    dumpable(True)  # an ordinary process again: train.py and all it started have ended
    if len(lines) > 1:
        raise EvaluationError(f"{len(lines)} lines on the evaluator's input where the loop writes one: something "
                              f"else wrote to it")
    return json.loads(lines[0]) if lines else None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="the file train.py handed over (torch.export program)")
    parser.add_argument("--expect", help="JSON file of the metric files' sha256 recorded by the harness")
    parser.add_argument("--batch-size", type=int, help="rows per forward pass (default 64 on CUDA, else 16)")
    parser.add_argument("--data", help="folder of the metric's files (default: the prepared dataset's)")
    parser.add_argument("--wait", action="store_true", help="import, then evaluate when stdin says what to")
    parser.add_argument("--early", help="with --wait: where train.py may hand over its untrained model early, "
                                        "for the scorer's compile to start warm")
    args = parser.parse_args()
    expect = json.loads(Path(args.expect).read_text()) if args.expect else None
    said = {}
    try:
        if args.wait:
            word = wait_for_go(args.early, args.batch_size)
            if word is None:
                return 0
            expect, args.data, said = word["expect"], word["data"], {"nonce": word.get("nonce")}
        # a run that crashed has nothing to score, but what it wrote into the code this process runs still counts
        result = {} if args.wait and word.get("check_only") else evaluate(args.model, expect, args.batch_size,
                                                                           args.data)
        if args.wait and word.get("since"):  # an older loop's word names no start: nothing to compare with
            code = code_in_use()
            result.update(code_written=code_written_since(code, word["since"]), code_read=installed_code(code))
    except EvaluationError as e:
        print(json.dumps({"error": str(e), **said}))
        return 1
    print(json.dumps({**result, **said}))
    return 0


def run_and_exit():
    """main(), then an exit that skips the interpreter's teardown of torch (~1.2 s on 2 cores, paid on every
    run): the result is printed, and nothing else is left to write."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run_and_exit()
