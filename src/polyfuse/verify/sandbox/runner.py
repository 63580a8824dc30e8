"""The sandbox runner R: forks the test process T (the untrusted solution, then its tests) and judges it.

Never imported by polyfuse: the launcher (:mod:`polyfuse.verify.sandbox.launcher`) reads this file before it
drops privileges and has the sandbox's interpreter execute its text as ``python -I -B -u [-S] -c <this file>
SPEC``, inside the sandbox (namespaces, unprivileged user, rlimits), with descriptor 3 as the report channel.
Standard library only; the annotations are never evaluated, so older system interpreters run it too. The
protocol and what it defends against are described in :mod:`polyfuse.verify.sandbox`.
"""

# What runs in the test process keeps ``%`` formatting (``str()`` of hostile objects, never their
# ``__format__``) and bare try/except rather than ``contextlib.suppress`` (nothing more to import or rebind).
# ruff: noqa: UP031, SIM105

from __future__ import annotations

import json
import os
import select
import signal
import sys
import types
from collections.abc import Callable

_spec: dict[str, str | bool] = {}
"""The run's settings (``solution``, ``tests``, ``hook``, ``strict``), read from ``sys.argv[1]`` at start."""
_FD = 3  # the report channel to the launcher; only this process, never the test process, holds it
_STATUSES = ("passed", "failed", "crashed", "memory")
_MAX_LINE = 1 << 16
_MAX_BLOCKED = 20
_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE = 1, 4


def _send(obj: dict[str, object]) -> None:
    try:
        os.write(_FD, (json.dumps(obj) + "\n").encode())
    except Exception:
        pass


def _prctl(option: int, value: int) -> None:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(%d, %d) failed" % (option, value))


def _install_hook(workdir: str, strict: bool, emit: Callable[[str, object], None]) -> None:
    realpath, join, isabs, fspath = os.path.realpath, os.path.join, os.path.isabs, os.fspath
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    allowed = ("/dev/null",)

    def inside(path: object, dir_fd: int | None = None) -> bool:
        if isinstance(path, int):
            return True
        try:
            p = os.fsdecode(fspath(path))
            if dir_fd not in (None, -1) and not isabs(p):
                p = join(os.readlink("/proc/self/fd/%d" % dir_fd), p)
            full = realpath(join(os.getcwd(), p))
        except Exception:
            return False
        return full == workdir or full.startswith(workdir + os.sep) or full in allowed

    def refuse(what: str) -> None:
        emit("blocked", what)
        raise PermissionError("polyfuse sandbox: %s is not allowed" % what)

    paths1 = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 2, "os.chmod": 2, "os.chown": 3, "os.utime": 3,
              "os.truncate": None, "os.setxattr": None, "os.removexattr": None, "os.chflags": None,
              "os.listxattr": None}
    spawn = ("os.exec", "os.posix_spawn", "os.spawn", "os.system", "subprocess.Popen", "ctypes.dlopen",
             "ctypes.dlsym", "ctypes.addressof", "ctypes.cdata", "ctypes.call_function", "os.forkpty")

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = (tuple(args) + (None, None, None))[:3]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                (isinstance(flags, int) and flags & write_flags)
            if writing and not inside(path):
                refuse("open(%r, %r)" % (path, mode if mode is not None else flags))
        elif event in paths1:
            dir_fd_at = paths1[event]
            dir_fd = args[dir_fd_at] if dir_fd_at is not None and len(args) > dir_fd_at else None
            if event == "os.listxattr":
                return
            if not inside(args[0], dir_fd):
                refuse("%s(%r)" % (event, args[0]))
        elif event in ("os.rename", "os.link"):
            src, dst, src_fd, dst_fd = (tuple(args) + (None,) * 4)[:4]
            if not inside(src, src_fd) or not inside(dst, dst_fd):
                refuse("%s(%r, %r)" % (event, src, dst))
        elif event == "os.symlink":
            if not inside(args[1], args[2] if len(args) > 2 else None):
                refuse("os.symlink(%r, %r)" % (args[0], args[1]))
        elif event in ("socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg"):
            refuse("%s(%r)" % (event, args[1] if len(args) > 1 else None))
        elif strict and event.startswith(spawn):
            refuse("%s (not allowed without a network and mount namespace)" % event)

    sys.addaudithook(hook)


def _allowed_exit_codes(test_code: types.CodeType, with_unittest: bool) -> dict[int, types.CodeType]:
    """id -> code object of the code that may be on the traceback of a clean ``SystemExit`` of the tests:
    the tests' own, and unittest's and ``exit()``/``quit()``'s (``_sitebuiltins``) as loaded before the
    solution runs."""
    found = {}

    def add(code: types.CodeType) -> None:
        found[id(code)] = code
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                add(const)

    add(test_code)
    if with_unittest:
        import unittest  # noqa: F401 - imported now, so that its code objects are the genuine ones
    for name, module in list(sys.modules.items()):
        if name != "_sitebuiltins" and name != "unittest" and not name.startswith("unittest."):
            continue
        for value in list(vars(module).values()):
            for item in (list(vars(value).values()) if isinstance(value, type) else [value]):
                code = getattr(getattr(item, "__func__", item), "__code__", None)
                if isinstance(code, types.CodeType):
                    add(code)
    return found


