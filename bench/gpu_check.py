"""
One-call GPU check: everything that can only be proven on a CUDA GPU, in under 10 minutes, on a bare box with
no internet and a Python that has torch. Prints one block of numbers at the end.

    python bench/gpu_check.py              # on the GPU machine, from the repo root
    python bench/gpu_check.py --dry-run    # anywhere: print what it would do, run nothing

Before copying the repo to the GPU machine, fill two git-ignored folders (the machine cannot download):
    .whl/      wheels of every dependency but torch, for the GPU machine's Python and platform, e.g.
               uv export --no-dev --no-hashes --format requirements-txt | grep -v '^torch' > /tmp/req.txt
               pip download -r /tmp/req.txt -d .whl --only-binary=:all: --python-version 3.11 \\
                   --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64
    .devdata/  the text to train on, e.g. cp -r ../shared/data/gutenberg-children .devdata/

Steps: install what is missing from .whl/ (pip --no-index), prepare .devdata/<corpus> for the reference
profile, run the CUDA-only and fake-CUDA tests on the GPU, the bf16-vs-fp32 evaluation check, then one full
reference run (300 s). A step that fails is reported and the rest still runs.
"""

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEELS, DATA = REPO / ".whl", REPO / ".devdata"
MODULES = ["numpy", "tiktoken", "rustbpe", "pyarrow", "requests", "kernels", "matplotlib", "setuptools", "pytest"]

# bf16 autocast vs float32 evaluation of the same briefly trained reference model (run in a child process)
EVAL_AGREEMENT = """
import json, torch, train, prepare
from prepare import Tokenizer, make_dataloader, evaluate_bpb
device = torch.device("cuda")
tokenizer = Tokenizer.from_directory()
model, attention = train.build_model(tokenizer.get_vocab_size(), device)
optimizer = train.make_optimizer(model, compiled=False, ortho_dtype=torch.bfloat16)
loader = make_dataloader(tokenizer, 16, prepare.MAX_SEQ_LEN, "train", device=device)
for step in range(30):
    x, y, _ = next(loader)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(x, y).backward()
    optimizer.step()
    model.zero_grad(set_to_none=True)
model.eval()
with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
    bf16 = evaluate_bpb(model, tokenizer, 16)
model.float()
with torch.no_grad():
    fp32 = evaluate_bpb(model, tokenizer, 16)
print(json.dumps({"attention": attention, "bf16": bf16, "fp32": fp32}))
"""


def missing_modules():
    return [m for m in MODULES if importlib.util.find_spec(m) is None]


def plan(env):
    corpus = next((p for p in sorted(DATA.iterdir()) if p.is_dir()), None) if DATA.exists() else None
    steps = []
    if missing_modules():
        steps.append(("install", [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(WHEELS),
                                  *missing_modules()]))
    steps.append(("prepare", [sys.executable, "prepare.py", "--source", str(corpus or DATA / "<corpus>")]))
    steps.append(("tests", [sys.executable, "-m", "pytest", "-q", "-k", "cuda or reference_path",
                            "tests/test_prepare.py", "tests/test_fake_cuda.py", "tests/test_train.py",
                            "tests/test_reference_path.py"]))
    steps.append(("eval-agreement", [sys.executable, "-c", EVAL_AGREEMENT]))
    steps.append(("reference-run", [sys.executable, "train.py"]))
    return steps, corpus


def run_step(name, cmd, env, timeout):
    start = time.time()
    try:
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        out, code = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        out, code = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or ""), -1
    print(f"[{name}] exit {code} in {time.time() - start:.0f}s", flush=True)
    if code:
        print("\n".join(out.splitlines()[-15:]))
    return code, out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="print the steps, run nothing")
    args = parser.parse_args()
    env = dict(os.environ, AUTORESEARCH_PROFILE="reference", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               AUTORESEARCH_CACHE_DIR=os.environ.get("AUTORESEARCH_CACHE_DIR") or tempfile.mkdtemp(prefix="gpu-"))
    steps, corpus = plan(env)
    if args.dry_run:
        print(f"gpu_check --dry-run: profile reference, cache {env['AUTORESEARCH_CACHE_DIR']}")
        print(f"wheels: {WHEELS} ({'present' if WHEELS.exists() else 'missing'}); data: {corpus or 'missing'}")
        for name, cmd in steps:
            shown = "<bf16-vs-fp32 evaluation script>" if name == "eval-agreement" else " ".join(cmd[1:])
            print(f"  {name:<15} python {shown}")
        return 0
    results, timeouts = {}, {"install": 120, "prepare": 120, "tests": 120, "eval-agreement": 120,
                              "reference-run": 420}
    for name, cmd in steps:
        results[name] = run_step(name, cmd, env, timeouts[name])
    code, out = results["reference-run"]
    s = dict(re.findall(r"^(\w+):\s+(\S+)$", out.split("\n---\n")[-1], flags=re.M)) if code == 0 else {}
    agreement = {}
    if results["eval-agreement"][0] == 0:
        agreement = json.loads(results["eval-agreement"][1].strip().splitlines()[-1])
    tests = re.findall(r"\d+ (?:passed|failed|skipped)", results["tests"][1])
    tokens_per_s = (float(s["total_tokens_M"]) * 1e6 / float(s["training_seconds"])) if s else None
    print("\n--- gpu_check")
    print(f"tests:            {', '.join(tests) or 'did not run'}")
    print(f"attention:        {s.get('attention', agreement.get('attention', 'n/a'))}")
    print(f"mfu_percent:      {s.get('mfu_percent', 'n/a')}")
    print(f"tokens_per_s:     {f'{tokens_per_s:,.0f}' if tokens_per_s else 'n/a'}")
    for key in ("num_steps", "peak_vram_mb", "startup_seconds", "eval_seconds", "val_bpb"):
        print(f"{key + ':':<18}{s.get(key, 'n/a')}")
    if agreement:
        print(f"eval_bf16_fp32:   {agreement['bf16']:.6f} vs {agreement['fp32']:.6f} "
              f"(difference {agreement['bf16'] - agreement['fp32']:+.6f})")
    return 0 if all(code == 0 for code, _ in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
