"""
Dataloader throughput: tokens/s of prepare.make_dataloader on CPU, first batch excluded, at B=32, T=2048 (the
upstream measurement) and at the profile's MAX_SEQ_LEN. Also prints how long the tokenizer training took.
Datasets: gutenberg-children (from ../shared, prepared with --source into a temporary cache) and synthetic,
or the prepared folders given with --prepared.

    uv run bench/bench_dataloader.py                       # cpu profile, ~5 s per measurement
    uv run bench/bench_dataloader.py --profile smoke --seconds 2
    uv run bench/bench_dataloader.py --prepared ~/.cache/autoresearch/prepared/climbmix/reference
"""

import argparse
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GUTENBERG = REPO.parent / "shared" / "data" / "gutenberg-children"


def prepare_into(cache, profile, args):
    env = {**os.environ, "AUTORESEARCH_CACHE_DIR": str(cache), "AUTORESEARCH_PROFILE": profile}
    result = subprocess.run([sys.executable, "prepare.py", *args], cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"prepare.py {' '.join(args)} failed:\n{result.stdout}{result.stderr}")


def tokens_per_second(prepare, directory, B, T, seconds):
    loader = prepare.make_dataloader(prepare.Tokenizer.from_directory(directory), B, T, "train", device="cpu")
    next(loader)  # excluded: opens the token files and fills the packing buffer
    tokens, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        inputs, _, _ = next(loader)
        tokens += inputs.numel()
    return tokens / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="cpu", choices=["reference", "cpu", "smoke"])
    parser.add_argument("--seconds", type=float, default=5.0, help="measuring time per configuration")
    parser.add_argument("--prepared", nargs="*", type=Path, help="prepared folders to measure instead")
    args = parser.parse_args()
    os.environ["AUTORESEARCH_PROFILE"] = args.profile
    sys.path.insert(0, str(REPO))
    import prepare

    directories = args.prepared
    if not directories:
        cache = Path(tempfile.mkdtemp(prefix="bench-dataloader-"))
        atexit.register(shutil.rmtree, cache, True)  # two prepared datasets per call: not left in /tmp
        directories = []
        if GUTENBERG.exists():
            prepare_into(cache, args.profile, ["--source", str(GUTENBERG)])
            directories.append(cache / "prepared" / "gutenberg-children" / args.profile)
        else:
            print(f"({GUTENBERG} not found: measuring the synthetic set only)")
        prepare_into(cache, args.profile, ["--dataset", "synthetic"])
        directories.append(cache / "prepared" / "synthetic" / args.profile)

    print(f"cpu cores: {os.cpu_count()}, profile: {args.profile}")
    for directory in directories:
        meta = json.loads((directory / "meta.json").read_text())
        print(f"{meta['dataset']}: {meta['train_tokens']:,} train tokens; tokenizer (vocab {meta['vocab_size']}) "
              f"trained on {meta['tokenizer_chars'] / 1e6:.1f}M chars in {meta['tokenizer_seconds']:.1f}s "
              f"({meta['tokenizer_chars'] / 1e6 / max(meta['tokenizer_seconds'], 1e-9):.1f}M chars/s); "
              f"pre-tokenized in {meta['tokenize_seconds']:.1f}s")
        for B, T in sorted({(32, 2048), (32, prepare.PROFILES[args.profile][0])}, key=lambda bt: -bt[1]):
            rate = tokens_per_second(prepare, directory, B, T, args.seconds)
            print(f"  make_dataloader B={B} T={T}: {rate / 1e6:.1f}M tokens/s")


if __name__ == "__main__":
    main()
