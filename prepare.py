"""
prepare.py: the fixed part of autoresearch that no agent edits. It prepares a dataset (downloaded, imported
from your files or generated), trains the tokenizer, pre-tokenizes the documents, and defines the dataloader and
the metric (evaluate_bpb) that make two experiments comparable. Profile (reference | cpu | smoke) from
AUTORESEARCH_PROFILE, cache in AUTORESEARCH_CACHE_DIR. This file is what train.py relies on; the data acquisition
steps that its CLI runs live in autoresearch/: download.py (climbmix), sources.py (--source), synthetic.py,
tokens.py (tokenizer training, token files) and cachefiles.py (what they share).

    uv run prepare.py                           # climbmix from Hugging Face: 10 train shards + the pinned val shard
    uv run prepare.py --dataset synthetic       # offline, generated in seconds
    uv run prepare.py --source ~/my-corpus      # your own .parquet / .jsonl / .txt files
"""

import argparse
import functools
import itertools
import json
import math
import os
import pickle
import shlex
import sys
import time
from bisect import bisect_right, insort
from pathlib import Path

import numpy as np

from autoresearch import download, sources, synthetic
from autoresearch.cachefiles import load_manifest
from autoresearch.metricdata import seal_metric_files
from autoresearch.tokens import SPECIAL_TOKENS, build_tokenizer_and_tokens  # SPECIAL_TOKENS[0] is BOS
# torch is imported inside the functions that need it: it takes seconds to import and the prepare CLI never does

# ---------------------------------------------------------------------------
# Profiles and constants

# TOKENIZER_MAX_CHARS: train text the tokenizer learns from. TRAIN_MAX_TOKENS: train tokens pre-tokenized, several
# runs' worth (TOKENS_PER_RUN below: what a 300 s run reads); the val split is pre-tokenized up to
# 2 * EVAL_TOKENS, all that evaluation reads.
# cpu (measured 2026-11-26, 300 s runs on 2 cores): vocab 4096 against 8192 gave val_bpb -0.09 on python-stdlib
# (1 seed), -0.024 on tinystories-sample and -0.003 on gutenberg-children (2 seeds each; the last within the seed
# spread): 30% more tokens in the budget, half the lm_head; 2048 lost on gutenberg (+0.025). On Debian package
# docs, tuned on by nobody, +0.018 (2 seeds, whole val split; 4096's two seeds 0.05 apart). Eval on 2**19 tokens,
# not 2**20: ~30 s instead of ~60 s, and two runs compared on these pinned rows differ by a sampling error of
# ~0.0005 (SE of the per-row difference), a tenth of the seed-to-seed spread (~0.005).
# smoke: 10 s. 5 s (tried 2026-11-28) made each real run of the suite and the demo ~5 s shorter, but tokens/s
# jittered more (5% over 6 runs) and a cold first run was slower still: every later run fell outside the keep
# rule's 10% speed band of a 1-run baseline, and a 100-sigma gain was discarded with nothing comparable.
PROFILES = {
    #            MAX_SEQ_LEN  TIME_BUDGET  EVAL_TOKENS   VOCAB_SIZE  TOKENIZER_MAX_CHARS  TRAIN_MAX_TOKENS
    "reference": (2048,       300,         40 * 524288,  8192,       2_000_000_000,       2_000_000_000),
    "cpu":       (256,        300,         2**19,        4096,       100_000_000,         50_000_000),
    "smoke":     (128,        10,          2**15,        1024,       5_000_000,           5_000_000),
}
# Tokens one run reads in its budget, measured (reference: an H200, flex attention, 2026-11-26; cpu: 2 cores).
# A train split much smaller than this is read many times over, and val_bpb then measures memorisation.
TOKENS_PER_RUN = {"reference": 358_000_000, "cpu": 3_100_000}
PACKING_BUFFER = 1000  # documents the packer chooses from: larger packs tighter but picks slower
EVAL_PROGRESS_SECONDS = 10  # a line this often during evaluation (cpu: ~60 s), so that it never looks hung


