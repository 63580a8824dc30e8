"""The sandbox launcher L, run by the polyfuse user as ``python -I -S -B launcher.py SPEC`` (stdlib only).

Started by :func:`polyfuse.verify.sandbox.run_code` for every run. It enters the namespaces the kernel allows,
becomes the child subreaper, forks the init I (read-only remount, work dir, privilege drop, rlimits), which
execs the runner R (:mod:`polyfuse.verify.sandbox.runner`), and enforces the wall clock; it reports the run's
layers, exit code and setup errors as one JSON line on its report descriptor. The whole chain is described
in :mod:`polyfuse.verify.sandbox`. The runner's text is read here, before any privilege is dropped, and given
to the interpreter with ``-c``: the sandbox user need not be able to read the installed package.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import resource
import select
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

RUN_ENV_VAR = "POLYFUSE_SANDBOX_RUN"
"""Environment variable carrying the run id into the sandbox (lets tests find stray processes)."""
SOLUTION_FILE = "solution.py"
"""The solution's file in the work dir."""
TESTS_FILE = "tests.py"
"""The tests' file in the work dir."""
RUNNER_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runner.py")
"""The runner's source, executed inside the sandbox with ``-c``."""

_RUNNER_FD = 3

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


def _read_runner() -> str:
    """The runner's source, read as the polyfuse user (the sandbox user may not be able to read the package)."""
    with open(RUNNER_FILE, encoding="utf-8") as f:
        return f.read()


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


def _init_main(spec: Mapping[str, Any], namespaces: list[str], root: bool, setup_w: int,
               runner_source: str) -> None:
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

    runner_spec = json.dumps({"solution": SOLUTION_FILE, "tests": TESTS_FILE, "hook": spec["audit_hook"],
                              "strict": strict})
    argv = [python, "-I", "-B", "-u"] + ([] if spec["site_packages"] else ["-S"])
    argv += ["-c", runner_source, runner_spec]
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
    try:
        runner_source = _read_runner()
    except OSError as e:
        message = {"setup_error": f"cannot read the sandbox runner {RUNNER_FILE}: {e.strerror or e}"}
        os.write(launch_fd, (json.dumps(message) + "\n").encode())
        os._exit(0)
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
            _init_main(spec, namespaces, root, setup_w, runner_source)
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
