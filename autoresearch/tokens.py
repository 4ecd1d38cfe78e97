"""
Tokenizer training and pre-tokenizing, the slow steps of prepare.py. A BPE tokenizer is trained with rustbpe
on the train split (saved as a pickled tiktoken encoding, with the byte length of every token), then every
document is encoded once, BOS first, into <split>.bin + <split>.offsets.npy, which prepare.py's dataloader packs
into rows. The build is skipped while the fingerprint of its settings and of the shards is unchanged.
"""

import hashlib
import itertools
import json
import os
import pickle
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow.parquet as pq
import rustbpe
import tiktoken

from autoresearch.cachefiles import FORMAT_VERSION, Progress, rebuilding, write_json

SPECIAL_TOKENS = ["<|bos|>", "<|reserved_1|>", "<|reserved_2|>", "<|reserved_3|>"]  # first one is BOS
# GPT-4's split pattern, except numbers split into groups of at most 2 digits (saves vocab for a small tokenizer)
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
TOKENIZER_DOC_CHARS = 10_000  # longer documents are truncated for tokenizer training only: they add little variety

# ---------------------------------------------------------------------------
# Tokenizer: BPE trained with rustbpe on the train split, saved as a tiktoken encoding


def iter_texts(folder, files, batch_size=1024):
    """Batches of document texts from parquet shards, in order."""
    for filename in files:
        for batch in pq.ParquetFile(folder / filename).iter_batches(batch_size=batch_size, columns=["text"]):
            if texts := [t for t in batch.column(0).to_pylist() if t]:
                yield texts


