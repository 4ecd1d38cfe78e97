"""prepare.py: downloads from a real loopback Hugging Face server, local sources, the synthetic corpus, the
tokenizer, the dataloader's packing invariants and evaluate_bpb. Offline, with tiny data."""

import hashlib
import io
import json
import math
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("AUTORESEARCH_PROFILE", "smoke")  # importing prepare reads it; tests pass directories explicitly
import prepare  # noqa: E402
from autoresearch import download, sources, synthetic  # noqa: E402
from autoresearch.tokens import write_token_split  # noqa: E402

HF_PREFIX = "/datasets/karpathy/climbmix-400b-shuffle/resolve/main/"
SYLLABLES = "ka lo mi ra to su ne pa di vo la be ri mo ta fi no se gu ha".split()
WORDS = ["".join(random.Random(i).choices(SYLLABLES, k=1 + i % 3)) for i in range(400)]


# ---------------------------------------------------------------------------
# helpers

def run_prepare(*args, cache, profile="smoke", timeout=300, **env):
    full_env = {**os.environ, "AUTORESEARCH_CACHE_DIR": str(cache), "AUTORESEARCH_PROFILE": profile, **env}
    full_env.pop("AUTORESEARCH_DATASET", None)
    result = subprocess.run([sys.executable, "prepare.py", *args], cwd=REPO, env=full_env, capture_output=True,
                            text=True, timeout=timeout)
    result.output = result.stdout + result.stderr
    return result


def documents(seed, n):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 120))) + "." for _ in range(n)]


def parquet_bytes(texts, compression="zstd"):
    buffer = io.BytesIO()
    pq.write_table(pa.table({"text": texts}), buffer, compression=compression)
    return buffer.getvalue()


def sha256(data):
    return hashlib.sha256(data).hexdigest()


class Hub(ThreadingHTTPServer):
    """A loopback Hugging Face: serves `files` under the HF URL layout, with scripted misbehaviour per file.
    script[name] is a list of actions for its next requests: an HTTP status, "truncate" (a valid response
    holding half the file), ("stall", n) (send n bytes, then hang until `release` is set), ("drop", n) (send n
    bytes, then close the connection) or "misrange" (answer any request with the whole file as a 206 whose
    Content-Range says it starts at byte 0)."""
    daemon_threads = True

    def __init__(self, files):
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.files, self.script, self.log = files, {}, []
        self.lock, self.release = threading.Lock(), threading.Event()
        self.delay, self.inflight, self.max_inflight = 0.0, 0, 0
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def requests_for(self, name):
        return [entry for entry in self.log if entry["name"] == name]


class HubHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        hub = self.server
        name = self.path[len(HF_PREFIX):] if self.path.startswith(HF_PREFIX) else self.path
        with hub.lock:
            hub.log.append({"name": name, "range": self.headers.get("Range"),
                            "auth": self.headers.get("Authorization")})
            action = hub.script[name].pop(0) if hub.script.get(name) else None
            hub.inflight += 1
            hub.max_inflight = max(hub.max_inflight, hub.inflight)
        try:
            time.sleep(hub.delay)
            if isinstance(action, int):
                return self.send_error(action)
            if name not in hub.files:
                return self.send_error(404)
            body = hub.files[name][:len(hub.files[name]) // 2] if action == "truncate" else hub.files[name]
            start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
            if action == "misrange":
                start = 0
                self.send_response(206)
                self.send_header("Content-Range", f"bytes 0-{len(body) - 1}/{len(body)}")
            elif start >= len(body) > 0:
                return self.send_error(416)  # like Hugging Face's CDN: nothing left after those bytes
            else:
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            if isinstance(action, tuple):
                self.wfile.write(body[start:start + action[1]])
                self.wfile.flush()
                if action[0] == "stall":
                    hub.release.wait(60)
                self.close_connection = True  # the client sees the connection end short of Content-Length
                return
            self.wfile.write(body[start:])
        finally:
            with hub.lock:
                hub.inflight -= 1


@pytest.fixture
def hub():
    files = {f"shard_{i:05d}.parquet": parquet_bytes(documents(i, 150)) for i in (0, 1, 2, 6542)}
    server = Hub(files)
    yield server
    server.release.set()
    server.shutdown()


def climbmix_dir(cache):
    return Path(cache) / "datasets" / "climbmix"


def assert_shards_match(cache, hub, names):
    manifest = json.loads((climbmix_dir(cache) / "manifest.json").read_text())
    for name in names:
        assert sha256((climbmix_dir(cache) / name).read_bytes()) == sha256(hub.files[name])
        assert manifest["shards"][name]["sha256"] == sha256(hub.files[name])
    return manifest


# ---------------------------------------------------------------------------
# climbmix download through HF_ENDPOINT

def test_download_fetches_train_and_pinned_val_shards_in_parallel_with_token(hub, tmp_path):
    hub.delay = 0.3  # slow answers, so that parallel workers overlap
    # rows without text (more than one read batch of them) are skipped
    hub.files["shard_00001.parquet"] = parquet_bytes([""] * 600 + documents(1, 150))
    r = run_prepare("--num-shards", "2", "--download-workers", "2", cache=tmp_path, HF_ENDPOINT=hub.url,
                    HF_TOKEN="hf_test")
    assert r.returncode == 0, r.output
    manifest = assert_shards_match(tmp_path, hub, ["shard_00000.parquet", "shard_00001.parquet",
                                                   "shard_06542.parquet"])
    assert manifest["train"] == ["shard_00000.parquet", "shard_00001.parquet"]
    assert manifest["val"] == ["shard_06542.parquet"]
    assert hub.max_inflight == 2  # three shards, two workers: parallel, and no more than asked
    assert all(entry["auth"] == "Bearer hf_test" for entry in hub.log)
    assert not list(climbmix_dir(tmp_path).glob("*.tmp"))
    assert (tmp_path / "prepared" / "climbmix" / "smoke" / "meta.json").exists()
    assert (tmp_path / "prepared" / "active-smoke.txt").read_text().strip() == "climbmix"
    again = run_prepare("--num-shards", "2", cache=tmp_path, HF_ENDPOINT=hub.url)
    assert again.returncode == 0 and len(hub.log) == 3, again.output  # nothing fetched twice


def test_server_errors_are_retried_until_the_shard_arrives(hub, tmp_path):
    hub.script["shard_00001.parquet"] = [500, 500]
    r = run_prepare("--num-shards", "2", cache=tmp_path, HF_ENDPOINT=hub.url)
    assert r.returncode == 0, r.output
    assert len(hub.requests_for("shard_00001.parquet")) == 3
    assert "HTTP 500" in r.output
    assert_shards_match(tmp_path, hub, ["shard_00001.parquet"])


def test_too_many_requests_is_retried_like_a_server_error(hub, tmp_path):
    hub.script["shard_00000.parquet"] = [429]
    r = run_prepare("--num-shards", "1", cache=tmp_path, HF_ENDPOINT=hub.url)
    assert r.returncode == 0, r.output
    assert len(hub.requests_for("shard_00000.parquet")) == 2
    assert "HTTP 429" in r.output
    assert_shards_match(tmp_path, hub, ["shard_00000.parquet"])


def test_failing_shard_is_given_up_after_the_attempts_saying_how_to_resume(hub, tmp_path, monkeypatch):
    # in-process, to shorten the backoff: the full schedule would make this test wait for seconds
    monkeypatch.setattr(download, "BACKOFF_SECONDS", 0.01)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    hub.script["shard_00000.parquet"] = [500] * 100  # always
    with pytest.raises(SystemExit) as failure:
        download.download_climbmix(climbmix_dir(tmp_path), 1, 2)
    message = str(failure.value.code)  # what prepare prints as it exits with status 1
    assert f"Could not download shard_00000.parquet from {hub.url}{HF_PREFIX}shard_00000.parquet" in message
    assert f"after {download.DOWNLOAD_ATTEMPTS} attempts (last error: HTTP 500)" in message
    assert message.endswith("Run the same command again to resume.")
    assert len(hub.requests_for("shard_00000.parquet")) == download.DOWNLOAD_ATTEMPTS


@pytest.mark.parametrize("status", [401, 403])
def test_access_denied_fails_at_once_asking_for_a_token(hub, tmp_path, status):
    hub.script["shard_00000.parquet"] = [status]  # only the first answer: a retry would succeed
    r = run_prepare("--num-shards", "1", cache=tmp_path, HF_ENDPOINT=hub.url, HF_TOKEN="hf_expired")
    assert r.returncode != 0
    assert f"access denied (HTTP {status})" in r.output and "HF_TOKEN=hf_" in r.output
    assert "Traceback" not in r.output
    assert len(hub.requests_for("shard_00000.parquet")) == 1


def test_connection_dropped_mid_shard_resumes_from_the_bytes_received_in_the_same_run(hub, tmp_path):
    name = "shard_00000.parquet"
    hub.files[name] = parquet_bytes(documents(100, 2500), compression="none")  # several read chunks long
    hub.script[name] = [("drop", 300_000)]
    r = run_prepare("--num-shards", "1", cache=tmp_path, HF_ENDPOINT=hub.url)
    assert r.returncode == 0, r.output
    first, second = hub.requests_for(name)
    assert first["range"] is None
    resumed_at = int(re.fullmatch(r"bytes=(\d+)-", second["range"]).group(1))
    assert 0 < resumed_at <= 300_000
    assert_shards_match(tmp_path, hub, [name])


def test_resume_answered_at_another_offset_discards_the_partial_file_and_starts_over(hub, tmp_path):
    name = "shard_00000.parquet"
    folder = climbmix_dir(tmp_path)
    folder.mkdir(parents=True)
    (folder / (name + ".tmp")).write_bytes(hub.files[name][:1000])  # left by an interrupted run
    hub.script[name] = ["misrange"]  # the whole file, said to start at byte 0: appended, it would corrupt
    r = run_prepare("--num-shards", "1", cache=tmp_path, HF_ENDPOINT=hub.url)
    assert r.returncode == 0, r.output
    assert [entry["range"] for entry in hub.requests_for(name)] == ["bytes=1000-", None]
    assert "wrong offset" in r.output
    assert_shards_match(tmp_path, hub, [name])


def test_truncated_shard_is_deleted_and_fetched_again(hub, tmp_path):
    hub.script["shard_00000.parquet"] = ["truncate"]  # a complete response holding half a parquet file
    folder = climbmix_dir(tmp_path)
    folder.mkdir(parents=True)
    (folder / "shard_00001.parquet").write_bytes(hub.files["shard_00001.parquet"][:1000])  # left by a crash
    r = run_prepare("--num-shards", "2", cache=tmp_path, HF_ENDPOINT=hub.url)
    assert r.returncode == 0, r.output
    assert len(hub.requests_for("shard_00000.parquet")) == 2
    assert len(hub.requests_for("shard_00001.parquet")) == 1
    assert "corrupt" in r.output
    assert_shards_match(tmp_path, hub, ["shard_00000.parquet", "shard_00001.parquet"])


def test_killed_download_resumes_from_its_partial_bytes(hub, tmp_path):
    name = "shard_00000.parquet"
    hub.files[name] = parquet_bytes(documents(100, 2500), compression="none")  # big enough to be caught mid-way
    hub.script[name] = [("stall", 200_000)]
    env = {**os.environ, "AUTORESEARCH_CACHE_DIR": str(tmp_path), "AUTORESEARCH_PROFILE": "smoke",
           "HF_ENDPOINT": hub.url}
    proc = subprocess.Popen([sys.executable, "prepare.py", "--num-shards", "1"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tmp = climbmix_dir(tmp_path) / (name + ".tmp")
    deadline = time.time() + 60
    while not (tmp.exists() and tmp.stat().st_size >= 65536) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    hub.release.set()
    partial = tmp.stat().st_size
    assert 0 < partial < len(hub.files[name])
    r = run_prepare("--num-shards", "1", cache=tmp_path, HF_ENDPOINT=hub.url)
    assert r.returncode == 0, r.output
    assert hub.requests_for(name)[-1]["range"] == f"bytes={partial}-"
    assert_shards_match(tmp_path, hub, [name])


def test_complete_download_killed_before_its_rename_is_kept(hub, tmp_path):
    name = "shard_00000.parquet"
    folder = climbmix_dir(tmp_path)
    folder.mkdir(parents=True)
    (folder / (name + ".tmp")).write_bytes(hub.files[name])
    r = run_prepare("--num-shards", "1", cache=tmp_path, HF_ENDPOINT=hub.url)
    assert r.returncode == 0, r.output
    assert [entry["range"] for entry in hub.requests_for(name)] == [f"bytes={len(hub.files[name])}-"]  # a 416
    assert_shards_match(tmp_path, hub, [name])


def test_shard_corrupted_in_place_is_fetched_again_on_the_next_run(hub, tmp_path):
    r = run_prepare("--num-shards", "1", cache=tmp_path, HF_ENDPOINT=hub.url)
    assert r.returncode == 0, r.output
    name = "shard_00000.parquet"
    path = climbmix_dir(tmp_path) / name
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])  # same size, footer intact
    path.write_bytes(bytes(data))
    again = run_prepare("--num-shards", "1", cache=tmp_path, HF_ENDPOINT=hub.url)
    assert again.returncode == 0, again.output
    assert f"{name} in the cache does not match its recorded sha256: fetching it again" in again.output
    assert len(hub.requests_for(name)) == 2 and len(hub.log) == 3  # that shard fetched again, and only that
    assert_shards_match(tmp_path, hub, [name, "shard_06542.parquet"])


def test_missing_shard_fails_once_naming_the_shard_and_url(hub, tmp_path):
    del hub.files["shard_00002.parquet"]
    r = run_prepare("--num-shards", "3", cache=tmp_path, HF_ENDPOINT=hub.url)
    assert r.returncode != 0
    assert "shard_00002.parquet" in r.output and "404" in r.output
    assert f"{hub.url}{HF_PREFIX}shard_00002.parquet" in r.output
    assert len(hub.requests_for("shard_00002.parquet")) == 1


@pytest.mark.parametrize("args, expected", [
    (["--num-shards", "0"], "--num-shards 0: climbmix has 6542 train shards"),
    (["--download-workers", "0"], "--download-workers 0: use at least 1"),
])
def test_bad_download_arguments_fail_before_any_request(hub, tmp_path, args, expected):
    r = run_prepare(*args, cache=tmp_path, HF_ENDPOINT=hub.url)
    assert r.returncode != 0 and expected in r.output and "Traceback" not in r.output
    assert not hub.log


def test_offline_download_fails_quickly_and_offers_source_synthetic_and_mirror(tmp_path):
    with socket.socket() as s:  # a port with nothing listening: connection refused, like a machine offline
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    r = run_prepare(cache=tmp_path, HF_ENDPOINT=f"http://127.0.0.1:{port}", timeout=60)
    assert time.monotonic() - start < 15, r.output  # seconds, not a retry schedule meant for a flaky server
    assert r.returncode != 0
    assert "--source" in r.output and "--dataset synthetic" in r.output and "HF_ENDPOINT" in r.output
    assert "Could not connect" in r.output and "Traceback" not in r.output


# ---------------------------------------------------------------------------
# local sources

def prepared_manifest(cache, name):
    return json.loads((Path(cache) / "datasets" / name / "manifest.json").read_text())


def shard_texts(cache, name, shard):
    return pq.read_table(Path(cache) / "datasets" / name / shard).column("text").to_pylist()


def test_parquet_source_uses_its_last_file_as_validation(tmp_path):
    src = tmp_path / "books"
    src.mkdir()
    val = documents(2, 20) + [" ".join(["quizzaciously"] * 300)]  # a word only validation has, many times
    for i, docs in enumerate((documents(0, 60), documents(1, 50), val)):
        pq.write_table(pa.table({"text": docs, "id": list(range(len(docs)))}), src / f"part{i}.parquet")
    r = run_prepare("--source", str(src), cache=tmp_path / "cache")
    assert r.returncode == 0, r.output
    manifest = prepared_manifest(tmp_path / "cache", "books")
    assert manifest["train"] == ["shard_00000.parquet", "shard_00001.parquet"]
    assert shard_texts(tmp_path / "cache", "books", manifest["val"][0]) == val
    assert "part2.parquet" in manifest["split"] and "part2.parquet" in r.output
    directory = tmp_path / "cache" / "prepared" / "books" / "smoke"
    meta = json.loads((directory / "meta.json").read_text())
    assert meta["train_documents"] == 110 and meta["val_documents"] == 21
    # trained on train only: validation's frequent word did not become a token
    assert len(prepare.Tokenizer.from_directory(directory).encode(" quizzaciously")) > 3


def test_source_folder_holding_the_cache_is_read_but_never_modified(tmp_path):
    src = tmp_path / "notes"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in documents(20 + i, 30)))
    before = {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in src.iterdir()}
    cache = src / ".cache"
    for _ in range(2):  # the second run must not read the cache's own shards as more source files
        r = run_prepare("--source", str(src), cache=cache)
        assert r.returncode == 0, r.output
        meta = json.loads((cache / "prepared" / "notes" / "smoke" / "meta.json").read_text())
        assert meta["train_documents"] == 60 and meta["val_documents"] == 30
    assert {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in before} == before


