"""Every page in docs/ runs as written: its Python examples and its `torchslim` commands (offline data), so the
documentation cannot rot; and every page is linked from the README and every relative link resolves."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

from torchslim.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
EXAMPLES = ["pruning.md", "structured-pruning.md", "quantization.md", "distillation.md", "recipes.md", "network-compression.md", "acceleration.md", "cli.md"]


def test_every_page_is_linked_and_every_link_resolves():
    pages = sorted(p.name for p in DOCS.glob("*.md") if p.name != "README.md")
    index = (DOCS / "README.md").read_text()
    assert all(f"]({name})" in index for name in pages), "docs/README.md links every page"
    assert "docs/README.md" in (ROOT / "README.md").read_text()
    for page in [*DOCS.glob("*.md"), ROOT / "README.md"]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if not target.startswith(("http://", "https://")):
                assert (page.parent / target).exists(), f"{page.name}: broken link {target}"


@pytest.mark.slow
@pytest.mark.parametrize("page", EXAMPLES)
def test_the_page_runs_as_written(page, tmp_path, monkeypatch, capsys):
    text = (DOCS / page).read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    commands = [line for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S) for line in block.splitlines() if line.startswith("torchslim ")]
    assert blocks or commands, f"{page} shows an example"
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    try:
        for block in blocks:
            exec(compile(block, str(DOCS / page), "exec"), {"__name__": "docs"})
        for command in commands:
            assert main(shlex.split(command)[1:]) == 0, f"{page}: {command}\n{capsys.readouterr().err}"
    finally:
        torch.set_num_threads(threads)
