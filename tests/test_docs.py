"""The commands in the README and in docs/ run as written: the serving examples (curl, gossipfl pull and
query, tritonclient) against a real node, and every other ``gossipfl`` command, script and benchmark
they show is checked against the real parser, file and options."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "docker" / "README.md"]
README_PORT = "8470"


def checked_blocks(kind: str) -> list[str]:
    """Fenced blocks, in the README and docs/, that follow a ``<!-- doc-check: KIND -->`` marker."""
    text = "\n".join(p.read_text() for p in PAGES)
    return re.findall(rf"<!-- doc-check: {kind} -->\n```\w*\n(.*?)```", text, flags=re.S)


@pytest.fixture(scope="module")
def node_port(tmp_path_factory):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("readme") / "node.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gossipfl", "node", "--host", "127.0.0.1", "--port", str(port),
             "--discovery", "static", "--cluster", f"test-{uuid.uuid4().hex[:8]}",
             "--steps-per-round", "300", "--train-interval", "3600"],  # one round, then fixed: answers comparable
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/status", timeout=2) as r:
                    if json.load(r)["age"] == 300:
                        break
            except OSError:
                pass
            time.sleep(0.2)
        else:
            pytest.fail(log.read_text())
        yield str(port)
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def run(cmd: list[str], script: str, port: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        cmd, input=script.replace(README_PORT, port), cwd=cwd, env=env, capture_output=True, text=True, timeout=90
    )


def test_serving_shell_examples_run(node_port, tmp_path):
    (block,) = checked_blocks("shell")
    r = run(["bash", "-euo", "pipefail"], block, node_port, tmp_path)
    assert r.returncode == 0, r.stderr
    assert '{"ready": true}' in r.stdout and '"model_name":"digits"' in r.stdout
    assert "gossipfl_test_accuracy_ratio" in r.stdout and "saved model.safetensors" in r.stdout
    assert r.stdout.rstrip().splitlines()[-6].split() == ["row", "label", "probability"]
    assert (tmp_path / "model.safetensors").stat().st_size > 10_000


def test_serving_python_example_runs(node_port, tmp_path):
    (shell,) = checked_blocks("shell")
    assert run(["bash", "-euo", "pipefail"], shell, node_port, tmp_path).returncode == 0  # saves model.safetensors
    (block,) = checked_blocks("python")
    r = run([sys.executable, "-"], block, node_port, tmp_path)
    assert r.returncode == 0, r.stderr
    served, local = r.stdout.splitlines()[0], r.stdout.splitlines()[1]
    assert served.split("]")[0] + "]" == local  # the node and the downloaded weights agree on the labels


def test_the_security_walkthrough_runs(tmp_path):
    """docs/security.md's session: a node with a cluster key and a read token, read with and without it."""
    import socket

    (block,) = checked_blocks("secure")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    r = run(["bash", "-euo", "pipefail"], block.replace("--discovery static", "--discovery static --cluster "
            f"test-{uuid.uuid4().hex[:8]}"), port, tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr + (tmp_path / "node.log").read_text()
    lines = r.stdout.splitlines()
    assert lines[:3] == ["401", "200", "cluster-key"], r.stdout
    assert lines[3].startswith("saved model.safetensors") and lines[4].startswith("no peers known to")
    assert "my-read-token" not in (tmp_path / "node.log").read_text()


FENCE = re.compile(r"```(?:bash|sh|shell)\n(.*?)```", re.S)
SPAN = re.compile(r"`((?:\./)?(?:gossipfl(?= |`)|scripts/|python benchmarks/|\.venv/bin/python benchmarks/)[^`]*)`")
PATH = re.compile(r"`((?:gossipfl|scripts|benchmarks|docs|examples|docker|tests)/[A-Za-z0-9_./-]*)`")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def doc_commands() -> list[tuple[str, str]]:
    """(page, command) for every command line in a shell block, and every inline code span that is a
    complete command (``gossipfl ...``, ``scripts/...``, ``python benchmarks/...``); spans written as
    a synopsis (with ``[...]`` or ``...``) are skipped."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for block in FENCE.findall(text):
            pending = ""
            for line in block.replace("\\\n", " ").splitlines():
                pending = f"{pending}\n{line}" if pending else line
                try:  # a quoted string may go on over several lines
                    shlex.split(pending, comments=True)
                except ValueError:
                    continue
                line, pending = pending.split(" #")[0].strip().removesuffix("&").strip(), ""
                if line and not line.startswith("#"):
                    found.append((page.name, line))
        for span in SPAN.findall(text.replace("\n", " ")):
            if "[" not in span and "..." not in span and len(span.split()) > 2:  # not a synopsis or a name
                found.append((page.name, span.strip().removesuffix("&").strip()))
    return found


def check_command(line: str) -> str | None:
    """Why ``line`` would not run as documented, or None. ``gossipfl`` commands go through the real
    parser (node options through the real configuration check); scripts must exist and be executable;
    benchmarks must exist and define every option they are shown with."""
    from gossipfl.args import config_from_namespace
    from gossipfl.cli import build_parser
    from gossipfl.config import ConfigError

    words = shlex.split(line)
    for i, w in enumerate(words):  # the command ends where a redirection or another command starts
        if w in ("|", "||", "&&", ";", "&") or re.match(r"^\d?>|^<", w):
            words = words[:i]
            break
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value prefixes
        words.pop(0)
    if not words:
        return None
    if words[0] in ("python", ".venv/bin/python", "python3") and len(words) > 1 and words[1].startswith("benchmarks/"):
        script = ROOT / words[1]
        if not script.is_file():
            return f"no such benchmark {words[1]}"
        source = script.read_text()
        missing = [w.split("=")[0] for w in words[2:] if w.startswith("--") and f'"{w.split("=")[0]}"' not in source]
        return f"{words[1]} has no option {', '.join(missing)}" if missing else None
    if words[0].removeprefix("./").startswith("scripts/"):
        script = ROOT / words[0].removeprefix("./")
        return None if script.is_file() and os.access(script, os.X_OK) else f"no executable {words[0]}"
    if words[0] != "gossipfl":
        return None
    if "--" in words:  # the testbed's node options are checked as a node's
        cut = words.index("--")
        words, node = words[:cut], words[cut + 1 :]
        if problem := check_command(shlex.join(["gossipfl", "node", *node])):
            return problem
    try:
        args = build_parser().parse_args(words[1:])
    except SystemExit:
        return "gossipfl refuses these arguments"
    if args.command == "node":
        try:
            config_from_namespace(args, env={})
        except ConfigError as e:
            return str(e)
    return None


def test_the_docs_show_commands_at_all():
    commands = [c for _, c in doc_commands()]
    assert "./scripts/demo.sh" in " ".join(commands)
    assert sum(c.startswith("gossipfl ") for c in commands) >= 10
    assert any(c.startswith("python benchmarks/") for c in commands)


def test_every_command_in_the_readme_and_docs_is_valid():
    problems = [f"{page}: {line}: {why}" for page, line in doc_commands() if (why := check_command(line))]
    assert problems == []


@pytest.mark.parametrize(
    "line",
    [
        "gossipfl node --no-such-flag",
        "gossipfl node --partition 3/2",
        "gossipfl testbed --nodes 4 -- --lr nope",
        "scripts/no_such_script.sh",
        "python benchmarks/convergence.py --no-such-option 3",
        "python benchmarks/no_such_benchmark.py",
    ],
)
def test_the_command_check_catches_a_wrong_command(line):
    assert check_command(line) is not None


def test_every_file_and_link_the_docs_name_exists():
    """Module paths in code spans and relative links (after a file moves, the docs must follow)."""
    missing = []
    for page in PAGES:
        text = page.read_text()
        for path in PATH.findall(text):
            if not (ROOT / path.rstrip(".")).exists():
                missing.append(f"{page.name}: `{path}`")
        for target in LINK.findall(text):
            if "://" not in target and not (page.parent / target).exists():
                missing.append(f"{page.name}: link {target}")
    assert missing == []
