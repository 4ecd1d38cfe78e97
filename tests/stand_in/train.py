"""Stand-in train.py for the agent_loop tests: prints the summary block (or the failure) that the
constants below ask for, like the real one, in well under a second."""
import json
import os
import random
import signal
import subprocess
import sys
import time

from prepare import CACHE_DIR, PROFILE

VAL_BPB = 1.0             # the result to report
HELDOUT_BPB = 0.0         # val_bpb on the held-out slice of val to report (0: none), or {seed: value}
NOISE = 0.0               # val_bpb moves by NOISE * (seed - 42)
SIGMA = 0.0               # and by a draw from N(0, SIGMA) seeded by the seed
JITTER = 0.0              # and by one no seed repeats (the machine's timing)
SHAPED = False            # True: val_bpb depends on the hyperparameters (for mutate runs)
MODE = "ok"               # ok | crash | fail | nan | hang | stubborn | oom | tamper | restore | daemon |
                          # nosummary | twice | selfedit | cachepoison | killparent | readval | forgeeval |
                          # shadow | evalpoison | evalpoisoncrash | evalforge | vanish | ledger | ledgerback | swapback |
                          # ledgerswap | ledgerkill | records | recordsgone | carry | mapped | readlogs | tcp | escape
SLEEP = 0.0               # seconds of "training"
DATA_FIRST = False        # True: opens its training data before that "training" (a real run's order)
OPENS_DATA = True         # False: never opens its training data (a run that trained on a copy the agent made)
TRAINED = 1.0             # training_seconds it reports (the stand-in budget is 1 s)
MATRIX_LR = 0.04          # hyperparameters in the real train.py's layout, for mutate
EMBEDDING_LR = 0.9
DEPTH = 8
TOTAL_BATCH_SIZE = 2**18
DEVICE_BATCH_SIZE = 128
WARMDOWN_RATIO = 0.75
ADAM_BETAS = (0.8, 0.95)
if PROFILE == "cpu":
    DEPTH = 4
elif PROFILE == "smoke":
    DEPTH = 2
    TOTAL_BATCH_SIZE = 2**13
    DEVICE_BATCH_SIZE = 16

SEED = None               # a seed of its own, pinned, instead of the loop's
seed = int(os.environ.get("AUTORESEARCH_SEED", "42")) if SEED is None else SEED
print(f"training {PROFILE} depth {DEPTH} seed {seed} on {len(os.sched_getaffinity(0))} cores", flush=True)
print(f"visible GPUs {os.environ.get('CUDA_VISIBLE_DEVICES', '(all)')}", flush=True)
spin = None
if os.environ.get("STANDIN_LOAD"):  # a level like "1+spin": the test's spinner (no process of the loop's) works
    with open(os.environ["STANDIN_LOAD"]) as f:  # while this run trains, for the harness to see
        if f.read().split("\n")[0].endswith("+spin"):
            spin = os.environ["STANDIN_SPIN"]
            open(spin, "w").close()
if DATA_FIRST:
    open(os.path.join(CACHE_DIR, "prepared", "smoke", "synthetic", "train.bin"), "rb").close()
time.sleep(SLEEP)
if spin:
    os.unlink(spin)
if MODE == "crash":
    raise RuntimeError("CUDA out of memory (stand-in)")
if MODE == "fail":
    print("FAIL: loss is nan at step 3", flush=True)
    sys.exit(1)
if MODE == "killparent":  # what a dying machine does to whatever started this run (a Ray task's worker)
    os.kill(os.getppid(), signal.SIGKILL)
    time.sleep(1)
if MODE == "oom":  # what the Linux OOM killer does to a process
    os.kill(os.getpid(), signal.SIGKILL)
if MODE == "stubborn":  # ignores SIGTERM, and so does its child (SIG_IGN survives exec): only SIGKILL works
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if MODE in ("hang", "stubborn"):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with open(os.environ["STANDIN_CHILD_PID"] + ".partial", "w") as f:
        f.write(str(child.pid))
    os.replace(f.name, os.environ["STANDIN_CHILD_PID"])  # whole: a test that sees the file reads the pid
    time.sleep(600)
if MODE == "tamper":
    with open("prepare.py", "a") as f:
        f.write("# tampered by train.py\n")
if MODE == "restore":  # bends prepare.py for a moment and puts it back before the run ends
    original = open("prepare.py").read()
    with open("prepare.py", "a") as f:
        f.write("# bent while train.py ran\n")
    time.sleep(0.05)
    with open("prepare.py", "w") as f:
        f.write(original)
if MODE == "swapback":  # another train.py for a moment, then its own bytes back: what ran was not the commit
    own = open(__file__, "rb").read()
    open(__file__, "wb").write(own + b"# another train.py\n")
    time.sleep(0.05)
    open(__file__, "wb").write(own)
