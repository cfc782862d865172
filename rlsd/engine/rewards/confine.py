"""Kernel-enforced confinement of a verifier worker process (Linux; best effort elsewhere).

A worker that scores model output with a built-in verifier calls `confine(workdir)` once, after it
has imported everything it needs (or `confine(workdir, sealed=False)`, Landlock only, when it
forks a process per completion: each of those calls `seal()`, the seccomp part, first). From
then on the kernel (not Python) refuses it, and everything
it could start:

- Landlock (Linux >= 5.13): creating, writing, truncating, renaming or removing files anywhere but
  `workdir` (and writing /dev/null), executing programs, TCP bind/connect (ABI >= 4), signalling
  or connecting to abstract unix sockets of processes outside the worker (ABI >= 6), and ptrace /
  /proc/PID/mem / environ of other processes (the trainer included).
- seccomp (x86_64, aarch64): execve, fork/vfork and clone of anything but a thread, socket /
  socketpair (no network of any kind, no unix sockets), ptrace, process_vm_readv/writev, and
  kill/tgkill of any process but itself fail with EPERM.
- no_new_privs, so no set-uid program can lift either.

Reading files is not restricted (the worker must read Python's libraries). Each part is applied
when the kernel offers it; `confine` returns the names of the parts that took effect.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
import sys

PR_SET_NO_NEW_PRIVS = 38
_SYS = {  # syscall numbers: landlock (same on every architecture), seccomp, and what is refused
    "x86_64": {
        "seccomp": 317,
        "arch": 0xC000003E,
        "deny": [41, 53, 57, 58, 59, 322, 101, 310, 311, 200],  # socket socketpair fork vfork
        # execve execveat ptrace process_vm_readv process_vm_writev tkill
        "clone": 56,
        "clone3": 435,
        "kill": [62, 234],  # kill, tgkill: allowed for the worker itself only
        "x32": True,
    },
    "aarch64": {
        "seccomp": 277,
        "arch": 0xC00000B7,
        "deny": [198, 199, 221, 281, 117, 270, 271, 130],
        "clone": 220,
        "clone3": 435,
        "kill": [129, 131],
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


def _seccomp_program(table: dict, pid: int) -> list[bytes]:
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, kill_process = 0x7FFF0000, 0x80000000
    eperm, enosys = 0x00050000 | 1, 0x00050000 | 38
    prog = [_bpf(ld, 4), _bpf(jeq, table["arch"], 1, 0), _bpf(ret, kill_process), _bpf(ld, 0)]
    if table["x32"]:
        prog += [_bpf(jge, 0x40000000, 0, 1), _bpf(ret, eperm)]
    for number in table["deny"]:
        prog += [_bpf(jeq, number, 0, 1), _bpf(ret, eperm)]
    prog += [_bpf(jeq, table["clone3"], 0, 1), _bpf(ret, enosys)]  # libc falls back to clone
    prog += [  # clone: threads only (CLONE_THREAD in the flags, the first argument)
        _bpf(jeq, table["clone"], 0, 4),
        _bpf(ld, 16),
        _bpf(jset, 0x00010000, 0, 1),
        _bpf(ret, allow),
        _bpf(ret, eperm),
    ]
    for number in table["kill"]:  # kill(pid, sig) / tgkill(tgid, tid, sig): only this process
        prog += [
            _bpf(jeq, number, 0, 4),
            _bpf(ld, 16),
            _bpf(jeq, pid, 0, 1),
            _bpf(ret, allow),
            _bpf(ret, eperm),
        ]
    return [*prog, _bpf(ret, allow)]


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


def confine(workdir: str, sealed: bool = True) -> list[str]:
    """Confine this process (and all it may start) as the module docstring says; with
    `sealed=False` Landlock only, for a worker that must still fork its scoring processes (each
    then calls `seal()`)."""
    applied: list[str] = []
    if not _no_new_privs():
        return applied
    if _landlock(workdir):
        applied.append(f"landlock-abi{landlock_abi()}")
    return applied + (seal() if sealed else [])


def seal() -> list[str]:
    """The seccomp part alone (no processes, sockets, programs, tracing, signals to others):
    for a scoring process forked from a Landlock-confined worker."""
    return ["seccomp"] if _no_new_privs() and _seccomp() else []
