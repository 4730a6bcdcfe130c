"""The README's Python example runs as written (offline data), so it cannot rot."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.slow
def test_the_readme_example_runs(tmp_path, monkeypatch):
    blocks = _python_blocks()
    assert blocks, "the README shows a Python example"
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, str(README), "exec"), {"__name__": "readme"})
    assert (tmp_path / "lenet.tslim").is_file() and (tmp_path / "slim.safetensors").is_file()


def test_the_readme_names_the_commands_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text()
    commands = re.findall(r"```\n(scripts/setup\.sh && [^\n]+)\n```", README.read_text())
    assert len(commands) == 2 and commands[1] in ci  # the test command CI runs is the README's
