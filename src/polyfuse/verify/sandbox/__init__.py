"""Run untrusted Python code against tests in a locked-down subprocess, never in the polyfuse process.

Used by the code verifier (:mod:`polyfuse.verify.checkers`) to decide whether a sampled response passes the
prompt's tests. The code is hostile until proven otherwise: it may loop forever, allocate without bound,
fork, open sockets or write anywhere. Each run goes through four processes::

    polyfuse ──Popen──► launcher L (python -I -S launcher.py; same user as polyfuse)
                          │ enters new namespaces, becomes child subreaper, enforces the wall clock
                          └─fork─► init I (pid 1 of the new pid namespace when there is one)
                                     │ read-only remount, chdir to the work dir, drops privileges
                                     └─fork+exec─► runner R (python -I -S -B -u -c <runner.py>, rlimits)
                                                     │ non-dumpable; holds the report pipe; judges T
                                                     └─fork─► test process T (closes the report pipe)
                                                                reads solution.py + tests.py, installs
                                                                the audit hook, execs the solution, then
                                                                the tests

Isolation layers; they stack, and each attack is stopped by every layer that applies:

=====================  =========================================================  ==========================
layer                  stops                                                      applies when
=====================  =========================================================  ==========================
rlimits                CPU time (RLIMIT_CPU), memory (RLIMIT_AS), processes        always
                       (RLIMIT_NPROC), file size (RLIMIT_FSIZE), open files,
                       core dumps; plus the wall-clock kill and capped output
throw-away directory   leftovers: a fresh directory per run, deleted afterwards   always
minimal environment    leaking secrets via env; ``-I -S`` ignores PYTHON* vars,   always
                       user site-packages and site-packages
unprivileged user      writes to files it does not own; signalling other runs;    polyfuse runs as root
                       root bypassing RLIMIT_NPROC. A fresh uid per run (default;
                       ``user=`` picks a fixed one such as ``nobody``), no groups,
                       ``no_new_privs``
network namespace      every connection, loopback included (``lo`` is down)      root, or unprivileged user
                                                                                  namespaces allowed
mount namespace        writes anywhere but the work dir (every mount is           same as above
                       re-mounted read-only; /tmp and /dev/shm included); the
                       work dir itself becomes a private tmpfs of
                       ``max_disk_mb`` (disk filling) that vanishes with the run
pid namespace          stray processes: when the runner's init exits the kernel   same as above
                       kills everything left in the namespace
child subreaper        stray processes (orphans re-parent to the launcher, which  always (Linux)
                       kills them); with a fresh uid also ``kill(-1)`` as that uid
audit hook             (in the test process, before user code) open-for-write     ``audit_hook=True``
                       outside the work dir, file renames/removals outside it,
                       socket connect/bind/send; in *strict* mode (a network or
                       mount layer is missing) also exec/spawn/subprocess and
                       ctypes, which would escape the hook
=====================  =========================================================  ==========================

As root (CI, containers) every kernel layer applies where the kernel allows namespaces
(``CAP_SYS_ADMIN``); a Docker container with the default seccomp profile refuses ``unshare``, and then the
unprivileged user plus the strict audit hook remain. Without root, unprivileged user namespaces give the
network, mount and pid layers (the code then runs as the calling user inside a nested user namespace, with
no capabilities); where they are disabled only rlimits, the subreaper and the strict audit hook apply, and
RLIMIT_NPROC is set to the user's current process count plus the allowance. The audit hook is a
best-effort layer (C extensions can go around it); it is what reports ``blocked``.
``SandboxResult.layers`` lists the layers a run actually had. Linux only (namespaces, prctl, /proc).

Not confined: reads (the code can read what its user can read; as a fresh uid, world-readable files) and
total memory across processes (each process may use ``memory_mb``, so the worst case is ``max_processes x
memory_mb`` per run; a cgroup would be needed for one budget). Without the mount namespace the work dir is
on the host's temp disk and only RLIMIT_FSIZE bounds each file.
The interpreter that runs the code must be executable by the sandbox user; when polyfuse's own Python
lives under a private directory (``/root/.pyenv``) the first usable one of ``/usr/local/bin/python3`` and
``/usr/bin/python3`` is used instead (or set ``SandboxConfig.python``). Only the standard library is
importable unless ``site_packages=True``.

Verdict integrity: the code must not report a pass it did not earn. The verdict reaches polyfuse on a pipe
(descriptor 3 of the runner) that only the runner R holds. R never runs untrusted code: it forks the test
process T, which closes that pipe (and every descriptor but 0-2 and its own result pipe) before it reads
the solution; R makes itself non-dumpable first, so T (same uid) cannot reopen R's descriptors through
``/proc/<pid>/fd``, read its memory or ptrace it. T reports to R on a pipe of its own, and R accepts a pass
only as the line ``<token> passed`` followed by T's exit with code 0; the token is 128 random bits R drew
before the fork, which T keeps in one closure of its harness only (no file, argument, environment variable
or frame local on the stack). Anything else is not a pass: T killed by a signal (R then dies by the same
signal, so the CPU limit still reads as ``timeout``), T exiting before its report (``os._exit`` with any
code), T closing or replacing its descriptors, R killed, or lines without the token (counted as forged).
Any exception while the solution loads is ``crashed``; during the tests any exception is ``failed``
(``KeyboardInterrupt`` and other ``BaseException`` subclasses included), and a ``SystemExit`` counts as the
tests finishing only when it is a plain ``SystemExit`` of code 0, ``None`` or ``False`` whose traceback holds
nothing but the tests' own code and, on their behalf, unittest's or ``exit()``'s (code objects compared by
identity, collected before the solution runs): ``sys.exit(0)`` or ``unittest.main()`` in the tests still
pass, a ``SystemExit`` from solution code that a test calls does not. After the solution has run, T's harness
uses only references it bound before, so rebinding builtins or module attributes does not change its
decision.

Not defended against: the solution and the tests share one interpreter, so code written against this
harness can still fake a pass from inside T. It can read the tests (``tests.py`` is in the work dir, their
code is on the stack) and answer them, rebind what they rely on (builtins, modules, ``unittest``), return
objects that compare equal to anything, skip test lines with a trace function, or dig the token out of T's
memory (``gc``, closures, frames, ``ctypes``, ``/proc/self/mem``) and write the pass line itself. Closing that
needs the tests evaluated outside the solution's process, which this module does not do.

The package holds one module per side: this one, the API in the polyfuse process; ``launcher.py``, L, run
as a script under ``python -I -S``; ``runner.py``, R, whose text L reads and hands to the sandbox's
interpreter with ``-c``. Both must stay standard-library only, and this one loads without polyfuse too.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pwd
import random
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

# relative, so that a copy of this package runs outside polyfuse too; the launcher itself runs as a script
from .launcher import RUN_ENV_VAR, SOLUTION_FILE, TESTS_FILE

__all__ = [
    "RUN_ENV_VAR",
    "SandboxConfig",
    "SandboxError",
    "SandboxJob",
    "SandboxResult",
    "Status",
    "run_code",
    "run_many",
]

Status = Literal["passed", "failed", "timeout", "memory", "crashed", "blocked"]

_FRESH_UID_RANGE = (1_500_000_000, 2_000_000_000)
_BACKSTOP_S = 15.0
_MAX_REPORT_BYTES = 1 << 20
_MAX_BLOCKED = 20


try:
    from polyfuse.errors import PolyfuseError as _ErrorBase
except ImportError:  # a copy of this package loaded outside polyfuse (the tests run one as another user)
    _ErrorBase = Exception  # type: ignore[assignment,misc]


class SandboxError(_ErrorBase):
    """The sandbox itself cannot run (bad configuration, no usable interpreter); not a verdict on the code."""


@dataclass(frozen=True)
class SandboxConfig:
    """Limits and isolation settings of one sandboxed run."""

    timeout_s: float = 10.0
    """Wall-clock limit; the whole process tree is killed when it runs out (status ``timeout``)."""
    cpu_s: float | None = None
    """CPU-time limit per process (RLIMIT_CPU, whole seconds, rounded up); ``None``: ``timeout_s``."""
    memory_mb: int = 256
    """Address-space limit per process (RLIMIT_AS); an allocation past it gives status ``memory``."""
    max_processes: int = 16
    """RLIMIT_NPROC: processes and threads of the sandbox user, the runner and its init included (the runner's
    test process comes on top)."""
    max_file_mb: int = 16
    """Largest file the code may write (RLIMIT_FSIZE)."""
    max_disk_mb: int = 64
    """Size of the work dir (a private tmpfs, where the mount namespace is available)."""
    max_open_files: int = 64
    """RLIMIT_NOFILE."""
    max_output_bytes: int = 64 * 1024
    """Kept bytes of stdout and of stderr each; the rest is read and dropped (``*_truncated``)."""
    user: str | int | None = None
    """Root only: the user the code runs as; ``None`` (default): a fresh unused uid per run."""
    namespaces: bool = True
    """Use network / mount / pid namespaces where the kernel allows them."""
    audit_hook: bool = True
    """Install the audit hook in the runner (reports ``blocked``)."""
    python: str | None = None
    """Interpreter for the code; ``None``: this Python if the sandbox user can run it, else a system one."""
    site_packages: bool = False
    """Let the code import installed packages (drops ``-S``); the standard library only by default."""
    workdir_base: str | None = None
    """Where run directories are made; ``None``: ``<tempdir>/polyfuse-sandbox-<uid>``."""

    def __post_init__(self) -> None:
        checks = {"timeout_s": self.timeout_s > 0, "memory_mb": self.memory_mb >= 16,
                  "max_processes": self.max_processes >= 2, "max_file_mb": self.max_file_mb >= 1,
                  "max_disk_mb": self.max_disk_mb >= 1,
                  "max_open_files": self.max_open_files >= 16, "max_output_bytes": self.max_output_bytes >= 0,
                  "cpu_s": self.cpu_s is None or self.cpu_s > 0}
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise SandboxError(f"SandboxConfig: invalid {', '.join(f'{b}={getattr(self, b)!r}' for b in bad)}; "
                               "need timeout_s>0, cpu_s>0, memory_mb>=16, max_processes>=2, max_file_mb>=1, max_disk_mb>=1, "
                               "max_open_files>=16, max_output_bytes>=0")


@dataclass
class SandboxResult:
    """Outcome of one run. ``status`` is the verdict; the rest explains it."""

    status: Status
    duration_s: float
    exit_code: int | None
    """Exit code of the runner, which repeats its test process's (codes of 128 and above read as 1); negative:
    killed by that signal; ``None``: killed at the wall clock."""
    stdout: str
    stderr: str
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    error: str = ""
    """One line: the exception, signal or blocked action behind a status other than ``passed``."""
    blocked: list[str] = field(default_factory=list)
    """Actions the audit hook refused, e.g. ``open('/tmp/x', 'w')``."""
    layers: list[str] = field(default_factory=list)
    """Isolation layers this run had (``rlimits``, ``uid``, ``netns``, ``mountns-ro``, ``pidns``, ...)."""
    run_id: str = ""
    """Value of ``POLYFUSE_SANDBOX_RUN`` in the run's environment."""
    python: str = ""
    """The interpreter that ran the code."""

    @property
    def passed(self) -> bool:
        """Whether the solution ran and every test passed."""
        return self.status == "passed"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True)
