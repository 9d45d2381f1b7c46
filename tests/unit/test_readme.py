"""The README's first two commands are what a new user types on a fresh machine: they
must run as written there (a minimal Debian 12 as root has no sudo)."""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def first_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```sh\n(.*?)```", text, re.S)
    assert block, "the README starts with a sh block"
    lines = [line.strip() for line in block.group(1).splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def test_the_readme_starts_with_the_demo_and_the_tests() -> None:
    assert first_commands() == ["scripts/demo.sh", "scripts/test.sh"]


def test_each_first_command_is_a_script_of_the_repository() -> None:
    for command in first_commands():
        program = ROOT / command.split()[0]
        assert program.is_file() and os.access(program, os.X_OK), command
