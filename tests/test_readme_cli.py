"""The README says exactly what the CLI does: every command it shows exists, every option it gives that
command exists, and every command's --help runs."""
import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from termret.cli import COMMANDS, cli

README = Path(__file__).resolve().parents[1] / "README.md"


def command_lines(text: str) -> list[tuple[int, str]]:
    """Lines of the README's code (code blocks, inline code), backslash continuations joined."""
    out, block, buf, start = [], False, "", 0
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip().startswith("```"):
            block = not block
            continue
        pieces = [line] if block else re.findall(r"`([^`]+)`", line)
        for p in pieces:
            if not buf:
                start = n
            if p.rstrip().endswith("\\"):
                buf += p.rstrip()[:-1] + " "
                continue
            out.append((start, buf + p))
            buf = ""
    return out


def invocations(text: str) -> list[tuple[int, str, list[str]]]:
    """(README line, command name, options given) of every command the README shows."""
    found = []
    for n, line in command_lines(text):
        for m in re.finditer(r"(?:python -m stage1_extract|python -m stage3_index|(?<![\w-])termret"
                             r"|-m stage2_train|-m stage1_extract|python -m demo)\b([^|;&#]*)", line):
            head = m.group(0)[:len(m.group(0)) - len(m.group(1))].strip()
            words = m.group(1).split()
            if "stage2_train" in head:
                name = "train"
            elif head == "python -m demo" and words and not words[0].startswith("-"):
                name = "demo-" + words[0]
            elif words and not words[0].startswith("-"):
                name = words[0]
            else:
                continue          # the bare group (`python -m stage1_extract --help`)
            if head == "termret" and name not in COMMANDS and not words[0].startswith("-"):
                if name in ("...", "COMMAND") or not re.fullmatch(r"[a-z][a-z-]*", name):
                    continue
            opts = [w.split("=")[0] for w in words if re.fullmatch(r"--[a-z][a-z0-9-]*(=.*)?", w)]
            found.append((n, name, opts))
    return found


def option_names(cmd: click.Command) -> set[str]:
    names = {"--help", "-h"}
    for p in cmd.params:
        names.update(getattr(p, "opts", []))
        names.update(getattr(p, "secondary_opts", []))
    return names


def test_the_readme_names_only_commands_and_options_that_exist():
    calls = invocations(README.read_text(encoding="utf-8"))
    assert len(calls) >= 15                    # the parser does see the README's commands
    problems = []
    for line, name, opts in calls:
        if name not in COMMANDS:
            problems.append(f"README line {line}: no command {name!r}")
            continue
        cmd = cli.get_command(None, name)
        missing = [o for o in opts if o not in option_names(cmd)]
        if missing:
            problems.append(f"README line {line}: {name} has no option {', '.join(missing)}")
    assert problems == []


def test_the_checker_catches_a_wrong_option_and_a_wrong_command():
    text = "```\npython -m stage1_extract prepare --segments a \\\n    --no-such-flag b\ntermret evaluate --run x\n```"
    assert invocations(text) == [(2, "prepare", ["--segments", "--no-such-flag"]), (4, "evaluate", ["--run"])]


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_has_help(name):
    res = CliRunner().invoke(cli, [name, "--help"])
    assert res.exit_code == 0, res.output
    assert "Usage:" in res.output and "--help" in res.output


def test_every_stage_command_is_under_termret():
    from stage1_extract.cli import _register as reg1, cli as cli1
    from stage3_index.cli import _register as reg3, cli as cli3
    reg1()
    reg3()
    assert set(cli1.commands) | set(cli3.commands) | {"train", "demo-corpus", "demo-heldout", "bench"} == set(COMMANDS)


def test_the_installed_command_works_from_another_directory(tmp_path):
    import subprocess
    import sys
    exe = Path(sys.executable).parent / "termret"
    assert exe.is_file(), "the termret console script is missing: make setup installs the project (pip install -e .)"
    res = subprocess.run([str(exe), "verify", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "Usage: termret verify" in res.stdout, res.stderr
    res = subprocess.run([sys.executable, "-m", "termret", "query", "--run", str(tmp_path / "none"), "--audio", "x"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "run folder does not exist" in res.stderr