class SandboxJob:
    """One unit of :func:`run_many`: solution code, test code and optional extra files for the work dir."""

    code: str
    tests: str = ""
    files: Mapping[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# polyfuse side


def run_code(code: str, tests: str = "", config: SandboxConfig | None = None, *,
             files: Mapping[str, str] | None = None) -> SandboxResult:
    """Run ``code`` then ``tests`` (Python source, e.g. ``assert f(2) == 4`` lines) in a fresh sandbox.

    Both run in one module namespace (``__name__ == "solution"``, so ``if __name__ == "__main__":``
    blocks of the solution do not run); the tests pass when they finish without an exception (a
    ``SystemExit`` of code 0, ``None`` or ``False`` raised by the tests themselves, as from ``sys.exit(0)``
    or ``unittest.main()``, counts as finishing; one raised by solution code does not). Any other way out
    of the code (``os._exit``, a signal, closing its descriptors) is not a pass; see the module docstring.
    Status:

    * ``passed``: solution and tests ran to the end;
    * ``failed``: the tests raised (an ``AssertionError``, an exit from solution code, anything else);
    * ``timeout``: wall clock or CPU time ran out;
    * ``memory``: a ``MemoryError`` (the address-space limit);
    * ``blocked``: the audit hook refused an action (whatever happened next);
    * ``crashed``: the solution did not compile or raised, or the process died or exited early.

    ``files`` (relative name -> text) are written into the work dir first.

    Raises:
        SandboxError: the sandbox cannot run at all (e.g. no interpreter the sandbox user can execute).
    """
    config = config or SandboxConfig()
    run_id = secrets.token_hex(8)
    root = os.geteuid() == 0
    uid, gid, fresh = _sandbox_ids(config) if root else (None, None, False)
    workdir = _make_workdir(config, run_id, code, tests, files or {}, uid, gid)
    try:
        return _run_in(workdir, run_id, config, uid, gid, fresh)
    finally:
        _remove_tree(workdir)


def run_many(jobs: Iterable[SandboxJob | tuple[str, str]], config: SandboxConfig | None = None, *,
             workers: int | None = None) -> list[SandboxResult]:
    """Run jobs concurrently, at most ``workers`` at a time (default: CPU count, at most 8); results in order.

    A job is a :class:`SandboxJob` or a ``(code, tests)`` pair.
    """
    config = config or SandboxConfig()
    items = [job if isinstance(job, SandboxJob) else SandboxJob(*job) for job in jobs]
    if not items:
        return []
    workers = max(1, min(workers or min(8, os.cpu_count() or 1), len(items)))

    def one(job: SandboxJob) -> SandboxResult:
        return run_code(job.code, job.tests, config, files=job.files)

    if workers == 1:
        return [one(job) for job in items]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox") as pool:
        return list(pool.map(one, items))


def _sandbox_ids(config: SandboxConfig) -> tuple[int, int, bool]:
    """(uid, gid, fresh) the code runs as when polyfuse is root.

    By default a fresh unused uid per run; where this user namespace maps too few uids for that (rootless
    containers), the user ``nobody``.
    """
    user = config.user
    if user is None:
        span = _mapped_range(_FRESH_UID_RANGE)
        if span is not None:
            rng = random.SystemRandom()
            for _ in range(100):
                uid = rng.randrange(*span)
                try:
                    pwd.getpwuid(uid)
                except KeyError:
                    return uid, uid, True
        user = "nobody"
    try:
        entry = pwd.getpwuid(user) if isinstance(user, int) else pwd.getpwnam(user)
    except KeyError:
        if isinstance(user, int) and user > 0:
            return user, user, False
        raise SandboxError(f"SandboxConfig.user={user!r}: no such user; use an existing unprivileged user such "
                           "as 'nobody', or None for a fresh uid per run") from None
    if entry.pw_uid == 0:
        raise SandboxError("SandboxConfig.user must not be root; use 'nobody' or None (a fresh uid per run)")
    return entry.pw_uid, entry.pw_gid, False


def _mapped_range(wanted: tuple[int, int]) -> tuple[int, int] | None:
    """The largest part of ``wanted`` mapped in this user namespace (containers may map fewer uids), or None."""
    try:
        with open("/proc/self/uid_map") as f:
            lines = f.read().splitlines()
    except OSError:
        return wanted
    best = (0, 0)
    for line in lines:
        inside, _, count = (int(x) for x in line.split())
        low, high = max(wanted[0], inside), min(wanted[1], inside + count)
        if high - low > best[1] - best[0]:
            best = (low, high)
    return best if best[1] - best[0] >= 1000 else None


def _workdir_base(config: SandboxConfig) -> str:
    base = config.workdir_base or os.path.join(tempfile.gettempdir(), f"polyfuse-sandbox-{os.geteuid()}")
    os.makedirs(base, mode=0o711, exist_ok=True)
    st = os.stat(base)
    if st.st_uid != os.geteuid():
        raise SandboxError(f"sandbox work-dir base {base} belongs to uid {st.st_uid}, not to this user; "
                           "remove it or set SandboxConfig.workdir_base")
    os.chmod(base, 0o711)  # traversable by the sandbox user, not listable
    return os.path.realpath(base)


def _make_workdir(config: SandboxConfig, run_id: str, code: str, tests: str, files: Mapping[str, str],
                  uid: int | None, gid: int | None) -> str:
    workdir = tempfile.mkdtemp(prefix=f"run-{run_id}-", dir=_workdir_base(config))
    try:
        all_files = {**files, SOLUTION_FILE: code, TESTS_FILE: tests}
        for name, text in all_files.items():
            path = os.path.realpath(os.path.join(workdir, name))
            if not path.startswith(workdir + os.sep):
                raise SandboxError(f"sandbox file name {name!r} points outside the work dir; use a relative name")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        if uid is not None:
            for dirpath, dirnames, filenames in os.walk(workdir):
                for name in [*dirnames, *filenames]:
                    os.lchown(os.path.join(dirpath, name), uid, gid)
            os.chown(workdir, uid, gid)
        os.chmod(workdir, 0o700)
    except BaseException:
        _remove_tree(workdir)
        raise
    return workdir


def _remove_tree(path: str) -> None:
    def fix(func: Any, p: str, _exc: Any) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
        with contextlib.suppress(OSError):
            func(p)

    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(path, onerror=fix)


def _run_in(workdir: str, run_id: str, config: SandboxConfig, uid: int | None, gid: int | None,
            fresh: bool) -> SandboxResult:
    runner_r, runner_w = os.pipe()
    launch_r, launch_w = os.pipe()
    spec = {
        "workdir": workdir, "run_id": run_id, "uid": uid, "gid": gid,
        "fresh_uid": fresh,
        "timeout_s": config.timeout_s, "cpu_s": math.ceil(config.cpu_s or config.timeout_s),
        "memory_mb": config.memory_mb, "max_processes": config.max_processes,
        "max_file_mb": config.max_file_mb, "max_open_files": config.max_open_files,
        "max_disk_mb": config.max_disk_mb,
        "namespaces": config.namespaces, "audit_hook": config.audit_hook,
        "site_packages": config.site_packages, "pythons": _python_candidates(config),
        "runner_fd": runner_w, "launcher_fd": launch_w,
    }
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-B", _launcher_file(), json.dumps(spec)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            pass_fds=(runner_w, launch_w), start_new_session=True, env=env, cwd="/",
        )
    finally:
        os.close(runner_w)
        os.close(launch_w)
    try:
        streams = _drain(proc, {"stdout": proc.stdout.fileno(), "stderr": proc.stderr.fileno(),
                                "runner": runner_r, "launcher": launch_r},
                         caps={"stdout": config.max_output_bytes, "stderr": config.max_output_bytes,
                               "runner": _MAX_REPORT_BYTES, "launcher": _MAX_REPORT_BYTES},
                         deadline=start + config.timeout_s + _BACKSTOP_S)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        os.close(runner_r)
        os.close(launch_r)
    duration = time.monotonic() - start
    return _classify(streams, run_id, duration)