def resolve_profile():
    name = os.environ.get("AUTORESEARCH_PROFILE", "")
    if not name:
        import torch
        name = "reference" if torch.cuda.is_available() else "cpu"
        print(f"\n*** AUTORESEARCH_PROFILE is not set: using the '{name}' profile "
              f"({'CUDA is available' if name == 'reference' else 'no CUDA GPU found'}). "
              f"Set AUTORESEARCH_PROFILE=reference|cpu|smoke to choose. ***\n", file=sys.stderr)
    elif name not in PROFILES:
        raise SystemExit(f"AUTORESEARCH_PROFILE={name!r} is not a profile; valid ones: {', '.join(PROFILES)} "
                         f"(e.g. AUTORESEARCH_PROFILE=cpu uv run train.py)")
    return name


PROFILE = resolve_profile()
MAX_SEQ_LEN, TIME_BUDGET, EVAL_TOKENS, VOCAB_SIZE, TOKENIZER_MAX_CHARS, TRAIN_MAX_TOKENS = PROFILES[PROFILE]
HELDOUT_TOKENS = EVAL_TOKENS // 8  # the held-out slice of val (see heldout_documents): ~1/8 more evaluation
# synthetic_heldout_rows' fresh text differs from run to run, unlike the file's slice, so it must be large enough
# that its own sampling error stays well inside experiment.LEAK_TOLERANCE: smoke's 4096 tokens spread the ratio
# val/held-out by sd 0.070 across 40 seeds (a trained smoke model), 2**15 (+0.5 s a run) by sd 0.016
SYNTHETIC_HELDOUT_TOKENS = max(HELDOUT_TOKENS, 2**15)
FRESH_HELDOUT_DATASETS = ("synthetic",)  # the harness scores synthetic_heldout_rows for these, not the file's slice

# ---------------------------------------------------------------------------
# Cache layout: raw shards per dataset, artifacts per dataset and profile, the active dataset per profile
#   CACHE_DIR/datasets/<dataset>/shard_NNNNN.parquet + manifest.json (sha256 per shard, train/val split)
#   CACHE_DIR/prepared/<dataset>/<profile>/tokenizer.pkl, token_bytes.npy, {train,val}.bin + .offsets.npy, meta.json
#   CACHE_DIR/prepared/active-<profile>.txt: the dataset last prepared for that profile

CACHE_DIR = Path(os.environ.get("AUTORESEARCH_CACHE_DIR") or "~/.cache/autoresearch").expanduser()


def dataset_dir(name):
    return CACHE_DIR / "datasets" / name


def prepared_dir(name, profile=None):
    return CACHE_DIR / "prepared" / name / (profile or PROFILE)


def active_file(profile):
    return CACHE_DIR / "prepared" / f"active-{profile}.txt"


def read_active_dataset(profile):
    path = active_file(profile)
    return (path.read_text().strip() or None) if path.exists() else None


def prepare_command(dataset):
    """The command that prepares `dataset` for the active profile (for error messages)."""
    args = ""
    if dataset == "synthetic":
        args = " --dataset synthetic"
    elif dataset not in (None, "climbmix"):
        manifest = load_manifest(dataset_dir(dataset))
        args = " --source " + (shlex.quote(manifest["source"]) if manifest else "PATH")
    return f"AUTORESEARCH_PROFILE={PROFILE} uv run prepare.py{args}"


DATASET = os.environ.get("AUTORESEARCH_DATASET") or read_active_dataset(PROFILE)

# ---------------------------------------------------------------------------
# Tokenizer: the trained BPE (a tiktoken encoding) and each token's byte length; see autoresearch/tokens.py


