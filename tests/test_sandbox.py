"""The code sandbox: every attack is stopped (by each layer that applies), and the next run still works.

Every test is safe even if the sandbox were broken: loops and allocations are bounded, the fork test tries a
bounded number of processes that exit by themselves, the network test only connects to a listener this test
opens on 127.0.0.1, and files written outside the work dir are removed by the test.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from polyfuse.verify import sandbox as sb
from polyfuse.verify.sandbox import SandboxConfig, SandboxError, SandboxJob, run_code, run_many

ROOT = os.geteuid() == 0
FAST = SandboxConfig(timeout_s=5)
SANDBOX_DIR = Path(sb.__file__).parent


@pytest.fixture(scope="module")
def layers() -> set[str]:
    """Isolation layers this machine gives a default run."""
    result = run_code("pass", "", FAST)
    assert result.status == "passed", result
    return set(result.layers)


def need(layers: set[str], layer: str) -> None:
    if layer not in layers:
        pytest.skip(f"layer {layer!r} is not available here (kernel refuses the namespace); got {sorted(layers)}")


def processes_of_run(run_id: str) -> list[int]:
    """Pids whose environment carries this run's id (strays of a sandboxed run)."""
    marker = f"{sb.RUN_ENV_VAR}={run_id}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if marker in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                    found.append(int(entry))
            except OSError:
                continue
    return found


@pytest.fixture
def listener():
    """A TCP listener on 127.0.0.1 owned by the test; yields (port, accepted_connections())."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.2)

    def accepted() -> int:
        count = 0
        while True:
            try:
                conn, _ = srv.accept()
            except (TimeoutError, OSError):
                return count
            conn.close()
            count += 1

    yield srv.getsockname()[1], accepted
    srv.close()


# --------------------------------------------------------------------------------------------------
# verdicts


def test_correct_solution_passes_and_wrong_one_fails():
    good = run_code("def square(x):\n    return x * x\n", "assert square(3) == 9\nassert square(-2) == 4\n", FAST)
    bad = run_code("def square(x):\n    return x + x\n", "assert square(3) == 9\n", FAST)
    assert good.status == "passed" and good.passed and good.exit_code == 0, good
    assert bad.status == "failed" and not bad.passed, bad
    assert "AssertionError" in bad.error


def test_syntax_error_and_exception_crash_missing_function_fails():
    assert run_code("def f(:\n", "assert True", FAST).status == "crashed"
    raising = run_code("raise ValueError('boom')", "assert True", FAST)
    assert raising.status == "crashed" and "ValueError: boom" in raising.error
    assert run_code("x = 1", "assert f(1) == 1", FAST).status == "failed"


def test_early_exit_in_the_solution_is_not_a_pass():
    assert run_code("import os\nos._exit(0)", "assert False", FAST).status == "crashed"
    assert run_code("import sys\nsys.exit(0)", "assert False", FAST).status == "crashed"
    assert run_code("import unittest", "import sys\nsys.exit(0)", FAST).status == "passed"


def test_main_block_does_not_run_and_stdout_is_captured():
    code = "def f():\n    return 1\nprint('hello')\nif __name__ == '__main__':\n    input()\n"
    result = run_code(code, "assert f() == 1", FAST)
    assert result.status == "passed", result
    assert result.stdout == "hello\n"


def test_output_is_capped():
    cfg = SandboxConfig(timeout_s=5, max_output_bytes=1000)
    result = run_code("import sys\nfor _ in range(2000):\n    sys.stdout.write('x' * 1000)\n", "", cfg)
    assert result.status == "passed", result
    assert len(result.stdout) == 1000 and result.stdout_truncated
    assert not result.stderr_truncated


def test_files_are_placed_in_the_work_dir_and_it_is_removed_after():
    code = "import os\nprint(open('data/input.txt').read())\nprint(os.getcwd())\nopen('out.txt', 'w').write('1')\n"
    result = run_code(code, "", FAST, files={"data/input.txt": "42"})
    assert result.status == "passed", result
    text, workdir = result.stdout.splitlines()
    assert text == "42"
    assert not os.path.exists(workdir)
    with pytest.raises(SandboxError, match="outside the work dir"):
        run_code("pass", "", FAST, files={"../escape.txt": "x"})


def test_minimal_environment():
    code = "import json, os, sys\nprint(json.dumps(sorted(os.environ)))\nprint(sys.flags.isolated, sys.flags.no_site)"
    result = run_code(code, "", FAST)
    names, flags = result.stdout.splitlines()
    assert set(json.loads(names)) == {"HOME", "LANG", "LC_ALL", "PATH", "TMPDIR", sb.RUN_ENV_VAR}
    assert flags == "1 1"


# --------------------------------------------------------------------------------------------------
# limits


def test_infinite_loop_stops_within_its_time_limit():
    start = time.monotonic()
    result = run_code("while True:\n    pass\n", "", SandboxConfig(timeout_s=1.5, cpu_s=30))
    elapsed = time.monotonic() - start
    assert result.status == "timeout", result
    assert "wall-clock" in result.error and result.exit_code is None
    assert result.duration_s >= 1.4 and elapsed < 1.5 + 4.0


def test_cpu_limit_stops_a_busy_loop_before_the_wall_clock():
    result = run_code("while True:\n    pass\n", "", SandboxConfig(timeout_s=20, cpu_s=1))
    assert result.status == "timeout" and "CPU" in result.error, result
    assert result.duration_s < 10


def test_sleeping_loop_stops_at_the_wall_clock_with_children():
    code = "import os, time\nfor _ in range(3):\n    if os.fork() == 0:\n        time.sleep(20)\n        os._exit(0)\n" \
           "time.sleep(20)\n"
    result = run_code(code, "", SandboxConfig(timeout_s=1.5))
    assert result.status == "timeout", result
    assert processes_of_run(result.run_id) == []


def test_memory_bomb_fails_within_the_memory_limit():
    result = run_code("blob = bytearray(2 * 1024 ** 3)\n", "", SandboxConfig(timeout_s=10, memory_mb=256))
    assert result.status == "memory", result
    small = run_code("blob = bytearray(20 * 1024 ** 2)\n", "", SandboxConfig(timeout_s=10, memory_mb=256))
    assert small.status == "passed", small


FORK_CODE = """
import os, time
started = 0
try:
    for _ in range(2000):
        pid = os.fork()
        if pid == 0:
            time.sleep(10)
            os._exit(0)
        started += 1
