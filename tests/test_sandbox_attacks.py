"""Escape and forgery attempts against the code sandbox, each asserting on the observable harm.

Every program here is what a policy under RL pressure could write. The escape attempts run through
`sandbox.run_python` (the public way to run untrusted Python) and assert on what matters outside:
a marker file outside the sandbox is absent, the home directory and a read-only file are
untouched, a stand-in trainer process is alive with its memory and environment unread, no socket
reached the host, no process outlives the run, /dev/shm and the host's disk hold nothing new. The
forgeries run through the `code` verifier and assert that a wrong solution scores 0 however it
tries to fake the verdict, while the right solution still scores 1.

The tests run as root here. The sandbox drops to uid 65534 before it starts bubblewrap when the
trainer is root (`test_the_program_runs_unprivileged_with_no_new_privileges` checks), so attacks
whose containment depends on not being root (writing read-only files, the process limit, which
the kernel does not apply to root) are run unprivileged without anything special in the tests.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from rlsd.engine.rewards import sandbox
from rlsd.engine.rewards.builtin import code, code_program
from rlsd.engine.rewards.sandbox import run_python

REPO = Path(__file__).resolve().parent.parent
PROBLEM = sandbox.sandbox_problem("bubblewrap")
if PROBLEM is not None:  # CI installs bubblewrap and sets RLSD_REQUIRE_SANDBOX=1: fail there
    if os.environ.get("RLSD_REQUIRE_SANDBOX") == "1":
        raise RuntimeError(f"RLSD_REQUIRE_SANDBOX=1 but {PROBLEM}")
    pytest.skip(f"no sandbox on this machine: {PROBLEM}", allow_module_level=True)


def run(program: str, timeout: float = 5.0):
    return run_python(textwrap.dedent(program), timeout=timeout, memory_mb=512)


@pytest.fixture
def tag():
    return "rlsd-attack-" + secrets.token_hex(6)


@pytest.fixture
def outside(tag):
    """Paths outside the sandbox that an escape would write: a fresh /tmp dir, the home directory,
    the project directory, /dev/shm and /var/tmp. Removed afterwards whatever happened."""
    root = Path(tempfile.mkdtemp(prefix="rlsd-attack-"))
    paths = {
        "tmp": root / "marker",
        "home": Path.home() / f".{tag}",
        "project": REPO / f".{tag}",
        "shm": Path("/dev/shm") / tag,
        "var_tmp": Path("/var/tmp") / tag,
    }
    yield paths
    for path in paths.values():
        with contextlib.suppress(OSError):
            if path.is_dir():
                for child in path.iterdir():
                    child.unlink()
                path.rmdir()
            else:
                path.unlink()
    with contextlib.suppress(OSError):
        for child in root.iterdir():
            child.unlink()
        root.rmdir()


def processes_with(text: str) -> list[int]:
    """Host processes whose command line contains `text` (zombies excluded)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text.encode() in cmdline and state != "Z" and int(entry) != os.getpid():
            found.append(int(entry))
    return found


def assert_no_leftover(tag: str) -> None:
    deadline = time.monotonic() + 5.0  # a namespace takes a moment to be torn down
    while processes_with(tag) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = processes_with(tag)
    for pid in left:
        with contextlib.suppress(OSError):
            os.kill(pid, 9)
    assert not left, f"processes outlived the sandbox: {left}"


# A daemon: a new session, a new interpreter whose command line carries the tag, sleeping.
DAEMON = "[sys.executable, '-c', 'import time; time.sleep(30)  # {tag}']"


# -- running other programs: every way the old preamble missed -------------------------------

SPAWNS = {
    "posix_system": "import posix\n"
    "posix.system('touch {m} || {py} -c \"open(\\'{m}\\', \\'w\\')\"')",
    "subprocess": "import subprocess, sys\n"
    "subprocess.run([sys.executable, '-c', \"open('{m}', 'w')\"])",
    "posix_spawn": "import os, sys\n"
    "pid = os.posix_spawn(sys.executable, [sys.executable, '-c', \"open('{m}', 'w')\"], {{}})\n"
    "os.waitpid(pid, 0)",
    "ctypes_system": "import ctypes\n"
    "ctypes.CDLL(None).system(b'touch {m} || {py} -c \"open(\\'{m}\\', \\'w\\')\"')",
}