def test_jsonl_source_reads_the_text_field_of_each_line(tmp_path):
    src = tmp_path / "corpus"
    src.mkdir()
    for i in range(3):
        lines = [json.dumps({"text": t, "meta": i}) for t in documents(10 + i, 30)]
        (src / f"{i}.jsonl").write_text("\n".join(lines[:15]) + "\n\n" + "\n".join(lines[15:]) + "\n")
    r = run_prepare("--source", str(src / "*.jsonl"), cache=tmp_path / "cache")
    assert r.returncode == 0, r.output
    manifest = prepared_manifest(tmp_path / "cache", "corpus")
    assert len(manifest["train"]) == 2
    assert shard_texts(tmp_path / "cache", "corpus", manifest["val"][0]) == documents(12, 30)


def test_a_train_split_that_a_run_would_read_many_times_over_is_named_at_prepare_time(tmp_path):
    # an 11.8M-token corpus, 30 epochs in a reference run on an H200: train loss 0.08, val_bpb 3.07
    (tmp_path / "small.txt").write_text("\n\n".join(" ".join(documents(i, 1)) for i in range(200)) + "\n")
    r = run_prepare("--source", str(tmp_path / "small.txt"), cache=tmp_path / "cache", profile="cpu")
    assert r.returncode == 0, r.output
    note = next(line for line in r.output.splitlines() if "times this train split" in line)
    assert "'cpu' run reads ~3M tokens" in note and "memorisation" in note, r.output


