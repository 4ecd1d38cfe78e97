"""
Training speed of train.py for the active profile: one real run (the full time budget), then training tokens/s
(total_tokens / training_seconds), MFU, startup and eval seconds and val_bpb, with the machine's load around it.

    uv run bench/bench_train.py                                   # active profile, active dataset
    AUTORESEARCH_PROFILE=cpu uv run bench/bench_train.py --source ../shared/data/gutenberg-children
    AUTORESEARCH_PROFILE=smoke uv run bench/bench_train.py --dataset synthetic --repeats 6 --quiet

--repeats N runs it N times with seeds 42, 43, ... and prints the run-to-run spread (the noise that the keep
rule works against, as bench/bench_decide.py takes it).

Then it shows where a step's time goes (matmuls, attention, loss, optimizer, the rest) for the profile's model,
from a few eager steps under torch.profiler; --split-only shows just that (seconds, not a full run). --compiled
profiles the steps as train.py runs them (compiled model, and optimizer on CUDA), by the kernels' names, and on
CUDA adds the share of the step the GPU sits idle (launches, host syncs): what MFU loses outside the kernels.

--source/--dataset prepare that data first (into --cache, default a temporary folder) and train on it.
"""

import argparse
import contextlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(args, env, stream):
    """Run a script in the repo; with stream, echo its output live (the run takes minutes)."""
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if stream:
            print("  | " + line, end="", flush=True)
    return proc.wait(), "".join(lines)


def parse_summary(output):
    block = output.replace("\r", "\n").split("\n---\n")[-1]
    return dict(re.findall(r"^(\w+):\s+(\S+)$", block, flags=re.M))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", help="prepare this local data first (prepare.py --source)")
    parser.add_argument("--dataset", help="prepare this named dataset first (prepare.py --dataset)")
    parser.add_argument("--cache", help="AUTORESEARCH_CACHE_DIR for --source/--dataset (default: a temporary folder)")
    parser.add_argument("--quiet", action="store_true", help="do not echo train.py's output")
    parser.add_argument("--repeats", type=int, default=1, help="runs with seeds 42, 43, ... (default 1)")
    parser.add_argument("--split-only", action="store_true", help="no full run: only where a step's time goes")
    parser.add_argument("--compiled", action="store_true", help="split compiled steps, as train.py runs them")
    args = parser.parse_args()

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.source or args.dataset:
        env["AUTORESEARCH_CACHE_DIR"] = args.cache or tempfile.mkdtemp(prefix="bench-train-")
        prepare_args = ["--source", str(Path(args.source).resolve())] if args.source else ["--dataset", args.dataset]
        t0 = time.time()
        code, out = run(["prepare.py", *prepare_args], env, stream=False)
        if code:
            sys.exit(f"prepare.py {' '.join(prepare_args)} failed:\n{out[-3000:]}")
        print(f"prepared {' '.join(prepare_args)} in {time.time() - t0:.0f}s (cache {env['AUTORESEARCH_CACHE_DIR']})")

    seed = int(env.get("AUTORESEARCH_SEED", 42))
    results = [] if args.split_only else [one_run(dict(env, AUTORESEARCH_SEED=str(seed + i)), args.quiet)
                                          for i in range(args.repeats)]
    if len(results) > 1:
        vals, speeds = [r[0] for r in results], [r[1] for r in results]
        print(f"\n{len(results)} runs: val_bpb mean {statistics.fmean(vals):.6f} sigma {statistics.stdev(vals):.6f} "
              f"(min {min(vals):.6f}, max {max(vals):.6f}); tokens/s mean {statistics.fmean(speeds):,.0f} "
              f"spread {100 * statistics.stdev(speeds) / statistics.fmean(speeds):.1f}%")
    os.environ.update(env)  # the split runs here, on the same data
    step_split(compiled=args.compiled)


def one_run(env, quiet):
    """One train.py run with its numbers printed; returns (val_bpb, training tokens/s)."""
    load_before = os.getloadavg()
    t0 = time.time()
    code, out = run(["train.py"], env, stream=not quiet)
    wall = time.time() - t0
    load_after = os.getloadavg()
    if code:
        sys.exit(f"train.py exited {code}:\n{out[-3000:]}")
    s = parse_summary(out)
    tokens_per_s = float(s["total_tokens_M"]) * 1e6 / float(s["training_seconds"])
    mfu = s["mfu_percent"] + ("%" if s["mfu_percent"] != "n/a" else "")
    print(f"\nprofile {s['profile']} | device {s['device']} | attention {s['attention']} | depth {s['depth']} | "
          f"{s['num_params_M']}M params | seed {s['seed']}")
    print(f"training tokens/s: {tokens_per_s:,.0f}  ({s['total_tokens_M']}M tokens in {s['training_seconds']}s, "
          f"{s['num_steps']} steps)")
    print(f"mfu:               {mfu}")
    print(f"startup + eval:    {float(s['startup_seconds']) + float(s['eval_seconds']):.1f}s "
          f"(startup {s['startup_seconds']}s, eval {s['eval_seconds']}s); total {s['total_seconds']}s, "
          f"wall with imports {wall:.0f}s")
    print(f"val_bpb:           {s['val_bpb']}")
    print(f"peak memory:       {s['peak_vram_mb']} MB")
    print(f"machine:           {os.cpu_count()} CPUs, load average {load_before[0]:.2f} before, "
          f"{load_after[0]:.2f} after (1-minute)")
    return float(s["val_bpb"]), tokens_per_s


