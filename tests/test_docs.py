"""The docs cannot drift from the code.

- Every shell block in README.md and docs/*.md whose fence says ```` ```bash cpu ```` is run
  (in a fresh temporary directory, with this environment's `kdcache` on PATH) and must exit
  0; ```` ```bash cpu slow ```` blocks run only with the slow tests. Blocks that need a GPU,
  s3 or hours stay unmarked.
- Every `kdcache COMMAND --flag` written in a code block or code span names a real command
  and real options of it.
- Links and paths in the docs stay inside the repository.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer

import kdcache.cli as cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(.*)$")


def blocks() -> list[tuple[str, int, str, str]]:
    """(file, first line, info string, text) of every fenced block."""
    out = []
    for path in DOCS:
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            m = FENCE.match(lines[i])
            if m:
                j = next(k for k in range(i + 1, len(lines)) if lines[k].startswith("```"))
                out.append((path.relative_to(ROOT).as_posix(), i + 1, m.group(1).strip(),
                            "\n".join(lines[i + 1 : j])))
                i = j
            i += 1
    return out


def _runnable() -> list:
    params = []
    for file, line, info, text in blocks():
        words = info.split()
        if words[:2] != ["bash", "cpu"]:
            continue
        marks = [pytest.mark.slow] if "slow" in words else []
        params.append(pytest.param(text, "slow" in words, id=f"{file}:{line}", marks=marks))
    return params


def test_some_blocks_are_marked_runnable():
    fast = [p for p in _runnable() if not p.marks]
    assert fast, "no ```bash cpu block in README.md or docs/: mark the cheap ones"


@pytest.mark.parametrize("text, slow", _runnable())
def test_runnable_block(text, slow, tmp_path):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               COLUMNS="100")
    res = subprocess.run(["bash", "-euo", "pipefail", "-c", text], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=1500 if slow else 180)
    assert res.returncode == 0, f"$ {text}\n--- stdout\n{res.stdout[-3000:]}\n--- stderr\n{res.stderr[-3000:]}"


# ---------------------------------------------------------------- commands and flags in the docs
def _code() -> list[tuple[str, str]]:
    """(where, text) of every code block and inline code span, continuation lines joined."""
    out = [(f"{f}:{line}", text.replace("\\\n", " ")) for f, line, _, text in blocks()]
    for path in DOCS:
        prose = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
        out += [(path.name, m) for m in re.findall(r"`([^`\n]+)`", prose)]
    return out


def _invocations() -> list[tuple[str, list[str]]]:
    calls = []
    for where, text in _code():
        for m in re.finditer(r"(?:^|[\s($'\"=])kdcache\s+([^\n|;&)'\"#]*)", text):
            try:
                words = shlex.split(m.group(1), comments=True)
            except ValueError:
                words = m.group(1).split()
            if words:
                calls.append((where, words))
    return calls


def _options(cmd) -> set[str]:
    return {o for p in cmd.params for o in (*p.opts, *getattr(p, "secondary_opts", ()))} | {"--help"}


def test_documented_commands_and_flags_exist():
    group = typer.main.get_command(cli.app)
    wrong = []
    for where, words in _invocations():
        opts = _options(group)
        while words and words[0].startswith("-"):  # global options: kdcache -v train ...
            if words[0] not in opts:
                wrong.append(f"{where}: kdcache {words[0]}")
            words = words[1:]
        if not words:
            continue
        name, rest = words[0], words[1:]
        if not name[0].islower():  # a placeholder: kdcache COMMAND --help
            continue
        if name in cli.CONFIG_COMMANDS:
            cmd = cli.build_config_command(name)
        elif name in group.commands:
            cmd = group.commands[name]
            if hasattr(cmd, "commands") and rest and not rest[0].startswith("-"):
                if rest[0] not in cmd.commands:
                    wrong.append(f"{where}: kdcache {name} {rest[0]} (no such command)")
                    continue
                cmd, rest = cmd.commands[rest[0]], rest[1:]
        else:
            wrong.append(f"{where}: kdcache {name} (no such command)")
            continue
        known = _options(cmd)
        wrong += [f"{where}: kdcache {name} {w}" for w in rest
                  if re.fullmatch(r"--?[a-z][\w-]*(=.*)?", w) and w.split("=")[0] not in known]
    assert not wrong, "documented flags that do not exist:\n" + "\n".join(wrong)


def test_invocations_are_found():
    calls = [" ".join(w) for _, w in _invocations()]
    assert any(c.startswith("precompute --teacher") for c in calls), calls


# ---------------------------------------------------------------- nothing outside the repository
def test_docs_refer_to_nothing_outside_the_repository():
    bad = []
    for path in DOCS:
        text = path.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://|mailto:|#", target):
                continue
            dest = (path.parent / target.split("#")[0]).resolve()
            if not dest.is_relative_to(ROOT) or not dest.exists():
                bad.append(f"{path.name}: link {target}")
        for ref in re.findall(r"(?<![\w/.])\.\./[\w./-]+", text):
            dest = (path.parent / ref).resolve()
            if not dest.is_relative_to(ROOT) or not dest.exists():
                bad.append(f"{path.name}: {ref}")
        bad += [f"{path.name}: {p}" for p in re.findall(r"/work/[\w./-]+", text)]
    assert not bad, "docs refer outside the repository:\n" + "\n".join(bad)