def _verdict_writer(token: str, out: int, write: Callable[[int, bytes], int]) -> Callable[[str], None]:
    """The one writer of verdict lines, ``<token> <status>``; from here on the token lives in this closure only."""
    def verdict(status: str) -> None:
        write(out, ("%s %s\n" % (token, status)).encode())
    return verdict


def _test_process(box: list[str], out: int) -> None:
    """The child that runs untrusted code: the solution, then the tests; reports on ``out``; never returns."""
    for option, value in ((_PR_SET_DUMPABLE, 1), (_PR_SET_PDEATHSIG, signal.SIGKILL)):
        try:  # dumpable like any exec'd process (the runner itself stays non-dumpable); dies with the runner
            _prctl(option, value)
        except Exception:
            pass
    # Everything used once the solution has run is bound here, as locals and closure cells: the solution shares
    # this interpreter and may rebind builtins and module attributes (this module's included).
    write, exit_, exec_, compile_, type_, id_, int_, bool_ = os.write, os._exit, exec, compile, type, id, int, bool
    isinstance_ = isinstance
    base_exc, memory_exc, exit_exc, code_type = BaseException, MemoryError, SystemExit, types.CodeType
    quote = json.encoder.encode_basestring_ascii
    streams = (sys.stdout, sys.stderr)
    verdict = _verdict_writer(box.pop(), out, write)

    def emit(key: str, text: object) -> None:  # an information line: the error behind a verdict, a blocked action
        try:
            write(out, ('{"%s": %s}\n' % (key, quote("%s" % (text,)))).encode())
        except base_exc:
            pass

    def describe(exc: BaseException, stage: str) -> str:
        try:
            name = "%s" % (type_(exc).__name__,)
            if isinstance_(exc, exit_exc):
                text = "%s(%r)" % (name, exc.code)
                return text + (" not raised by the tests themselves" if stage == "tests" else "")
            text = "%s" % (exc,)
            return "%s: %s" % (name, text) if text else name
        except base_exc:
            return "an exception that cannot be printed"

    def clean_exit(exc: BaseException, test_code: types.CodeType, allowed: dict[int, types.CodeType]) -> bool:
        """Whether ``exc`` is the tests ending themselves: a plain ``SystemExit`` of code 0, ``None`` or ``False``
        whose traceback holds only the tests' own code (and unittest's or ``exit()``'s on their behalf)."""
        try:
            if type_(exc) is not exit_exc:
                return False
            code = exc.code
            if not (code is None or ((type_(code) is int_ or type_(code) is bool_) and code == 0)):
                return False
            tb = exc.__traceback__.tb_next  # the first entry is this process's own frame
            if tb is None or tb.tb_frame.f_code is not test_code:
                return False
            while tb is not None:
                frame_code = tb.tb_frame.f_code
                if type_(frame_code) is not code_type or allowed.get(id_(frame_code)) is not frame_code:
                    return False
                tb = tb.tb_next
            return True
        except base_exc:
            return False

    def run() -> tuple[str, str]:
        """(status, error) of compiling and running the solution, then the tests."""
        workdir = os.getcwd()
        with open(_spec["solution"], encoding="utf-8") as f:
            solution = f.read()
        with open(_spec["tests"], encoding="utf-8") as f:
            tests = f.read()
        try:
            sol_code = compile_(solution, "solution.py", "exec")
            test_code = compile_(tests, "tests.py", "exec")
        except memory_exc:
            return "memory", "MemoryError while compiling"
        except (SyntaxError, ValueError) as e:
            return "crashed", "%s: %s" % (type(e).__name__, e)
        allowed = _allowed_exit_codes(test_code, "unittest" in tests)
        if _spec["hook"]:
            _install_hook(workdir, _spec["strict"], emit)
        module = types.ModuleType("solution")
        module.__file__ = os.path.join(workdir, "solution.py")
        sys.modules["solution"] = module
        scope = module.__dict__
        # untrusted code runs from here on
        for stage, code in (("solution", sol_code), ("tests", test_code)):
            try:
                exec_(code, scope)
            except memory_exc:
                return "memory", "MemoryError in %s" % stage
            except base_exc as e:
                if stage == "tests" and clean_exit(e, test_code, allowed):
                    break
                return ("failed" if stage == "tests" else "crashed"), "%s (in %s)" % (describe(e, stage), stage)
        return "passed", ""

    try:
        status, error = run()
    except base_exc:
        status, error = "crashed", "the test process failed outside the solution and the tests"
    for stream in streams:
        try:
            stream.flush()
        except base_exc:
            pass
    if error:
        emit("error", error)
    try:
        verdict(status)
    except base_exc:
        pass
    exit_(0)


