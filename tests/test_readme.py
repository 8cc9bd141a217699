"""The README's examples, run as written (issue 11: the README cannot drift from the code).

Every fenced ``python`` and ``sh`` block of README.md is found here and run:

* the library blocks and the CLI block run the embedded model and ``mock`` for real
  (a top-level ``async with`` runs as the asyncio REPL would run it);
* the gateway block and the Python blocks that talk to ``127.0.0.1:8000`` run in a
  network namespace of their own (``unshare -n``, as root): the ports the README names
  (8000, 8001) and ``--host 0.0.0.0`` then touch nothing outside the test, and no other
  test running at the same time;
* the Quick start's ``scripts/setup.sh && .venv/bin/tokenrelay ...`` runs from the repo
  root (setup is idempotent: it only checks what is installed);
* ``scripts/test.sh`` is the one command not run: it runs this very test. Its syntax is
  checked instead;
* the ``toml`` blocks (gateway config snippets) load into the gateway's config model.

A block the test does not recognise fails the test: a new example must be run here too.
"""

from __future__ import annotations

import ast
import asyncio
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
VENV_BIN = Path(sys.executable).parent
DRIVER = Path(__file__).with_name("_readme_gateway.py")

pytestmark = pytest.mark.local


def blocks(language: str) -> list[str]:
    """The README's fenced blocks of ``language``, in order."""
    text = README.read_text(encoding="utf-8")
    return [m.group(1) for m in re.finditer(rf"^```{language}\n(.*?)^```", text,
                                            re.DOTALL | re.MULTILINE)]


def commands(block: str) -> list[str]:
    """The block's commands, each line without its comment (``#`` outside quotes)."""
    lines = (line[:_comment_at(line)].strip() for line in block.splitlines())
    return [line for line in lines if line]


def _comment_at(line: str) -> int:
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return i
    return len(line)


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    (tmp_path / "notes.txt").write_text("Meeting moved to Tuesday. Bring the slides.\n")
    yield tmp_path


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["TOKENRELAY_HOME"] = str(home)
    env.pop("TOKENRELAY_MODEL", None)
    return env