finally:
    print(started, flush=True)
"""


def check_fork_bomb(config: SandboxConfig) -> sb.SandboxResult:
    result = run_code(FORK_CODE, "", config)
    assert result.status == "crashed", result
    assert "BlockingIOError" in result.error or "Resource temporarily unavailable" in result.error
    started = int(result.stdout.split()[0])
    assert 0 <= started < config.max_processes, result.stdout
    assert processes_of_run(result.run_id) == []
    return result


def test_fork_bomb_is_stopped_by_the_process_limit():
    result = check_fork_bomb(SandboxConfig(timeout_s=10, max_processes=16))
    if ROOT:
        assert "fresh-uid" in result.layers


def test_fork_bomb_is_stopped_without_namespaces_and_strays_are_killed():
    code = FORK_CODE.replace("time.sleep(10)", "os.setsid()\n            time.sleep(10)")
    config = SandboxConfig(timeout_s=10, max_processes=16, namespaces=False)
    result = run_code(code, "", config)
    assert result.status == "crashed", result
    assert int(result.stdout.split()[0]) < 16
    assert "pidns" not in result.layers
    assert processes_of_run(result.run_id) == []


@pytest.mark.skipif(not ROOT, reason="a fixed user (nobody) is a root-only setting")
def test_fork_bomb_as_nobody_is_stopped():
    result = check_fork_bomb(SandboxConfig(timeout_s=10, max_processes=16, user="nobody"))
    assert "uid" in result.layers


def test_file_size_limit():
    result = run_code("open('big.bin', 'wb').write(b'x' * (3 * 1024 * 1024))\n", "",
                      SandboxConfig(timeout_s=5, max_file_mb=1))
    # Python ignores SIGXFSZ, so the write fails with EFBIG instead of killing the process
    assert result.status == "crashed" and ("File too large" in result.error or "SIGXFSZ" in result.error), result


def test_work_dir_size_is_capped(layers):
    need(layers, "mountns-ro")
    code = "for i in range(8):\n    open(f'part{i}.bin', 'wb').write(b'x' * (1024 * 1024))\n"
    result = run_code(code, "", SandboxConfig(timeout_s=5, max_disk_mb=3, max_file_mb=2))
    assert result.status == "crashed" and "No space left on device" in result.error, result
    assert run_code(code, "", SandboxConfig(timeout_s=5, max_disk_mb=16, max_file_mb=2)).status == "passed"


# --------------------------------------------------------------------------------------------------
# isolation: network


NET_CODE = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.settimeout(2)
s.connect(("127.0.0.1", {port}))
print("connected")
"""


def test_network_connection_is_blocked(listener):
    port, accepted = listener
    result = run_code(NET_CODE.format(port=port), "", FAST)
    assert result.status == "blocked", result
    assert "socket.connect" in result.blocked[0]
    assert "connected" not in result.stdout
    assert accepted() == 0