class Tokenizer:
    """A tiktoken encoding plus the folder of token data it belongs to."""

    def __init__(self, enc, directory=None):
        self.enc = enc
        self.directory = Path(directory) if directory else None
        self.bos_token_id = enc.encode_single_token(SPECIAL_TOKENS[0])

    @classmethod
    def from_directory(cls, directory=None):
        if directory is None:
            if DATASET is None:
                raise FileNotFoundError(f"No dataset is prepared for the '{PROFILE}' profile in {CACHE_DIR}. "
                                        f"Prepare one: {prepare_command(None)}")
            directory = prepared_dir(DATASET)
        path = Path(directory) / "tokenizer.pkl"
        if not path.exists():
            raise FileNotFoundError(f"No tokenizer at {path}. Prepare it: {prepare_command(DATASET)}")
        with open(path, "rb") as f:
            return cls(pickle.load(f), directory)

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_bos_token_id(self):
        return self.bos_token_id

    def encode(self, text, prepend=None, num_threads=8):
        if prepend is not None and not isinstance(prepend, int):
            prepend = self.enc.encode_single_token(prepend)
        first = [] if prepend is None else [prepend]
        if isinstance(text, str):
            return first + self.enc.encode_ordinary(text)
        return [first + ids for ids in self.enc.encode_ordinary_batch(text, num_threads=num_threads)]

    def decode(self, ids):
        return self.enc.decode(ids)


def get_token_bytes(device="cpu", directory=None):
    """UTF-8 byte length of every token (0 for the special tokens), for bits per byte."""
    import torch
    if directory is None and DATASET is not None:
        directory = prepared_dir(DATASET)
    if directory is None or not (Path(directory) / "token_bytes.npy").exists():
        raise FileNotFoundError(f"No token byte lengths prepared for the '{PROFILE}' profile. "
                                f"Prepare them: {prepare_command(DATASET)}")
    return torch.from_numpy(np.load(Path(directory) / "token_bytes.npy")).to(device)

# ---------------------------------------------------------------------------
# Token files (written by autoresearch/tokens.py): <split>.bin, every document once with BOS first, and
# <split>.offsets.npy, where each document starts


