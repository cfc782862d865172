"""Run untrusted Python (model output) in a sandbox made by the operating system, and judge it
against tests with a verdict the untrusted code cannot forge.

**Containment.** Every run is a fresh bubblewrap sandbox (`bwrap`, Debian's `bubblewrap`): its own
user, PID, mount, IPC, UTS, cgroup and network namespaces (no network at all, not even the
host's loopback or abstract unix sockets); a read-only view of only the system libraries and the
Python install it runs with (no home directory, no project, no /etc, no /sys); its own /proc,
which shows only its own processes; a private size-limited tmpfs at /tmp, its working directory
and the only writable place; all capabilities dropped, no new privileges, a new session, a
cleared environment, no nested user namespaces, and death with its parent. When the trainer runs
as root the sandbox is started as uid 65534, so nothing in it is root anywhere and the kernel
applies the process limit (if that user cannot read the interpreter, it starts as root, whose
process count the kernel does not limit). Inside, before anything untrusted runs, the
launcher sets hard limits on memory (address space), CPU time, file size (each file and the
output), process count and core dumps. The trainer keeps the wall clock: past `timeout` it
kills the whole tree.

**The verdict** (`run_tests`). Inside the sandbox a judge process forks the candidate process
*before* it reads the tests, so the candidate never holds them; the candidate closes every
inherited descriptor but its two pipes to the judge before its code runs, and the judge makes
itself non-dumpable, so the candidate cannot open the judge's /proc entries, read its memory,
trace it or reach the descriptor on which the judge reports to the trainer. The tests run in the
judge, which never executes candidate code: each function of the candidate they call is a proxy
that sends the arguments to the candidate process and brings back the result as plain data
(None, bool, int, float, complex, str, bytes, and lists, tuples, sets and dicts of them, decoded
by the judge into fresh built-in objects); an exception it raises arrives as the built-in type
of that name (else RuntimeError), StopIteration as RuntimeError (PEP 479: raised inside a
test's map() or filter() it would end the iteration and pass the test). Exiting early,
printing anything, patching builtins, `exec` or the test function, atexit or `__del__` tricks
and objects whose `__eq__` is always true all happen in a process the verdict does not come
from. The judge writes the verdict with a nonce the trainer made; no verdict (the candidate
killed or stopped the judge) is a fail.

`code_sandbox: none` (the opt-out where bubblewrap cannot run) keeps the resource limits, the
judge and the unprivileged uid when the trainer is root, but no namespaces and no file-system
view: the program can read and write whatever that user can, reach the network and, unless the
trainer is root, the trainer's own processes (and so its verdict).

The program that runs inside (the launcher, the judge and the candidate's server) is
`sandbox_launcher.py`, passed to the sandbox's interpreter with `-c`.

The interpreter inside is the system's `/usr/bin/python3` when there is one (else the trainer's
own base interpreter, its installation bound read-only), run with `-I -S`: the standard library
only, no site-packages, nothing from the trainer's virtual environment.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

SANDBOXES = ("bubblewrap", "none")
NOBODY = 65534
INSTALL = "install bubblewrap (Debian/Ubuntu: sudo apt-get install bubblewrap)"


class SandboxError(RuntimeError):
    """The sandbox itself failed (did not start, judge crashed): not the candidate's doing."""


@dataclass
class SandboxResult:
    status: str  # "passed" (exit 0), "failed", "timeout", "output_limit"
    exit_code: int | None
    output: str


@dataclass
class CodeTests:
    """What to judge: the candidate's code and either HumanEval-style `check` code (with the
    trusted `prompt_code` it may use and the `entry_point` it is given) or `tests`, statements
    run one by one with the candidate's top-level names in scope."""

    candidate: str
    tests: list[str] = field(default_factory=list)
    check: str = ""
    entry_point: str = ""
    prompt_code: str = ""


@dataclass
class Verdict:
    passed: int
    total: int
    status: str  # "judged", "timeout", "no_verdict" (the candidate stopped the judge)
    output: str


@dataclass(frozen=True)
class Limits:
    timeout: float = 10.0
    memory_mb: int = 1024
    max_output: int = 1_000_000
    disk_mb: int = 64
    processes: int = 32
    sandbox: str = "bubblewrap"


# -- the trainer's side ----------------------------------------------------------------------


def run_python(
    code: str, timeout: float = 10.0, memory_mb: int = 1024, max_output: int = 1_000_000, **limits
) -> SandboxResult:
    """Run `code` as a program in a fresh sandbox; its exit status says passed or failed.

    Everything it writes to stdout and stderr is returned, up to `max_output` bytes (also the
    limit on each file it writes); more gives "output_limit". Not a verdict: use `run_tests`.
    """
    lim = Limits(timeout, memory_mb, max_output, **limits)
    rc, output, size, reports = _launch("run", code.encode(), lim)
    if rc is None:
        return SandboxResult("timeout", None, "")
    _require_started(reports, output)
    if size >= max_output:
        return SandboxResult("output_limit", rc, output)
    return SandboxResult("passed" if rc == 0 else "failed", rc, output)