def train_tokenizer(folder, files, vocab_size, max_chars):
    """Returns the tiktoken Encoding and what the training took (chars, seconds)."""
    progress, start, seen = Progress(every=10), time.time(), 0

    def texts():
        nonlocal seen
        for batch in iter_texts(folder, files):
            for text in batch:
                text = text[:min(TOKENIZER_DOC_CHARS, max_chars - seen)]
                seen += len(text)
                yield text
                if seen >= max_chars:
                    break
            progress.show(f"tokenizer: read {seen / 1e6:.1f}M of at most {max_chars / 1e6:.0f}M characters, "
                          f"{time.time() - start:.1f}s")
            if seen >= max_chars:
                break
        progress.show(f"tokenizer: read {seen / 1e6:.1f}M characters; computing merges", final=True)

    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(texts(), vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    ranks = {bytes(token): rank for token, rank in bpe.get_mergeable_ranks()}
    specials = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
    enc = tiktoken.Encoding(name="autoresearch", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks,
                            special_tokens=specials)
    if enc.n_vocab < vocab_size:
        print(f"note: the training text only supports {enc.n_vocab} of {vocab_size} tokens (too few distinct pairs)")
    check_round_trip(enc)
    return enc, seen, time.time() - start


def check_round_trip(enc):
    sample = "Hello, wörld! naïve café — 東京タワー 🚀👩‍💻 x=42; def f(a): return a**2  \n\tÅngström ∑ 1234"
    decoded = enc.decode(enc.encode_ordinary(sample))
    if decoded != sample:
        raise RuntimeError(f"tokenizer round trip failed: {sample!r} came back as {decoded!r}")


def token_byte_lengths(enc):
    n_ranks = enc.n_vocab - len(SPECIAL_TOKENS)  # the special tokens come last and count 0 bytes
    return np.array([len(enc.decode_single_token_bytes(i)) for i in range(n_ranks)] + [0] * len(SPECIAL_TOKENS),
                    dtype=np.int32)

# ---------------------------------------------------------------------------
# Pre-tokenization: every document once, BOS first, into <split>.bin (uint16 tokens) + <split>.offsets.npy


def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def write_token_split(directory, split, batches, dtype):
    """Writes batches (lists of token lists, each beginning with BOS) as one token file plus document offsets."""
    lengths = []
    with open(directory / f"{split}.bin", "wb") as f:
        for docs in batches:
            lens = np.fromiter(map(len, docs), np.int64, len(docs))
            f.write(np.fromiter(itertools.chain.from_iterable(docs), dtype, int(lens.sum())).tobytes())
            lengths.append(lens)
    offsets = np.concatenate([[0], np.cumsum(np.concatenate(lengths))]) if lengths else np.zeros(1, np.int64)
    np.save(directory / f"{split}.offsets.npy", offsets.astype(np.int64))
    return len(offsets) - 1, int(offsets[-1])


def tokenize_batches(enc, folder, files, label, max_tokens, profile, pool, threads):
    """Encodes the documents of `files` in order, in parallel chunks, until max_tokens: yields lists of token
    lists with BOS first."""
    bos = enc.encode_single_token(SPECIAL_TOKENS[0])
    progress, start, docs, tokens = Progress(), time.time(), 0, 0

    def encode(texts):
        return [[bos] + enc.encode_ordinary(t) for t in texts]

    for texts in iter_texts(folder, files, batch_size=512):
        step = -(-len(texts) // threads)
        batch = [ids for chunk in pool.map(encode, [texts[i:i + step] for i in range(0, len(texts), step)])
                 for ids in chunk]
        ends = np.cumsum([len(ids) for ids in batch]) + tokens
        capped = ends[-1] >= max_tokens
        if capped:  # keep documents until the cap is reached
            batch = batch[:int(np.searchsorted(ends, max_tokens)) + 1]
        yield batch
        docs += len(batch)
        tokens = int(ends[len(batch) - 1])
        progress.show(f"tokenize {label}: {docs:,} documents, {tokens / 1e6:.1f}M tokens, "
                      f"{tokens / 1e6 / max(time.time() - start, 1e-6):.1f}M tokens/s")
        if capped:
            print(f"tokenize {label}: stopped at the {profile} profile's cap of {max_tokens / 1e6:.1f}M tokens")
            break
    progress.show(f"tokenize {label}: {docs:,} documents, {tokens / 1e6:.1f}M tokens in {time.time() - start:.1f}s",
                  final=True)


def tokenize_split(enc, folder, files, directory, split, max_tokens, profile, pool, threads):
    batches = tokenize_batches(enc, folder, files, split, max_tokens, profile, pool, threads)
    return write_token_split(directory, split, batches, token_dtype(enc.n_vocab))

# ---------------------------------------------------------------------------
# The build: tokenizer, token byte lengths and both token splits into a fresh prepared folder, meta.json last


def build_tokenizer_and_tokens(name, manifest, folder, final, *, profile, vocab_size, max_chars, max_tokens):
    """Trains the tokenizer on the shards of dataset `name` in `folder` and writes it with the token files
    into `final`, the prepared folder of (dataset, profile); skipped when `final` is already up to date.
    max_chars caps the tokenizer's training text, max_tokens = {"train": cap, "val": cap} the tokens kept per
    split. Returns the contents of meta.json."""
    settings = {"format": FORMAT_VERSION, "vocab_size": vocab_size, "max_chars": max_chars,
                "max_tokens": [max_tokens["train"], max_tokens["val"]],
                "pattern": SPLIT_PATTERN, "specials": SPECIAL_TOKENS, "train": manifest["train"],
                "val": manifest["val"], "sha256": {k: v["sha256"] for k, v in sorted(manifest["shards"].items())}}
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    if (final / "meta.json").exists():
        meta = json.loads((final / "meta.json").read_text())
        if meta.get("fingerprint") == fingerprint:
            print(f"tokenizer and tokens for '{name}' / '{profile}' are up to date in {final}")
            return meta
    with rebuilding(final) as work:
        enc, chars, seconds = train_tokenizer(folder, manifest["train"], vocab_size, max_chars)
        print(f"tokenizer: vocab {enc.n_vocab} trained on {chars / 1e6:.1f}M characters in {seconds:.1f}s "
              f"({chars / 1e6 / max(seconds, 1e-6):.1f}M chars/s)")
        with open(work / "tokenizer.pkl", "wb") as f:
            pickle.dump(enc, f)
        np.save(work / "token_bytes.npy", token_byte_lengths(enc))
        start, threads = time.time(), os.cpu_count() or 1
        with ThreadPoolExecutor(threads) as pool:
            counts = {split: tokenize_split(enc, folder, manifest[split], work, split, max_tokens[split],
                                            profile, pool, threads)
                      for split in ("train", "val")}
        meta = {"dataset": name, "profile": profile, "fingerprint": fingerprint,
                "dtype": np.dtype(token_dtype(enc.n_vocab)).name,
                "vocab_size": enc.n_vocab, "tokenizer_chars": chars, "tokenizer_seconds": round(seconds, 2),
                "tokenize_seconds": round(time.time() - start, 2),
                **{f"{split}_documents": n for split, (n, _) in counts.items()},
                **{f"{split}_tokens": t for split, (_, t) in counts.items()}}
        write_json(work / "meta.json", meta)  # written last: its presence means the folder is complete
    return meta