def test_network_namespace_alone_stops_the_connection(listener, layers):
    need(layers, "netns")
    port, accepted = listener
    result = run_code(NET_CODE.format(port=port), "", SandboxConfig(timeout_s=5, audit_hook=False))
    assert result.status == "crashed" and "unreachable" in result.error, result
    assert "audit-hook" not in " ".join(result.layers)
    assert accepted() == 0


def test_audit_hook_alone_stops_the_connection(listener):
    port, accepted = listener
    result = run_code(NET_CODE.format(port=port), "", SandboxConfig(timeout_s=5, namespaces=False))
    assert result.status == "blocked", result
    assert "audit-hook-strict" in result.layers
    assert accepted() == 0


def test_strict_hook_refuses_subprocess_and_ctypes():
    cfg = SandboxConfig(timeout_s=5, namespaces=False)
    spawn = run_code("import subprocess\nsubprocess.run(['true'])\n", "", cfg)
    assert spawn.status == "blocked" and "subprocess.Popen" in spawn.blocked[0], spawn
    assert run_code("import ctypes\nctypes.CDLL(None)\n", "", cfg).status == "blocked"


# --------------------------------------------------------------------------------------------------
# isolation: writes outside the work dir


@pytest.fixture
def targets(tmp_path: Path):
    """Two paths outside any work dir: in a directory the test owns, and directly in /tmp."""
    owned = tmp_path / "owned"
    owned.mkdir()
    in_tmp = Path("/tmp") / f"polyfuse-sandbox-test-{secrets.token_hex(6)}"
    yield [owned / "escape.txt", in_tmp]
    in_tmp.unlink(missing_ok=True)


def write_code(path: Path) -> str:
    return f"with open({str(path)!r}, 'w') as f:\n    f.write('escaped')\nprint('wrote')\n"


def test_writes_outside_the_work_dir_are_blocked(targets):
    for target in targets:
        result = run_code(write_code(target), "", FAST)
        assert result.status == "blocked", result
        assert not target.exists(), target
        assert "wrote" not in result.stdout
    rename = run_code(f"import os\nopen('a', 'w').close()\nos.rename('a', {str(targets[1])!r})\n", "", FAST)
    assert rename.status == "blocked" and not targets[1].exists()


def test_read_only_mounts_alone_stop_writes(targets, layers):
    need(layers, "mountns-ro")
    for target in targets:
        result = run_code(write_code(target), "", SandboxConfig(timeout_s=5, audit_hook=False))
        assert result.status == "crashed", result
        assert "Read-only file system" in result.error or "Permission denied" in result.error
        assert not target.exists()


def test_audit_hook_alone_stops_writes(targets):
    for target in targets:
        result = run_code(write_code(target), "", SandboxConfig(timeout_s=5, namespaces=False))
        assert result.status == "blocked", result
        assert not target.exists()


@pytest.mark.skipif(not ROOT, reason="the unprivileged-user layer exists only when polyfuse runs as root")
def test_unprivileged_user_alone_cannot_write_the_tests_files(targets):
    owned = targets[0]
    result = run_code(write_code(owned), "", SandboxConfig(timeout_s=5, namespaces=False, audit_hook=False))
    assert result.status == "crashed" and "Permission denied" in result.error, result
    assert not owned.exists()
    who = run_code("import os\nprint(os.getuid(), os.getgid(), os.getgroups())", "", FAST)
    uid, gid, groups = who.stdout.split(maxsplit=2)
    assert int(uid) != 0 and int(gid) != 0 and groups.strip() == "[]"


def test_work_dir_is_writable_and_temp_files_go_there():
    code = "import tempfile, os\nwith tempfile.NamedTemporaryFile('w', delete=False) as f:\n    f.write('x')\n" \
           "print(os.path.dirname(f.name) == os.getcwd())\n"
    result = run_code(code, "", FAST)
    assert result.status == "passed" and result.stdout.strip() == "True", result


# --------------------------------------------------------------------------------------------------
# batches, configuration, the non-root path


def test_run_many_keeps_order_and_bounds_concurrency():
    code = "import time\nprint(time.time())\ntime.sleep(1.0)\nprint(time.time())\n"
    jobs = [SandboxJob(code, "")] * 4 + [("def f():\n    return 1\n", "assert f() == 2")]
    results = run_many(jobs, FAST, workers=2)
    assert [r.status for r in results] == ["passed"] * 4 + ["failed"]
    spans = [tuple(float(x) for x in r.stdout.split()) for r in results[:4]]
    most = max(sum(1 for a, b in spans if a <= t < b) for t, _ in spans)
    assert most <= 2
    assert run_many([], FAST) == []