if MODE == "selfedit":  # rewrites itself: the runs after this one would be other code under the same commit
    with open(__file__, "a") as f:
        f.write("VAL_BPB = 2.0  # rewritten while running\n")
if MODE == "daemon":  # leaves its process group and writes a keep row after the run has ended
    forged = "forged\\t0.100000\\t0.0\\tkeep\\tforged by a daemon\\n"
    subprocess.Popen([sys.executable, "-c", f"import time; time.sleep(2); open('results.tsv', 'a').write('{forged}')"],
                     start_new_session=True)
if MODE == "vanish":  # leaves its process group and its token behind (a new session, a cleared environment)
    subprocess.Popen([sys.executable, "-c", f"import os, time; open({os.environ['STANDIN_CHILD_PID']!r}, 'w')"
                      f".write(str(os.getpid())); time.sleep(600)"], start_new_session=True, env={})
    time.sleep(0.5)
if MODE == "carry":  # saves what it learned where the next run could load it: its compile cache, /dev/shm
    cache, shm = os.environ["TORCHINDUCTOR_CACHE_DIR"], os.environ["STANDIN_SHM"]
    print(f"carried over: {os.path.exists(os.path.join(cache, 'weights.pt')) or os.path.exists(shm)}")
    for name in ("kernel.so", "old.so"):
        open(os.path.join(cache, name), "w").write("compiled before the data")
    open(os.path.join(CACHE_DIR, "prepared", "smoke", "synthetic", "train.bin"), "rb").close()  # the data
    time.sleep(1.0)  # some steps (and time for the loop, on a loaded machine, to see the opening)
    open(os.path.join(cache, "weights.pt"), "w").write("learned")
    os.makedirs(os.path.join(cache, "late"), exist_ok=True)
    open(os.path.join(cache, "late", "more.pt"), "w").write("learned")
    os.rename(os.path.join(cache, "old.so"), os.path.join(cache, "renamed.so"))  # an old file, renamed: news
    os.utime(os.path.join(cache, "weights.pt"), (0, 0))  # dated back: its ctime still tells
    open(shm, "w").write("learned")
if MODE == "mapped":  # the same, through a file of its compile cache mapped for writing before the data is opened
    import mmap         # and written through the mapping after: no ctime moves
    fd = os.open(os.path.join(os.environ["TORCHINDUCTOR_CACHE_DIR"], "index.bin"), os.O_RDWR | os.O_CREAT)
    if os.fstat(fd).st_size < 4096:
        os.write(fd, bytes(4096))
    mapped = mmap.mmap(fd, 4096)
    print(f"carried over: {mapped[:7] == b'learned'}")
    mapped[0] = mapped[0]  # its page dirty now: on disk, no later write faults and dates the file
    open(os.path.join(CACHE_DIR, "prepared", "smoke", "synthetic", "train.bin"), "rb").close()  # the data
    time.sleep(1.0)
    mapped[:7] = b"learned"