def run_tests(tests: CodeTests, limits: Limits | None = None) -> Verdict:
    """Judge the candidate in a fresh sandbox: how many of its tests passed (HumanEval-style
    `check` code counts as one test)."""
    return _judge_tests(tests, limits or Limits())


def _judge_tests(tests: CodeTests, lim: Limits, setup: _Setup | None = None) -> Verdict:
    nonce = secrets.token_hex(16)
    total = 1 if tests.check else len(tests.tests)
    job = json.dumps({"nonce": nonce, **tests.__dict__}).encode()
    rc, output, _, reports = _launch("judge", job, lim, setup)
    if rc is None:
        return Verdict(0, total, "timeout", output)
    _require_started(reports, output)
    final = reports[-1]
    if "error" in final:
        raise SandboxError(f"the judge failed: {final['error']}")
    if final.get("nonce") != nonce:  # no verdict: the candidate killed or stopped the judge
        return Verdict(0, total, "no_verdict", output)
    passed = final.get("passed")
    if type(passed) is not int or not 0 <= passed <= total or final.get("total") != total:
        raise SandboxError(f"the judge sent a malformed verdict: {final!r:.200}")
    return Verdict(passed, total, "judged", output)


def sandbox_problem(sandbox: str = "bubblewrap") -> str | None:
    """None when runs of this kind can start here; else one line saying why and what to do.
    The first call probes (one short run); `none` warns, once, that code runs unsandboxed."""
    setup = _setup(sandbox)
    return setup if isinstance(setup, str) else None


@dataclass(frozen=True)
class _Setup:
    sandbox: str
    python: str  # the interpreter inside: the system's when there is one, run with -I -S
    prefix: str  # its installation, bound read-only when it lives outside /usr
    user: int | None  # uid to start as (65534 when the trainer is root and that works)


@functools.cache
def _setup(sandbox: str) -> _Setup | str:
    if sandbox not in SANDBOXES:
        return f"unknown sandbox {sandbox!r} (choose {' or '.join(SANDBOXES)})"
    if sandbox == "bubblewrap" and shutil.which("bwrap") is None:
        return f"bubblewrap (bwrap) is not installed: {INSTALL}, or set {_OPT_OUT}"
    problem = "no Python interpreter found for the sandbox"
    users = [NOBODY, None] if os.geteuid() == 0 else [None]
    for python, prefix in _interpreters():
        for user in users:
            setup = _Setup(sandbox, python, prefix, user)
            try:
                result = _probe(setup)
            except (OSError, SandboxError) as exc:
                result = str(exc)
            if result is None:
                if sandbox == "none":
                    log.warning(_UNSANDBOXED)
                return setup
            if problem.startswith("no Python"):
                problem = result
    if sandbox == "none":
        return f"the code verifier cannot run Python here ({problem})"
    return f"bubblewrap cannot start a sandbox here ({problem}); {_HINT}"


_OPT_OUT = "reward.code_sandbox: none to run model code WITHOUT a sandbox (not recommended)"
_HINT = (
    "it needs user namespaces: run as root, or allow unprivileged ones (sysctl "
    "user.max_user_namespaces > 0, kernel.unprivileged_userns_clone=1 on older Debian, "
    "kernel.apparmor_restrict_unprivileged_userns=0 on Ubuntu 24.04; in Docker, "
    f"--security-opt seccomp=unconfined); or set {_OPT_OUT}"
)
_UNSANDBOXED = (
    "reward.code_sandbox: none: model-written code runs WITHOUT a sandbox, as an ordinary "
    "process with resource limits only: it can read and write what its user can, use the "
    "network and leave processes behind. Use it only on a throwaway machine or container."
)


def _interpreters() -> list[tuple[str, str]]:
    """(executable, prefix) candidates: the system python3 first, then the trainer's own base."""
    found = []
    for path in ("/usr/bin/python3", getattr(sys, "_base_executable", "") or sys.executable):
        real = os.path.realpath(path)
        if os.access(real, os.X_OK) and real not in [p for p, _ in found]:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                prefix = subprocess.run(
                    [real, "-I", "-S", "-c", "import sys; print(sys.base_prefix)"],
                    capture_output=True,
                    text=True,
                    timeout=30,
                    check=True,
                ).stdout.strip()
                found.append((real, prefix))
    return found


def _probe(setup: _Setup) -> str | None:
    """None when a program runs and the judge judges with this setup; else what went wrong."""
    rc, output, _, reports = _launch("run", b"print('rlsd-sandbox-ok')", Limits(timeout=30), setup)
    if not (rc == 0 and "rlsd-sandbox-ok" in output and reports):
        return output.strip().splitlines()[0][:200] if output.strip() else f"exit status {rc}"
    probe = CodeTests("def f():\n    return 1", tests=["assert f() == 1", "assert f() == 2"])
    verdict = _judge_tests(probe, Limits(timeout=30), setup)
    if (verdict.passed, verdict.status) != (1, "judged"):
        return f"the judge did not work: {verdict.status} {verdict.output.strip()[:200]}"
    return None


