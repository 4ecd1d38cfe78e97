"""
A training run confined by the kernel (Linux Landlock): train.py and all it starts may write only in the
folders the loop names (runner.writable: the run's scratch folder, its version's compile cache, /dev/shm,
/dev/mqueue, FA3's download cache) and in the character devices of /dev (no file made there), from ABI 4
(kernel 6.7) may bind no TCP port nor connect but to the ports the loop names (fa3.download_ports: none where no
GPU could load FA3), and from ABI 6 (kernel 6.12) may signal no process outside the run nor reach an abstract
unix socket. Where the kernel lets a user have namespaces, the run also has an IPC namespace of its own, a
mount namespace where every file but its folders is read-only and what earlier runs left (their logs) shows
empty, a PID namespace with its own /proc and, when it may connect nowhere, a network namespace: what it leaves
in SysV IPC dies with it, it marks no file of yours, reads no earlier run's output and reaches no process over
IP. A seccomp filter (x86-64, ARM64) keeps it from unix sockets with a path and from the kernel's keyrings. The one place that decides whether a run
is confined; where the kernel cannot (off Linux, before 5.19, a container that blocks the calls) or
AUTORESEARCH_CONFINE=0 says not to, the run goes on unconfined with a line that says why, and the loop's checks
after the run are all there is.

    python -m autoresearch.confine --write DIR [--devices DIR] [--connect PORT ...] [--hide PATH ...] -- COMMAND
"""
import argparse
import contextlib
import ctypes
import os
import signal
import stat
import sys
from pathlib import Path

CONFINE_ENV = "AUTORESEARCH_CONFINE"  # "0": runs are not confined (the log of each says so)

# -----------------------------------------------------------------------------
# The kernel's interface (include/uapi/linux/landlock.h); the syscall numbers are the same on every architecture

SYS_CREATE_RULESET, SYS_ADD_RULE, SYS_RESTRICT_SELF = 444, 445, 446
CREATE_RULESET_VERSION = 1
RULE_PATH_BENEATH, RULE_NET_PORT = 1, 2
PR_SET_NO_NEW_PRIVS = 38
# ABI 4: TCP. Handled and never allowed, listening is refused; connecting, but to the ports a rule names
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
# ABI 6: no connecting to an abstract unix socket (another process of yours) or signalling outside the domain
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1

# what writing is, by the ABI that first knows the right: files written, truncated, made, removed, renamed in.
# Reading, executing and device ioctls are not handled, so they stay allowed everywhere.
WRITE_FILE, TRUNCATE, REFER = 1 << 1, 1 << 14, 1 << 13
MAKE_AND_REMOVE = sum(1 << bit for bit in (4, 5, 6, 7, 8, 9, 10, 11, 12))  # remove dir/file, make char..sym


class RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class NetPortAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("port", ctypes.c_uint64)]


def libc():
    return ctypes.CDLL(None, use_errno=True)


def landlock_abi():
    """The kernel's Landlock ABI version, or (0, why not) where there is none."""
    if not sys.platform.startswith("linux"):
        return 0, f"Landlock is Linux's ({sys.platform} has none)"
    abi = libc().syscall(SYS_CREATE_RULESET, None, 0, CREATE_RULESET_VERSION)
    if abi < 0:
        why = os.strerror(ctypes.get_errno())
        return 0, f"no Landlock here ({why}: a kernel before 5.13, without it, or a container that blocks it)"
    return abi, ""


def write_rights(abi):
    return WRITE_FILE | MAKE_AND_REMOVE | (REFER if abi >= 2 else 0) | (TRUNCATE if abi >= 3 else 0)


# -----------------------------------------------------------------------------
# Namespaces of the run's own: what it leaves in SysV IPC and on the network dies with it, and it sees every file
# but its folders read-only