@pytest.mark.parametrize("name", sorted(SPAWNS))
def test_spawning_a_program_cannot_write_outside(name, outside):
    marker = outside["tmp"]
    run(SPAWNS[name].format(m=marker, py=sys.executable))
    assert not marker.exists()


FORKS = {
    "ctypes_fork": "import ctypes, os, sys\nfork = ctypes.CDLL(None).fork",
    "gc_fork": "import gc, os, sys\n"
    "fork = next((d['fork'] for d in gc.get_objects() if isinstance(d, dict)\n"
    "             and d.get('__name__') == 'posix'), None) or sys.modules['posix'].fork",
    "posix_fork": "import os, sys, posix\nfork = posix.fork",
}


@pytest.mark.parametrize("name", sorted(FORKS))
def test_a_forked_daemon_does_not_outlive_the_run_nor_write_outside(name, outside, tag):
    marker = outside["tmp"]
    program = FORKS[name] + textwrap.dedent(f"""
        if fork() == 0:
            os.setsid()
            if fork() == 0:
                try:
                    fd = os.open({str(marker)!r}, os.O_CREAT | os.O_WRONLY)
                    os.write(fd, b'x')
                except OSError:
                    pass
                os.execv(sys.executable, {DAEMON.format(tag=tag)})
            os._exit(0)
        """)
    run(program)
    assert_no_leftover(tag)
    assert not marker.exists()


def test_a_daemon_started_with_subprocess_does_not_outlive_the_run(tag):
    run(f"""
        import subprocess, sys
        subprocess.Popen({DAEMON.format(tag=tag)}, start_new_session=True)
        """)
    assert_no_leftover(tag)


def test_a_sandbox_dies_with_a_trainer_killed_by_sigkill(tag, tmp_path):
    script = tmp_path / "trainer.py"
    daemon = f"import os, sys\nos.execv(sys.executable, {DAEMON.format(tag=tag)})"
    script.write_text(
        f"from rlsd.engine.rewards.sandbox import run_python\nrun_python({daemon!r}, timeout=60)\n"
    )
    trainer = subprocess.Popen([sys.executable, str(script)], cwd=REPO)
    try:
        deadline = time.monotonic() + 30
        while not processes_with(tag) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert processes_with(tag), "the sandboxed program never started"
    finally:
        trainer.kill()
        trainer.wait()
    assert_no_leftover(tag)


# -- writing files -------------------------------------------------------------------------

WRITERS = {
    "os_open": "fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC); os.write(fd, b'x')",
    "io_open": "io.open(path, 'w').write('x')",
    "pathlib": "pathlib.Path(path).write_text('x')",
    "real_open": "globals().get('_real_open', io.open)(path, 'w').write('x')",
}


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_writes_outside_the_sandbox_do_not_land(name, outside):
    targets = [outside[k] for k in ("tmp", "home", "project", "var_tmp")]
    run(f"""
        import io, os, pathlib
        for path in {[str(t) for t in targets]!r}:
            try:
                {WRITERS[name]}
            except OSError:
                pass
        """)
    for target in targets:
        assert not target.exists(), target


def test_a_read_only_file_stays_unchanged(tmp_path):
    path = tmp_path / "read-only.txt"
    path.write_text("original")
    path.chmod(0o444)
    run(f"""
        import os
        os.chmod({str(path)!r}, 0o644)
        fd = os.open({str(path)!r}, os.O_WRONLY | os.O_TRUNC)
        os.write(fd, b'changed')
        """)
    assert path.read_text() == "original"


def test_files_in_dev_shm_do_not_outlive_the_run(outside):
    shm = outside["shm"]
    run(f"""
        import os
        fd = os.open({str(shm)!r}, os.O_CREAT | os.O_WRONLY)
        os.write(fd, b'x' * 4096)
        """)
    assert not shm.exists()


def test_the_disk_the_program_can_fill_is_bounded():
    """270 MB in 0.9 MB files (each under the file-size limit) into its own directory and /tmp."""
    result = run(
        """
        import os
        written = 0
        for n, where in enumerate(('.', '/tmp', '/dev/shm')):
            for i in range(300):
                try:
                    with open(os.path.join(where, f'fill-{n}-{i}'), 'wb') as fh:
                        fh.write(b'x' * 900_000)
                    written += 900_000
                except OSError:
                    break
        print('written', written)
        """,
        timeout=20.0,
    )
    written = (
        int(result.output.split("written")[-1].split()[0]) if "written" in result.output else 0
    )
    assert written <= 80 * 2**20, f"{written / 2**20:.0f} MB written"


