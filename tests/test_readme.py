"""The README's quickstart runs as written and prints what its comments say."""

from __future__ import annotations

import contextlib
import io
import os
import re

import pytest
import torch

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def quickstart() -> str:
    text = open(README).read()
    section = text[text.index("## Quickstart"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"\d+\.\d+(?:e[-+]\d+)?", text)]


def test_quickstart_runs_and_prints_its_comments():
    code = quickstart()
    expected = "\n".join(line[2:] for line in code.splitlines() if line.startswith("# "))
    out = io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, "README quickstart", "exec"), {})
    finally:
        torch.set_num_threads(threads)
    printed = out.getvalue().strip()
    assert re.sub(r"[\d.e+-]+", "N", printed) == re.sub(r"[\d.e+-]+", "N", expected)
    # the same figures, up to float noise between machines
    assert numbers(printed) == pytest.approx(numbers(expected), rel=0.05)


def test_readme_quotes_no_placeholder():
    text = open(README).read()
    assert "BENCHMARK_TABLES" not in text and "SUGGESTION_AUTO_RULE" not in text
