"""The program that runs inside each code sandbox (see sandbox.py): it sets the limits, then
runs a program (`run`) or judges a candidate against tests (`judge`).

Started as `python -I -S -X utf8 -c <this file> MODE JOB_FD REPORT_FD MEMORY_MB CPU_S FILE_BYTES
PROCESSES`: the job (the code, and for `judge` the tests and a nonce) arrives on JOB_FD, and
REPORT_FD carries "started" and then, for `judge`, the verdict back to the trainer. It needs only
light standard-library modules (every run starts it afresh) and imports nothing from rlsd.

`judge`: the judge forks the candidate process before it reads the job, so the candidate never
holds the tests or the nonce. The candidate closes every descriptor but its two pipes to the
judge, and waits; the judge reads the job, makes itself non-dumpable (no /proc/PID/fd, mem or
ptrace for a process of the same user), and only then sends the candidate its code. The tests run
in the judge; the candidate's functions are proxies that send the arguments to the candidate
process and decode its results into fresh built-in objects (`_encode`, `_decode`: plain data
only). The judge counts the passes itself and reports them with the nonce.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import os
import resource
import signal
import struct
import sys
import traceback

MESSAGE_LIMIT = 8 * 2**20  # the largest message between judge and candidate (bytes)
# Modules the candidate imported that its `tests` may use without importing them.
TEST_MODULES = frozenset(
    {"bisect", "cmath", "collections", "copy", "datetime", "decimal", "fractions", "functools"}
    | {"hashlib", "heapq", "itertools", "json", "math", "operator", "random", "re"}
    | {"statistics", "string", "sys", "typing"}
)


def _boot(argv: list[str]) -> None:
    """The launcher: set the limits, tell the trainer it started, then run or judge."""
    mode, job_fd, report_fd, memory_mb, cpu, file_bytes, processes = argv
    job_fd, report_fd = int(job_fd), int(report_fd)
    for limit, value in (
        (resource.RLIMIT_AS, int(memory_mb) * 2**20),
        (resource.RLIMIT_CPU, int(cpu)),
        (resource.RLIMIT_FSIZE, int(file_bytes)),
        (resource.RLIMIT_NPROC, int(processes)),
        (resource.RLIMIT_CORE, 0),
    ):
        resource.setrlimit(limit, (value, value))
    os.write(report_fd, b'{"started": true}\n')
    if mode == "run":
        code = _read_all(job_fd).decode()
        os.close(job_fd)
        os.close(report_fd)
        _exec_program(code, "program.py")
    else:
        _judge(job_fd, report_fd)


def _exec_program(code: str, name: str) -> dict:
    path = os.path.join(os.getcwd(), name)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(code)
    sys.argv = [path]
    scope = {"__name__": "__main__", "__file__": path, "__builtins__": builtins}
    exec(compile(code, path, "exec"), scope)
    return scope


def _judge(job_fd: int, report_fd: int) -> None:
    to_candidate_r, to_candidate_w = os.pipe()
    to_judge_r, to_judge_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the candidate: it keeps its two pipe ends and nothing else
        keep = sorted((to_candidate_r, to_judge_w))
        os.closerange(3, keep[0])
        os.closerange(keep[0] + 1, keep[1])
        os.closerange(keep[1] + 1, max(1 << 16, os.sysconf("SC_OPEN_MAX")))
        try:
            _serve(to_candidate_r, to_judge_w)
        finally:
            os._exit(1)
    os.close(to_candidate_r)
    os.close(to_judge_w)
    try:
        job = json.loads(_read_all(job_fd))
        os.close(job_fd)
        import ctypes

        if ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE 0
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE) failed")
        # Only now does the candidate get its code: the judge is already out of its reach.
        _send(to_candidate_w, {"code": job["candidate"], "entry_point": job["entry_point"]})
        passed = _run_tests(job, to_candidate_w, to_judge_r)
        total = 1 if job["check"] else len(job["tests"])
        verdict = {"nonce": job["nonce"], "passed": passed, "total": total}
    except Exception as exc:  # the judge's own failure, never the candidate's doing
        verdict = {"error": repr(exc)[:500]}
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    os.write(report_fd, json.dumps(verdict).encode() + b"\n")
    os._exit(0)


class _CandidateGone(BaseException):
    """The candidate process ended or broke the protocol: every test still to run fails (a
    BaseException, so a test's `except Exception` cannot turn it into a pass)."""


def _run_tests(job: dict, send_fd: int, recv_fd: int) -> int:
    """The tests, in the judge: the number that pass."""
    ready = _recv(recv_fd)
    if not isinstance(ready, dict) or not isinstance(ready.get("names"), dict):
        return 0  # the candidate's code raised, exited or never answered

    def proxy(name: str):
        def call(*args, **kwargs):
            _send(send_fd, {"call": name, "args": _encode(args), "kwargs": _encode(kwargs)})
            reply = _recv(recv_fd)
            if not isinstance(reply, dict):
                raise _CandidateGone(name)
            if "ok" in reply:
                return _decode(reply["ok"])
            raised = reply.get("raise")
            kind, message = raised[:2] if isinstance(raised, list) and len(raised) > 1 else ("", "")
            cls = getattr(builtins, str(kind), None)
            if not (isinstance(cls, type) and issubclass(cls, Exception)):
                cls = RuntimeError
            if issubclass(cls, (StopIteration, StopAsyncIteration)):  # as PEP 479 does: raised
                # inside map(), filter() or a for loop it would end the iteration and pass
                raise RuntimeError(f"the candidate raised {kind}: {message}")
            raise cls(str(message))

        call.__name__ = call.__qualname__ = name
        return call

    scope: dict = {"__name__": "__rlsd_tests__"}
    if job["check"]:
        try:
            exec(compile(job["prompt_code"], "<prompt>", "exec"), scope)
            scope[job["entry_point"]] = proxy(job["entry_point"])
            exec(compile(job["check"], "<tests>", "exec"), scope)
            scope["check"](scope[job["entry_point"]])
            return 1
        except BaseException:
            return 0
    for name, entry in ready["names"].items():
        if not name.isidentifier() or name.startswith("__") or hasattr(builtins, name):
            continue  # a candidate's `abs` or `isinstance` never replaces the tests' builtins
        with contextlib.suppress(Exception):
            kind, *rest = entry
            if kind == "call":
                scope[name] = proxy(name)
            elif kind == "module" and rest[0] in TEST_MODULES:
                scope[name] = __import__(rest[0])
            elif kind == "value":
                scope[name] = _decode(rest[0])
    passed = 0
    for number, test in enumerate(job["tests"], 1):
        try:
            exec(compile(test, f"<test {number}>", "exec"), scope)
            passed += 1
        except BaseException:
            pass
    return passed


def _serve(recv_fd: int, send_fd: int) -> None:
    """The candidate process: run the candidate's code, then answer calls with plain data."""
    first = _recv(recv_fd)
    try:
        scope = _exec_program(first["code"], "candidate.py")
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        _send(send_fd, {"error": "the candidate's code did not run"})
        return
    names = {}
    for name, value in list(scope.items()):
        if name.startswith("__"):
            continue
        if type(value) is type(sys):
            names[name] = ["module", value.__name__]
        elif callable(value):
            names[name] = ["call"]
        else:
            with contextlib.suppress(Exception):
                names[name] = ["value", _encode(value)]
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    _send(send_fd, {"names": names})
    while (request := _recv(recv_fd)) is not None:
        try:
            result = scope[request["call"]](*_decode(request["args"]), **_decode(request["kwargs"]))
            reply = {"ok": _encode(result)}
        except BaseException as exc:
            reply = {"raise": [type(exc).__name__, str(exc)[:2000]]}
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        _send(send_fd, reply)


# -- plain data across the boundary, and the framing ------------------------------------------

_SCALARS = {bool: "b", int: "i", float: "f", str: "s"}
_SEQUENCES = {list: "l", tuple: "t", set: "S", frozenset: "F"}
_BUILD = {"l": list, "t": tuple, "S": set, "F": frozenset}


def _encode(value, depth: int = 0):
    """A value as JSON-able tagged data; only exact built-in types (no subclasses) pass."""
    if depth > 200:
        raise TypeError("nested too deeply to cross the sandbox")
    kind = type(value)
    if value is None:
        return ["N"]
    if kind in _SCALARS:
        return [_SCALARS[kind], repr(value) if kind in (int, float) else value]
    if kind is complex:
        return ["c", repr(value.real), repr(value.imag)]
    if kind in (bytes, bytearray):
        return ["y" if kind is bytes else "Y", value.hex()]
    if kind in _SEQUENCES:
        return [_SEQUENCES[kind], [_encode(v, depth + 1) for v in value]]
    if kind is dict:
        return ["d", [[_encode(k, depth + 1), _encode(v, depth + 1)] for k, v in value.items()]]
    raise TypeError(f"a {kind.__name__} cannot cross the sandbox (plain data only)")


def _decode(data, depth: int = 0):
    """Tagged data back to fresh built-in objects; anything malformed raises."""
    if depth > 200 or not isinstance(data, list) or not data or not isinstance(data[0], str):
        raise ValueError("malformed data from the sandbox")
    tag, rest = data[0], data[1:]
    if tag == "N":
        return None
    if tag == "b" and type(rest[0]) is bool:
        return rest[0]
    if tag in ("i", "f", "s", "c", "y", "Y") and all(type(r) is str for r in rest):
        if tag == "s":
            return rest[0]
        if tag == "i":
            return int(rest[0])
        if tag == "f":
            return float(rest[0])
        if tag == "c":
            return complex(float(rest[0]), float(rest[1]))
        return (bytes if tag == "y" else bytearray).fromhex(rest[0])
    if tag in _BUILD and isinstance(rest[0], list):
        return _BUILD[tag](_decode(v, depth + 1) for v in rest[0])
    if tag == "d" and isinstance(rest[0], list):
        return {_decode(k, depth + 1): _decode(v, depth + 1) for k, v in rest[0]}
    raise ValueError("malformed data from the sandbox")


def _send(fd: int, message: dict) -> None:
    data = json.dumps(message).encode()
    if len(data) > MESSAGE_LIMIT:
        data = json.dumps({"raise": ["ValueError", "the result is too large"]}).encode()
    with contextlib.suppress(OSError):
        view = memoryview(struct.pack(">I", len(data)) + data)
        while view:
            view = view[os.write(fd, view) :]


def _recv(fd: int):
    """The next message, or None when the other side is gone or sent something malformed."""
    try:
        header = _read_exactly(fd, 4)
        size = struct.unpack(">I", header)[0] if header else MESSAGE_LIMIT + 1
        body = _read_exactly(fd, size) if size <= MESSAGE_LIMIT else None
        return json.loads(body) if body is not None else None
    except (OSError, ValueError, RecursionError):
        return None


def _read_exactly(fd: int, size: int) -> bytes | None:
    chunks, left = [], size
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


if __name__ == "__main__":
    _boot(sys.argv[1:])
