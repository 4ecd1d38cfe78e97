"""A confined run (autoresearch/confine.py, Linux Landlock and namespaces): what it may write, signal and reach,
and the hostile stand-ins of the other tests run confined, where the kernel stops each write before the loop's
checks see it."""
import contextlib
import ctypes
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from autoresearch.confine import CONFINE_ENV, confined, landlock_abi, will_confine
from test_agent_loop import env, harness_evaluates, initialised, loop, repo, rows, set_train  # noqa: F401

ABI, WHY = landlock_abi()
pytestmark = pytest.mark.skipif(not ABI, reason=f"no confinement here: {WHY}")

TRIES = textwrap.dedent("""
    import ctypes, os, socket, subprocess, sys
    allowed, other, abstract, served, udp, key, devices, path, loop = sys.argv[1:10]

    def connect_abstract():  # a socket of another process of yours (it could write for the run)
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).connect("\\0" + abstract)

    def child_writes_other():
        code = f"open({os.path.join(other, 'c')!r}, 'w')"
        if subprocess.run([sys.executable, "-c", code], capture_output=True).returncode:
            raise PermissionError(13, "the child could not")

    def send_from_a_datagram_pair():  # a pair made by socketpair(), then pointed at a path
        socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)[0].sendto(b"weights", path + ".dgram")

    def io_uring():  # its requests make and connect sockets without the system calls
        if ctypes.CDLL(None, use_errno=True).syscall(425, 1, ctypes.create_string_buffer(120)) < 0:
            raise OSError(ctypes.get_errno(), "io_uring_setup")

    def sysv_shared_memory():  # outlives its process: the next run could attach to it
        if ctypes.CDLL(None, use_errno=True).shmget(int(key), 4096, 0o1000 | 0o600) < 0:
            raise OSError(ctypes.get_errno(), "shmget")

    for what, act in [
            ("write allowed", lambda: open(os.path.join(allowed, "a"), "w").write("x")),
            ("write other", lambda: open(os.path.join(other, "b"), "w").write("x")),
            ("append other", lambda: open(os.path.join(other, "kept"), "a").write("x")),
            ("rename inside", lambda: os.rename(os.path.join(allowed, "a"), os.path.join(allowed, "d", "a"))),
            ("rename other", lambda: os.rename(os.path.join(other, "kept"), os.path.join(allowed, "kept"))),
            ("link other", lambda: os.link(os.path.join(other, "kept"), os.path.join(allowed, "linked"))),
            ("signal the loop", lambda: os.kill(int(loop), 0)),  # in a PID namespace of its own: not even seen
            ("child writes other", child_writes_other),
            ("write /dev/null", lambda: open(os.devnull, "w").write("x")),
            ("make a file in /dev", lambda: open(f"/dev/.{abstract}", "w").write("weights")),  # not swept
            # a folder of devices where this user may write (not root: /dev is root's): only its devices open
            ("write a file among devices", lambda: open(os.path.join(devices, "kept"), "a").write("weights")),
            ("make a file among devices", lambda: open(os.path.join(devices, "new"), "w").write("weights")),
            ("make a file in /dev/shm", lambda: open(f"/dev/shm/{abstract}", "w").write("x")),  # swept
            ("connect abstract socket", connect_abstract),
            # a process of yours listening on a path (an agent's) could keep what the run sends it
            ("connect path socket", lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).connect(path)),
            ("send from a datagram pair", send_from_a_datagram_pair),
            ("stream socketpair", lambda: socket.socketpair()),  # multiprocessing's pipes
            ("io_uring", io_uring),
            # what a file it may read could carry for the next run: attributes, mode, times
            ("set an attribute other", lambda: os.setxattr(os.path.join(other, "meta"), "user.w", b"weights")),
            ("chmod other", lambda: os.chmod(os.path.join(other, "meta"), 0o600)),
            ("touch other", lambda: os.utime(os.path.join(other, "meta"), (1, 1))),
            ("chmod allowed", lambda: os.chmod(os.path.join(allowed, "d"), 0o700)),
            # a server of yours on this machine could keep what the run sends it, for the next run
            ("connect tcp", lambda: socket.create_connection(("127.0.0.1", int(served)), timeout=10).close()),
            ("listen tcp", lambda: socket.create_server(("127.0.0.1", 0)).close()),
            ("send udp", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("127.0.0.1",
                                                                                              int(udp)))),
            ("sysv shared memory", sysv_shared_memory)]:
        try:
            act()
            print(f"{what}: done")
        except OSError:
            print(f"{what}: refused")
""")
LIBC = ctypes.CDLL(None, use_errno=True)
RUN_ONLY = ["/dev/shm", "/dev/mqueue"]  # all a run may write in /dev but its device files: swept after it
# where this kernel lets a process of ours have namespaces of its own (a user namespace first), and a read-only
# view of the files in a mount namespace: a throwaway probe
PROBE = subprocess.run([sys.executable, "-c", "from autoresearch.confine import own_namespaces as o; "
                        "print(o(True, ['/tmp'])[0])"], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                       text=True).stdout