# -- reaching the network and other processes ------------------------------------------------


def test_no_tcp_connection_to_the_host():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        run(f"""
            import _socket
            s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
            s.settimeout(2)
            s.connect(('127.0.0.1', {port}))
            s.send(b'escaped')
            """)
        with pytest.raises(BlockingIOError):
            server.accept()
    finally:
        server.close()


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_no_unix_socket_connection_to_the_host(kind, tag):
    where = tempfile.mkdtemp(prefix="rlsd-sock-")
    address = f"\0{tag}" if kind == "abstract" else os.path.join(where, "s")
    server = socket.socket(socket.AF_UNIX)
    server.bind(address)
    server.listen(1)
    server.setblocking(False)
    try:
        run(f"""
            import _socket
            s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
            s.connect({address!r})
            s.send(b'escaped')
            """)
        with pytest.raises(BlockingIOError):
            server.accept()
    finally:
        server.close()
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(where, "s"))
        os.rmdir(where)


def test_no_listening_socket_outlives_the_run(tag):
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    run(f"""
        import os, posix, _socket, time
        if posix.fork() == 0:
            os.setsid()
            s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
            s.bind(('127.0.0.1', {port}))
            s.listen(5)
            os.execv('/proc/self/exe', ['python', '-c', 'import time; time.sleep(30)  # {tag}'])
        time.sleep(0.3)
        """)
    client = socket.socket()
    client.settimeout(1)
    try:
        with pytest.raises(OSError):
            client.connect(("127.0.0.1", port))
    finally:
        client.close()
        assert_no_leftover(tag)


def test_no_sysv_shared_memory_outlives_the_run():
    key = secrets.randbelow(2**30) + 1
    run(f"""
        import ctypes
        libc = ctypes.CDLL(None)
        print('shmget', libc.shmget({key}, 4096, 0o1000 | 0o600))
        """)
    segments = Path("/proc/sysvipc/shm").read_text().splitlines()[1:]
    ours = [line.split() for line in segments if line.split()[0] == str(key)]
    for fields in ours:  # clean up what escaped (IPC_RMID = 0)
        ctypes.CDLL(None).shmctl(int(fields[1]), 0, None)
    assert not ours


VICTIM = textwrap.dedent("""
    import os, sys
    secret = bytearray(os.environ['RLSD_VICTIM_SECRET'].encode())
    print('ready', flush=True)
    sys.stdin.readline()
    print(secret.decode(), flush=True)
    sys.stdin.readline()
""")


@pytest.fixture
def victim():
    """A stand-in for the trainer: a process of the same user holding a secret in memory and in
    its environment; the test asks it afterwards what its memory holds."""
    secret = "rlsd-victim-" + secrets.token_hex(8)
    proc = subprocess.Popen(
        [sys.executable, "-c", VICTIM],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={"RLSD_VICTIM_SECRET": secret, "PATH": os.environ.get("PATH", "")},
        text=True,
        start_new_session=True,  # its own process group: killpg of it cannot reach the tests
    )
    assert proc.stdout.readline().strip() == "ready"
    yield proc, secret
    proc.kill()
    proc.wait()


def victim_memory(proc) -> str:
    proc.stdin.write("\n")
    proc.stdin.flush()
    return proc.stdout.readline().strip()


@pytest.mark.parametrize(
    "how",
    [
        "import posix\nposix.kill({pid}, 9)",
        "import ctypes\nctypes.CDLL(None).kill({pid}, 9)",
        "import os, posix\nposix.killpg(os.getpgid({pid}), 9)",
    ],
)
def test_the_trainer_cannot_be_killed(how, victim):
    proc, _ = victim
    run(how.format(pid=proc.pid))
    time.sleep(0.1)
    assert proc.poll() is None


def test_the_trainers_memory_is_neither_read_nor_written(victim):
    proc, secret = victim
    result = run(f"""
        import io, re
        pid = {proc.pid}
        found = []
        with io.open(f'/proc/{{pid}}/maps') as maps, io.open(f'/proc/{{pid}}/mem', 'r+b', 0) as mem:
            for line in maps:
                m = re.match(r'([0-9a-f]+)-([0-9a-f]+) rw', line)
                if not m:
                    continue
                start, end = int(m[1], 16), int(m[2], 16)
                try:
                    mem.seek(start)
                    chunk = mem.read(end - start)
                except OSError:
                    continue
                for hit in re.finditer(rb'rlsd-victim-[0-9a-f]{{16}}', chunk):
                    found.append(hit.group().decode())
                    mem.seek(start + hit.start())
                    mem.write(b'X' * len(hit.group()))
        print('found', found)
        """)
    assert secret not in result.output
    assert victim_memory(proc) == secret