def test_single_txt_file_splits_paragraphs_and_keeps_the_last_tenth_for_validation(tmp_path):
    paragraphs = [" ".join(documents(i, 1)) for i in range(200)]
    (tmp_path / "book.txt").write_text("\n\n".join(paragraphs) + "\n")
    r = run_prepare("--source", str(tmp_path / "book.txt"), cache=tmp_path / "cache")
    assert r.returncode == 0, r.output
    manifest = prepared_manifest(tmp_path / "cache", "book")
    train = shard_texts(tmp_path / "cache", "book", manifest["train"][0])
    val = shard_texts(tmp_path / "cache", "book", manifest["val"][0])
    assert len(val) == max(1, (len(train) + len(val)) // 10)
    assert all(len(doc) <= sources.TXT_DOC_CHARS for doc in train + val)
    assert "\n\n".join(train + val) == "\n\n".join(paragraphs)  # nothing lost, order kept
    assert "last" in manifest["split"]


@pytest.mark.parametrize("case, expected", [
    ("missing", "no such file or folder"),
    ("empty-folder", "no .parquet, .jsonl or .txt files"),
    ("no-text-column", "no 'text' column (columns: body)"),
    ("jsonl-without-text", 'no string field "text"'),
    ("one-document", "at least 2"),
    ("inside-cache", "files in the cache"),
])
def test_bad_source_fails_with_the_problem_and_the_fix(tmp_path, case, expected):
    src = tmp_path / ("cache/datasets/mine" if case == "inside-cache" else "src")
    if case != "missing":
        src.mkdir(parents=True)
    if case == "no-text-column":
        pq.write_table(pa.table({"body": ["a", "b"]}), src / "a.parquet")
    elif case == "jsonl-without-text":
        (src / "a.jsonl").write_text('{"body": "x"}\n')
    elif case in ("one-document", "inside-cache"):
        (src / "a.txt").write_text("just one paragraph")
    r = run_prepare("--source", str(src), cache=tmp_path / "cache")
    assert r.returncode != 0
    assert expected in r.output and "uv run prepare.py" in r.output and "Traceback" not in r.output
    assert not list((tmp_path / "cache").glob("**/*.tmp*"))  # no half-written folder left behind


def test_source_and_dataset_together_are_refused(tmp_path):
    r = run_prepare("--dataset", "synthetic", "--source", str(tmp_path), cache=tmp_path / "cache")
    assert r.returncode != 0 and "not allowed with" in r.output


# ---------------------------------------------------------------------------
# synthetic corpus

def test_synthetic_corpus_is_deterministic_with_a_separate_val_set(smoke_cache):
    assert synthetic.synthetic_documents("val") == synthetic.synthetic_documents("val")
    train = shard_texts(smoke_cache, "synthetic", "shard_00000.parquet")
    val = shard_texts(smoke_cache, "synthetic", "shard_00001.parquet")
    assert train == synthetic.synthetic_documents("train")
    assert not set(train) & set(val)


def test_synthetic_corpus_has_learnable_structure():
    docs = synthetic.synthetic_documents("val")
    words = [w for doc in docs for w in re.findall(r"\w+|[^\w\s]", doc)]
    unigram = Counter(words)
    bigram = Counter(zip(words, words[1:]))
    h_unigram = -sum(c / len(words) * math.log2(c / len(words)) for c in unigram.values())
    h_next = -sum(c / len(words) * math.log2(c / unigram[a]) for (a, _), c in bigram.items())
    assert h_unigram < 0.8 * math.log2(len(unigram))  # far from uniform over its words
    assert h_next < 0.5 * h_unigram  # the previous word says a lot about the next
    sums = re.findall(r"Q: (\d+) \+ (\d+) = \? A: (\d+)", "\n".join(docs))
    assert len(sums) > 100 and all(int(a) + int(b) == int(c) for a, b, c in sums)  # arithmetic is consistent


# ---------------------------------------------------------------------------
# tokenizer

MIXED = "Héllo wörld! 東京タワー 🚀👩‍💻 café naïve\n\tdef f(x): return x**2  # ∑ 12345 ‘quotes’"


def smoke_dir(cache, dataset="synthetic"):
    return Path(cache) / "prepared" / dataset / "smoke"


def test_tokenizer_round_trips_mixed_unicode_and_counts_bytes(smoke_cache):
    tok = prepare.Tokenizer.from_directory(smoke_dir(smoke_cache))
    assert tok.get_vocab_size() == prepare.PROFILES["smoke"][3]
    bos = tok.get_bos_token_id()
    assert bos == tok.get_vocab_size() - len(prepare.SPECIAL_TOKENS)
    ids = tok.encode(MIXED)
    assert tok.decode(ids) == MIXED
    token_bytes = prepare.get_token_bytes("cpu", smoke_dir(smoke_cache))
    assert token_bytes[ids].sum().item() == len(MIXED.encode("utf-8"))
    assert token_bytes[bos].item() == 0
    batch = tok.encode([MIXED, "Once upon a time"], prepend=bos)
    assert batch[0] == [bos] + ids and batch[1][0] == bos
    assert tok.encode("Once upon a time", prepend="<|bos|>") == batch[1]


# ---------------------------------------------------------------------------
# dataloader

def write_split(directory, split, docs):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "meta.json").write_text(json.dumps({"dtype": "uint16"}))
    return write_token_split(directory, split, [docs], np.uint16)