def load_token_split(directory, split):
    """(tokens memmap, document offsets) of a prepared split; a clear error when it is missing or empty."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    directory = Path(directory)
    offsets_path = directory / f"{split}.offsets.npy"
    if not offsets_path.exists():
        raise FileNotFoundError(f"No {split} tokens in {directory}. Prepare them: {prepare_command(DATASET)}")
    offsets = np.load(offsets_path)
    if len(offsets) < 2 or offsets[-1] == 0:
        raise ValueError(f"The {split} split in {directory} has no documents, so there is nothing to load. "
                         f"Prepare a dataset with {split} data: {prepare_command(DATASET)}")
    dtype = json.loads((directory / "meta.json").read_text())["dtype"]
    # a plain ndarray view of the memmap: slicing it skips numpy.memmap's per-slice bookkeeping
    return np.memmap(directory / f"{split}.bin", dtype=dtype, mode="r").view(np.ndarray), offsets

# ---------------------------------------------------------------------------
# Dataloader: best-fit packing of pre-tokenized documents into rows that start with BOS, without padding or waste


def document_stream(offsets, shuffle, seed, epochs=None, documents=None):
    """(start, end, epoch) of every document (or of those indexed by `documents`), epoch after epoch; train order
    reshuffled per epoch from the seed."""
    documents = np.arange(len(offsets) - 1) if documents is None else np.asarray(documents)
    n, epoch = len(documents), 1
    while epochs is None or epoch <= epochs:
        order = documents[np.random.default_rng([seed, epoch]).permutation(n)] if shuffle else documents
        yield from zip(offsets[order].tolist(), offsets[order + 1].tolist(), [epoch] * n)
        epoch += 1


def best_fit_rows(documents, capacity):
    """Packs documents into rows of `capacity` tokens. Yields (segments, epoch) per row, segments being
    (start, end, bos_first) token ranges: bos_first means a BOS token precedes tokens[start:end].
    Repeatedly places the largest piece that fits; when none does, the shortest is cropped to fill the row and its
    remainder returns to the buffer as a new piece led by BOS, so no token is dropped. A piece longer than a row
    counts as row-sized: it fills an empty row and its remainder goes back, so long documents are never starved.
    With a finite `documents` the last, partial row is not yielded."""
    buffer = []  # sorted (fit, seq, start, end, bos_first); fit = min(length, capacity), seq breaks ties in order
    seq, epoch, exhausted = 0, 1, False
    while True:
        segments, room = [], capacity
        while room:
            while len(buffer) < PACKING_BUFFER and not exhausted:
                try:
                    start, end, epoch = next(documents)
                except StopIteration:
                    exhausted = True
                    break
                insort(buffer, (min(end - start, capacity), seq, start, end, False))
                seq += 1
            if not buffer:
                return
            i = bisect_right(buffer, (room, math.inf)) - 1  # the largest piece that fits
            _, _, start, end, bos_first = buffer.pop(max(i, 0))  # none fits: crop the shortest
            size = end - start + bos_first
            take = min(size, room)
            segments.append((start, start + take - bos_first, bos_first))
            if take < size:
                rest = start + take - bos_first
                insort(buffer, (min(end - rest + 1, capacity), seq, rest, end, True))
                seq += 1
            room -= take
        yield segments, epoch


def fill_row(row, segments, tokens, bos):
    pos = 0
    for start, end, bos_first in segments:
        if bos_first:
            row[pos] = bos
            pos += 1
        row[pos:pos + end - start] = tokens[start:end]
        pos += end - start


def default_device():
    import torch
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def make_dataloader(tokenizer, B, T, split, device=None, seed=0):
    """Infinite iterator of (inputs, targets, epoch): LongTensors [B, T] on `device`, targets = inputs shifted by
    one. Rows are best-fit packed documents (see best_fit_rows); train documents are shuffled per epoch from
    `seed`, val documents come in file order, all but the held-out slice's. Deterministic for a given seed."""
    import torch
    tokens, offsets = load_token_split(tokenizer.directory, split)
    device = torch.device(device) if device is not None else default_device()
    bos = tokenizer.get_bos_token_id()
    documents = None
    if split == "val":
        documents = np.setdiff1d(np.arange(len(offsets) - 1), heldout_documents(tokenizer.directory))
    rows = best_fit_rows(document_stream(offsets, shuffle=split == "train", seed=seed, documents=documents), T + 1)
    batch = np.empty((B, T + 1), dtype=np.int64)
    if device.type == "cuda":
        # two pinned staging buffers, so that filling one never races the asynchronous copy from the other; each
        # copy lands in a fresh device tensor, ordered with the model's kernels on the same stream
        staging = [torch.empty((2, B, T), dtype=torch.long, pin_memory=True) for _ in range(2)]
        copied = [torch.cuda.Event(), torch.cuda.Event()]  # waiting on a never-recorded event returns at once
    for step in itertools.count():
        for b in range(B):
            segments, epoch = next(rows)
            fill_row(batch[b], segments, tokens, bos)
        if device.type == "cuda":
            k = step % 2
            copied[k].synchronize()  # the copy out of this buffer two steps ago has finished
            host = staging[k].numpy()
            host[0], host[1] = batch[:, :-1], batch[:, 1:]
            on_device = staging[k].to(device, non_blocking=True)
            copied[k].record(torch.cuda.current_stream(device))
            yield on_device[0], on_device[1], epoch
        else:  # fresh contiguous copies, as the batch array is refilled for the next step
            inputs, targets = torch.from_numpy(batch[:, :-1].copy()), torch.from_numpy(batch[:, 1:].copy())
            yield inputs.to(device), targets.to(device), epoch

# ---------------------------------------------------------------------------
# Evaluation: bits per byte on EVAL_TOKENS tokens of pinned validation data


def eval_rows(directory, T, n_rows, bos):
    """The validation rows (n_rows x (T+1) tokens), packed like training rows from val documents in file order.
    The same rows whatever the batch size; wraps around the val split (with a warning) when it is too small."""
    tokens, offsets = load_token_split(directory, "val")
    # packing places every token it reads (a crop adds a BOS, never drops one): n_rows * (T+1) tokens fill the rows
    passes = math.ceil(n_rows * (T + 1) / len(tokens))
    if passes > 1:
        print(f"warning: the val split has {len(tokens):,} tokens, fewer than the {n_rows * (T + 1):,} that "
              f"{n_rows:,} evaluation rows read: evaluation wraps around it", file=sys.stderr)
    rows = best_fit_rows(document_stream(offsets, shuffle=False, seed=0, epochs=passes), T + 1)
    out = np.empty((n_rows, T + 1), dtype=tokens.dtype)
    for r in range(n_rows):
        fill_row(out[r], next(rows)[0], tokens, bos)
    return out