def test_the_trainers_environment_is_not_read(victim):
    proc, secret = victim
    result = run(f"""
        import os
        for pid in ['{proc.pid}'] + [p for p in os.listdir('/proc') if p.isdigit()]:
            try:
                print(open(f'/proc/{{pid}}/environ', 'rb').read())
            except OSError:
                pass
        """)
    assert secret not in result.output


def test_the_projects_files_are_not_readable():
    needle = "the-projects-files-are-not-readable-" + "marker"  # only in this file, split here
    result = run(f"""
        for path in [{__file__!r}, {str(REPO / "README.md")!r}]:
            try:
                print(open(path).read())
            except OSError:
                pass
        """)
    assert needle not in result.output
    assert "## Your own task" not in result.output  # a heading of the README


def test_the_program_runs_unprivileged_with_no_new_privileges():
    result = run("""
        import os
        status = open('/proc/self/status').read()
        print('uid', os.getuid(), os.geteuid())
        print([line for line in status.splitlines() if line.startswith(('NoNewPrivs', 'CapEff'))])
        """)
    assert "uid 0" not in result.output
    assert "'NoNewPrivs:\\t1'" in result.output
    assert "'CapEff:\\t0000000000000000'" in result.output


def test_the_process_count_is_limited(tag):
    result = run(
        f"""
        import os, posix, time
        started = 0
        for i in range(150):
            try:
                pid = posix.fork()
            except OSError:
                break
            if pid == 0:
                time.sleep(3)  # {tag}
                os._exit(0)
            started += 1
        print('started', started)
        """,
        timeout=10.0,
    )
    started = (
        int(result.output.split("started")[-1].split()[0]) if "started" in result.output else 0
    )
    assert started <= 64, f"{started} processes"


# -- forging the verdict ---------------------------------------------------------------------

UNSOLVABLE = {"tests": ["assert f(3) == 1234567", "assert f(4) == 7654321"]}
HUMANEVAL = {
    "prompt_code": "def f(x):\n    '''Return the secret.'''\n",
    "test": "def check(candidate):\n    assert candidate(3) == 1234567\n"
    "    assert abs(candidate(4) - 7654321) < 1e-9\n",
    "entry_point": "f",
}
# Tests that go through helpers a candidate could patch: abs and math.isclose.
HELPERS = {
    "tests": {
        "tests": [
            "assert abs(f(3) - 1234567) < 1e-9",
            "import math\nassert math.isclose(f(4), 7.5)",
        ]
    },
    "humaneval": {
        **HUMANEVAL,
        "test": "import math\ndef check(candidate):\n"
        "    assert abs(candidate(3) - 1234567) < 1e-9\n"
        "    assert math.isclose(candidate(4), 7.5)\n",
    },
}

# Print every 32-hex-digit string the program can find (its source, its code's constants, its
# command line and environment, the interpreter's objects), with "n n" for pass_fraction, so a
# token-based verdict sees its token; then exit 0.
FIND_TOKENS = """
import gc, io, os, re, sys
_seen = set()
def _scan(text):
    for t in re.findall(r'[0-9a-f]{32}', text):
        _seen.add(t)
for _path in [globals().get('__file__') or '', '/proc/self/cmdline', '/proc/self/environ']:
    try:
        _scan(io.open(_path, 'rb').read().decode('latin-1'))
    except (OSError, ValueError):
        pass
for _name in os.listdir('/proc/self/fd'):
    try:
        _scan(os.pread(int(_name), 1 << 20, 0).decode('latin-1'))
    except OSError:
        pass
_best = re.findall(r'[0-9a-f]{32}', ' '.join(str(c) for c in sys._getframe().f_code.co_consts))
for _o in gc.get_objects():
    if isinstance(_o, (list, tuple, dict)):
        _scan(repr(_o)[:100000])
def _forge():
    for _t in sorted(_seen) + _best:  # the likeliest last: what the verdict reads
        print(_t, flush=True)
        print(_t, 2, 2, flush=True)
"""