# ---------------------------------------------------------------------------
# Where a step's time goes

CATEGORIES = {  # first match wins: an operator's (or CUDA kernel's) name, lower-cased
    "attention": ("attention", "flash", "flex", "sdpa"),
    "loss": ("cross_entropy", "log_softmax", "nll_loss", "softmax", "logsumexp", "tanh"),
    "matmuls": ("mm", "matmul", "linear", "gemm", "nvjet", "xmma", "cutlass"),  # the last three: cuBLAS kernels
}


def category(name):
    name = name.lower()
    return next((what for what, keys in CATEGORIES.items() if any(k in name for k in keys)), "other")


def step_split(steps=3, compiled=False):
    """train.py's model, optimizer and batch for the active profile: forward+backward and the optimizer step are
    timed apart, and torch.profiler's self time per operator (CPU) or per kernel (CUDA) splits forward+backward.
    Eager by default, where operators keep their names; compiled, inductor's kernels carry the names of the
    operators they fused (flex attention, log_softmax, ...), the rest land in 'other'."""
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # the profiler's own chatter on stderr, off
    import torch
    import train
    from autoresearch.device import synchronize
    from prepare import Tokenizer, default_device, make_dataloader
    from torch.profiler import ProfilerActivity, profile
    device = default_device()
    on_cuda = device.type == "cuda"
    torch.set_float32_matmul_precision("high")
    tokenizer = Tokenizer.from_directory()
    model, attention = train.build_model(tokenizer.get_vocab_size(), device)
    optimizer = train.make_optimizer(model, compiled=compiled and on_cuda,
                                     ortho_dtype=torch.bfloat16 if on_cuda else torch.float32)
    step_model = torch.compile(model, dynamic=False) if compiled else model
    loader = make_dataloader(tokenizer, train.DEVICE_BATCH_SIZE, train.MAX_SEQ_LEN, "train",
                             device=device)
    accum = train.TOTAL_BATCH_SIZE // (train.DEVICE_BATCH_SIZE * train.MAX_SEQ_LEN)
    autocast = torch.amp.autocast("cuda", dtype=torch.bfloat16) if on_cuda else contextlib.nullcontext()

    def forward_backward():
        for _ in range(accum):
            x, y, _ = next(loader)
            with autocast:
                loss = step_model(x, y)
            (loss / accum).backward()

    def timed(fn):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        return time.perf_counter() - t0

    def own_time(fn):
        """fn's time by category, in seconds: its CUDA kernels' on CUDA, its operators' CPU self time on CPU."""
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])) as prof:
            fn()
            synchronize(device)
        spent = dict.fromkeys([*CATEGORIES, "other"], 0.0)
        for event in prof.key_averages():
            if on_cuda and event.device_type != torch.autograd.DeviceType.CUDA:
                continue  # on CUDA the kernels' own time is what a step waits for
            spent[category(event.key)] += 1e-6 * (event.self_device_time_total if on_cuda
                                                  else event.self_cpu_time_total)
        return spent

    def whole_step():
        forward_backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for _ in range(2):  # warm-up: compiles, allocator, kernels, Muon's buffers
        whole_step()
    warmup_s = time.perf_counter() - t0
    fb, opt, whole = 0.0, 0.0, 0.0
    for _ in range(steps):
        fb += timed(forward_backward)
        opt += timed(optimizer.step)
        model.zero_grad(set_to_none=True)
        whole += timed(whole_step) if on_cuda else 0.0  # the GPU's idle share needs it, CPU has none
    fb, opt, whole = fb / steps, opt / steps, whole / steps
    fb_kernels = own_time(forward_backward)
    opt_kernels = own_time(optimizer.step)
    model.zero_grad(set_to_none=True)
    step_s = fb + opt
    if on_cuda:  # kernel time over a step's wall time with one wait for the GPU, as train.py's loop has: the gap
        step_s = whole  # is the GPU waiting on the host (launches, the step's start after that wait)
        shares = {what: t / step_s for what, t in fb_kernels.items()}
        shares["optimizer"] = sum(opt_kernels.values()) / step_s
        shares["gpu idle"] = max(0.0, 1 - sum(shares.values()))
    else:
        total = sum(fb_kernels.values()) or 1.0
        shares = {what: fb / step_s * t / total for what, t in fb_kernels.items()}
        shares["optimizer"] = opt / step_s
    print(f"\nstep time split ({train.PROFILE} profile, {device.type}, attention {attention}, "
          f"{'compiled' if compiled else 'eager'}, {steps} steps of {train.TOTAL_BATCH_SIZE:,} tokens: "
          f"{1000 * step_s:.0f} ms/step, forward+backward {1000 * fb:.0f} ms, optimizer {1000 * opt:.0f} ms; "
          f"warm-up {warmup_s:.0f}s):")
    print("  " + " | ".join(f"{what} {100 * share:.0f}%" for what, share in
                            sorted(shares.items(), key=lambda item: -item[1])))
    return shares


if __name__ == "__main__":
    main()
