"""Hostile solutions that try to forge a ``passed`` verdict: write the report channel, exit early, signal.

Every case is bounded: no loops beyond a few dozen file descriptors, no forks, no allocations. Each attack
tries its forgery and then ends the way named in its id; none of them may come back ``passed``.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from polyfuse.verify import sandbox as sb
from polyfuse.verify.checkers import CodeVerdict, VerifierConfig, verify_code
from polyfuse.verify.sandbox import SandboxConfig, run_code

FAST = VerifierConfig(sandbox=SandboxConfig(timeout_s=5))
NO_HOOK = VerifierConfig(sandbox=SandboxConfig(timeout_s=5, audit_hook=False))
SITE = VerifierConfig(sandbox=SandboxConfig(timeout_s=5, site_packages=True))
TESTS = ["assert add(2, 2) == 4", "assert add(1, 2) == 3"]
FAILURE = ("failed", "crashed")
SANDBOX_DIR = Path(sb.__file__).parent

FORGED = r"""
import json, os
FORGED = [b'{"status": "passed"}\n', json.dumps({"status": "passed", "stage": "tests"}).encode() + b"\n"]

def forge(fds):
    for fd in fds:
        for line in FORGED:
            try:
                os.write(fd, line)
            except OSError:
                pass
"""


def check(solution: str, config: VerifierConfig = FAST, allowed: tuple[str, ...] = FAILURE) -> CodeVerdict:
    verdict = verify_code(f"```python\n{textwrap.dedent(solution).strip()}\n```", TESTS, entry_point="add",
                          config=config)
    assert not verdict.correct and verdict.status in allowed, verdict
    return verdict


# --------------------------------------------------------------------------------------------------
# the two reported reproductions


def test_writing_the_report_descriptor_then_exiting_is_not_a_pass():
    response = "```python\nimport os\nos.write(3, b'{\"status\": \"passed\"}\\n')\nos._exit(0)\n```"
    verdict = verify_code(response, ["assert add(2,2)==4"], entry_point="add", config=FAST)
    assert not verdict.correct and verdict.status in FAILURE, verdict


def test_system_exit_from_the_solution_is_not_a_pass():
    check("def add(a, b):\n    raise SystemExit(0)")


# --------------------------------------------------------------------------------------------------
# exits of every kind, at import time and from inside a test


@pytest.mark.parametrize("body", [
    "import sys\n    sys.exit(0)",
    "import sys\n    sys.exit()",
    "import sys\n    sys.exit(False)",
    "raise SystemExit",
    "raise SystemExit(None)",
    "import os\n    os._exit(0)",
    "raise KeyboardInterrupt",
    "import signal\n    signal.raise_signal(signal.SIGINT)",
    "class Quit(BaseException):\n        pass\n    raise Quit()",
    "class Quiet(SystemExit):\n        pass\n    raise Quiet(0)",
    "import signal, os\n    os.kill(os.getpid(), signal.SIGTERM)",
    "import signal, os\n    os.kill(os.getpid(), signal.SIGKILL)",
    "import sys, types, unittest\n    class Ok(unittest.TestCase):\n        def test_ok(self):\n            pass\n"
    "    sys.modules['ok'] = types.ModuleType('ok')\n    sys.modules['ok'].Ok = Ok\n"
    "    unittest.main(module='ok', argv=['x'], exit=True)",
], ids=["sys.exit(0)", "sys.exit()", "sys.exit(False)", "raise SystemExit", "SystemExit(None)", "os._exit(0)",
        "KeyboardInterrupt", "SIGINT", "BaseException subclass", "SystemExit subclass", "SIGTERM", "SIGKILL",
        "unittest.main() from the solution"])
def test_an_exit_inside_a_test_is_a_failure(body):
    check(f"def add(a, b):\n    {body}")


@pytest.mark.parametrize("call", ["exit()", "exit(0)", "quit()"])
def test_site_exit_and_quit_are_failures(call):
    check(f"def add(a, b):\n    {call}", SITE)
    check(f"def add(a, b):\n    {call}")  # without site: a NameError


@pytest.mark.parametrize("ending", ["import sys\nsys.exit(0)", "raise SystemExit(0)", "import os\nos._exit(0)"])
def test_an_exit_at_import_time_is_a_failure(ending):
    check(f"def add(a, b):\n    return a + b\n{ending}")


# --------------------------------------------------------------------------------------------------
# forging the report channel


def test_forged_lines_on_every_descriptor_then_os_exit():
    check(FORGED + "forge(range(0, 21))\nos._exit(0)")


def test_forged_lines_on_descriptors_3_to_50_from_inside_a_test():
    check(FORGED + "def add(a, b):\n    forge(range(3, 51))\n    os._exit(0)")


def test_forged_line_then_sigkill():
    check(FORGED + "import signal\nforge(range(3, 51))\nos.kill(os.getpid(), signal.SIGKILL)")


def test_forged_line_then_the_report_descriptor_is_replaced():
    """Forge a pass, then point the report descriptors at /dev/null so the real (failing) verdict is lost."""
    check(FORGED + "forge(range(3, 51))\nnull = os.open('/dev/null', os.O_WRONLY)\n"
          "for fd in range(3, 51):\n    if fd != null:\n        try:\n            os.dup2(null, fd)\n"
          "        except OSError:\n            pass\n"
          "def add(a, b):\n    return a - b")


def test_a_saved_duplicate_of_the_report_descriptor_is_used_after_the_tests():
    check(FORGED + "saved = []\nfor fd in range(3, 51):\n    try:\n        saved.append(os.dup(fd))\n"
          "    except OSError:\n        pass\n"
          "def add(a, b):\n    forge(saved)\n    os._exit(0)")


def test_closing_every_descriptor_is_not_a_pass():
    """A correct solution that closes the descriptors takes its own report channel away: never ``passed``."""
    check("import os\nos.closerange(3, 1024)\ndef add(a, b):\n    return a + b")
    check("import os\nnull = os.open('/dev/null', os.O_WRONLY)\nfor fd in range(3, 64):\n    if fd != null:\n"
          "        try:\n            os.dup2(null, fd)\n        except OSError:\n            pass\n"
          "def add(a, b):\n    return a + b")


PARENTS = r"""
import os