def numbered_documents(bos, n=120, seed=0):
    """Documents whose tokens are distinct increasing ids (from 2000), so any token tells its document and place."""
    rng, next_id, docs = random.Random(seed), 2000, []
    for _ in range(n):
        length = rng.choice([rng.randint(1, 40), rng.randint(40, 200)])
        docs.append([bos] + list(range(next_id, next_id + length)))
        next_id += length
    return docs


def segments_of(row, bos):
    """Splits a row at BOS tokens: the runs of document tokens that follow each BOS."""
    starts = [i for i, t in enumerate(row) if t == bos]
    return [row[a + 1:b] for a, b in zip(starts, starts[1:] + [len(row)])]


def test_rows_start_with_bos_and_hold_contiguous_document_pieces_without_padding(smoke_cache, tmp_path):
    tok = prepare.Tokenizer.from_directory(smoke_dir(smoke_cache))
    bos = tok.get_bos_token_id()
    docs = numbered_documents(bos)
    write_split(tmp_path, "train", docs)
    owner = {t: i for i, doc in enumerate(docs) for t in doc[1:]}
    loader = prepare.make_dataloader(prepare.Tokenizer(tok.enc, tmp_path), 8, 64, "train", device="cpu")
    for _ in range(20):
        x, y, epoch = next(loader)
        assert x.shape == y.shape == (8, 64) and x.dtype == torch.long and epoch >= 1
        assert (x[:, 0] == bos).all()
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row in torch.cat([x, y[:, -1:]], dim=1).tolist():
            for piece in segments_of(row, bos):
                assert all(t in owner for t in piece)  # only document tokens: no padding
                assert piece == list(range(piece[0], piece[0] + len(piece)))[:len(piece)]  # contiguous, in order
                assert len({owner[t] for t in piece}) <= 1  # one document per piece


def test_cropping_returns_remainders_so_no_token_is_lost(smoke_cache):
    bos = 1020
    docs = numbered_documents(bos, n=300, seed=1)
    tokens = np.array([t for doc in docs for t in doc], dtype=np.int64)
    offsets = np.cumsum([0] + [len(doc) for doc in docs])
    capacity = 65
    rows = list(prepare.best_fit_rows(prepare.document_stream(offsets, shuffle=True, seed=0, epochs=1), capacity))
    emitted = []
    for segments, _ in rows:
        row = np.empty(capacity, dtype=np.int64)
        prepare.fill_row(row, segments, tokens, bos)
        assert row[0] == bos
        emitted += [t for t in row.tolist() if t != bos]
    assert len(emitted) == len(set(emitted))  # nothing twice
    total = sum(len(doc) - 1 for doc in docs)
    assert total - len(emitted) < capacity  # all but the final, partial row was used
    seen = set(emitted)
    for doc in docs:  # each document came out as a prefix (the rest was in the unfinished row)
        got = [t for t in doc[1:] if t in seen]
        assert got == doc[1:len(got) + 1]