def test_bad_configuration_is_a_sandbox_error():
    with pytest.raises(SandboxError, match="memory_mb"):
        SandboxConfig(memory_mb=1)
    with pytest.raises(SandboxError, match="SandboxConfig.python"):
        run_code("pass", "", SandboxConfig(timeout_s=5, python="/nonexistent/python3"))


NOBODY_SCRIPT = textwrap.dedent("""
    import importlib.util, json, os, socket, sys
    spec = importlib.util.spec_from_file_location("sandbox_copy", sys.argv[1])
    sb = importlib.util.module_from_spec(spec)
    sys.modules["sandbox_copy"] = sb
    spec.loader.exec_module(sb)
    port, target = int(sys.argv[2]), sys.argv[3]
    cfg = sb.SandboxConfig(timeout_s=5, max_processes=16)
    runs = {
        "good": sb.run_code("def f(x):\\n    return x + 1\\n", "assert f(1) == 2", cfg),
        "write": sb.run_code(f"open({target!r}, 'w').write('x')", "", cfg),
        "net": sb.run_code(f"import socket\\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)", "", cfg),
        "fork": sb.run_code("import os, time\\nfor _ in range(500):\\n    if os.fork() == 0:\\n"
                            "        time.sleep(5)\\n        os._exit(0)\\n", "", cfg),
    }
    print(json.dumps({k: [r.status, r.layers, r.run_id] for k, r in runs.items()}))
""")


@pytest.mark.skipif(not ROOT, reason="runs the sandbox as the unprivileged user 'nobody'; needs root to switch")
def test_non_root_path_as_nobody(tmp_path, listener):
    """polyfuse itself running unprivileged: user namespaces where allowed, else the strict audit hook."""
    python = next((p for p in ("/usr/local/bin/python3", "/usr/bin/python3") if os.access(p, os.X_OK)), None)
    if python is None:
        pytest.skip("no system Python that the user 'nobody' can run")
    port, accepted = listener
    shared = Path(f"/tmp/polyfuse-sandbox-nobody-test-{secrets.token_hex(4)}")
    shared.mkdir(mode=0o755)
    try:
        shutil.copytree(SANDBOX_DIR, shared / "sandbox_copy", ignore=shutil.ignore_patterns("__pycache__"))
        target = f"/tmp/polyfuse-sandbox-test-{secrets.token_hex(6)}"
        copy = str(shared / "sandbox_copy" / "__init__.py")
        proc = subprocess.run([python, "-I", "-c", NOBODY_SCRIPT, copy, str(port), target],
                              user="nobody", group=pwd.getpwnam("nobody").pw_gid, extra_groups=[],
                              capture_output=True, text=True,
                              timeout=120, cwd="/", env={"PATH": "/usr/bin:/bin"})
        assert proc.returncode == 0, proc.stderr
        runs = json.loads(proc.stdout.splitlines()[-1])
        assert not os.path.exists(target)
    finally:
        shutil.rmtree(shared, ignore_errors=True)
        Path(target).unlink(missing_ok=True)
    assert runs["good"][0] == "passed", runs
    assert runs["write"][0] in ("blocked", "crashed") and runs["net"][0] in ("blocked", "crashed"), runs
    assert runs["fork"][0] == "crashed", runs
    assert "userns" in runs["good"][1] or "audit-hook-strict" in runs["good"][1], runs
    assert accepted() == 0
    assert processes_of_run(runs["fork"][2]) == []


def test_launcher_is_stdlib_only():
    """The launcher runs as ``python -I -S launcher.py``: importing the file must not need site-packages."""
    proc = subprocess.run([sys.executable, "-I", "-S", "-c",
                           f"import importlib.util, sys; s = importlib.util.spec_from_file_location('x', {str(SANDBOX_DIR / 'launcher.py')!r});"
                           "m = importlib.util.module_from_spec(s); sys.modules['x'] = m; s.loader.exec_module(m)"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(not ROOT, reason="uid choice is a root-only setting")
def test_without_fresh_uids_falls_back_to_nobody(monkeypatch):
    monkeypatch.setattr(sb, "_mapped_range", lambda wanted: None)  # a rootless container mapping few uids
    result = run_code("import os\nprint(os.getuid())", "", FAST)
    assert result.status == "passed" and "uid" in result.layers and "fresh-uid" not in result.layers, result
    assert int(result.stdout) == pwd.getpwnam("nobody").pw_uid


def test_next_run_still_works_after_every_attack():
    """Run last in this module: nothing above left the sandbox unusable."""
    result = run_code("def add(a, b):\n    return a + b\n", "assert add(2, 3) == 5\n", FAST)
    assert result.status == "passed", result