SPACES, VIEW = PROBE.startswith("; IPC and network"), "but its folders read-only" in PROBE
FILTER = platform.machine() in ("x86_64", "aarch64")  # confine.SYSCALLS: where unix sockets are refused


def tries(tmp_path, extra_env=None, ports=False):
    """What TRIES could do, confined to write in tmp_path/allowed (ports: and to connect to the TCP server's):
    {what: "done" or "refused"}, the line the confinement printed, tmp_path/other, and whether the SysV shared
    memory the run made outlived it (then removed)."""
    allowed, other, devices = tmp_path / "allowed", tmp_path / "other", tmp_path / "devices"
    (allowed / "d").mkdir(parents=True)  # renames between folders: what compile caches do
    other.mkdir()
    (other / "kept").write_text("as it was")
    (other / "meta").write_text("its mode, times and attributes as they were")
    devices.mkdir()
    (devices / "kept").write_text("as it was")
    name, key = f"autoresearch-test-{os.getpid()}-{tmp_path.name}", 0x5EED0000 + os.getpid() % 0xFFFF
    path = tmp_path / "sockets" / "s"
    path.parent.mkdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listening, socket.create_server(("127.0.0.1", 0)) \
            as served, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, \
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as on_path, \
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as dgram:
        listening.bind("\0" + name)
        listening.listen()
        on_path.bind(str(path))
        on_path.listen()
        dgram.bind(f"{path}.dgram")
        udp.bind(("127.0.0.1", 0))
        port = served.getsockname()[1]
        command = [sys.executable, "-c", TRIES, str(allowed), str(other), name, str(port),
                   str(udp.getsockname()[1]), str(key), str(devices), str(path), str(os.getpid())]
        p = subprocess.run(confined(command, [allowed, *RUN_ONLY], ports=[port] if ports else (),
                                    devices=["/dev", devices]),
                           capture_output=True, text=True, env={**os.environ, **(extra_env or {})}, timeout=60)
    outcome = dict(line.rsplit(": ", 1) for line in p.stdout.splitlines())
    outcome["its /dev/shm file outlived it"] = "yes" if os.path.exists(f"/dev/shm/{name}") else "no"
    for made in (f"/dev/.{name}", f"/dev/shm/{name}"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(made)
    assert p.returncode == 0, p.stderr
    segment = LIBC.shmget(key, 0, 0)
    if segment >= 0:
        LIBC.shmctl(segment, 0, None)  # IPC_RMID
    return outcome, p.stderr, other, segment >= 0


def test_a_confined_command_and_its_children_write_only_in_its_folders_and_signal_nothing_outside(tmp_path):
    outcome, said, other, outlived = tries(tmp_path)
    expected = {"write allowed": "done", "write other": "refused", "append other": "refused",
                "rename inside": "done", "rename other": "refused", "link other": "refused",
                "signal the loop": "refused" if ABI >= 6 or VIEW else "done",
                "child writes other": "refused", "write /dev/null": "done",
                "make a file in /dev": "refused", "make a file in /dev/shm": "done",
                "write a file among devices": "refused", "make a file among devices": "refused",
                # abstract unix sockets belong to a network namespace too
                "connect abstract socket": "refused" if ABI >= 6 or SPACES else "done",
                "connect tcp": "refused" if ABI >= 4 or SPACES else "done",
                "listen tcp": "refused" if ABI >= 4 else outcome["listen tcp"],  # before 6.7, not promised
                "send udp": "refused" if SPACES else "done", "sysv shared memory": "done",
                "connect path socket": "refused" if FILTER else "done",
                "send from a datagram pair": "refused" if FILTER else "done",
                "stream socketpair": "done", "io_uring": "refused" if FILTER else outcome["io_uring"],
                "set an attribute other": "refused" if VIEW else "done",
                "chmod other": "refused" if VIEW else "done", "touch other": "refused" if VIEW else "done",
                "chmod allowed": "done",
                # the run's own /dev/shm (a tmpfs in its mount namespace): nothing there outlives it
                "its /dev/shm file outlived it": "no" if VIEW else "yes"}
    assert outcome == expected, outcome
    assert outlived is not SPACES  # in an IPC namespace of its own, it went with the run
    assert (other / "kept").read_text() == "as it was"
    assert sorted(p.name for p in other.iterdir()) == ["kept", "meta"]
    assert f"confined (Landlock ABI {ABI}): writes only in {tmp_path / 'allowed'}, /dev/shm" in said, said
    assert re.search(r", \d+ character devices in /dev, ", said), said
    assert (tmp_path / "devices" / "kept").read_text() == "as it was"
    assert ("; no TCP" in said) is (ABI >= 4) and ("; IPC and network namespaces of its own" in said) is SPACES, said
    assert ("; every file but its folders read-only, /dev/shm its own" in said) is VIEW, said
    assert ("; no unix socket but a socketpair's stream, no keyring" in said) is FILTER, said


def test_a_confined_command_reaches_the_tcp_ports_named_and_only_they_leave_it_the_machines_network(tmp_path):
    # where a GPU could load FA3: the hub's ports (fa3.download_ports), and no network namespace of its own
    outcome, said, _, outlived = tries(tmp_path, ports=True)
    assert (outcome["connect tcp"], outcome["send udp"], outcome["sysv shared memory"]) == ("done", "done", "done")
    assert outlived is not SPACES, said
    # the files and sockets stay as closed as without the ports
    assert (outcome["chmod other"], outcome["connect path socket"]) == ("refused" if VIEW else "done",
                                                                         "refused" if FILTER else "done"), outcome
    assert ("; TCP only to port " in said) is (ABI >= 4) and ("; an IPC namespace of its own" in said) is SPACES


UNDO = textwrap.dedent("""
    import ctypes, os, sys
    from autoresearch.confine import AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY, MS_BIND, MountAttr, libc
    from autoresearch.confine import own_namespaces
    allowed, other = sys.argv[1:3]
    print(own_namespaces(True, [allowed])[0].strip("; "), file=sys.stderr)
    c, clear, top = libc(), MountAttr(attr_clr=MOUNT_ATTR_RDONLY), other
    while not os.path.ismount(top):
        top = os.path.dirname(top)
    for what, act in [  # with every capability its user namespace gives it, and no Landlock to stop it
            ("make the view writable", lambda: c.syscall(442, AT_FDCWD, top.encode(), AT_RECURSIVE,
                                                        ctypes.byref(clear), ctypes.sizeof(clear))),
            ("unmount a folder's own mount", lambda: c.umount2(allowed.encode(), 2)),  # MNT_DETACH
            # it may mount (this shows the refusals are the lock's): over what it may not write, it writes nothing
            ("bind a folder of its own over the other",
             lambda: c.mount(allowed.encode(), other.encode(), None, MS_BIND, None) or c.umount2(other.encode(), 2)),
            ("chmod other", lambda: os.chmod(os.path.join(other, "f"), 0o600))]:
        try:
            print(f"{what}: " + ("refused" if act() else "done"))
        except OSError:
            print(f"{what}: refused")
""")


@pytest.mark.skipif(not VIEW, reason="no user and mount namespaces here")
def test_a_runs_read_only_view_of_the_files_cannot_be_made_writable_from_inside(tmp_path):
    allowed, other = tmp_path / "allowed", tmp_path / "other"
    allowed.mkdir()
    other.mkdir()
    (other / "f").write_text("as it was")
    p = subprocess.run([sys.executable, "-c", UNDO, str(allowed), str(other)], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1], timeout=60)
    outcome = dict(line.rsplit(": ", 1) for line in p.stdout.splitlines())
    assert "every file but its folders read-only" in p.stderr, p.stderr
    # the view is locked by the nested namespace: no Landlock is needed to keep it (a confined run has both)
    assert outcome == {"make the view writable": "refused", "unmount a folder's own mount": "refused",
                       "bind a folder of its own over the other": "done", "chmod other": "refused"}, outcome
    assert os.stat(other / "f").st_mode & 0o777 != 0o600


