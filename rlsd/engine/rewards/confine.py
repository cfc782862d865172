"""Kernel-enforced confinement of a verifier worker process (Linux; best effort elsewhere).

A worker that scores model output with a built-in verifier calls `confine(workdir)` once, after it
has imported everything it needs (or `confine(workdir, sealed=False)`, Landlock and no
capabilities only, when it forks a process per completion: each of those calls `seal()`, the
seccomp part, first). From then on the kernel (not Python) refuses it, and everything it could
start:

- Landlock (Linux >= 5.13): creating, writing, truncating, renaming or removing files anywhere but
  `workdir` (and writing /dev/null), executing programs, TCP bind/connect (ABI >= 4), signalling
  or connecting to abstract unix sockets of processes outside the worker (ABI >= 6), and ptrace /
  /proc/PID/mem / environ of other processes (the trainer included), mounting.
- no capabilities (`drop_capabilities`): a trainer run as root holds them all, and Landlock and
  seccomp leave what they grant (loading kernel modules, setting the clock, rebooting, raising
  its own limits, chattr +i) alone. The bounding, ambient, effective, permitted and inheritable
  sets are emptied; the process stays uid 0.
- seccomp (x86_64, aarch64), failing with EPERM: execve, fork/vfork and clone of anything but a
  thread, socket / socketpair (no network of any kind, no unix sockets), ptrace,
  process_vm_readv/writev; every signal to another process (kill and tgkill but to itself,
  tkill, rt_sigqueueinfo, rt_tgsigqueueinfo, pidfd_send_signal, fcntl F_SETOWN / F_SETOWN_EX /
  F_SETSIG) and file leases (F_SETLEASE); file metadata, which Landlock
  does not cover (chmod, chown, utime families, every xattr call, and the ioctls that set a
  file's flags, fsxattr, version or fs-verity) and truncate(2) by path; prlimit, setpriority,
  ioprio_set and the sched_set* calls aimed at any process but itself (the trainer's limits,
  priority, CPUs); and what outlives the process: System V IPC, POSIX message queues and the
  kernel's keyrings (add_key, request_key, keyctl).
- no_new_privs, so no set-uid program can lift any of it.

Reading files is not restricted (the worker must read Python's libraries). Each part is applied
when the kernel offers it; `confine` returns the names of the parts that took effect.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
import sys

PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 38, 24, 47, 4
# ioctl commands that change a file's attributes: FS_IOC_SETFLAGS (and its 32-bit form: chattr,
# +i / +a as root), FS_IOC_FSSETXATTR, FS_IOC_SETVERSION (both forms), FS_IOC_ENABLE_VERITY (makes
# a file read-only for good)
_FILE_IOCTLS = (0x40086602, 0x40046602, 0x401C5820, 0x40087602, 0x40047602, 0x40806685)
# fcntl commands: F_SETOWN, F_SETOWN_EX, F_SETSIG (SIGIO, or any signal, sent to a process it
# names: Landlock scopes it only from ABI 6), F_SETLEASE (holds back others who open the file)
_FCNTLS = (8, 15, 10, 1024)
_OWN = (0, "self")  # a process argument that names this process (0: the caller)
_SYS = {  # syscall numbers: landlock (same on every architecture), seccomp, and what is refused
    "x86_64": {
        "seccomp": 317,
        "capset": 126,
        "arch": 0xC000003E,
        "deny": [
            *(41, 53, 57, 58, 59, 322),  # socket socketpair fork vfork execve execveat
            *(101, 310, 311),  # ptrace process_vm_readv process_vm_writev
            *(200, 129, 297, 424),  # tkill rt_sigqueueinfo rt_tgsigqueueinfo pidfd_send_signal
            *(90, 91, 268, 452),  # chmod fchmod fchmodat fchmodat2
            *(92, 93, 94, 260),  # chown fchown lchown fchownat
            *(132, 235, 261, 280),  # utime utimes futimesat utimensat
            *range(188, 200),  # (l|f)(set|get|list|remove)xattr
            *(463, 464, 465, 466),  # (set|get|list|remove)xattrat (Linux 6.13)
            76,  # truncate (by path: Landlock refuses it only from ABI 3, Linux 6.2)
            *(29, 30, 31, *range(64, 72), 220),  # System V shared memory, semaphores,
            *range(240, 246),  # message queues, POSIX message queues (all outlive the process)
            *(248, 249, 250),  # add_key request_key keyctl (the user's keyrings outlive it too)
        ],
        "clone": 56,
        "clone3": 435,
        "ioctl": 16,
        "fcntl": 72,
        "own": {  # allowed only on this process: (argument, allowed values), all must hold
            62: [(0, ("self",))],  # kill
            234: [(0, ("self",))],  # tgkill (of its own threads)
            302: [(0, _OWN)],  # prlimit64
            141: [(0, (0,)), (1, _OWN)],  # setpriority(PRIO_PROCESS, itself)
            251: [(0, (1,)), (1, _OWN)],  # ioprio_set(IOPRIO_WHO_PROCESS, itself)
            142: [(0, _OWN)],  # sched_setparam
            144: [(0, _OWN)],  # sched_setscheduler
            203: [(0, _OWN)],  # sched_setaffinity
            314: [(0, _OWN)],  # sched_setattr
        },
        "x32": True,
    },
    "aarch64": {
        "seccomp": 277,
        "capset": 91,
        "arch": 0xC00000B7,
        "deny": [
            *(198, 199, 221, 281, 117, 270, 271),
            *(130, 138, 240, 424),
            *(52, 53, 452, 54, 55, 88),  # fchmod fchmodat fchmodat2 fchownat fchown utimensat
            *range(5, 17),
            *(463, 464, 465, 466),
            45,
            *range(180, 198),  # POSIX message queues, System V IPC
            *(217, 218, 219),
        ],
        "clone": 220,
        "clone3": 435,
        "ioctl": 29,
        "fcntl": 25,
        "own": {
            129: [(0, ("self",))],
            131: [(0, ("self",))],
            261: [(0, _OWN)],
            140: [(0, (0,)), (1, _OWN)],
            30: [(0, (1,)), (1, _OWN)],
            118: [(0, _OWN)],
            119: [(0, _OWN)],
            122: [(0, _OWN)],
            274: [(0, _OWN)],
        },
        "x32": False,
    },
}
_LANDLOCK_CREATE, _LANDLOCK_ADD, _LANDLOCK_RESTRICT = 444, 445, 446
_FS_EXECUTE, _FS_WRITE_FILE = 1 << 0, 1 << 1
_FS_WRITES = sum(1 << b for b in range(4, 13))  # remove dir/file, make char/dir/reg/sock/fifo/...
_FS_REFER, _FS_TRUNCATE = 1 << 13, 1 << 14
_NET_TCP = (1 << 0) | (1 << 1)  # bind, connect
_SCOPE_ALL = (1 << 0) | (1 << 1)  # abstract unix sockets, signals

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _syscall(number: int, *args) -> int:
    return _libc.syscall(ctypes.c_long(number), *args)


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 when it has none (or it is disabled)."""
    if not sys.platform.startswith("linux"):  # the syscall numbers below are Linux's
        return 0
    version = _syscall(_LANDLOCK_CREATE, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return max(version, 0)


def _landlock(workdir: str) -> bool:
    abi = landlock_abi()
    if abi < 1:
        return False
    fs = _FS_EXECUTE | _FS_WRITE_FILE | _FS_WRITES
    fs |= _FS_REFER if abi >= 2 else 0
    fs |= _FS_TRUNCATE if abi >= 3 else 0
    net = _NET_TCP if abi >= 4 else 0
    scoped = _SCOPE_ALL if abi >= 6 else 0
    attr = struct.pack("QQQ", fs, net, scoped)[: 24 if abi >= 6 else 16 if abi >= 4 else 8]
    ruleset = _syscall(_LANDLOCK_CREATE, attr, ctypes.c_size_t(len(attr)), ctypes.c_uint32(0))
    if ruleset < 0:
        return False
    try:
        for path, allowed in ((workdir, fs & ~_FS_EXECUTE), (os.devnull, _FS_WRITE_FILE)):
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                if path == os.devnull:
                    allowed |= _FS_TRUNCATE if abi >= 3 else 0
                rule = struct.pack("=Qi", allowed, fd)
                if _syscall(_LANDLOCK_ADD, ruleset, 1, rule, ctypes.c_uint32(0)) < 0:
                    return False
            finally:
                os.close(fd)
        return _syscall(_LANDLOCK_RESTRICT, ruleset, ctypes.c_uint32(0)) == 0
    finally:
        os.close(ruleset)


def _bpf(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k & 0xFFFFFFFF)


_LD, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
_ALLOW, _KILL_PROCESS = 0x7FFF0000, 0x80000000
_EPERM, _ENOSYS = 0x00050000 | 1, 0x00050000 | 38


def _argument(index: int) -> bytes:
    """Load the low 32 bits of a syscall argument (seccomp_data.args[index], little-endian)."""
    return _bpf(_LD, 16 + 8 * index)


def _only(number: int, rules: list, pid: int) -> list[bytes]:
    """Syscall `number` allowed only when every (argument, values) rule holds, its argument
    one of the values ("self": this process's pid); EPERM otherwise."""
    body = []
    for index, values in rules:
        values = [pid if v == "self" else v for v in values]
        body.append(_argument(index))  # a match jumps over the rest and the refusal
        body += [_bpf(_JEQ, v, len(values) - j, 0) for j, v in enumerate(values)]
        body.append(_bpf(_RET, _EPERM))
    body.append(_bpf(_RET, _ALLOW))
    return [_bpf(_JEQ, number, 0, len(body)), *body]


def _refused_when(number: int, index: int, values: tuple) -> list[bytes]:
    """Syscall `number` refused (EPERM) when argument `index` is one of `values`."""
    body = [_argument(index)]  # a match jumps over the rest and the allowance
    body += [_bpf(_JEQ, v, len(values) - j, 0) for j, v in enumerate(values)]
    body += [_bpf(_RET, _ALLOW), _bpf(_RET, _EPERM)]
    return [_bpf(_JEQ, number, 0, len(body)), *body]


def _seccomp_program(table: dict, pid: int) -> list[bytes]:
    """The filter: another architecture's calls kill the process; the `deny` calls, clone but
    for threads, the `own` calls aimed at another process, the file-attribute ioctls and the
    signalling fcntls fail with EPERM; clone3 with ENOSYS (libc falls back to clone); everything
    else is allowed."""
    prog = [_bpf(_LD, 4), _bpf(_JEQ, table["arch"], 1, 0), _bpf(_RET, _KILL_PROCESS)]
    prog.append(_bpf(_LD, 0))
    if table["x32"]:
        prog += [_bpf(_JGE, 0x40000000, 0, 1), _bpf(_RET, _EPERM)]
    for number in table["deny"]:
        prog += [_bpf(_JEQ, number, 0, 1), _bpf(_RET, _EPERM)]
    prog += [_bpf(_JEQ, table["clone3"], 0, 1), _bpf(_RET, _ENOSYS)]
    prog += [  # clone: threads only (CLONE_THREAD in the flags, the first argument)
        _bpf(_JEQ, table["clone"], 0, 4),
        _argument(0),
        _bpf(_JSET, 0x00010000, 0, 1),
        _bpf(_RET, _ALLOW),
        _bpf(_RET, _EPERM),
    ]
    for number, rules in table["own"].items():
        prog += _only(number, rules, pid)
    prog += _refused_when(table["ioctl"], 1, _FILE_IOCTLS)
    prog += _refused_when(table["fcntl"], 1, _FCNTLS)
    return [*prog, _bpf(_RET, _ALLOW)]


def _seccomp() -> bool:
    table = _SYS.get(platform.machine())
    if table is None:
        return False
    prog = b"".join(_seccomp_program(table, os.getpid()))
    buffer = ctypes.create_string_buffer(prog)
    fprog = struct.pack("HxxxxxxQ", len(prog) // 8, ctypes.addressof(buffer))
    # SECCOMP_SET_MODE_FILTER with SECCOMP_FILTER_FLAG_TSYNC: every thread of the worker
    return _syscall(table["seccomp"], 1, 1, fprog) == 0


def _no_new_privs() -> bool:
    return sys.platform.startswith("linux") and _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0


def _capability_sets() -> dict[str, int]:
    """This process's capability sets as the kernel reports them (CapEff, CapPrm, ...)."""
    with open("/proc/self/status") as fh:
        return {k: int(v, 16) for k, v in (ln.split(":", 1) for ln in fh) if k.startswith("Cap")}


def drop_capabilities() -> bool:
    """Give up every capability for good (a trainer run as root holds them all): the bounding
    set first (while CAP_SETPCAP is still held), the ambient set, then the effective, permitted
    and inheritable sets (capset). The process stays uid 0, so it still owns root's files: the
    metadata calls that owning allows are refused by seccomp. True when none is left to use."""
    table = _SYS.get(platform.machine())
    if table is None or not os.path.exists("/proc/self/status"):
        return False
    try:
        with open("/proc/sys/kernel/cap_last_cap") as fh:
            last = int(fh.read())
    except (OSError, ValueError):
        last = 63
    for cap in range(last + 1):  # (EPERM without CAP_SETPCAP: then the sets below are empty)
        _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
    _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = struct.pack("=Ii", 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    _syscall(table["capset"], header, bytes(24))  # two words of (effective, permitted, inh.)
    sets = _capability_sets()
    return sets.get("CapEff", 1) == sets.get("CapPrm", 1) == sets.get("CapAmb", 0) == 0


def confine(workdir: str, sealed: bool = True) -> list[str]:
    """Confine this process (and all it may start) as the module docstring says; with
    `sealed=False` Landlock and no capabilities only, for a worker that must still fork its
    scoring processes (each then calls `seal()`)."""
    applied: list[str] = []
    if not _no_new_privs():
        return applied
    if _landlock(workdir):
        applied.append(f"landlock-abi{landlock_abi()}")
    if drop_capabilities():
        applied.append("no-capabilities")
    return applied + (seal() if sealed else [])


def seal() -> list[str]:
    """The seccomp part alone (no processes, sockets, programs, tracing, signals to others, file
    metadata, no changing another process's limits or scheduling): for a scoring process forked
    from a Landlock-confined worker."""
    return ["seccomp"] if _no_new_privs() and _seccomp() else []
