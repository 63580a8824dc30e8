"""Run untrusted Python code against tests in a locked-down subprocess, never in the polyfuse process.

Used by the code verifier (:mod:`polyfuse.implicit.verify`) to decide whether a sampled response passes the
prompt's tests. The code is hostile until proven otherwise: it may loop forever, allocate without bound,
fork, open sockets or write anywhere. Each run goes through four processes::

    polyfuse ──Popen──► launcher L (python -I -S this file; same user as polyfuse)
                          │ enters new namespaces, becomes child subreaper, enforces the wall clock
                          └─fork─► init I (pid 1 of the new pid namespace when there is one)
                                     │ read-only remount, chdir to the work dir, drops privileges
                                     └─fork+exec─► runner R (python -I -S -B -u -c RUNNER, rlimits)
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

The launcher part of this file runs as a script under ``python -I -S``: module-level imports must stay
standard-library only.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import pwd
import random
import resource
import secrets
import select
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = [
    "SandboxConfig",
    "SandboxError",
    "SandboxJob",
    "SandboxResult",
    "Status",
    "run_code",
    "run_many",
]

Status = Literal["passed", "failed", "timeout", "memory", "crashed", "blocked"]

RUN_ENV_VAR = "POLYFUSE_SANDBOX_RUN"
"""Environment variable carrying the run id into the sandbox (lets tests find stray processes)."""

_SOLUTION_FILE = "solution.py"
_TESTS_FILE = "tests.py"
_FRESH_UID_RANGE = (1_500_000_000, 2_000_000_000)
_RUNNER_FD = 3
_BACKSTOP_S = 15.0
_MAX_REPORT_BYTES = 1 << 20
_MAX_BLOCKED = 20

# linux constants (x86_64 and aarch64 agree on all of these)
_CLONE_NEWNS = 0x00020000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_NOSYMFOLLOW, _MS_NOATIME, _MS_NODIRATIME = 32, 256, 1024, 2048
_MS_BIND, _MS_REC, _MS_PRIVATE = 4096, 16384, 1 << 18
_MS_RELATIME, _MS_STRICTATIME = 1 << 21, 1 << 24
_MOUNT_FLAGS = {"ro": _MS_RDONLY, "nosuid": _MS_NOSUID, "nodev": _MS_NODEV, "noexec": _MS_NOEXEC,
                "nosymfollow": _MS_NOSYMFOLLOW, "noatime": _MS_NOATIME, "nodiratime": _MS_NODIRATIME,
                "relatime": _MS_RELATIME, "strictatime": _MS_STRICTATIME}
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_PR_SET_NO_NEW_PRIVS = 38


try:
    from polyfuse.errors import PolyfuseError as _ErrorBase
except ImportError:  # the launcher runs under -I -S, without polyfuse on its path; it never raises this
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
        all_files = {**files, _SOLUTION_FILE: code, _TESTS_FILE: tests}
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
            [sys.executable, "-I", "-S", "-B", os.path.abspath(__file__), json.dumps(spec)],
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


# --------------------------------------------------------------------------------------------------
# the runner: executed by the sandbox's interpreter with `-c`; must not import anything but the stdlib

RUNNER_SOURCE = r'''
import json, os, select, signal, sys, types
_spec = json.loads(sys.argv[1])
_FD = 3  # the report channel to the launcher; only this process, never the test process, holds it
_STATUSES = ("passed", "failed", "crashed", "memory")
_MAX_LINE = 1 << 16
_MAX_BLOCKED = 20
_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE = 1, 4


def _send(obj):
    try:
        os.write(_FD, (json.dumps(obj) + "\n").encode())
    except Exception:
        pass


def _prctl(option, value):
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(%d, %d) failed" % (option, value))


def _install_hook(workdir, strict, emit):
    realpath, join, isabs, fspath = os.path.realpath, os.path.join, os.path.isabs, os.fspath
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    allowed = ("/dev/null",)

    def inside(path, dir_fd=None):
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

    def refuse(what):
        emit("blocked", what)
        raise PermissionError("polyfuse sandbox: %s is not allowed" % what)

    paths1 = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 2, "os.chmod": 2, "os.chown": 3, "os.utime": 3,
              "os.truncate": None, "os.setxattr": None, "os.removexattr": None, "os.chflags": None,
              "os.listxattr": None}
    spawn = ("os.exec", "os.posix_spawn", "os.spawn", "os.system", "subprocess.Popen", "ctypes.dlopen",
             "ctypes.dlsym", "ctypes.addressof", "ctypes.cdata", "ctypes.call_function", "os.forkpty")

    def hook(event, args):
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


def _allowed_exit_codes(test_code, with_unittest):
    """id -> code object of the code that may be on the traceback of a clean ``SystemExit`` of the tests:
    the tests' own, and unittest's and ``exit()``/``quit()``'s (``_sitebuiltins``) as loaded before the
    solution runs."""
    found = {}

    def add(code):
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


def _verdict_writer(token, out, write):
    """The one writer of verdict lines, ``<token> <status>``; from here on the token lives in this closure only."""
    def verdict(status):
        write(out, ("%s %s\n" % (token, status)).encode())
    return verdict


def _test_process(box, out):
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

    def emit(key, text):  # an information line: the error behind a verdict, a blocked action
        try:
            write(out, ('{"%s": %s}\n' % (key, quote("%s" % (text,)))).encode())
        except base_exc:
            pass

    def describe(exc, stage):
        try:
            name = "%s" % (type_(exc).__name__,)
            if isinstance_(exc, exit_exc):
                text = "%s(%r)" % (name, exc.code)
                return text + (" not raised by the tests themselves" if stage == "tests" else "")
            text = "%s" % (exc,)
            return "%s: %s" % (name, text) if text else name
        except base_exc:
            return "an exception that cannot be printed"

    def clean_exit(exc, test_code, allowed):
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

    def run():
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


def _line_reader(token):
    """(feed, state): ``feed(chunk)`` parses the test process's lines as they come, so that no amount of noise
    can push its verdict out; over-long lines are dropped."""
    state = {"verdict": None, "error": "", "blocked": [], "forged": 0}
    prefix = token + " "
    pending, skipping = bytearray(), [False]

    def take(raw):
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

    def feed(chunk):
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


def _read_available(fd, feed):
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


def _collect(pid, fd, feed):
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


def _die_like(sig):
    """End this process by signal ``sig``, as the test process did (the init and launcher decode it)."""
    try:
        signal.signal(sig, signal.SIG_DFL)
    except (OSError, ValueError):
        pass
    os.kill(os.getpid(), sig)
    os._exit(128 + sig)


def _judge(pid, fd, token):
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


def _runner():
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


_runner()
'''


# --------------------------------------------------------------------------------------------------
# the launcher: runs as `python -I -S -B sandbox.py SPEC` (stdlib only), as the polyfuse user


def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _prctl(option: int, value: int) -> None:
    _check(_libc().prctl(option, ctypes.c_ulong(value), 0, 0, 0), f"prctl({option})")


def _write_file(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _enter_namespaces(spec: Mapping[str, Any], root: bool) -> list[str]:
    """Unshare what the kernel allows; returns the namespace names entered (``user``, ``net``, ...)."""
    if not spec["namespaces"]:
        return []
    libc = _libc()
    names = {"net": _CLONE_NEWNET, "mount": _CLONE_NEWNS, "pid": _CLONE_NEWPID, "ipc": _CLONE_NEWIPC}
    if not root:
        uid, gid = os.geteuid(), os.getegid()
        for chosen in (["net", "mount", "pid", "ipc"], ["net", "mount"]):
            flags = _CLONE_NEWUSER
            for name in chosen:
                flags |= names[name]
            if libc.unshare(flags) == 0:
                _write_file("/proc/self/setgroups", "deny")
                _write_file("/proc/self/uid_map", f"0 {uid} 1")
                _write_file("/proc/self/gid_map", f"0 {gid} 1")
                return ["user", *chosen]
        return []
    entered = []
    all_flags = 0
    for flag in names.values():
        all_flags |= flag
    if libc.unshare(all_flags) == 0:
        return list(names)
    for name, flag in names.items():  # some runtimes allow only part of them
        if libc.unshare(flag) == 0:
            entered.append(name)
    return entered


def _mountinfo() -> list[tuple[str, set[str], str]]:
    """(mount point, per-mount options, filesystem type) of every mount of this mount namespace."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            point = parts[4].encode().decode("unicode_escape").encode("latin-1").decode("utf-8", "replace")
            fstype = parts[parts.index("-") + 1] if "-" in parts else ""
            out.append((point, set(parts[5].split(",")), fstype))
    return out