def _line_reader(token: str) -> tuple[Callable[[bytes], None], dict[str, object]]:
    """(feed, state): ``feed(chunk)`` parses the test process's lines as they come, so that no amount of noise
    can push its verdict out; over-long lines are dropped."""
    state: dict = {"verdict": None, "error": "", "blocked": [], "forged": 0}
    prefix = token + " "
    pending, skipping = bytearray(), [False]

    def take(raw: bytes) -> None:
        line = raw.decode("utf-8", "replace")
        if line.startswith(prefix) and line[len(prefix):] in _STATUSES:
            state["verdict"] = line[len(prefix):]
            return
        obj = None
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except Exception:
                pass
        if isinstance(obj, dict):
            if "blocked" in obj and len(state["blocked"]) < _MAX_BLOCKED:
                state["blocked"].append(str(obj["blocked"])[:1000])
            if "error" in obj:
                state["error"] = str(obj["error"])[:1000]
            state["forged"] += "status" in obj or "setup_error" in obj
        elif line.rstrip().endswith(_STATUSES):
            state["forged"] += 1

    def feed(chunk: bytes) -> None:
        parts = (bytes(pending) + chunk).split(b"\n")
        pending[:] = parts.pop()
        for raw in parts:
            if skipping[0]:
                skipping[0] = False  # the end of an over-long line
            else:
                take(raw)
        if len(pending) > _MAX_LINE:
            pending.clear()
            skipping[0] = True

    return feed, state


def _read_available(fd: int, feed: Callable[[bytes], None]) -> bool:
    """Feed what ``fd`` holds now; False at end of file."""
    for _ in range(64):
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return True
        if not chunk:
            return False
        feed(chunk)
    return True


def _collect(pid: int, fd: int, feed: Callable[[bytes], None]) -> int:
    """Feed the test process's output until it exits; returns its wait status."""
    os.set_blocking(fd, False)
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    readable = True
    try:
        while True:
            if readable:
                select.select([fd] if pidfd is None else [fd, pidfd], [], [], 0.01 if pidfd is None else None)
                readable = _read_available(fd, feed)
            done, status = os.waitpid(pid, os.WNOHANG if readable else 0)
            if done == pid:
                break
        _read_available(fd, feed)  # what came just before the exit; strays may hold the pipe open: no EOF wait
    finally:
        if pidfd is not None:
            os.close(pidfd)
    return status


def _die_like(sig: int) -> None:
    """End this process by signal ``sig``, as the test process did (the init and launcher decode it)."""
    try:
        signal.signal(sig, signal.SIG_DFL)
    except (OSError, ValueError):
        pass
    os.kill(os.getpid(), sig)
    os._exit(128 + sig)


def _judge(pid: int, fd: int, token: str) -> None:
    """Relay the test process's outcome to the launcher; never returns.

    ``passed`` only when it wrote ``<token> passed`` and then exited with code 0."""
    feed, state = _line_reader(token)
    status = _collect(pid, fd, feed)
    verdict, error = state["verdict"], state["error"]
    for what in state["blocked"]:
        _send({"blocked": what})
    if os.WIFSIGNALED(status):
        if verdict not in (None, "passed"):
            _send({"status": verdict, "error": error})
        _die_like(os.WTERMSIG(status))
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1
    if verdict == "passed" and code == 0:
        _send({"status": "passed"})
    elif verdict not in (None, "passed"):
        _send({"status": verdict, "error": error})
    else:
        why = "the test process exited with code %d %s" % (
            code, "after reporting a pass" if verdict else "before the tests finished")
        if state["forged"]:
            why += "; the code wrote %d forged report line(s)" % state["forged"]
        _send({"status": "crashed", "error": why})
    os._exit(code if code < 128 else 1)  # 128 + N would read as "killed by signal N"


def _runner() -> None:
    exit_ = os._exit
    try:
        _prctl(_PR_SET_DUMPABLE, 0)  # no ptrace, /proc/<pid>/fd or /proc/<pid>/mem for the test process
    except Exception as e:
        _send({"setup_error": "the sandbox runner cannot make itself non-dumpable (%s: %s)" % (type(e).__name__, e)})
        exit_(127)
    box = [os.urandom(16).hex()]
    rfd, wfd = os.pipe()
    try:
        pid = os.fork()
    except OSError as e:
        _send({"status": "crashed", "error": "cannot start the test process: %s" % e})
        exit_(1)
    if pid == 0:
        try:
            os.closerange(_FD, wfd)  # the report channel and the read end
            os.closerange(wfd + 1, 1 << 16)
            _test_process(box, wfd)
        finally:
            exit_(1)
    os.close(wfd)
    _judge(pid, rfd, box[0])


if __name__ == "__main__":
    _spec.update(json.loads(sys.argv[1]))
    _runner()