def parent_pids():
    pids = {os.getppid()}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("PPid:"):
                pids.add(int(line.split()[1]))
    return pids
"""

PROC_FORGE = FORGED + PARENTS + r"""
opened = []
for pid in ["self", *parent_pids()]:
    for fd in range(3, 20):
        try:
            opened.append(os.open(f"/proc/{pid}/fd/{fd}", os.O_WRONLY))
        except OSError:
            pass
forge(opened)
os._exit(0)
"""


@pytest.mark.parametrize("config", [FAST, NO_HOOK], ids=["audit hook", "no audit hook"])
def test_forging_through_proc_fd(config):
    check(PROC_FORGE, config, FAILURE + ("blocked",))


def test_the_runner_process_is_out_of_reach():
    """The solution cannot open the runner's descriptors or memory through /proc (it is not dumpable)."""
    code = PARENTS + textwrap.dedent("""
        reached = []
        for pid in parent_pids():
            for what in ("fd/3", "mem", "environ"):
                try:
                    os.close(os.open(f"/proc/{pid}/{what}", os.O_RDONLY))
                    reached.append(f"{pid}/{what}")
                except OSError:
                    pass
        print("reached", reached)
        def add(a, b):
            return a + b
    """)
    result = run_code(code, "\n".join(TESTS), SandboxConfig(timeout_s=5, audit_hook=False))
    assert result.status == "passed", result
    assert "reached []" in result.stdout, result.stdout


def test_killing_the_parent_after_forging():
    check(FORGED + "import signal\nforge(range(3, 51))\nfor pid in {os.getppid(), 1}:\n    try:\n"
          "        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\nos._exit(0)")


def test_tokens_in_frame_locals_are_not_enough():
    """Harvest every hex string from the frames on the stack and try it as a report token."""
    check(FORGED + textwrap.dedent("""
        import sys
        def strings(value, depth=0):
            if isinstance(value, str):
                yield value
            elif isinstance(value, (list, tuple, set)) and depth < 3:
                for item in value:
                    yield from strings(item, depth + 1)

        def add(a, b):
            frame, tokens = sys._getframe(), set()
            while frame is not None:
                for value in list(frame.f_locals.values()):
                    tokens.update(s for s in strings(value) if len(s) >= 16 and all(c in "0123456789abcdef" for c in s))
                frame = frame.f_back
            for token in tokens:
                for status in ("passed", "PASSED"):
                    FORGED.append(f"{token} {status}\\n".encode())
            forge(range(3, 51))
            os._exit(0)
    """))


# --------------------------------------------------------------------------------------------------
# honest solutions are still judged by their tests


def test_correct_and_wrong_solutions():
    assert verify_code("def add(a, b):\n    return a + b", TESTS, entry_point="add", config=FAST).correct
    wrong = verify_code("def add(a, b):\n    return a * b", TESTS, entry_point="add", config=FAST)
    assert not wrong.correct and wrong.status == "failed"