CLONE_NEWUSER, CLONE_NEWIPC, CLONE_NEWNET, CLONE_NEWNS = 0x10000000, 0x08000000, 0x40000000, 0x00020000
CLONE_NEWPID = 0x20000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 1 << 1, 1 << 2, 1 << 3, 1 << 12, 1 << 14, 1 << 18
SYS_MOUNT_SETATTR, AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY = 442, -100, 0x8000, 1
SYS_OPEN_TREE, SYS_MOVE_MOUNT, OPEN_TREE_CLONE, MOVE_MOUNT_F_EMPTY_PATH = 428, 429, 1, 4
# folders of the run's own, made afresh: what it leaves there goes with its namespaces (shm_open's files; the
# message queues of its IPC namespace)
FRESH = {"/dev/shm": ("tmpfs", b"mode=1777"), "/dev/mqueue": ("mqueue", None)}


class MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64), ("propagation", ctypes.c_uint64),
                ("userns_fd", ctypes.c_uint64)]


def enter_own_namespaces(flags):
    """This process in a user namespace of its own (its uid and gid mapped to themselves: files and
    permissions look the same) with the namespaces in `flags`; an empty string when done, else why not."""
    c, uid, gid = libc(), os.getuid(), os.getgid()  # once in the namespace, both read as unmapped (65534)
    if c.unshare(CLONE_NEWUSER | flags) != 0:
        return os.strerror(ctypes.get_errno())
    try:
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    except OSError as e:
        return e.strerror or str(e)
    return ""


def read_only_view(folders, hidden=()):
    """In this process's own mount namespace: every mount read-only but `folders` (bound onto themselves) and
    /proc (where the next namespace's maps are written), then a user, mount and PID namespace inside it, which
    locks that view: no process in it can make a mount writable again or unmount one. So a run can set no
    extended attribute, mode or time on a file outside its folders (a few KB of weights each that would outlive
    it). Devices open for writing on a read-only mount. /dev/shm and /dev/mqueue, where among `folders`, are made
    the run's own (FRESH). `hidden` shows empty (a folder) or as /dev/null (a file), but for the folders beneath
    it: what earlier runs left that a run could read (its logs, say). Returns why not (an empty string when
    done) and the folders made afresh."""
    c, size = libc(), ctypes.sizeof(MountAttr)

    def writable(path):
        return not os.statvfs(path).f_flag & os.ST_RDONLY

    def mount_attr(path, attr):
        return c.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, os.fsencode(path), AT_RECURSIVE, ctypes.byref(attr), size)

    own = [path for path in dict.fromkeys(map(os.path.realpath, folders))
           if os.path.exists(path) and writable(path)]
    if c.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        return f"making mounts private: {os.strerror(ctypes.get_errno())}", []
    fresh = [path for path, (kind, options) in FRESH.items() if os.path.realpath(path) in own and c.mount(
        kind.encode(), os.fsencode(os.path.realpath(path)), kind.encode(), MS_NOSUID | MS_NODEV, options) == 0]
    for path in dict.fromkeys(map(os.path.realpath, hidden)):
        why = hide(path, [folder for folder in own if folder != path and folder.startswith(path + os.sep)])
        if why:
            return f"hiding {path}: {why}", fresh
    for path in own:
        if c.mount(os.fsencode(path), os.fsencode(path), None, MS_BIND | MS_REC, None) != 0:
            return f"binding {path}: {os.strerror(ctypes.get_errno())}", fresh
    if mount_attr("/", MountAttr(attr_set=MOUNT_ATTR_RDONLY)) != 0:
        return f"mount_setattr: {os.strerror(ctypes.get_errno())}", fresh
    for path in [*own, "/proc"]:
        mount_attr(path, MountAttr(attr_clr=MOUNT_ATTR_RDONLY))
    why = enter_own_namespaces(CLONE_NEWNS | CLONE_NEWPID)
    if why:
        return f"locking it: {why}", fresh
    stuck = [path for path in own if not writable(path)]
    return (f"{stuck[0]} stayed read-only" if stuck else ""), fresh