def _snapshot(workdir: str) -> list[tuple[str, bytes | None]]:
    """(relative path, content or None for a directory) of everything in ``workdir``, parents first."""
    out: list[tuple[str, bytes | None]] = []
    for dirpath, dirnames, filenames in os.walk(workdir):
        rel = os.path.relpath(dirpath, workdir)
        out.extend((os.path.normpath(os.path.join(rel, d)), None) for d in sorted(dirnames))
        for name in sorted(filenames):
            with open(os.path.join(dirpath, name), "rb") as f:
                out.append((os.path.normpath(os.path.join(rel, name)), f.read()))
    return out


def _readonly_mounts(workdir: str, disk_mb: int, owner: tuple[int, int]) -> list[str]:
    """Mount a private tmpfs of ``disk_mb`` MiB (owned by ``owner``) on ``workdir``, holding a copy of its files,
    and make every other mount read-only; returns the mount points that could not be made read-only.

    ``proc`` stays writable: a nested user namespace needs ``/proc/self/uid_map``, and what an unprivileged
    process can write there (its own ``comm``, ``oom_score_adj`` upwards) persists nowhere.
    """
    libc = _libc()
    _check(libc.mount(None, b"/", None, ctypes.c_ulong(_MS_REC | _MS_PRIVATE), None), "make / private")
    files = _snapshot(workdir)
    uid, gid = owner
    options = f"size={disk_mb}m,mode=700,uid={uid},gid={gid}".encode()
    _check(libc.mount(b"tmpfs", workdir.encode(), b"tmpfs", ctypes.c_ulong(_MS_NOSUID | _MS_NODEV), options),
           "mount a tmpfs on the work dir")
    for rel, data in files:
        path = os.path.join(workdir, rel)
        if data is None:
            os.mkdir(path, 0o700)
        else:
            with open(path, "wb") as f:
                f.write(data)
        os.lchown(path, uid, gid)
    failed = []
    for point, opts, fstype in _mountinfo():
        if point == workdir or "ro" in opts or fstype == "proc":
            continue
        flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY
        for opt in opts:
            flags |= _MOUNT_FLAGS.get(opt, 0)
        if libc.mount(None, point.encode(), None, ctypes.c_ulong(flags), None) != 0:
            err = ctypes.get_errno()
            if err != 2:  # ENOENT: a mount hidden under another one
                failed.append(f"{point} ({os.strerror(err)})")
    return failed