# Through the /proc entries of its parent (the judge) and of pid 1: look for the verdict's nonce
# in any file they hold open and in their memory (less what is in its own memory, a copy of the
# judge's from before the job arrived), write a verdict with each candidate into their pipes (not
# those to this process), and kill the judge so that nothing comes after. Only those two
# processes: no harm to anything else if it got through. What stops it:
# test_the_judge_is_out_of_reach_of_a_candidate_of_the_same_user.
PROC_FORGERY = """
import json, os, re, signal

def hex_strings(pid):
    found = set()
    try:
        with open(f'/proc/{pid}/maps') as maps, open(f'/proc/{pid}/mem', 'rb', 0) as mem:
            for line in maps:
                start, end = (int(x, 16) for x in line.split()[0].split('-'))
                if line.split()[1].startswith('rw'):
                    try:
                        mem.seek(start)
                        chunk = mem.read(end - start)
                    except (OSError, ValueError, OverflowError):
                        continue
                    found.update(m.decode() for m in re.findall(rb'[0-9a-f]{32}', chunk))
    except OSError:
        pass
    return found

def links(pid):
    out = {}
    try:
        fds = os.listdir(f'/proc/{pid}/fd')
    except OSError:
        return out
    for fd in fds:
        try:
            out[f'/proc/{pid}/fd/{fd}'] = os.readlink(f'/proc/{pid}/fd/{fd}')
        except OSError:
            pass
    return out

mine = hex_strings('self')  # before anything of the judge's is copied here
judge, nonces, pipes = os.getppid(), set(), []
for pid in {judge, 1}:
    for path, target in links(pid).items():
        if target.startswith('pipe:'):
            pipes.append((path, target))
        else:
            try:
                nonces.update(re.findall(r'[0-9a-f]{32}', open(path, errors='replace').read()))
            except OSError:
                pass
    nonces |= hex_strings(pid)
nonces -= mine
own = set(links('self').values())
for path, target in pipes:
    if target in own:
        continue  # a pipe between the judge and this process: not the verdict's
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        for nonce in sorted(nonces)[:500] or ['0' * 32]:
            for n in (1, 2):
                line = json.dumps({'nonce': nonce, 'passed': n, 'total': n})
                os.write(fd, line.encode() + b'\\n')
    except OSError:
        pass
os.kill(judge, signal.SIGKILL)
os._exit(0)
"""

FORGERIES = {
    "sys_exit_0": "import sys\nsys.exit(0)",
    "os_exit_0": "import os\nos._exit(0)",
    "print_token_from_source": FIND_TOKENS + "_forge()\nos._exit(0)",
    "token_at_atexit": FIND_TOKENS
    + "import atexit\natexit.register(lambda: (_forge(), os._exit(0)))\n"
    "def f(x):\n    return 0",
    "token_from_del": FIND_TOKENS + "class _D:\n    def __del__(self):\n        _forge()\n"
    "        os._exit(0)\ndef f(x):\n    return _D()",
    "sys_exit_in_atexit": "import atexit, sys\natexit.register(sys.exit, 0)\n"
    "def f(x):\n    return 0",
    "system_exit_from_del": "class _D:\n    def __del__(self):\n        raise SystemExit(0)\n"
    "def f(x):\n    return _D()",
    "exit_when_called": "def f(x):\n    import os\n    os._exit(0)",
    "always_equal": "class _Eq:\n    def __eq__(self, other):\n        return True\n"
    "    def __ne__(self, other):\n        return False\n    def __sub__(self, other):\n"
    "        return 0\n    __rsub__ = __sub__\ndef f(x):\n    return _Eq()",
    "int_subclass_always_equal": "class _I(int):\n"
    "    def __eq__(self, other):\n        return True\n"
    "    def __sub__(self, other):\n        return 0\ndef f(x):\n    return _I(0)",
    "patched_builtins": "import builtins, math\nbuiltins.abs = lambda x: 0\n"
    "builtins.AssertionError = type('E', (Exception,), {})\n"
    "math.isclose = lambda *a, **k: True\ndef f(x):\n    return 0",
    "redefined_exec": "exec = lambda *a, **k: None\nimport builtins\n"
    "builtins.exec = lambda *a, **k: None\ndef f(x):\n    return 0",
    "monkeypatched_check": "import sys\ndef _noop(*a, **k):\n    pass\n"
    "def _tracer(frame, event, arg):\n"
    "    for name in ('check', '_rlsd_check', 'run_tests'):\n"
    "        fn = frame.f_globals.get(name)\n"
    "        if callable(fn) and getattr(fn, '__code__', None) is not None:\n"
    "            fn.__code__ = _noop.__code__\n"
    "    return _tracer\n"
    "sys.settrace(_tracer)\nsys._getframe().f_trace = _tracer\n"
    "def f(x):\n    return 0",
    "read_the_expected_answers": "import gc, io, os, re\n"
    "def _texts():\n"
    "    try:\n        yield io.open(__file__).read()\n    except Exception:\n        pass\n"
    "    for p in os.listdir('/proc'):\n"
    "        for leaf in ('cmdline', 'environ'):\n"
    "            try:\n                yield io.open(f'/proc/{p}/{leaf}', 'rb').read().decode()\n"
    "            except Exception:\n                pass\n"
    "    for o in gc.get_objects():\n"
    "        if isinstance(o, dict):\n            yield repr(o)[:100000]\n"
    "def f(x):\n"
    "    for text in _texts():\n"
    "        m = re.search(r'\\(' + str(x) + r'\\)\\s*(?:-\\s*)?(?:==\\s*)?(\\d+)', text)\n"
    "        if m:\n            return int(m.group(1))\n"
    "    return 0",
    "write_a_verdict_to_every_fd": "import os\n"
    "for fd in range(3, 256):\n"
    "    for line in (b'PASS 2 2\\n', b'passed 2 2\\n', b'2 2\\n'):\n"
    "        try:\n            os.write(fd, line)\n        except OSError:\n            pass\n"
    "os._exit(0)",
    "through_the_judges_proc_entries": PROC_FORGERY,
    "kill_the_judge": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n"
    "def f(x):\n    return 0",
}