def hide(path, beneath):
    """`path` shows empty (a folder: a tmpfs, made read-only with the rest; a file: /dev/null) but for the
    folders `beneath` it, cloned before and put back in the same places. Returns why not, or ''."""
    c = libc()
    if not os.path.isdir(path):
        if os.path.exists(path) and c.mount(b"/dev/null", os.fsencode(path), None, MS_BIND, None) != 0:
            return os.strerror(ctypes.get_errno())
        return ""
    clones = []
    for folder in beneath:
        fd = c.syscall(SYS_OPEN_TREE, AT_FDCWD, os.fsencode(folder), OPEN_TREE_CLONE | AT_RECURSIVE | os.O_CLOEXEC)
        if fd < 0:
            return f"open_tree {folder}: {os.strerror(ctypes.get_errno())}"
        clones.append((folder, fd))
    if c.mount(b"tmpfs", os.fsencode(path), b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=0755,size=16m") != 0:
        return os.strerror(ctypes.get_errno())
    for folder, fd in clones:
        os.makedirs(folder, exist_ok=True)
        moved = c.syscall(SYS_MOVE_MOUNT, fd, b"", AT_FDCWD, os.fsencode(folder), MOVE_MOUNT_F_EMPTY_PATH)
        os.close(fd)
        if moved != 0:
            return f"move_mount {folder}: {os.strerror(ctypes.get_errno())}"
    return ""


def fresh_proc():
    """/proc of this PID namespace, over the machine's (whose /proc/PID/root would show any process's view of the
    files, yours included): called as its first process. Returns why not, or ''."""
    if libc().mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None) != 0:
        return os.strerror(ctypes.get_errno())
    return ""


def own_namespaces(net, folders=None, hidden=()):
    """Puts this process (and so the run) in an IPC namespace of its own, and with net a network namespace of its
    own (only a loopback, down): SysV shared memory, semaphores and message queues, POSIX message queues, abstract
    unix sockets and any socket over IP that the run makes reach nothing outside it, and go with it. With folders,
    also a mount namespace where all else is read-only and `hidden` empty (read_only_view), and a PID namespace
    whose first process (the next this one forks) mounts a /proc of its own (fresh_proc). Unprivileged only
    through a user namespace, which some systems forbid (a sysctl, AppArmor): it is all tried in a child first,
    as a process left half in one (its uid unmapped) could write no file. Returns a phrase for the line, and
    whether the next fork starts a PID namespace."""
    flags = CLONE_NEWIPC | (CLONE_NEWNET if net else 0)
    what = "IPC and network namespaces of its own" if net else "an IPC namespace of its own"
    view = folders is not None

    def enter(view):
        why = enter_own_namespaces(flags | (CLONE_NEWNS if view else 0))
        return (why, "", []) if why or not view else ("", *read_only_view(folders, hidden))

    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.close(read)
            why, view_why, _ = enter(view)
            if view and not why and not view_why:  # the PID namespace's first process: its own /proc
                first = os.fork()
                if first == 0:
                    os._exit(1 if fresh_proc() else 0)
                if os.waitstatus_to_exitcode(os.waitpid(first, 0)[1]) != 0:
                    view_why = "a /proc of its own: mounting it failed"
            os.write(write, f"{why}\n{view_why}".encode())
        finally:
            os._exit(0)  # whatever happened: never on into the run
    os.close(write)
    with os.fdopen(read, "rb") as f:
        why, said, tried_view = f.read().decode(errors="replace").partition("\n")
    os.waitpid(child, 0)
    why = why if said else "the trial child died"
    if not why:
        why, view_why, fresh = enter(view and not tried_view)
        view_why = view_why or tried_view
    if why:
        return f"; no {what} ({why})", False
    if not view:
        return f"; {what}", False
    if view_why:
        return f"; {what}; no read-only view ({view_why})", False
    return f"; {what}; every file but its folders read-only" + (f", {' and '.join(fresh)} its own" if fresh else
                                                                "") + " (a mount namespace of its own)", True