def _require_started(reports: list[dict], output: str) -> None:
    if not reports or not reports[0].get("started"):
        raise SandboxError(f"the sandbox did not start: {output.strip()[:300]}")


def _bwrap(setup: _Setup, lim: Limits) -> list[str]:
    """The bubblewrap command line: namespaces, a read-only view, a private /tmp."""
    args = ["bwrap", "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent"]
    args += ["--new-session", "--cap-drop", "ALL", "--hostname", "rlsd-sandbox"]
    for lib in ("/usr/lib", "/usr/lib64", "/usr/lib32", "/usr/libx32"):
        if os.path.isdir(lib) and not os.path.islink(lib):
            args += ["--ro-bind", lib, lib]
    for top in ("/lib", "/lib64", "/lib32", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    args += ["--ro-bind", setup.python, setup.python]
    if not setup.prefix.startswith("/usr/") and setup.prefix not in ("/usr", "/"):
        args += ["--ro-bind", setup.prefix, setup.prefix]
    args += ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev"]
    args += ["--size", str(lim.disk_mb * 2**20), "--tmpfs", "/tmp", "--remount-ro", "/"]
    args += ["--chdir", "/tmp", "--clearenv", "--setenv", "HOME", "/tmp"]
    args += ["--setenv", "TMPDIR", "/tmp", "--setenv", "PATH", "/usr/bin:/bin", "--"]
    return args


def _launch(
    mode: str, job: bytes, lim: Limits, setup: _Setup | None = None
) -> tuple[int | None, str, int, list[dict]]:
    """Start the launcher (this file) in a sandbox with the job on a descriptor. Returns the exit
    status (None after a time-out), the output, its size and the reports the launcher sent."""
    if setup is None:
        found = _setup(lim.sandbox)
        if isinstance(found, str):
            raise SandboxError(found)
        setup = found
    workdir = tempfile.mkdtemp(prefix="rlsd-sandbox-") if setup.sandbox == "none" else None
    with tempfile.TemporaryFile() as job_file, tempfile.TemporaryFile() as out:
        job_file.write(job)
        job_file.flush()
        job_file.seek(0)
        report_r, report_w = os.pipe()
        limits = [lim.memory_mb, int(lim.timeout) + 1, lim.max_output, lim.processes]
        argv = [mode, job_file.fileno(), report_w, *limits]
        command = [setup.python, "-I", "-S", "-X", "utf8", "-c", _source(), *map(str, argv)]
        env = {"PATH": "/usr/bin:/bin"}
        if workdir is None:
            command = _bwrap(setup, lim) + command
        else:
            env.update(HOME=workdir, TMPDIR=workdir)
            if setup.user is not None:
                os.chown(workdir, setup.user, setup.user)
        user = {} if setup.user is None else {"user": setup.user, "group": setup.user}
        try:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                pass_fds=(job_file.fileno(), report_w),
                start_new_session=True,
                cwd=workdir or "/",
                env=env,
                extra_groups=[] if user else None,
                **user,
            )
        finally:
            os.close(report_w)
        try:
            rc = _wait_and_kill(proc, lim.timeout)
            reports = _reports(report_r)
        finally:
            os.close(report_r)
            if workdir:
                shutil.rmtree(workdir, ignore_errors=True)
        size = os.fstat(out.fileno()).st_size
        out.seek(0)
        output = out.read(lim.max_output).decode("utf-8", "replace")
    return rc, output, size, reports


def _wait_and_kill(proc: subprocess.Popen, timeout: float) -> int | None:
    """Wait up to `timeout`, then kill the whole process group (before reaping the leader, so
    the group cannot have been reused); the exit status, or None when it ran out of time."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None
    try:
        done = select.select([pidfd], [], [], timeout)[0]
    finally:
        os.close(pidfd)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    rc = proc.wait()
    return rc if done else None


def _reports(fd: int) -> list[dict]:
    os.set_blocking(fd, False)
    data = b""
    with contextlib.suppress(BlockingIOError):
        while len(data) < 65536 and (chunk := os.read(fd, 65536)):
            data += chunk
    reports = []
    for line in data.splitlines():
        with contextlib.suppress(ValueError):
            item = json.loads(line)
            if isinstance(item, dict):
                reports.append(item)
    return reports


@functools.lru_cache(maxsize=1)
def _source() -> str:
    """The launcher's source, run with `python -c` inside each sandbox."""
    with open(
        os.path.join(os.path.dirname(__file__), "sandbox_launcher.py"), encoding="utf-8"
    ) as fh:
        return fh.read()