@pytest.mark.parametrize("score", ["all_pass", "pass_fraction"])
@pytest.mark.parametrize("style", ["tests", "humaneval"])
@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_a_forged_verdict_scores_zero(name, style, score):
    meta = UNSOLVABLE if style == "tests" else HUMANEVAL
    if name == "patched_builtins":
        meta = HELPERS[style]
    completion = f"```python\n{FORGERIES[name]}\n```"
    assert code([""], [completion], [meta], code_score=score) == [0.0]


def test_the_judge_is_out_of_reach_of_a_candidate_of_the_same_user():
    """As a trainer that is not root runs it: the sandbox with the trainer's own uid, so the
    report pipe belongs to the candidate's user too. The judge's being non-dumpable is then what
    keeps the candidate out of its memory (the nonce) and its descriptors (the report pipe):
    left dumpable, the same program finds the nonce and gets a forged verdict through."""
    setup = dataclasses.replace(sandbox._setup("bubblewrap"), user=None)
    job = code_program(PROC_FORGERY, UNSOLVABLE)
    assert sandbox._judge_tests(job, sandbox.Limits(), setup).passed == 0
    spy = PROC_FORGERY.replace("os.kill(judge", "print(sorted(nonces), flush=True)\nos.kill(judge")
    spy_job = json.loads(json.dumps(code_program(spy, UNSOLVABLE).__dict__))
    source = sandbox._source()
    dumpable = source.replace("prctl(4, 0, 0, 0, 0)", "prctl(4, 1, 0, 0, 0)")
    assert dumpable != source
    for launcher, leaks in ((source, False), (dumpable, True)):
        nonce = secrets.token_hex(16)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(sandbox, "_source", lambda launcher=launcher: launcher)
            job_bytes = json.dumps({"nonce": nonce, **spy_job}).encode()
            _, output, _, reports = sandbox._launch("judge", job_bytes, sandbox.Limits(), setup)
        assert (nonce in output) is leaks
        assert any(r.get("nonce") == nonce and r.get("passed") == 2 for r in reports) is leaks


@pytest.mark.parametrize("style", ["tests", "humaneval"])
def test_the_right_solution_still_scores_one(style):
    meta = UNSOLVABLE if style == "tests" else HUMANEVAL
    right = "def f(x):\n    return {3: 1234567, 4: 7654321}[x]"
    half = "def f(x):\n    return 1234567"
    assert code([""] * 2, [right, half], [meta] * 2) == [1.0, 0.0]
    fraction = code([""] * 2, [right, half], [meta] * 2, code_score="pass_fraction")
    assert fraction == ([1.0, 0.5] if style == "tests" else [1.0, 0.0])
    helpers = "def f(x):\n    return {3: 1234567, 4: 7.5}[x]"
    assert code([""], [helpers], [HELPERS[style]]) == [1.0]