@pytest.mark.skipif(platform.machine() != "x86_64" or not FILTER, reason="x86_64's syscall numbers, the filter")
def test_a_confined_run_can_keep_no_key_in_your_keyrings(tmp_path):
    # the kernel's keyrings outlive a process and take no path: a red team kept weights in the user keyring of
    # the machine's own namespace, reached by its number (/proc/keys lists it), from a run in a namespace of its own
    add_key, keyctl, get_id, search, invalidate = 248, 250, 0, 10, 21
    outer = LIBC.syscall(keyctl, get_id, ctypes.c_int(-4), 1)  # KEY_SPEC_USER_KEYRING, made if need be
    assert outer > 0
    name = f"autoresearch-test-{os.getpid()}".encode()
    code = ("import ctypes, sys; c = ctypes.CDLL(None, use_errno=True); "
            f"print([c.syscall({add_key}, b'user', {name!r}, b'weights', 7, ctypes.c_int(ring)) for ring in "
            f"(-4, {outer})], ctypes.get_errno())")
    p = subprocess.run(confined([sys.executable, "-c", code], [tmp_path]), capture_output=True, text=True, timeout=60)
    key = LIBC.syscall(keyctl, search, ctypes.c_int(outer), b"user", name, 0)
    if key >= 0:
        LIBC.syscall(keyctl, invalidate, key)
    assert p.stdout.split() == ["[-1,", "-1]", "1"], p.stdout + p.stderr  # EPERM, both times
    assert key < 0, "the key outlived the run in your user keyring"


