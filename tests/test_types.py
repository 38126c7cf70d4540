"""The package type-checks with mypy under pyproject.toml's settings (it ships py.typed)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_mypy_passes_on_the_package():
    # mypy is a dev dependency like pytest: when it is missing this fails instead of skipping
    proc = subprocess.run([sys.executable, "-m", "mypy", "lrfind"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, f"mypy lrfind failed:\n{proc.stdout}{proc.stderr}"