def first_process():
    """Forks into the PID namespace own_namespaces made: the child goes on as its first process (PID 1), with a
    /proc of its own, and gets (the pipe to tell the run's end on, why it has no /proc of its own or ''); this
    process waits for it and ends as the run it starts ended (run_as_first)."""
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    status_read, status_write = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(status_read)
        os.set_inheritable(status_write, False)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # an ignored SIGCHLD would leave it no child to wait for
        signal.signal(signal.SIGINT, lambda *_: None)  # a Ctrl-C is the run's to handle (a handler, not
        return status_write, fresh_proc()               # SIG_IGN: that would outlive the exec into the run)
    os.close(status_write)
    for number in signals:  # the loop's signals reach the run itself, in the same process group: its end is ours
        signal.signal(number, signal.SIG_IGN)
    with os.fdopen(status_read, "rb") as f:
        told = f.read()
    waited = os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])
    status = int(told) if told else None
    if status is None:  # the first process died before the run ended: a failure, whatever its code
        sys.exit(waited if waited > 0 else 128 - waited if waited < 0 else 1)
    if os.WIFSIGNALED(status):  # as the run's own end: killed by this signal (the out-of-memory killer's, say)
        with contextlib.suppress(OSError, ValueError):  # SIGKILL's cannot be set, and needs not
            signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
        os.kill(os.getpid(), os.WTERMSIG(status))
    sys.exit(os.waitstatus_to_exitcode(status))


def run_as_first(command, status_write):
    """As the PID namespace's first process: runs `command` as its child (in the same process group, where the
    loop's signals reach it; a first process ignores those it has no handler for), reaps every orphan, and when
    the command ends tells its wait status to the process outside, then ends (and the kernel kills what is left
    in the namespace)."""
    run = os.fork()
    if run == 0:
        os.execvp(command[0], command)
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        if pid == run:
            os.write(status_write, str(status).encode())
            break
    os._exit(0)


# -----------------------------------------------------------------------------
# No unix socket with a path: Landlock does not confine connecting to one, and a process of yours that listens on
# one (started by an agent, say) could keep what a run sends it for the next. Nor the kernel's keyrings: a run can
# reach your user's keyring by its number (/proc/keys) and keep megabytes of keys there. A seccomp filter refuses a
# unix socket (socketpair's streams stay: multiprocessing's pipes), the key calls, io_uring (which makes sockets
# without the call) and the 32-bit system calls, which the filter would not see.

PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
RET_ALLOW, RET_ERRNO = 0x7FFF0000, 0x00050000
LOAD, JUMP_EQ, JUMP_GE, AND, RET = 0x20, 0x15, 0x35, 0x54, 0x06  # BPF: ld [k]; jeq, jge #k; and #k; ret #k
AF_UNIX, SOCK_DGRAM, IO_URING_SETUP = 1, 2, 425
# machine: (its audit arch, socket, socketpair, the first syscall number of another ABI sharing it (x32), the
# calls refused whatever their arguments: add_key, request_key, keyctl)
SYSCALLS = {"x86_64": (0xC000003E, 41, 53, 0x40000000, (248, 249, 250)),
            "aarch64": (0xC00000B7, 198, 199, None, (217, 218, 219))}


class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(SockFilter))]


def socket_filter(machine):
    """The seccomp program (a list of (code, jump if true, jump if false, k), jumps to labels) for `machine`."""
    arch, sock, pair, other_abi, refused = SYSCALLS[machine]
    program = [(LOAD, 0, 0, 4), (JUMP_EQ, 0, "abi", arch), (LOAD, 0, 0, 0),  # seccomp_data: nr, arch, ip, args
               *([(JUMP_GE, "abi", 0, other_abi)] if other_abi else []),
               *((JUMP_EQ, "deny", 0, call) for call in (IO_URING_SETUP, *refused)),
               (JUMP_EQ, "socket", 0, sock), (JUMP_EQ, 0, "allow", pair),
               (LOAD, 0, 0, 16), (JUMP_EQ, 0, "allow", AF_UNIX), (LOAD, 0, 0, 24), (AND, 0, 0, 0xF),
               (JUMP_EQ, "deny", "allow", SOCK_DGRAM),  # a datagram pair could still send to a path
               "socket", (LOAD, 0, 0, 16), (JUMP_EQ, "deny", "allow", AF_UNIX),
               "allow", (RET, 0, 0, RET_ALLOW), "deny", (RET, 0, 0, RET_ERRNO | 1),  # EPERM
               "abi", (RET, 0, 0, RET_ERRNO | 38)]  # ENOSYS
    labels, code = {}, []
    for item in program:
        if isinstance(item, str):
            labels[item] = len(code)
        else:
            code.append(item)
    return [(op, *(labels[j] - i - 1 if isinstance(j, str) else j for j in (jt, jf)), k)
            for i, (op, jt, jf, k) in enumerate(code)]