def test_confinement_turned_off_says_so_and_writes_anywhere(tmp_path):
    outcome, said, other, outlived = tries(tmp_path, {CONFINE_ENV: "0"})
    assert outcome["write other"] == "done" and outcome["child writes other"] == "done", outcome
    assert outcome["connect abstract socket"] == "done" and outcome["connect tcp"] == "done", outcome
    assert outcome["send udp"] == "done" and outlived
    assert outcome["connect path socket"] == "done" and outcome["send from a datagram pair"] == "done", outcome
    assert outcome["chmod other"] == "done" and outcome["touch other"] == "done", outcome
    assert outcome["its /dev/shm file outlived it"] == "yes", outcome
    assert f"not confined: {CONFINE_ENV}=0" in said, said


def test_a_run_the_loop_counts_on_being_confined_does_not_start_unconfined(tmp_path):
    # the loop lets the evaluator warm its compile cache beside a run only where the kernel keeps the run out of it
    # (will_confine); the run then starts confined or not at all, whatever happens between that and its start
    ran = tmp_path / "ran"
    command = [sys.executable, "-c", f"open({str(ran)!r}, 'w')"]
    for extra, held in (({}, ABI >= 2), ({CONFINE_ENV: "0"}, False)):
        env = {**os.environ, **extra}
        p = subprocess.run(confined(command, [tmp_path], require=True), capture_output=True, text=True, env=env,
                           timeout=60)
        assert (p.returncode == 0) is held and ran.exists() is held, (extra, p.stderr)
        if not held:
            assert "counted on the kernel's confinement" in p.stderr and f"Set {CONFINE_ENV}=0 at `init`" in p.stderr
        assert will_confine(env) is held and will_confine(env, truncate=True) is (held and ABI >= 3)
        ran.unlink(missing_ok=True)