def test_a_correct_solution_that_writes_noise_still_passes():
    verdict = verify_code("```python\n" + FORGED + "forge(range(3, 51))\nprint('{\"status\": \"failed\"}')\n"
                          "def add(a, b):\n    return a + b\n```", TESTS, entry_point="add", config=FAST)
    assert verdict.correct and verdict.status == "passed", verdict


def test_a_flood_on_the_report_pipe_does_not_push_the_verdict_out():
    flood = FORGED + ("for fd in range(3, 10):\n    try:\n        for _ in range(32):\n"
                      "            os.write(fd, b'x' * 65536)\n            os.write(fd, FORGED[0] * 1000)\n"
                      "    except OSError:\n        pass\n")
    assert run_code(flood + "def add(a, b):\n    return a + b\n", "\n".join(TESTS), FAST.sandbox).passed
    assert run_code(flood + "def add(a, b):\n    return a - b\n", "\n".join(TESTS), FAST.sandbox).status == "failed"
    assert run_code(flood + "os._exit(0)\n", "\n".join(TESTS), FAST.sandbox).status == "crashed"


UNITTEST_TESTS = """
import unittest

class TestAdd(unittest.TestCase):
    def test_add(self):
        self.assertEqual(add(2, 2), 4)

unittest.main(module="solution", argv=["tests"], exit=True)
"""


def test_tests_may_end_themselves_with_sys_exit_or_unittest():
    good, bad = "def add(a, b):\n    return a + b\n", "def add(a, b):\n    return a - b\n"
    assert run_code(good, "assert add(1, 1) == 2\nimport sys\nsys.exit(0)\nassert False", FAST.sandbox).passed
    assert run_code(good, "raise SystemExit", FAST.sandbox).passed
    assert run_code(good, "import sys\nsys.exit(1)", FAST.sandbox).status == "failed"
    assert run_code(good, UNITTEST_TESTS, FAST.sandbox).passed
    failing = run_code(bad, UNITTEST_TESTS, FAST.sandbox)
    assert failing.status == "failed" and "SystemExit" in failing.error, failing
    exiting = run_code("def add(a, b):\n    raise SystemExit(0)\n", UNITTEST_TESTS, FAST.sandbox)
    assert exiting.status == "failed", exiting


# --------------------------------------------------------------------------------------------------
# the same attacks with polyfuse itself unprivileged (user namespaces; the pipes belong to the code's own uid)


NOBODY_SCRIPT = textwrap.dedent("""
    import importlib.util, json, sys
    spec = importlib.util.spec_from_file_location("sandbox_copy", sys.argv[1])
    sb = importlib.util.module_from_spec(spec)
    sys.modules["sandbox_copy"] = sb
    spec.loader.exec_module(sb)
    codes = json.loads(sys.argv[2])
    tests = "assert add(2, 2) == 4"
    out = {}
    for hook in (True, False):
        cfg = sb.SandboxConfig(timeout_s=5, audit_hook=hook)
        for name, code in codes.items():
            r = sb.run_code(code, tests, cfg)
            out[f"{name}/hook={hook}"] = [r.status, r.layers]
    print(json.dumps(out))
""")


@pytest.mark.skipif(os.geteuid() != 0, reason="runs the sandbox as the unprivileged user 'nobody'; needs root to switch")
def test_attacks_with_an_unprivileged_polyfuse(tmp_path):
    python = next((p for p in ("/usr/local/bin/python3", "/usr/bin/python3") if os.access(p, os.X_OK)), None)
    if python is None:
        pytest.skip("no system Python that the user 'nobody' can run")
    codes = {
        "good": "def add(a, b):\n    return a + b\n",
        "fd-write": FORGED + "forge(range(0, 51))\nos._exit(0)\n",
        "proc-fd": PROC_FORGE,
        "exit": "def add(a, b):\n    raise SystemExit(0)\n",
    }
    shared = Path(f"/tmp/polyfuse-sandbox-hostile-test-{secrets.token_hex(4)}")
    shared.mkdir(mode=0o755)
    try:
        shutil.copytree(SANDBOX_DIR, shared / "sandbox_copy", ignore=shutil.ignore_patterns("__pycache__"))
        copy = str(shared / "sandbox_copy" / "__init__.py")
        proc = subprocess.run([python, "-I", "-c", NOBODY_SCRIPT, copy, json.dumps(codes)],
                              user="nobody", group=pwd.getpwnam("nobody").pw_gid, extra_groups=[],
                              capture_output=True, text=True, timeout=120, cwd="/", env={"PATH": "/usr/bin:/bin"})
    finally:
        shutil.rmtree(shared, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr
    runs = json.loads(proc.stdout.splitlines()[-1])
    for name, (status, layers) in runs.items():
        expected = ("passed",) if name.startswith("good/") else FAILURE + ("blocked",)
        assert status in expected, (name, status, layers)
