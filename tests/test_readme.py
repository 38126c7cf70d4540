"""The README's quickstart runs as written and prints what its comments say."""

from __future__ import annotations

import contextlib
import io
import os
import re

import pytest
import torch

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def block(heading: str) -> str:
    """The first Python block after ``heading`` in the README."""
    text = open(README).read()
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"\d+\.\d+(?:e[-+]\d+)?", text)]


@pytest.mark.parametrize("heading", ["## Quickstart", "### Your own loop"])
def test_readme_block_runs_and_prints_its_comments(heading):
    code = block(heading)
    expected = "\n".join(line[2:] for line in code.splitlines() if line.startswith("# "))
    out = io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, f"README {heading}", "exec"), {})
    finally:
        torch.set_num_threads(threads)
    printed = out.getvalue().strip()
    assert re.sub(r"[\d.e+-]+", "N", printed) == re.sub(r"[\d.e+-]+", "N", expected)
    # the same figures, up to float noise between machines
    assert numbers(printed) == pytest.approx(numbers(expected), rel=0.05)


def test_readme_quotes_no_placeholder():
    text = open(README).read()
    assert "BENCHMARK_TABLES" not in text and "SUGGESTION_AUTO_RULE" not in text
