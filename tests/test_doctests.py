"""The examples in lrfind's docstrings run and show what they say."""

import doctest
import importlib
from pathlib import Path

import pytest

import lrfind

SOURCES = sorted(Path(lrfind.__file__).parent.glob("*.py"))
WITH_EXAMPLES = [p.stem for p in SOURCES if ">>>" in p.read_text()]


def test_the_modules_with_examples_are_found():
    assert {"data", "metrics", "schedules", "suggest"} <= set(WITH_EXAMPLES)


@pytest.mark.parametrize("name", WITH_EXAMPLES)
def test_docstring_examples_pass(name):
    module = importlib.import_module(f"lrfind.{name}")
    result = doctest.testmod(module, report=False)
    assert result.failed == 0
    # every example ran: one per ">>>" line of the module
    assert result.attempted == Path(module.__file__).read_text().count(">>>")