def evaluate_bpb(model, tokenizer, batch_size):
    """Bits per byte: the summed cross-entropy (nats) of target tokens that have bytes, over ln 2 times their
    byte count, on EVAL_TOKENS // MAX_SEQ_LEN rows of MAX_SEQ_LEN targets. Uses the model's device.
    model(x, y, reduction='none') must return per-token losses in nats, [B*T] or [B, T]."""
    rows = eval_rows(tokenizer.directory, MAX_SEQ_LEN, EVAL_TOKENS // MAX_SEQ_LEN, tokenizer.get_bos_token_id())
    return bits_per_byte(model, rows, tokenizer.directory, batch_size)


def bits_per_byte(model, rows, directory, batch_size):
    """evaluate_bpb's metric on the given rows (n x (T+1) tokens, as eval_rows returns them)."""
    import torch
    device = next(itertools.chain(model.parameters(), model.buffers())).device
    token_bytes = get_token_bytes(device, directory)
    row_nats, total_bytes = [], torch.zeros((), dtype=torch.int64, device=device)
    start = last_line = time.time()
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            if time.time() - last_line >= EVAL_PROGRESS_SECONDS:  # on stderr: stdout may be a summary block
                last_line = time.time()
                print(f"eval: {i / len(rows):.0%} of {len(rows):,} rows, {last_line - start:.0f}s", file=sys.stderr,
                      flush=True)
            chunk = torch.from_numpy(rows[i:i + batch_size].astype(np.int64)).to(device)
            x, y = chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()
            loss = model(x, y, reduction="none").reshape(y.shape).float()
            nbytes = token_bytes[y]
            # rows summed in float64 on the CPU (MPS has no float64), one row at a time whatever the batch
            row_nats.append(torch.where(nbytes > 0, loss, 0.0).cpu().double().sum(dim=1))
            total_bytes += nbytes.sum()
    # fsum over per-row sums: the total does not depend on how rows were grouped into batches
    return math.fsum(torch.cat(row_nats).tolist()) / (math.log(2) * total_bytes.item())

# ---------------------------------------------------------------------------
# The held-out slice: val documents that no pinned row reads and make_dataloader never hands out, which the
# harness's evaluator also scores. A model that learned the pinned rows themselves (trained on val) does much
# better on them than on these; one that learned the text does about as well on both.


@functools.lru_cache(maxsize=8)
def heldout_documents(directory):
    """Indices of the held-out val documents, in file order: the last documents no pinned evaluation row
    touches, up to HELDOUT_TOKENS tokens. Empty when the val split is too small to spare any."""
    tokens, offsets = load_token_split(directory, "val")
    n_rows, capacity = EVAL_TOKENS // MAX_SEQ_LEN, MAX_SEQ_LEN + 1
    if n_rows * capacity >= len(tokens):  # evaluation reads the whole split (or wraps around it)
        return np.zeros(0, dtype=np.int64)
    touched = np.zeros(len(offsets) - 1, dtype=bool)
    rows = best_fit_rows(document_stream(offsets, shuffle=False, seed=0, epochs=1), capacity)
    for segments, _ in itertools.islice(rows, n_rows):  # the pinned rows, as eval_rows packs them
        starts = [start for start, _, _ in segments]
        touched[np.searchsorted(offsets, starts, side="right") - 1] = True
    spare = np.flatnonzero(~touched)
    sizes = offsets[spare + 1] - offsets[spare]
    keep = np.cumsum(sizes[::-1]) <= HELDOUT_TOKENS
    chosen = spare[::-1][keep][::-1]
    return chosen if sizes[::-1][keep].sum() >= 2 * capacity else np.zeros(0, dtype=np.int64)


def heldout_rows(directory, bos):
    """The held-out slice packed into rows like eval_rows' (n x (MAX_SEQ_LEN+1) tokens; n may be 0)."""
    tokens, offsets = load_token_split(directory, "val")
    documents = heldout_documents(directory)
    rows = best_fit_rows(document_stream(offsets, shuffle=False, seed=0, epochs=1, documents=documents),
                         MAX_SEQ_LEN + 1)
    packed = [segments for segments, _ in rows]  # the last, partial row is not yielded
    out = np.empty((len(packed), MAX_SEQ_LEN + 1), dtype=tokens.dtype)
    for r, segments in enumerate(packed):
        fill_row(out[r], segments, tokens, bos)
    return out


def synthetic_heldout_rows(tokenizer, seed):
    """The held-out slice for the synthetic dataset, whose val text a run can make again without opening a file
    (its generator and seed are in the repository) and so learn both the pinned rows and the file's held-out
    slice: text of the same kind from a seed the evaluator draws after the run, packed as heldout_rows packs."""
    n_rows, capacity = SYNTHETIC_HELDOUT_TOKENS // (MAX_SEQ_LEN + 1), MAX_SEQ_LEN + 1
    stream, docs = synthetic.synthetic_stream(seed), []
    while sum(map(len, docs)) < (n_rows + 1) * capacity:  # packing drops no token; only a partial last row
        docs += tokenizer.encode(list(itertools.islice(stream, 64)), prepend=tokenizer.get_bos_token_id())
    tokens = np.fromiter(itertools.chain.from_iterable(docs), np.int64)
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
    rows = best_fit_rows(document_stream(offsets, shuffle=False, seed=0, epochs=1), capacity)
    out = np.empty((n_rows, capacity), dtype=np.int64)
    for r, (segments, _) in zip(range(n_rows), rows):
        fill_row(out[r], segments, tokens, tokenizer.get_bos_token_id())
    return out

# ---------------------------------------------------------------------------
# Readiness: what stops a training run, each problem ending with the command that fixes it


def check_ready():
    if DATASET is None:
        return [f"No dataset is prepared for the '{PROFILE}' profile in {CACHE_DIR} (offline? add --dataset "
                f"synthetic or --source PATH); run: {prepare_command(None)}"]
    directory = prepared_dir(DATASET)
    fix = prepare_command(DATASET)
    if not (directory / "meta.json").exists():
        return [f"Dataset '{DATASET}' is not prepared for the '{PROFILE}' profile (no complete {directory}); "
                f"run: {fix}"]
    needed = {"tokenizer.pkl": "tokenizer", "token_bytes.npy": "token byte lengths", "train.bin": "train tokens",
              "train.offsets.npy": "train document offsets", "val.bin": "val tokens",
              "val.offsets.npy": "val document offsets"}
    return [f"The {what} of '{DATASET}' for the '{PROFILE}' profile is missing ({directory / filename}); run: {fix}"
            for filename, what in needed.items() if not (directory / filename).exists()]

# ---------------------------------------------------------------------------
# CLI


def main():
    parser = argparse.ArgumentParser(
        description="Prepare data, tokenizer and token files for autoresearch (profile from AUTORESEARCH_PROFILE: "
                    "reference, cpu or smoke; cache in AUTORESEARCH_CACHE_DIR, default ~/.cache/autoresearch).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="profiles (AUTORESEARCH_PROFILE; unset: reference with CUDA, else cpu):\n" + "".join(
            f"  {name:<10}  context {p[0]}, eval {p[2]:,} tokens, vocab {p[3]}; tokenizer trained on <= {p[4] / 1e6:g}M "
            f"chars, <= {p[5] / 1e6:g}M train tokens kept\n" for name, p in PROFILES.items())
        + """\ndatasets:
  climbmix    karpathy/climbmix-400b-shuffle from Hugging Face: --num-shards train shards + the pinned
              validation shard shard_06542. Honours HF_ENDPOINT (mirrors) and HF_TOKEN. Resumable.
  synthetic   generated offline in seconds: stories with consistent characters, towns, counting and
              arithmetic; separate seeds for train and val.
  --source    your own files: a folder (searched recursively), a file, or a glob of
                .parquet  one document per row, string column 'text'
                .jsonl    one JSON object per line with a string field "text"
                .txt      split at blank lines into paragraphs, merged into ~4,000-character documents
              Split: with 2 or more files the last one in sorted order is validation; with a single file
              its last 10% of documents (at least 1). The dataset is named after the path.
Each run records the prepared dataset as the active one for the profile (AUTORESEARCH_DATASET overrides).""")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--dataset", choices=["climbmix", "synthetic"], default="climbmix",
                       help="dataset to prepare (default climbmix)")
    which.add_argument("--source", metavar="PATH", help="prepare local files instead (see below)")
    all_shards = download.CLIMBMIX_TRAIN_SHARDS
    parser.add_argument("--num-shards", type=int, default=10,
                        help=f"climbmix train shards to download (default 10, -1 = all {all_shards})")
    parser.add_argument("--download-workers", type=int, default=8, help="parallel downloads (default 8)")
    args = parser.parse_args()

    start = time.time()
    print(f"profile: {PROFILE} (MAX_SEQ_LEN {MAX_SEQ_LEN}, EVAL_TOKENS {EVAL_TOKENS:,}, VOCAB_SIZE {VOCAB_SIZE}); "
          f"cache: {CACHE_DIR}")
    if args.source:
        name = sources.source_name(args.source)
        manifest = sources.import_source(args.source, name, dataset_dir(name), CACHE_DIR)
    elif args.dataset == "synthetic":
        name, manifest = "synthetic", synthetic.make_synthetic(dataset_dir("synthetic"))
    else:
        name = "climbmix"
        manifest = download.download_climbmix(dataset_dir(name), args.num_shards, args.download_workers)
    data_seconds = time.time() - start
    meta = build_tokenizer_and_tokens(name, manifest, dataset_dir(name), prepared_dir(name), profile=PROFILE,
                                      vocab_size=VOCAB_SIZE, max_chars=TOKENIZER_MAX_CHARS,
                                      max_tokens={"train": TRAIN_MAX_TOKENS, "val": 2 * EVAL_TOKENS})
    seal_metric_files(prepared_dir(name))  # hashes and read-only copies: the evaluator restores damaged files
    active_file(PROFILE).parent.mkdir(parents=True, exist_ok=True)
    active_file(PROFILE).write_text(name + "\n")

    directory = prepared_dir(name)
    print(f"\nprepared '{name}' for the '{PROFILE}' profile in {time.time() - start:.1f}s")
    print(f"  data:      {dataset_dir(name)} ({len(manifest['train'])} train + {len(manifest['val'])} val shards; "
          f"{manifest['split']}) [{data_seconds:.1f}s]")
    print(f"  tokenizer: {directory / 'tokenizer.pkl'} (vocab {meta['vocab_size']}, "
          f"{meta['tokenizer_chars'] / 1e6:.1f}M characters) [{meta['tokenizer_seconds']:.1f}s]")
    print(f"  tokens:    train {meta['train_tokens']:,} in {meta['train_documents']:,} documents, "
          f"val {meta['val_tokens']:,} in {meta['val_documents']:,} documents ({meta['dtype']}) "
          f"[{meta['tokenize_seconds']:.1f}s]")
    if meta["val_tokens"] < EVAL_TOKENS // MAX_SEQ_LEN * (MAX_SEQ_LEN + 1):
        print(f"  note: val has fewer tokens than evaluation reads ({EVAL_TOKENS:,} targets): it wraps around them")
    passes = TOKENS_PER_RUN.get(PROFILE, 0) / max(1, meta["train_tokens"])
    if passes > 4:
        print(f"  note: a '{PROFILE}' run reads ~{TOKENS_PER_RUN[PROFILE] / 1e6:,.0f}M tokens, {passes:.0f} times this "
              f"train split: val_bpb would measure memorisation more than learning; prepare more text")
    print(f"  active dataset for '{PROFILE}': {name} (recorded in {active_file(PROFILE)})")
    print(f"next: AUTORESEARCH_PROFILE={PROFILE} uv run train.py")


if __name__ == "__main__":
    main()