def refuse_unix_sockets():
    """This process and its children may open no unix socket (see above). Needs no_new_privs set. Returns a
    phrase for the line."""
    machine = os.uname().machine if sys.maxsize > 2**32 else "a 32-bit Python"  # its calls are the other ABI's
    if machine not in SYSCALLS:
        return f"; unix sockets not refused (no filter for {machine})"
    program = socket_filter(machine)
    filters = (SockFilter * len(program))(*(SockFilter(*op) for op in program))
    if libc().prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(SockFprog(len(program), filters)), 0, 0):
        return f"; unix sockets not refused (seccomp: {os.strerror(ctypes.get_errno())})"
    return "; no unix socket but a socketpair's stream, no keyring"


# -----------------------------------------------------------------------------
# Confining this process, then becoming the run


def character_devices(folder):
    """The character devices beneath `folder` (links not followed): a GPU's, /dev/null, a terminal."""
    found = []
    for top, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(top, name)
            with contextlib.suppress(OSError):
                if stat.S_ISCHR(os.lstat(path).st_mode):
                    found.append(path)
    return found


def confine(folders, ports=(), devices=(), hidden=()):
    """From now on this process and its children write only beneath `folders` (those that exist) and in the
    character devices beneath `devices` as they are now (opened for writing: no file made there, no regular
    file or disk written, so that nothing the run keeps there outlives it), use TCP only to connect to `ports`
    (a process of yours listening on another could keep or write what the run sends it), signal no process
    outside and see `hidden` empty. Returns a line that says what holds, and where this process became the
    first of a PID namespace of its own (the process that called this waits outside), the pipe to tell the
    run's end on (run_as_first); else None."""
    if os.environ.get(CONFINE_ENV) == "0":
        return f"not confined: {CONFINE_ENV}=0", None
    abi, why = landlock_abi()
    if not abi:
        return f"not confined: {why}", None
    if abi < 2:  # every rename between folders refused, also inside the allowed ones: triton's cache would fail
        return "not confined: Landlock ABI 1 (a kernel before 5.19) refuses the renames compile caches make", None
    c, rights = libc(), write_rights(abi)
    net = NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0
    attr = RulesetAttr(rights, net, SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0)
    ruleset = c.syscall(SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.sizeof(attr), 0)
    if ruleset < 0:
        return f"not confined: landlock_create_ruleset failed ({os.strerror(ctypes.get_errno())})", None
    # first: the rules name what the paths lead to in the run's own view (/dev/shm made afresh there)
    spaces, pid_namespace = own_namespaces(net=not ports, folders=folders, hidden=hidden)
    status, no_proc = first_process() if pid_namespace else (None, "")
    if pid_namespace:
        spaces += f"; a PID namespace, but the machine's /proc ({no_proc})" if no_proc else \
            "; a PID namespace and /proc of its own"
    allowed, opened = [], 0
    try:
        for folder in [*folders, *(path for d in devices for path in character_devices(d))]:
            try:
                fd = os.open(folder, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue  # not there: nothing to write in
            try:
                # a file (/dev/null, say) takes only the rights a file has
                mask = rights if os.path.isdir(folder) else rights & (WRITE_FILE | TRUNCATE)
                if c.syscall(SYS_ADD_RULE, ruleset, RULE_PATH_BENEATH, ctypes.byref(PathBeneathAttr(mask, fd)),
                             0) == 0:
                    if folder in folders:
                        allowed.append(folder)
                    else:
                        opened += 1
            finally:
                os.close(fd)
        if devices:
            allowed.append(f"{opened} character devices in {', '.join(devices)}")
        for port in sorted(set(ports)) if net else ():
            rule = NetPortAttr(NET_CONNECT_TCP, port)
            if c.syscall(SYS_ADD_RULE, ruleset, RULE_NET_PORT, ctypes.byref(rule), 0) != 0:
                return f"not confined: a rule for TCP port {port} failed ({os.strerror(ctypes.get_errno())})", status
        if c.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or c.syscall(SYS_RESTRICT_SELF, ruleset, 0) != 0:
            return f"not confined: landlock_restrict_self failed ({os.strerror(ctypes.get_errno())})", status
        spaces += refuse_unix_sockets()
    finally:
        os.close(ruleset)
    tcp = "" if not net else (f"; TCP only to port {', '.join(map(str, sorted(set(ports))))}" if ports else
                              "; no TCP")
    signals = "; signals and abstract unix sockets only within the run" if abi >= 6 else ""
    return f"confined (Landlock ABI {abi}): writes only in {', '.join(allowed)}{tcp}{signals}{spaces}", status


def will_confine(env, truncate=False):
    """Whether a run started with this environment will be confined (what confine() checks before it acts), and
    with truncate: also kept from truncating files it may not write (ABI 3, kernel 6.2). A kernel that offers
    Landlock and then refuses it leaves this wrong: a run that counts on it is started with require."""
    return env.get(CONFINE_ENV) != "0" and landlock_abi()[0] >= (3 if truncate else 2)


def confined(command, folders, require=False, ports=(), devices=(), hidden=()):
    """`command` run through this module: confined to write in `folders` and the files in `devices`, to
    connect over TCP to `ports` and to see `hidden` empty (see confine) before it starts. -I,
    and this package's folder last on the path: no module left in the repository stands in for the stdlib's.
    require: where it cannot be confined the command does not run (exit 1), as the harness counted on it."""
    root = str(Path(__file__).resolve().parents[1])
    bootstrap = f"import sys; sys.path.append({root!r}); from autoresearch.confine import main; main()"
    writes = [arg for folder in folders if folder for arg in ("--write", str(folder))]
    writes += [arg for folder in devices for arg in ("--devices", str(folder))]
    connects = [arg for port in ports for arg in ("--connect", str(port))]
    hides = [arg for path in hidden for arg in ("--hide", str(path))]
    return [sys.executable, "-I", "-c", bootstrap, *writes, *connects, *hides, *(["--require"] if require else []),
            "--", *command]


def main():
    parser = argparse.ArgumentParser(description="Run a command that may write only in the folders named.")
    parser.add_argument("--write", action="append", default=[], metavar="DIR")
    parser.add_argument("--connect", action="append", default=[], type=int, metavar="PORT")
    parser.add_argument("--devices", action="append", default=[], metavar="DIR")
    parser.add_argument("--hide", action="append", default=[], metavar="PATH")
    parser.add_argument("--require", action="store_true", help="not confined: do not run the command")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command after --")
    said, status = confine(args.write, args.connect, args.devices, args.hide)
    print(f"[agent_loop] {said}", file=sys.stderr, flush=True)
    if args.require and not said.startswith("confined"):
        message = (f"[agent_loop] the loop counted on the kernel's confinement here (the evaluator warms its "
                   f"compile cache beside the run), so the run does not start. Set {CONFINE_ENV}=0 at `init` "
                   f"where the kernel offers Landlock but refuses it")
        if status is not None:
            print(message, file=sys.stderr, flush=True)
            os.write(status, str(1 << 8).encode())  # a wait status: exit code 1
            os._exit(1)
        sys.exit(message)
    if status is not None:
        run_as_first(command, status)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
