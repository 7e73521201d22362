"""The sandboxed code reward: scoring, test-case formats, and the sandbox's limits and isolation.

The isolation tests run once per isolation mode this machine supports (``namespace`` and ``setuid`` need root;
``rlimit`` runs everywhere), so CI exercises at least the fallback guards.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from fedrl_lightning.rewards import compute_rewards, reward_func_name
from fedrl_lightning.rewards.code import (
    CodeReward,
    _parse_tests,
    binary_code_reward,
    code_reward,
    extract_code,
    make_code_reward,
)
from fedrl_lightning.sandbox import SandboxResult, _interpreter_for, isolation_mode, run_sandboxed

DOUBLE = "```python\nn = int(input())\nprint(n * 2)\n```"
PLUS_ONE = "```python\nn = int(input())\nprint(n + 1)\n```"
SQUARE = "```python\nn = int(input())\nprint(n * n)\n```"
TESTS = [{"input": "2\n", "output": "4\n"}, {"input": "5", "output": "10"}]  # n*n passes only the first
REPO = Path(__file__).resolve().parents[1]


def _fenced(code: str) -> str:
    return f"Here is my solution:\n```python\n{code}\n```\n"


def _sandbox_pids() -> set[int]:
    """Live processes started by a sandbox (they carry its environment marker) or owned by ``nobody``."""
    found = set()
    for proc in psutil.process_iter():
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.uids().real == 65534 or "FEDRL_SANDBOX_ID" in proc.environ():
                found.add(proc.pid)
        except psutil.Error:
            continue
    return found


@pytest.fixture(params=["namespace", "setuid", "rlimit"])
def mode(request) -> str:
    if _interpreter_for(request.param) is None:
        pytest.skip(f"{request.param} isolation is not available here")
    return request.param


# ---------------------------------------------------------------------------------------------------------------------
# Extraction and test-case parsing
# ---------------------------------------------------------------------------------------------------------------------


def test_extract_code_takes_the_last_python_or_unlabelled_block():
    text = "```python\nprint(1)\n```\nthen\n```\nprint(2)\n```\nOutput:\n```text\n2\n```"
    assert extract_code(text) == "print(2)\n"
    assert extract_code("```py\nx = 1\n```") == "x = 1\n"
    assert extract_code("no code here") is None
    assert extract_code("```python\nprint(1)") is None  # truncated: no closing fence
    assert extract_code("```cpp\nint main() {}\n```") is None
    assert extract_code("```python\n   \n```") is None


def test_parse_tests_accepts_both_formats():
    expected = [("1", "2"), ("3", "4")]
    assert _parse_tests([{"input": "1", "output": "2"}, {"input": "3", "output": "4"}]) == expected
    assert _parse_tests({"inputs": ["1", "3"], "outputs": ["2", "4"]}) == expected
    assert _parse_tests(json.dumps({"inputs": ["1", "3"], "outputs": ["2", "4"]})) == expected
    wrapped = {"language": "python", "test_cases": [{"input": "1", "output": "2", "type": "stdin_stdout"}]}
    assert _parse_tests(wrapped) == [("1", "2")]
    assert _parse_tests({"inputs": [["1", "2"]], "outputs": [["3"]]}) == [("1\n2", "3")]
    assert _parse_tests(None) is None
    assert _parse_tests([]) is None
    assert _parse_tests({"inputs": [[1]], "outputs": [2], "fn_name": "f"}) is None  # call-based: unsupported
    assert _parse_tests({"language": "cpp", "test_cases": [{"input": "1", "output": "2"}]}) is None
    with pytest.raises(ValueError, match="inputs"):
        _parse_tests({"inputs": ["1"], "outputs": []})


# ---------------------------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------------------------


def test_code_reward_scores_correct_wrong_partial_missing_and_conversational():
    completions = [
        DOUBLE,
        PLUS_ONE,
        SQUARE,
        "I don't know how to write this.",
        DOUBLE,
        [{"role": "assistant", "content": "Sure.\n" + DOUBLE}],
    ]
    test_cases = [TESTS, TESTS, TESTS, TESTS, None, {"inputs": ["2", "5"], "outputs": ["4", "10"]}]
    prompts = ["p"] * len(completions)
    assert code_reward(prompts, completions, test_cases, max_workers=2) == [1.0, 0.0, 0.5, 0.0, None, 1.0]
    assert binary_code_reward(prompts, completions, test_cases, max_workers=2) == [1.0, 0.0, 0.0, 0.0, None, 1.0]


def test_code_reward_output_comparison_ignores_trailing_whitespace_but_needs_exit_status_0():
    tests = [[{"input": "", "output": "a b\nc\n"}]] * 3
    completions = [
        _fenced("print('a b   ')\nprint('c')\nprint()\nprint('  ')"),
        _fenced("print('a  b')\nprint('c')"),  # inner whitespace matters
        _fenced("print('a b')\nprint('c')\nraise SystemExit(1)"),
    ]
    assert code_reward(["p"] * 3, completions, tests) == [1.0, 0.0, 0.0]


def test_code_reward_without_test_column_is_none_and_rejects_misaligned_columns():
    assert code_reward(["p", "q"], [DOUBLE, DOUBLE]) == [None, None]
    with pytest.raises(ValueError, match="test_cases"):
        code_reward(["p"], [DOUBLE], [TESTS, TESTS])


def test_configured_reward_through_compute_rewards_and_yaml():
    slow = _fenced("import time\ntime.sleep(5)\nprint(4)")
    funcs = [
        make_code_reward(timeout_s=0.5),
        CodeReward(binary=True, max_tests=1, timeout_s=0.5),
        functools.partial(code_reward, timeout_s=0.5),
    ]
    assert [reward_func_name(f) for f in funcs] == ["code_reward", "binary_code_reward", "code_reward"]
    rewards, errors = compute_rewards(funcs, ["p", "q"], [SQUARE, slow], {"test_cases": [TESTS, TESTS]})
    # SQUARE passes only the first test (binary with max_tests=1 sees just that one); the sleeper times out.
    assert rewards.tolist() == [[0.5, 1.0, 0.5], [0.0, 0.0, 0.0]]
    assert errors == {"code_reward": 0, "binary_code_reward": 0}

    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--reward_funcs", type=list[Callable[..., list]])
    yaml = (
        "reward_funcs:\n"
        "  - class_path: fedrl_lightning.rewards.code.CodeReward\n"
        "    init_args: {timeout_s: 4.0, memory_mb: 512, max_workers: 2}\n"
        "  - fedrl_lightning.rewards.code.binary_code_reward\n"
    )
    reward_funcs = parser.instantiate(parser.parse_string(yaml)).reward_funcs
    assert isinstance(reward_funcs[0], CodeReward)
    assert (reward_funcs[0].timeout_s, reward_funcs[0].memory_mb, reward_funcs[0].max_workers) == (4.0, 512, 2)
    assert reward_funcs[1] is binary_code_reward


def test_run_sandboxed_reports_exit_status_and_streams():
    result = run_sandboxed("import sys\nprint(input()[::-1])\nprint('oops', file=sys.stderr)\nsys.exit(3)", "abc\n")
    assert isinstance(result, SandboxResult)
    assert (result.returncode, result.stdout, result.stderr) == (3, "cba\n", "oops\n")
    assert not result.timed_out and result.killed_reason is None
    assert isolation_mode() in ("namespace", "setuid", "rlimit")


# ---------------------------------------------------------------------------------------------------------------------
# Limits and isolation, per available isolation mode
# ---------------------------------------------------------------------------------------------------------------------


def test_infinite_loop_times_out_and_leaves_no_process(mode):
    # A background child in its own session tries to outlive the sandbox (forking is refused when the fallback
    # runs as root; then only the loop remains).
    code = (
        "import os, time\n"
        "try:\n"
        "    if os.fork() == 0:\n"
        "        os.setsid()\n"
        "        time.sleep(60)\n"
        "        os._exit(0)\n"
        "except OSError:\n"
        "    pass\n"
        "print('looping', flush=True)\n"
        "while True:\n"
        "    pass\n"
    )
    before = _sandbox_pids()
    result = run_sandboxed(code, timeout_s=1.0, isolation=mode)
    assert result.timed_out and result.killed_reason == "timeout" and result.returncode < 0
    assert result.stdout == "looping\n"
    assert _sandbox_pids() - before == set()


def test_infinite_loop_scores_zero():
    reward = CodeReward(timeout_s=0.5)
    assert reward(["p"], [_fenced("while True:\n    pass")], [TESTS[:1]]) == [0.0]


def test_fork_bomb_is_contained(mode):
    bomb = "import os\nwhile True:\n    os.fork()"
    assert code_reward(["p"], [_fenced(bomb)], [TESTS[:1]], timeout_s=0.5) == [0.0]
    persistent_bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    before = _sandbox_pids()
    result = run_sandboxed(persistent_bomb, timeout_s=0.5, isolation=mode)
    assert result.returncode != 0
    assert _sandbox_pids() - before == set()
    # The sandbox still works afterwards (the process limit of its user is free again).
    assert run_sandboxed("print('alive')", isolation=mode).stdout == "alive\n"


def test_memory_hog_fails_without_harming_the_caller(mode):
    rss_before = psutil.Process().memory_info().rss
    result = run_sandboxed("x = bytearray(2 * 1024**3)\nprint('allocated')", memory_mb=256, isolation=mode)
    assert result.returncode != 0 and "MemoryError" in result.stderr and "allocated" not in result.stdout
    assert psutil.Process().memory_info().rss - rss_before < 100 * 1024**2
    assert code_reward(["p"], [_fenced("x = bytearray(2 * 1024**3)\nprint(4)")], [TESTS[:1]]) == [0.0]


def test_writes_outside_the_working_directory_fail(mode):
    name = f"escape_{uuid.uuid4().hex}"
    targets = [Path(tempfile.gettempdir()) / name, REPO / name, REPO.parent / name]
    targets += [Path(d) / name for d in ("/tmp", "/var/tmp", "/dev/shm") if os.path.isdir(d)]
    tmp = tempfile.gettempdir()
    code = (
        "import os, subprocess\n"
        f"for path in {[str(t) for t in targets]!r}:\n"
        "    try:\n"
        "        with open(path, 'w') as f:\n"
        "            f.write('x')\n"
        "        print('WROTE', path)\n"
        "    except OSError:\n"
        "        print('blocked')\n"
        "try:\n"  # a directory fd opened outside, then a relative create through it
        f"    fd = os.open({tmp!r}, os.O_RDONLY | os.O_DIRECTORY)\n"
        f"    os.close(os.open({name + '_dirfd'!r}, os.O_WRONLY | os.O_CREAT, dir_fd=fd))\n"
        "    print('WROTE dir_fd')\n"
        "except OSError:\n"
        "    print('blocked')\n"
        "try:\n"  # another program, which no audit hook sees
        f"    subprocess.run(['sh', '-c', 'echo x > {tmp}/{name}_sh'])\n"
        "except OSError:\n"
        "    print('blocked')\n"
        "with open('inside.txt', 'w') as f:\n"
        "    f.write('ok')\n"
        "print(open('inside.txt').read())\n"
    )
    try:
        result = run_sandboxed(code, isolation=mode)
        assert "WROTE" not in result.stdout, result.stdout
        assert result.stdout.endswith("ok\n"), result.stderr
        for path in [*targets, Path(tmp) / f"{name}_dirfd", Path(tmp) / f"{name}_sh"]:
            assert not path.exists(), path
    finally:
        for path in [*targets, Path(tmp) / f"{name}_dirfd", Path(tmp) / f"{name}_sh"]:
            path.unlink(missing_ok=True)


def test_network_is_unreachable(mode):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        code = (
            "import socket\n"
            "try:\n"
            f"    socket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'hi')\n"
            "    print('CONNECTED')\n"
            "except OSError as e:\n"
            "    print('blocked', e)\n"
        )
        result = run_sandboxed(code, isolation=mode)
        assert result.returncode == 0 and result.stdout.startswith("blocked"), (result.stdout, result.stderr)
        server.settimeout(0.2)
        with pytest.raises(TimeoutError):
            server.accept()


def test_output_flood_is_truncated(mode):
    result = run_sandboxed("while True:\n    print('x' * 1000)", max_output_bytes=4096, isolation=mode)
    assert result.killed_reason == "output_limit" and not result.timed_out
    assert len(result.stdout.encode()) == 4096
    result = run_sandboxed("import sys\nsys.stderr.write('e' * 100000)\nprint('done')", max_output_bytes=4096)
    assert (result.returncode, result.stdout, len(result.stderr)) == (0, "done\n", 4096)


def test_cpu_and_file_size_limits():
    result = run_sandboxed("while True:\n    pass", timeout_s=20.0, cpu_s=1)
    assert result.killed_reason == "cpu_limit" and not result.timed_out
    code = (
        "try:\n    open('big.bin', 'wb').write(b'x' * 3_000_000)\nexcept OSError as e:\n    print('limited', e.errno)\n"
    )
    assert run_sandboxed(code, max_file_bytes=1_000_000).stdout == "limited 27\n"  # EFBIG


def test_working_directory_is_private_and_removed(mode):
    code = (
        "import os, tempfile\n"
        "os.makedirs('a/b')\n"
        "open('a/b/scratch.txt', 'w').write('x' * 1000)\n"
        "os.rename('a/b/scratch.txt', 'a/moved.txt')\n"
        "os.chmod('a/moved.txt', 0o600)\n"
        "os.remove('a/moved.txt')\n"
        "os.rmdir('a/b')\n"
        "with tempfile.NamedTemporaryFile('w') as f:\n"
        "    f.write('tmp')\n"
        "print(os.getcwd())\n"
        "print(os.environ['HOME'])\n"
    )
    result = run_sandboxed(code, isolation=mode)
    assert result.returncode == 0, result.stderr
    workdir, home = result.stdout.split()
    assert workdir == home and os.path.basename(workdir).startswith("fedrl-sandbox-")
    assert not os.path.exists(workdir)