def _nested_user_namespace(uid: int, gid: int) -> None:
    """Inside a user namespace where we are root: become ``uid`` again, so exec leaves no capabilities."""
    _check(_libc().unshare(_CLONE_NEWUSER), "unshare(CLONE_NEWUSER)")
    _write_file("/proc/self/setgroups", "deny")
    _write_file("/proc/self/uid_map", f"{uid} 0 1")
    _write_file("/proc/self/gid_map", f"{gid} 0 1")


def _count_tasks(uid: int) -> int:
    """Processes and threads owned by ``uid`` (RLIMIT_NPROC counts those)."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                text = f.read()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        if int(fields.get("Uid", "-1 0").split()[0]) == uid:
            total += int(fields.get("Threads", "1").strip() or 1)
    return total


def _pick_python(candidates: Sequence[str]) -> str | None:
    for cand in candidates:
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def _set_rlimits(spec: Mapping[str, Any], nproc: int) -> None:
    mb = 1024 * 1024
    limits = {
        resource.RLIMIT_AS: spec["memory_mb"] * mb,
        resource.RLIMIT_CPU: spec["cpu_s"],
        resource.RLIMIT_FSIZE: spec["max_file_mb"] * mb,
        resource.RLIMIT_NOFILE: spec["max_open_files"],
        resource.RLIMIT_CORE: 0,
        resource.RLIMIT_NPROC: nproc,
    }
    for which, value in limits.items():
        hard = value + 1 if which == resource.RLIMIT_CPU else value
        resource.setrlimit(which, (value, hard))


def _init_main(spec: Mapping[str, Any], namespaces: list[str], root: bool, setup_w: int) -> None:
    """Child of the launcher (pid 1 of the new pid namespace when there is one); never returns."""
    info: dict[str, Any] = {"layers": ["rlimits", "subreaper"]}
    workdir = spec["workdir"]
    real_uid, real_gid = int(spec["outer_uid"]), int(spec["outer_gid"])
    if "mount" in namespaces:
        owner = (int(spec["uid"]), int(spec["gid"])) if root else (0, 0)  # (0, 0): ourselves in the user ns
        try:
            failed = _readonly_mounts(workdir, int(spec["max_disk_mb"]), owner)
        except OSError as e:
            failed = [str(e)]
        info["layers"].append("mountns-ro" if not failed else "mountns-ro-partial")
        if failed:
            info["ro_failed"] = failed
    if "net" in namespaces:
        info["layers"].append("netns")
    if "pid" in namespaces:
        info["layers"].append("pidns")
    dir_fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)
    os.fchdir(dir_fd)
    os.close(dir_fd)
    if root:
        uid, gid = int(spec["uid"]), int(spec["gid"])
        try:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
        except PermissionError as e:
            raise PermissionError(f"cannot switch to uid {uid} / gid {gid} ({e.strerror}); running as root needs "
                                  "CAP_SETUID and CAP_SETGID, or run polyfuse as an unprivileged user") from None
        info["layers"].append("fresh-uid" if spec["fresh_uid"] else "uid")
        nproc = spec["max_processes"] if spec["fresh_uid"] else _count_tasks(uid) + spec["max_processes"]
    else:
        if "user" in namespaces:  # RLIMIT_NPROC then counts the tasks of this user namespace only
            _nested_user_namespace(real_uid, real_gid)
            info["layers"].append("userns")
            nproc = spec["max_processes"]
        else:
            nproc = _count_tasks(real_uid) + spec["max_processes"]
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    python = _pick_python(spec["pythons"])
    if python is None:
        info["setup_error"] = (f"no Python interpreter the sandbox user (uid {os.getuid()}) can execute among "
                               f"{', '.join(spec['pythons'])}; set SandboxConfig.python to one in a "
                               "world-readable location such as /usr/bin/python3")
        os.write(setup_w, (json.dumps(info) + "\n").encode())
        os._exit(125)
    strict = not ("netns" in info["layers"] and "mountns-ro" in info["layers"])
    if spec["audit_hook"]:
        info["layers"].append("audit-hook-strict" if strict else "audit-hook")
    info["python"] = python
    os.write(setup_w, (json.dumps(info) + "\n").encode())
    os.close(setup_w)

    runner_spec = json.dumps({"solution": _SOLUTION_FILE, "tests": _TESTS_FILE, "hook": spec["audit_hook"],
                              "strict": strict})
    argv = [python, "-I", "-B", "-u"] + ([] if spec["site_packages"] else ["-S"])
    argv += ["-c", RUNNER_SOURCE, runner_spec]
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
           "LC_ALL": "C.UTF-8", RUN_ENV_VAR: spec["run_id"]}
    runner_fd = spec["runner_fd"]
    pid = os.fork()
    if pid == 0:
        try:
            _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
            if runner_fd != _RUNNER_FD:
                os.dup2(runner_fd, _RUNNER_FD)
            os.closerange(_RUNNER_FD + 1, 65536)
            os.set_inheritable(_RUNNER_FD, True)
            _set_rlimits(spec, nproc + 1)  # + 1: the runner's test process, not the code's allowance
            os.execve(python, argv, env)
        except BaseException as e:  # noqa: BLE001 - report anything, then die
            with contextlib.suppress(OSError):
                message = {"setup_error": f"cannot start the runner {python}: {type(e).__name__}: {e}"}
                os.write(_RUNNER_FD, (json.dumps(message) + "\n").encode())
        os._exit(127)
    os.close(runner_fd)
    while True:  # as pid 1, reap every orphan until the runner itself exits
        try:
            done, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(126)
        if done == pid:
            code = os.waitstatus_to_exitcode(status)
            os._exit(code if code >= 0 else 128 + (-code))


def _wait_with_timeout(pid: int, timeout: float) -> tuple[int | None, bool]:
    """Wait for child ``pid`` at most ``timeout`` seconds; returns (waitpid status, timed out)."""
    deadline = time.monotonic() + timeout
    pidfd = None
    with contextlib.suppress(OSError, AttributeError):
        pidfd = os.pidfd_open(pid)
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                return status, False
            left = deadline - time.monotonic()
            if left <= 0:
                return None, True
            if pidfd is not None:
                select.select([pidfd], [], [], left)
            else:
                time.sleep(min(left, 0.005))
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _children_of(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            kids.append(int(entry))
    return kids


def _kill_uid(uid: int) -> None:
    """Kill every process of ``uid`` (``kill(-1)`` from a helper running as that uid; root only)."""
    helper = os.fork()
    if helper == 0:
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            for _ in range(1000):
                os.kill(-1, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            os._exit(0)
        except BaseException:  # noqa: BLE001
            os._exit(1)
        os._exit(0)
    os.waitpid(helper, 0)


def _sweep_descendants(deadline: float) -> int:
    """Kill and reap every remaining descendant (orphans re-parent to us as the subreaper)."""
    killed = 0
    me = os.getpid()
    while time.monotonic() < deadline:
        kids = _children_of(me)
        for kid in kids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(kid, signal.SIGKILL)
                killed += 1
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            if not kids:
                break
        if not kids:
            time.sleep(0.001)
    return killed


def _launcher_main(spec: dict[str, Any]) -> None:
    launch_fd, runner_fd = spec["launcher_fd"], spec["runner_fd"]
    report: dict[str, Any] = {}
    with contextlib.suppress(OSError):
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    root = os.geteuid() == 0
    spec["outer_uid"], spec["outer_gid"] = os.geteuid(), os.getegid()
    namespaces = _enter_namespaces(spec, root)
    with contextlib.suppress(OSError):
        _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    setup_r, setup_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(setup_r)
            os.close(launch_fd)
            _init_main(spec, namespaces, root, setup_w)
        except BaseException as e:  # noqa: BLE001
            with contextlib.suppress(OSError):
                os.write(setup_w, (json.dumps({"setup_error": f"{type(e).__name__}: {e}"}) + "\n").encode())
        os._exit(125)
    os.close(setup_w)
    os.close(runner_fd)
    status, timed_out = _wait_with_timeout(pid, float(spec["timeout_s"]))
    if timed_out:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    setup = b""
    while chunk := os.read(setup_r, 65536):
        setup += chunk
    for line in setup.decode("utf-8", "replace").splitlines():
        with contextlib.suppress(ValueError):
            report.update(json.loads(line))
    if spec["fresh_uid"] and "pid" not in namespaces:
        _kill_uid(int(spec["uid"]))
    report["strays_killed"] = _sweep_descendants(time.monotonic() + 5.0)
    code = os.waitstatus_to_exitcode(status) if status is not None else None
    if isinstance(code, int) and code >= 128 and not timed_out:
        code = -(code - 128)  # the init encodes "runner killed by signal N" as 128 + N
    report.update({"exit_code": code, "timed_out": timed_out})
    if report.get("setup_error") is None:
        report.pop("setup_error", None)
    os.write(launch_fd, (json.dumps(report) + "\n").encode())
    os._exit(0)


if __name__ == "__main__":
    _launcher_main(json.loads(sys.argv[1]))
