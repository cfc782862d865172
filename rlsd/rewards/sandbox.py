"""Run untrusted Python (model output) in a limited subprocess: the only place rlsd executes it.

Limits, all enforced outside the program: its own temporary directory as working directory;
CPU time, address space (memory) and file size through `setrlimit`; wall time, after which the
whole process group is killed; output read up to a size limit. Where the system allows
unprivileged namespaces (`unshare`), the program also runs without a network and in its own PID
namespace (it cannot see or signal the trainer). In every case a preamble inside the program
disables sockets, `fork`, `os.kill` of other processes and file writes outside its directory;
that preamble is a second fence, not a security boundary on its own: for hostile code on a shared
machine, run the trainer inside a container.
"""

from __future__ import annotations

import contextlib
import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass

PREAMBLE = textwrap.dedent("""
    import builtins as _b, os as _os, socket as _socket
    def _refuse(*a, **k):
        raise PermissionError("not allowed in the rlsd sandbox")
    _socket.socket = _refuse
    _socket.create_connection = _refuse
    _os.fork = _refuse
    _os.forkpty = _refuse
    _os.system = _refuse
    _home = _os.getcwd()
    _real_kill = _os.kill
    def _kill(pid, sig):
        if pid != _os.getpid():
            _refuse()
        _real_kill(pid, sig)
    _os.kill = _kill
    _os.killpg = _refuse
    _real_open = _b.open
    _self = _os.path.realpath(__file__)
    def _open(file, mode="r", *a, **k):
        if isinstance(file, (str, bytes, _os.PathLike)):
            path = _os.path.realpath(_os.fsdecode(file))
            if path == _self or (any(m in mode for m in "wax+") and
                                 not path.startswith(_home + _os.sep)):
                _refuse()  # no writes outside, and the program may not read its own source
        return _real_open(file, mode, *a, **k)
    _b.open = _open
    del _b, _socket
""")


@dataclass
class SandboxResult:
    status: str  # "passed", "failed" (non-zero exit), "timeout", "output_limit"
    exit_code: int | None
    output: str


@functools.lru_cache(maxsize=1)
def namespaces_available() -> bool:
    """Whether `unshare` can give the program its own user, network and PID namespaces."""
    if shutil.which("unshare") is None:
        return False
    try:
        probe = subprocess.run(
            ["unshare", "-rn", "--pid", "--fork", "true"], capture_output=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def _limits(cpu_seconds: int, memory_mb: int, file_bytes: int) -> None:
    """Runs in the child before exec: its own session (process group) and resource limits."""
    os.setsid()
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
    memory = memory_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_python(
    code: str, timeout: float = 10.0, memory_mb: int = 1024, max_output: int = 1_000_000
) -> SandboxResult:
    """Run `code` with the limits above; the exit status decides pass or fail.

    Output goes to a file in the sandbox, and the file-size limit (`max_output` bytes, for
    every file the program writes) stops a program that prints or writes too much.
    """
    workdir = tempfile.mkdtemp(prefix="rlsd-sandbox-")
    try:
        program = os.path.join(workdir, "program.py")
        with open(program, "w", encoding="utf-8") as fh:
            fh.write(PREAMBLE + "\n" + code)
        command = [sys.executable, "-I", program]
        if namespaces_available():
            command = ["unshare", "-rn", "--pid", "--fork", "--kill-child", *command]
        out_path = os.path.join(workdir, "output.txt")
        with open(out_path, "wb") as out:
            proc = subprocess.Popen(
                command,
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={"PATH": "/usr/bin:/bin", "HOME": workdir},
                preexec_fn=functools.partial(_limits, int(timeout) + 1, memory_mb, max_output),
            )
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                return SandboxResult("timeout", None, "")
        size = os.path.getsize(out_path)
        with open(out_path, "rb") as fh:
            text = fh.read(max_output).decode("utf-8", "replace")
        if proc.returncode == -signal.SIGXFSZ or size >= max_output:
            return SandboxResult("output_limit", proc.returncode, text)
        return SandboxResult("passed" if proc.returncode == 0 else "failed", proc.returncode, text)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