def test_the_heldout_slice_is_in_no_pinned_row_and_never_handed_out_by_the_val_loader(smoke_cache, tmp_path):
    tok = prepare.Tokenizer.from_directory(smoke_dir(smoke_cache))
    bos, T = tok.get_bos_token_id(), prepare.MAX_SEQ_LEN
    docs = numbered_documents(bos, n=800)  # ~56k tokens: more than the pinned rows read
    write_split(tmp_path, "val", docs)
    held = prepare.heldout_documents(tmp_path)
    held_tokens = {t for i in held for t in docs[i][1:]}
    assert 2 * (T + 1) <= sum(len(docs[i]) for i in held) <= prepare.HELDOUT_TOKENS
    pinned = prepare.eval_rows(tmp_path, T, prepare.EVAL_TOKENS // T, bos)
    assert not held_tokens & set(pinned.flatten().tolist())
    loader = prepare.make_dataloader(prepare.Tokenizer(tok.enc, tmp_path), 64, T, "val", device="cpu")
    seen = set()
    for _ in range(200):  # ~30 passes: best-fit packing leaves short pieces in its buffer for many rows
        x, y, _ = next(loader)
        seen |= set(x.flatten().tolist()) | set(y.flatten().tolist())
    assert not held_tokens & seen
    assert seen | held_tokens | {bos} == {t for doc in docs for t in doc}  # all the rest is handed out
    rows = prepare.heldout_rows(tmp_path, bos)
    assert len(rows) >= 2 and set(rows.flatten().tolist()) <= held_tokens | {bos}


def test_a_val_split_with_nothing_to_spare_has_no_heldout_slice(smoke_cache, tmp_path):
    tok = prepare.Tokenizer.from_directory(smoke_dir(smoke_cache))
    write_split(tmp_path, "val", numbered_documents(tok.get_bos_token_id(), n=120))  # evaluation wraps around it
    assert len(prepare.heldout_documents(tmp_path)) == 0 and len(prepare.heldout_rows(tmp_path, 0)) == 0


def test_the_synthetic_heldout_slice_is_fresh_text_of_the_val_kind_from_the_seed_given(smoke_cache):
    tok = prepare.Tokenizer.from_directory(smoke_dir(smoke_cache))
    rows = prepare.synthetic_heldout_rows(tok, 7)
    assert rows.shape == (prepare.SYNTHETIC_HELDOUT_TOKENS // (prepare.MAX_SEQ_LEN + 1), prepare.MAX_SEQ_LEN + 1)
    assert (prepare.synthetic_heldout_rows(tok, 7) == rows).all()
    assert not (prepare.synthetic_heldout_rows(tok, 8) == rows).all()
    val = prepare.eval_rows(smoke_dir(smoke_cache), prepare.MAX_SEQ_LEN, len(rows), tok.get_bos_token_id())
    text, val_text = tok.decode(rows.flatten().tolist()), tok.decode(val.flatten().tolist())
    assert "Once upon a time" in text and not set(text.split("Once upon a time")[1:]) & set(
        val_text.split("Once upon a time")[1:])  # the same kind of text, none of the val file's stories


def test_same_seed_gives_the_same_batches_and_another_seed_does_not(smoke_cache):
    tok = prepare.Tokenizer.from_directory(smoke_dir(smoke_cache))

    def batches(seed):
        loader = prepare.make_dataloader(tok, 4, 128, "train", device="cpu", seed=seed)
        return [next(loader)[0] for _ in range(3)]

    assert all(torch.equal(a, b) for a, b in zip(batches(0), batches(0)))
    assert not all(torch.equal(a, b) for a, b in zip(batches(0), batches(1)))
    val = prepare.make_dataloader(tok, 4, 128, "val", device="cpu")
    x, y, _ = next(val)
    assert (x[:, 0] == tok.get_bos_token_id()).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_batches_held_by_the_caller_are_not_overwritten_by_later_copies(smoke_cache):
    tok = prepare.Tokenizer.from_directory(smoke_dir(smoke_cache))
    on_gpu = prepare.make_dataloader(tok, 4, 128, "train", device="cuda")
    held = [next(on_gpu) for _ in range(6)]  # three times the two staging buffers
    on_cpu = prepare.make_dataloader(tok, 4, 128, "train", device="cpu")
    for x, y, epoch in held:
        cx, cy, cepoch = next(on_cpu)
        assert x.is_cuda and torch.equal(x.cpu(), cx) and torch.equal(y.cpu(), cy) and epoch == cepoch


def test_empty_split_raises_a_clear_error(smoke_cache, tmp_path):
    tok = prepare.Tokenizer.from_directory(smoke_dir(smoke_cache))
    write_split(tmp_path, "train", [])
    with pytest.raises(ValueError, match="train split .* has no documents.*prepare.py"):
        next(prepare.make_dataloader(prepare.Tokenizer(tok.enc, tmp_path), 2, 16, "train", device="cpu"))


# ---------------------------------------------------------------------------
# evaluate_bpb

class UniformModel(nn.Module):
    """Predicts every token with probability 1/V and counts the targets it is asked about."""

    def __init__(self, vocab_size):
        super().__init__()
        self.vocab_size = vocab_size
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the model a device
        self.targets_seen = 0

    def forward(self, x, y, reduction="mean"):
        self.targets_seen += y.numel()
        logits = torch.zeros(*y.shape, self.vocab_size, device=self.anchor.device)
        return F.cross_entropy(logits.view(-1, self.vocab_size), y.reshape(-1), reduction=reduction)


def target_loss(y):
    return 0.5 + (y % 17) / 8  # exact in float32, like position_loss: the sums compare tightly


def position_loss(position):
    return 1 + position / 64


class TargetAndPositionLossModel(nn.Module):
    """Per-token loss f(target) + g(position in the row): wrong targets, or losses paired with the wrong
    positions or bytes, change the total. Returns [B*T] losses and counts the targets it is asked about."""

    def __init__(self):
        super().__init__()
        self.register_buffer("anchor", torch.zeros(()))  # gives the model a device
        self.targets_seen = 0

    def forward(self, x, y, reduction="mean"):
        self.targets_seen += y.numel()
        return (target_loss(y) + position_loss(torch.arange(y.shape[1], device=y.device))).reshape(-1)


def test_bpb_is_the_loss_of_val_targets_with_bytes_over_their_bytes_whatever_the_batch(smoke_cache, tmp_path,
                                                                                         monkeypatch):
    T, n_rows = 64, 40
    monkeypatch.setattr(prepare, "MAX_SEQ_LEN", T)
    monkeypatch.setattr(prepare, "EVAL_TOKENS", T * n_rows)
    tok = prepare.Tokenizer.from_directory(smoke_dir(smoke_cache))
    bos = tok.get_bos_token_id()
    shutil.copy(tok.directory / "token_bytes.npy", tmp_path)
    rng = np.random.default_rng(0)

    def row_sized_documents():
        # T+1 tokens each: every document fills one row, so the rows are the documents, whatever order the
        # packer places them in. A zero-byte token (BOS) at another place in each gives every row its own mask.
        docs = rng.integers(0, bos, (n_rows, T + 1))  # ordinary tokens, all with bytes
        docs[:, 0] = bos
        docs[np.arange(n_rows), 1 + 7 * np.arange(n_rows) % T] = bos
        return docs.tolist()

    write_split(tmp_path, "val", row_sized_documents())  # exactly the rows evaluation reads
    write_split(tmp_path, "train", row_sized_documents())  # same shapes, other tokens: must not be read

    # the expectation straight from the files on disk, with numpy
    dtype = json.loads((tmp_path / "meta.json").read_text())["dtype"]
    tokens = np.fromfile(tmp_path / "val.bin", dtype=dtype).astype(np.int64)
    offsets = np.load(tmp_path / "val.offsets.npy")
    token_bytes = np.load(tmp_path / "token_bytes.npy")
    rows = np.stack([tokens[a:b] for a, b in zip(offsets[:-1], offsets[1:])])
    targets = rows[:, 1:]
    losses = np.where(token_bytes[targets] > 0, target_loss(targets) + position_loss(np.arange(T)), 0.0)
    expected = losses.sum() / (math.log(2) * token_bytes[targets].sum())

    results = []
    for batch_size in (3, 8, 128):  # 3 leaves a partial last batch; 128 takes every row at once
        model = TargetAndPositionLossModel()
        results.append(prepare.evaluate_bpb(model, prepare.Tokenizer(tok.enc, tmp_path), batch_size))
        assert model.targets_seen == T * n_rows
    assert results[0] == results[1] == results[2]
    assert results[0] == pytest.approx(expected, rel=1e-9)


def test_a_long_evaluation_prints_its_progress_on_stderr(smoke_cache, monkeypatch, capsys):
    monkeypatch.setattr(prepare, "MAX_SEQ_LEN", 64)
    monkeypatch.setattr(prepare, "EVAL_TOKENS", 64 * 40)
    tok = prepare.Tokenizer.from_directory(smoke_dir(smoke_cache))
    quiet = prepare.evaluate_bpb(TargetAndPositionLossModel(), tok, 8)
    assert capsys.readouterr().err == ""  # a quick evaluation stays quiet
    monkeypatch.setattr(prepare, "EVAL_PROGRESS_SECONDS", 0)  # as if every batch took the whole interval
    assert prepare.evaluate_bpb(TargetAndPositionLossModel(), tok, 8) == quiet
    out, err = capsys.readouterr()
    shares = re.findall(r"^eval: (\d+)% of 40 rows, \d+s$", err, re.M)
    assert out == "" and shares == ["0", "20", "40", "60", "80"], err


class HalfPrecisionLossModel(UniformModel):
    """Returns its per-token losses in bfloat16, as a model computing its loss under autocast may."""

    def forward(self, x, y, reduction="mean"):
        return super().forward(x, y, reduction).to(torch.bfloat16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_evaluation_on_cuda_under_autocast_matches_the_cpu(smoke_cache, monkeypatch):
    monkeypatch.setattr(prepare, "MAX_SEQ_LEN", 64)
    monkeypatch.setattr(prepare, "EVAL_TOKENS", 64 * 40)
    tok = prepare.Tokenizer.from_directory(smoke_dir(smoke_cache))
    on_cpu = prepare.evaluate_bpb(UniformModel(tok.get_vocab_size()), tok, 16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        on_gpu = prepare.evaluate_bpb(UniformModel(tok.get_vocab_size()).cuda(), tok, 16)
        half = prepare.evaluate_bpb(HalfPrecisionLossModel(tok.get_vocab_size()).cuda(), tok, 16)
    assert on_gpu == pytest.approx(on_cpu, rel=1e-6) and half == pytest.approx(on_cpu, rel=1e-2)


def test_evaluation_wraps_around_a_small_val_split_with_a_warning(smoke_cache, monkeypatch, capsys):
    tok = prepare.Tokenizer.from_directory(smoke_dir(smoke_cache))
    val_tokens = json.loads((tok.directory / "meta.json").read_text())["val_tokens"]
    rows = val_tokens // 32 + 100
    monkeypatch.setattr(prepare, "MAX_SEQ_LEN", 32)
    monkeypatch.setattr(prepare, "EVAL_TOKENS", 32 * rows)
    model = UniformModel(tok.get_vocab_size())
    bpb = prepare.evaluate_bpb(model, tok, 256)
    assert model.targets_seen == 32 * rows and math.isfinite(bpb)
    assert "wraps around" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# profile and readiness

def python_c(code, cache, **env):
    """Runs python -c code in the repo; env values of None remove those variables."""
    full_env = {k: v for k, v in os.environ.items() if k != "AUTORESEARCH_DATASET"}
    full_env.update(AUTORESEARCH_CACHE_DIR=str(cache), **env)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in full_env.items() if v is not None})


def test_check_ready_names_the_fix_until_data_is_prepared(smoke_cache, tmp_path):
    code = "import json, prepare; print(json.dumps(prepare.check_ready()))"
    empty = python_c(code, tmp_path, AUTORESEARCH_PROFILE="smoke")
    problems = json.loads(empty.stdout)
    assert len(problems) == 1 and problems[0].endswith("AUTORESEARCH_PROFILE=smoke uv run prepare.py")
    other_profile = json.loads(python_c(code, smoke_cache, AUTORESEARCH_PROFILE="cpu").stdout)
    assert other_profile and other_profile[0].endswith("uv run prepare.py")
    assert json.loads(python_c(code, smoke_cache, AUTORESEARCH_PROFILE="smoke").stdout) == []
    missing = json.loads(python_c(code, smoke_cache, AUTORESEARCH_PROFILE="smoke",
                                  AUTORESEARCH_DATASET="climbmix").stdout)
    assert missing and missing[0].endswith("AUTORESEARCH_PROFILE=smoke uv run prepare.py")


def test_autoresearch_dataset_picks_a_prepared_dataset_else_the_last_prepared_one(smoke_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(smoke_cache, cache)     # synthetic for smoke; a copy, so the shared cache stays as it is
    paragraphs = [" ".join(documents(i, 1)) for i in range(200)]
    (tmp_path / "book.txt").write_text("\n\n".join(paragraphs) + "\n")
    r = run_prepare("--source", str(tmp_path / "book.txt"), cache=cache)
    assert r.returncode == 0, r.output
    code = ("import json, prepare; print(json.dumps([prepare.DATASET, "
            "str(prepare.Tokenizer.from_directory().directory), prepare.check_ready()]))")

    def active(**env):
        p = python_c(code, cache, AUTORESEARCH_PROFILE="smoke", **env)
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)
    for name in ("synthetic", "book"):
        assert active(AUTORESEARCH_DATASET=name) == [name, str(cache / "prepared" / name / "smoke"), []]
    # without it, the dataset prepared last: book, then synthetic once that is prepared again
    assert active() == ["book", str(cache / "prepared" / "book" / "smoke"), []]
    assert run_prepare("--dataset", "synthetic", cache=cache).returncode == 0
    assert active() == ["synthetic", str(cache / "prepared" / "synthetic" / "smoke"), []]
    # a name that was never prepared: check_ready says so and names the command that prepares it
    never = python_c("import json, prepare; print(json.dumps(prepare.check_ready()))", cache,
                     AUTORESEARCH_PROFILE="smoke", AUTORESEARCH_DATASET="novels")
    (problem,) = json.loads(never.stdout)
    assert "'novels' is not prepared" in problem and problem.endswith(
        "run: AUTORESEARCH_PROFILE=smoke uv run prepare.py --source PATH")


def test_unknown_profile_is_refused_with_the_valid_ones(tmp_path):
    r = python_c("import prepare", tmp_path, AUTORESEARCH_PROFILE="gpu")
    assert r.returncode != 0 and "reference, cpu, smoke" in r.stderr and "Traceback" not in r.stderr


def test_unset_profile_follows_the_hardware_and_says_so_once(tmp_path):
    r = python_c("import prepare; print(prepare.PROFILE, prepare.MAX_SEQ_LEN)", tmp_path, AUTORESEARCH_PROFILE=None)
    expected = "reference 2048" if torch.cuda.is_available() else "cpu 256"
    assert r.returncode == 0 and r.stdout.split() == expected.split(), r.stderr
    assert r.stderr.count("AUTORESEARCH_PROFILE is not set") == 1


def test_the_loop_reads_each_profiles_budget_and_context_from_prepare_py_as_importing_it_sets_them():
    # agent_loop reads them from prepare.py's text (importing it imports torch), to put back a pinned config
    # edited with its copy (state.put_back_profile_pins); a table it misread would put back wrong values
    from autoresearch.state import profile_pins
    source = (REPO / "prepare.py").read_text()
    for profile, (seq_len, budget, *_) in prepare.PROFILES.items():
        pins = {"time_budget": budget, "max_seq_len": seq_len, "harness_eval": True}
        assert profile_pins(source, profile) == pins
    assert profile_pins(source, "nosuch") is None and profile_pins("TIME_BUDGET = 1\n", "smoke") is None