def _sh(command: str, *, cwd: Path, env: dict[str, str],
        timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", f"set -o pipefail; {command}"], cwd=cwd, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout, check=False)


def _needs_gateway(source: str) -> bool:
    return "127.0.0.1:8000" in source


def _python_blocks(gateway: bool) -> list[str]:
    return [b for b in blocks("python") if _needs_gateway(b) == gateway]


def test_every_block_is_accounted_for() -> None:
    assert {m.group(1) for m in re.finditer(r"^```(\w*)$", README.read_text(), re.MULTILINE)
            if m.group(1)} <= {"python", "sh", "toml"}
    sh = blocks("sh")
    kinds = [_sh_kind(b) for b in sh]
    assert kinds.count("quick start") == 1 and kinds.count("tests") == 1
    assert kinds.count("cli") == 1 and kinds.count("gateway") == 1, kinds
    assert kinds.count("replicas") == 1, kinds
    assert len(_python_blocks(gateway=True)) == 3
    assert len(_python_blocks(gateway=False)) == 2


def test_config_blocks_load_into_the_gateway_config() -> None:
    import tomllib

    from tokenrelay.server.config import ServerConfig

    toml_blocks = blocks("toml")
    assert toml_blocks
    for block in toml_blocks:
        ServerConfig.model_validate(tomllib.loads(block))  # unknown keys are refused


def _sh_kind(block: str) -> str:
    lines = commands(block)
    if lines == ["scripts/test.sh"]:
        return "tests"
    if lines and lines[0].startswith("scripts/setup.sh"):
        return "quick start"
    if any(line.startswith("docker compose") for line in lines):
        return "replicas"
    if any(line.startswith("tokenrelay serve") for line in lines):
        return "gateway"
    if all(re.match(r"^(\S+ .*\| )?tokenrelay\b", line) for line in lines):
        return "cli"
    return "unknown"


def _run_python(source: str, *, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # Top-level ``async with`` / ``await`` run as in ``python -m asyncio``.
    runner = textwrap.dedent("""
        import ast, asyncio, sys
        source = sys.stdin.read()
        code = compile(source, "README.md", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        result = eval(code, {"__name__": "__main__"})
        if asyncio.iscoroutine(result):
            asyncio.run(result)
    """)
    return subprocess.run([sys.executable, "-c", runner], input=source, cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900, check=False)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("index", range(2))
def test_library_blocks(index: int, workdir: Path) -> None:
    pytest.importorskip("llama_cpp")
    source = _python_blocks(gateway=False)[index]
    done = _run_python(source, cwd=workdir, env=_env(workdir / "home"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip()


def test_the_top_level_await_runner_is_the_repl_s() -> None:
    # The runner above compiles as ``python -m asyncio`` does; make sure that flag exists.
    assert ast.PyCF_ALLOW_TOP_LEVEL_AWAIT and asyncio.iscoroutine


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_cli_block(workdir: Path) -> None:
    pytest.importorskip("llama_cpp")
    (block,) = [b for b in blocks("sh") if _sh_kind(b) == "cli"]
    env = _env(workdir / "home")
    for command in commands(block):
        done = _sh(command, cwd=workdir, env=env)
        assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
        if not command.startswith("tokenrelay chat"):
            assert done.stdout.strip() or done.stderr.strip(), command


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quick_start(workdir: Path) -> None:
    pytest.importorskip("llama_cpp")
    (block,) = [b for b in blocks("sh") if _sh_kind(b) == "quick start"]
    (command,) = commands(block)
    # setup.sh uses ./.venv: the interpreter running these tests must be that one.
    if Path(sys.executable).parent != ROOT / ".venv" / "bin":
        pytest.fail(f"run the tests with {ROOT}/.venv/bin/python (scripts/test.sh does)")
    done = _sh(command, cwd=ROOT, env=_env(workdir / "home"), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip()


def test_the_test_command_is_a_script_bash_accepts() -> None:
    (block,) = [b for b in blocks("sh") if _sh_kind(b) == "tests"]
    (command,) = commands(block)
    script = ROOT / command
    assert os.access(script, os.X_OK)
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gateway_block_and_its_clients(workdir: Path) -> None:
    pytest.importorskip("llama_cpp")
    pytest.importorskip("openai")
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.fail("the README's gateway block runs in a network namespace: root and"
                    " util-linux's unshare (scripts/test.sh runs as root)")
    (block,) = [b for b in blocks("sh") if _sh_kind(b) == "gateway"]
    env = _env(workdir / "home")
    env["KEY"] = "readme-test-key"
    args = ["unshare", "--net", sys.executable, str(DRIVER), "--commands",
            *commands(block), "--python", *_python_blocks(gateway=True)]
    done = subprocess.run(args, cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=900, stdin=subprocess.DEVNULL, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "all README gateway examples ran" in done.stdout


def test_replicas_block_commands_are_valid() -> None:
    """The "Running several replicas" block: its ``tokenrelay serve`` lines parse with the
    CLI's own options (they run for real in test_gateway_workers / test_replicas) and the
    compose file it names has Redis, three replicas and nginx."""
    import shlex

    import click
    import yaml

    from tokenrelay.cli import cli as main

    (block,) = [b for b in blocks("sh") if _sh_kind(b) == "replicas"]
    lines = commands(block)
    serves = [line for line in lines if line.startswith("tokenrelay serve")]
    assert serves
    for line in serves:
        args = shlex.split(line)[1:]
        with click.Context(main) as ctx:
            command = main.get_command(ctx, args[0])
            assert command is not None
            command.make_context(args[0], args[1:])  # raises on an unknown option
    (compose,) = [line for line in lines if line.startswith("docker compose")]
    path = README.parent / shlex.split(compose)[shlex.split(compose).index("-f") + 1]
    services = yaml.safe_load(path.read_text())["services"]
    assert "redis" in services and "nginx" in services
    assert sum(1 for name in services if name.startswith("replica")) >= 3 or \
        any(s.get("deploy", {}).get("replicas") == 3 for s in services.values()), services