def _launcher_file() -> str:
    """The launcher script, next to this file."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "launcher.py")


def _python_candidates(config: SandboxConfig) -> list[str]:
    if config.python:
        return [config.python]
    out: list[str] = []
    for cand in (sys.executable, os.path.realpath(sys.executable), getattr(sys, "_base_executable", ""),
                 "/usr/local/bin/python3", "/usr/bin/python3"):
        if cand and cand not in out:
            out.append(cand)
    return out


def _drain(proc: subprocess.Popen, fds: Mapping[str, int], caps: Mapping[str, int],
           deadline: float) -> dict[str, tuple[bytes, bool]]:
    """Read every pipe to EOF, keeping at most ``caps[name]`` bytes of each; kill the launcher at ``deadline``."""
    kept = {name: bytearray() for name in fds}
    truncated = dict.fromkeys(fds, False)
    sel = selectors.DefaultSelector()
    for name, fd in fds.items():
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ, name)
    exited_at: float | None = None
    try:
        while sel.get_map():
            now = time.monotonic()
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if now > deadline or (exited_at is not None and now - exited_at > 2.0):
                kept["backstop"] = bytearray(b"1" if now > deadline else b"")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                break
            for key, _ in sel.select(timeout=0.05):
                name = key.data
                try:
                    chunk = os.read(key.fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                room = caps[name] - len(kept[name])
                if room > 0:
                    kept[name] += chunk[:room]
                if len(chunk) > max(room, 0):
                    truncated[name] = True
    finally:
        sel.close()
    return {name: (bytes(kept[name]), truncated.get(name, False)) for name in kept}


def _json_lines(data: bytes) -> list[dict[str, Any]]:
    out = []
    for line in data.decode("utf-8", "replace").splitlines():
        with contextlib.suppress(ValueError):
            obj = json.loads(line)
            if isinstance(obj, dict):
                out.append(obj)
    return out


def _classify(streams: Mapping[str, tuple[bytes, bool]], run_id: str, duration: float) -> SandboxResult:
    launcher: dict[str, Any] = {}
    for obj in _json_lines(streams["launcher"][0]):
        launcher.update(obj)
    if launcher.get("setup_error"):
        raise SandboxError(f"sandbox: {launcher['setup_error']}")
    runner = _json_lines(streams["runner"][0])
    setup_errors = [str(r["setup_error"]) for r in runner if "setup_error" in r]
    if setup_errors:
        raise SandboxError(f"sandbox: {setup_errors[0]}")
    blocked = [str(r["blocked"]) for r in runner if "blocked" in r][:_MAX_BLOCKED]
    final = next((r for r in reversed(runner) if "status" in r), {})
    exit_code = launcher.get("exit_code")
    if not launcher and not streams.get("backstop", (b"", False))[0]:
        tail = streams["stderr"][0].decode("utf-8", "replace").strip().splitlines()
        raise SandboxError(f"sandbox launcher exited without a report: {tail[-1] if tail else 'no output'}")
    timed_out = bool(launcher.get("timed_out")) or not launcher
    sig = -exit_code if isinstance(exit_code, int) and exit_code < 0 else None

    status: Status
    error = str(final.get("error", ""))
    if timed_out or sig == signal.SIGXCPU:
        status = "timeout"
        error = "wall-clock limit reached" if timed_out else "CPU-time limit reached (SIGXCPU)"
    elif blocked:
        status, error = "blocked", f"blocked: {blocked[0]}"
    elif final.get("status") == "memory":
        status = "memory"
    elif final.get("status") == "passed" and exit_code == 0:
        status = "passed"
    elif final.get("status") == "failed":
        status = "failed"
    else:
        status = "crashed"
        if sig is not None:
            error = f"killed by {signal.Signals(sig).name}" if sig in signal.Signals._value2member_map_ \
                else f"killed by signal {sig}"
            if sig == signal.SIGXFSZ:
                error += " (file-size limit)"
        elif not error:
            error = f"exited with code {exit_code} before reporting a result"
    stdout, out_trunc = streams["stdout"]
    stderr, err_trunc = streams["stderr"]
    return SandboxResult(
        status=status, duration_s=round(duration, 4), exit_code=None if timed_out else exit_code,
        stdout=stdout.decode("utf-8", "replace"), stderr=stderr.decode("utf-8", "replace"),
        stdout_truncated=out_trunc, stderr_truncated=err_trunc, error=error.splitlines()[0][:500] if error else "",
        blocked=blocked, layers=list(launcher.get("layers", [])), run_id=run_id, python=str(launcher.get("python", "")),
    )