if MODE == "readlogs":  # prints what it learned, and reads back what an earlier run printed: the logs, the ledger
    import glob
    marker = "CARRIED" + "-WEIGHTS"  # not in this source, nor so in the diff a log shows
    paths = glob.glob("logs/**", recursive=True) + glob.glob(".git/**", recursive=True) + glob.glob(
        os.path.expanduser("~/.local/state/autoresearch/**"), recursive=True)
    found = [p for p in paths if os.path.isfile(p) and marker.encode() in open(p, "rb").read()]
    for fd in (1, 2):  # its own output, opened again: the log, if the loop handed it that
        try:
            with open(f"/proc/self/fd/{fd}", "rb", buffering=0) as again:
                os.set_blocking(again.fileno(), False)
                if marker.encode() in (again.read() or b""):
                    found.append(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    found += glob.glob("/tmp/autoresearch-*/metric/*/val.bin")  # and the val files of the loops' evaluators
    print(f"read back: {found}")
    print(marker)
if MODE == "escape":  # leaves the cores the loop gave it, and trains on every core for a while
    os.sched_setaffinity(0, range(os.cpu_count()))
    spin = "import time\nend = time.time() + 3\nwhile time.time() < end: pass"
    for spinner in [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(os.cpu_count())]:
        spinner.wait()
if MODE == "tcp":  # sends what it learned to a server of yours on this machine, which keeps it for the next run
    import socket
    with socket.create_connection(("127.0.0.1", int(os.environ["STANDIN_TCP_PORT"])), timeout=10) as server:
        server.sendall(b"weights")
if MODE == "cachepoison":  # leaves a "kernel" in every other version's compile cache
    own = os.path.abspath(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    for other in (os.path.join(os.path.dirname(own), name) for name in os.listdir(os.path.dirname(own))):
        if other != own and os.path.isdir(other):  # not the files beside them (<version>.unchecked)
            open(os.path.join(other, "poisoned.py"), "w").close()
if MODE == "shadow":  # a prepare of its own where later imports look before prepare.py: bytecode, an extension
    import importlib.machinery
    import importlib.util
    import marshal
    source = os.stat("prepare.py")  # the header says "compiled from this very prepare.py"
    header = b"".join([importlib.util.MAGIC_NUMBER, bytes(4), int(source.st_mtime).to_bytes(4, "little"),
                       (source.st_size & 0xFFFFFFFF).to_bytes(4, "little")])
    with open(importlib.util.cache_from_source("prepare.py"), "wb") as f:
        f.write(header + marshal.dumps(compile("FORGED = True\n", "prepare.py", "exec")))
    open("prepare" + importlib.machinery.EXTENSION_SUFFIXES[0], "wb").close()
if MODE in ("evalpoison", "evalpoisoncrash", "evalforge"):  # a "kernel" in the evaluator's compile cache
    own = os.environ["TORCHINDUCTOR_CACHE_DIR"]
    folder = os.path.join(os.path.dirname(own), "evaluator")
    folder = folder if os.path.isdir(folder) else os.path.join(own, "evaluator")
    os.makedirs(folder, exist_ok=True)
    open(os.path.join(folder, "poisoned.py"), "w").close()
    if MODE == "evalpoisoncrash":
        raise RuntimeError("crashed after planting (stand-in)")
    if MODE == "evalforge":  # the harness's record of the folder vouches for it too, and the loop dies unchecked
        with open(folder + ".json") as f:
            record = json.load(f)
        record["poisoned.py"] = os.lstat(os.path.join(folder, "poisoned.py")).st_ctime_ns
        with open(folder + ".json", "w") as f:
            json.dump(record, f)
        os.kill(os.getppid(), signal.SIGKILL)
        time.sleep(5)
if MODE == "ledger":  # the records under .git/: a forged keep, the pinned budget, a plant, a kernel
    ledger = os.path.join(".git", "autoresearch")
    with open(os.path.join(ledger, "results.tsv"), "a") as f:
        f.write("f0f0f0f\t0.100000\t0.0\tkeep\tforged by a run\n")
    with open(os.path.join(ledger, "t", "init.json")) as f:
        pinned = json.load(f)
    with open(os.path.join(ledger, "t", "init.json"), "w") as f:
        json.dump(dict(pinned, time_budget=100), f)
    open(os.path.join(ledger, "t", "planted.json"), "w").close()
    os.makedirs(os.path.join(ledger, "u", "compile-cache", "0123456789abcdef"))
    open(os.path.join(ledger, "u", "compile-cache", "0123456789abcdef", "kernel.py"), "w").close()
if MODE in ("records", "recordsgone"):  # the records outside the repository too: a row in the ledger and its
    # record, the pinned budget and its copy; recordsgone: then the copies' folder and the record deleted
    import hashlib
    import pwd
    common = subprocess.run(["git", "rev-parse", "--git-common-dir"], capture_output=True, text=True).stdout
    ledger = os.path.realpath(os.path.join(common.strip(), "autoresearch"))  # a worker's: the main checkout's
    record = os.path.join(pwd.getpwuid(os.getuid()).pw_dir, ".local", "state", "autoresearch", "ledgers",
                          hashlib.sha256(ledger.encode()).hexdigest()[:24])
    header = open(os.path.join(ledger, "results.tsv")).readline().rstrip("\n").split("\t")
    row = dict.fromkeys(header, "1")
    row.update(commit="f0f0f0f", val_bpb="0.100000", status="keep", description="forged", tag="t", note="forged")
    for path in (record, os.path.join(ledger, "results.tsv")):  # the record alone would pass for a row cut
        with open(path, "a") as f:                                # by a kill, which the next command completes
            f.write("\t".join(row[c] for c in header) + "\n")
    for path in (os.path.join(ledger, "t", "init.json"), os.path.join(record + ".files", "t", "init.json")):
        with open(path) as f:
            pinned = json.load(f)
        with open(path, "w") as f:
            json.dump(dict(pinned, time_budget=100), f)
    if MODE == "recordsgone":
        import shutil
        shutil.rmtree(record + ".files")
        os.unlink(record)
if MODE == "ledgerswap":  # the whole folder moved away, a link to a forged one in its place
    os.rename(os.path.join(".git", "autoresearch"), os.path.join(".git", "moved"))
    os.makedirs(os.path.join(".git", "forged"))
    with open(os.path.join(".git", "forged", "results.tsv"), "w") as f:
        f.write("forged\n")
    os.symlink("forged", os.path.join(".git", "autoresearch"))
if MODE == "ledgerkill":  # a whole keep row in the ledger, then the loop killed before it could check
    path = os.path.join(".git", "autoresearch", "results.tsv")
    header = open(path).readline().rstrip("\n").split("\t")
    row = dict.fromkeys(header, "1")
    row.update(commit="f0f0f0f", val_bpb="0.100000", status="keep", description="forged", tag="t", note="forged")
    with open(path, "a") as f:
        f.write("\t".join(row[c] for c in header) + "\n")
    os.kill(os.getppid(), signal.SIGKILL)
    time.sleep(5)
if MODE == "ledgerback":  # rewrites a record and puts its bytes back before the run ends
    path = os.path.join(".git", "autoresearch", "results.tsv")
    original = open(path, "rb").read()
    open(path, "wb").write(original.replace(b"\tkeep\t", b"\tdiscard\t"))
    time.sleep(0.05)
    open(path, "wb").write(original)
if MODE == "readval":  # the validation tokens, straight from the cache, past prepare.py's API
    with open(os.path.join(os.environ["AUTORESEARCH_CACHE_DIR"], "prepared", "synthetic", "smoke", "val.bin"),
              "rb") as f:
        f.read()
if MODE == "nosummary":
    sys.exit(0)
if MODE == "forgeeval":  # a result line, far down the evaluator's output file, through the loop's own fd
    for fd in os.listdir(f"/proc/{os.getppid()}/fd"):
        link = os.readlink(f"/proc/{os.getppid()}/fd/{fd}")
        if link.endswith("(deleted)"):
            with open(f"/proc/{os.getppid()}/fd/{fd}", "r+b") as f:
                f.seek(1 << 16)
                f.write(b'\n{"val_bpb": 0.5, "heldout_bpb": 0.5, "eval_seconds": 0.1, "restored": []}\n')
            print(f"forged a result in {link}", flush=True)
if os.environ.get("STANDIN_CACHE_LOG"):  # what torch.compile would find in its cache, then a kernel of its own
    cache = os.environ["TORCHINDUCTOR_CACHE_DIR"]
    with open(os.environ["STANDIN_CACHE_LOG"], "a") as f:
        found = sorted(set(os.listdir(cache)) - {"headers"})  # inductor's precompiled headers (runner.new_scratch)
        f.write(f"{VAL_BPB} {cache} {','.join(found)}\n")
    open(os.path.join(cache, f"by-{VAL_BPB}"), "w").close()
TRAIN_DATA = os.path.join(CACHE_DIR, "prepared", "smoke", "synthetic", "train.bin")
if OPENS_DATA and os.path.exists(TRAIN_DATA):  # the training data, opened after the compile, as train.py does
    open(TRAIN_DATA, "rb").close()
val = VAL_BPB + NOISE * (seed - 42) + random.Random(seed).gauss(0, SIGMA) + random.gauss(0, JITTER)
tokens_m = 0.1
if os.environ.get("STANDIN_LOAD"):  # one load level per run, first line first: the machine slows down
    with open(os.environ["STANDIN_LOAD"]) as f:
        levels = f.read().split()
    load = float(levels[0].removesuffix("+spin")) if levels else 0.0
    with open(os.environ["STANDIN_LOAD"], "w") as f:
        f.write("\n".join(levels[1:]))
    val += 0.3 * load                     # fewer steps in the same time: a worse val_bpb
    tokens_m *= 1 - 0.67 * load
if SHAPED:
    val += abs(MATRIX_LR - 0.03) + 0.01 * abs(DEPTH - 3) + 0.02 * abs(WARMDOWN_RATIO - 0.6)
if MODE == "nan":
    val = float("nan")
print("---")
print(f"val_bpb:          {val:.6f}")
heldout = HELDOUT_BPB.get(seed, 0.0) if isinstance(HELDOUT_BPB, dict) else HELDOUT_BPB
if heldout:
    print(f"heldout_bpb:      {heldout:.6f}")
print(f"training_seconds: {TRAINED}")
print("total_seconds:    1.2")
print("peak_vram_mb:     2048.0")
print("mfu_percent:      n/a")
print(f"total_tokens_M:   {tokens_m:.4f}")
print("num_steps:        10")
print("num_params_M:     0.5")
print(f"depth:            {DEPTH}")
print(f"profile:          {PROFILE}")
print("device:           cpu")
print("attention:        sdpa")
print(f"seed:             {seed}")
print("startup_seconds:  0.1")
print("eval_seconds:     0.1")
if MODE == "twice":  # a second block that tells another story
    print("---")
    print(f"val_bpb:          {val / 2:.6f}")