# the hostile stand-ins of test_agent_loop, test_seal and test_ledger (unconfined there, where the checks after
# the run catch them): confined, each one's first write fails, so the run is a crash that names it and nothing
# outside the run changed; a daemon's late row and a kill of the loop fail the same way
@pytest.mark.parametrize("mode", ["tamper", "selfedit", "shadow", "cachepoison", "evalpoison", "ledger",
                                  "records", "ledgerswap", "ledgerkill", "daemon", "tcp"])
def test_a_confined_run_cannot_write_outside_its_folders_nor_kill_the_loop(repo, env, mode):  # noqa: F811
    if mode == "tcp" and ABI < 4:
        pytest.skip(f"Landlock ABI {ABI} does not govern TCP (ABI 4, kernel 6.7)")
    server = socket.create_server(("127.0.0.1", 0))  # no GPU here: a run connects nowhere over TCP
    env = {k: v for k, v in env.items() if k != CONFINE_ENV}  # the fixture's runs are not confined
    env["STANDIN_TCP_PORT"] = str(server.getsockname()[1])
    initialised(repo, env)
    if mode == "evalpoison":  # the evaluator's cache, which it warms beside a confined run, made by a first step
        harness_evaluates(repo)
        set_train(repo, VAL_BPB=0.9)
        loop(repo, env, "step", "-m", "an honest change")
    ledger = repo / ".git" / "autoresearch"
    before = {p: p.read_bytes() for p in [*ledger.rglob("*.tsv"), *ledger.rglob("*.json"), repo / "prepare.py"]
              if p.is_file()}
    set_train(repo, MODE=mode, VAL_BPB=0.5)
    out = loop(repo, env, "step", "-m", f"a run that tries {mode}").stdout
    if mode == "daemon":  # the run itself writes nothing: its daemon's row, two seconds later, is refused
        subprocess.run([sys.executable, "-c", "import time; time.sleep(3)"])
    candidate = rows(repo)[-1]
    log = (repo / candidate["log"]).read_text()
    assert f"confined (Landlock ABI {ABI})" in log, log
    caches = repo / ".git" / "autoresearch" / "t" / "compile-cache"
    if mode == "daemon":
        assert candidate["status"] == "keep" and "forged" not in (repo / "results.tsv").read_text(), out
    elif mode in ("cachepoison", "evalpoison") and VIEW:  # .git shows empty but for its own cache: no other
        poisoned = [p.relative_to(caches) for p in caches.rglob("poisoned.py")]  # cache to reach (own: its own)
        assert all(p.parts[0] == candidate["train_py"] for p in poisoned), (out, candidate, poisoned)
    else:
        # caught by the kernel (Landlock; the read-only view of its mount namespace, where .git shows empty), not by
        # the checks after the run
        refused = any(said in log for said in ("PermissionError", "Read-only file system", "No such file"))
        assert candidate["status"] == "crash" and refused and not candidate["note"].startswith("rejected"), \
            (out, candidate)
    after = {p: p.read_bytes() for p in before if p.is_file()}
    changed = [str(p) for p in before if after.get(p) != before[p] and p.name not in ("results.tsv", "state.json")]
    assert not [p for p in changed if "forged" in after.get(p, b"").decode(errors="replace")] and \
        (repo / "prepare.py").read_bytes() == before[repo / "prepare.py"], changed
    assert not (ledger / "t" / "planted.json").exists() and not (ledger / "u").exists()
    assert "forged" not in (ledger / "results.tsv").read_text()
    server.setblocking(False)
    with pytest.raises(BlockingIOError), server:
        server.accept()  # nobody connected


@pytest.mark.skipif(not VIEW, reason="no user and mount namespaces here")
def test_a_run_cannot_read_what_earlier_runs_printed_in_their_logs(repo, env):  # noqa: F811
    # a red team's run printed its weights, and the next read them back from its log: logs, results and the
    # repository's git folder (the ledgers) show empty to a run, and so do the loop's records outside it and the
    # evaluators' copies of the val files; its output goes through a pipe (the log, reopened through
    # /proc/self/fd/1, held the experiment's earlier runs), and another red team trained on another loop's copy
    env = {k: v for k, v in env.items() if k != CONFINE_ENV}
    initialised(repo, env)
    set_train(repo, MODE="readlogs", VAL_BPB=0.5)
    other_loops = Path(tempfile.gettempdir()) / f"autoresearch-{os.getuid()}" / "metric" / f"test-{os.getpid()}"
    other_loops.mkdir(parents=True, exist_ok=True)
    (other_loops / "val.bin").write_bytes(b"\0" * 64)  # another loop's copy of the val files
    try:
        loop(repo, env, "step", "-m", "a run that reads back what the last one printed")
    finally:
        shutil.rmtree(other_loops)
    candidate = rows(repo)[-1]
    log = (repo / candidate["log"]).read_text()
    assert log.count("read back: []") >= 2 and "CARRIED-WEIGHTS" in log, log
    assert len(re.findall(r"^read back: ", log, re.M)) == log.count("read back: []"), log


def test_whether_runs_are_confined_is_decided_at_init_not_by_a_later_step(repo, env):  # noqa: F811
    confined_env = {k: v for k, v in env.items() if k != CONFINE_ENV}
    initialised(repo, confined_env)
    set_train(repo, VAL_BPB=1.5)
    loop(repo, env, "step", "-m", "a step with confinement turned off")  # env: AUTORESEARCH_CONFINE=0
    log = (repo / rows(repo)[-1]["log"]).read_text()
    assert f"confined (Landlock ABI {ABI})" in log and f"{CONFINE_ENV}=0 is not heeded: tag t was started" in log
    initialised(repo, env, tag="u")  # started unconfined, on purpose: its steps are, whatever they set
    set_train(repo, VAL_BPB=1.6)
    loop(repo, confined_env, "step", "-m", "a step that does not say")
    assert f"not confined: {CONFINE_ENV}=0" in (repo / rows(repo)[-1]["log"]).read_text()


def test_without_an_nvidia_gpu_a_run_may_not_write_in_hugging_faces_cache(tmp_path, monkeypatch):
    # FA3's kernel downloads there, and only CUDA runs load it: elsewhere it would only be a place that outlives
    # the run (a checkpoint for the next one)
    from autoresearch.fa3 import could_load
    from autoresearch.runner import writable
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    env = {"AUTORESEARCH_CACHE_DIR": str(tmp_path / "data"), "CUDA_VISIBLE_DEVICES": ""}
    assert not could_load(env) and writable("scratch", "cache", env) == ["scratch", "cache", *RUN_ONLY]
    if not os.path.exists("/dev/nvidiactl"):  # this machine: no GPU at all
        assert writable("scratch", "cache", {}) == ["scratch", "cache", *RUN_ONLY]


def test_a_download_folder_holding_or_in_what_the_harness_keeps_is_never_writable(tmp_path, monkeypatch):
    # the agent starts `step` itself, with whatever HF_HOME it likes: `HF_HOME=.` must not open the repository
    from autoresearch import runner
    from autoresearch.runner import writable
    monkeypatch.chdir(tmp_path)  # where the loop runs
    env = {"AUTORESEARCH_CACHE_DIR": str(tmp_path.parent / "data")}
    monkeypatch.setattr(runner, "could_load", lambda env: True)  # a machine with an NVIDIA GPU
    data_inside = tmp_path.parent / "data" / "hf"
    for home in (tmp_path, tmp_path / "inside", tmp_path.parent, data_inside, Path.home(), "/"):
        monkeypatch.setenv("HF_HOME", str(home))
        assert str(home) not in map(str, writable("scratch", "cache", env)), home
    monkeypatch.setenv("HF_HOME", str(tmp_path.parent / "hf"))
    assert writable("scratch", "cache", env) == ["scratch", "cache", *RUN_ONLY, str(tmp_path.parent / "hf")]
