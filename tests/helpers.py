"""Helpers shared by test modules (fixtures live in conftest.py)."""
import shutil

import pytest

# fp32 parity with the PyTorch reference: max-abs difference (the project's bar unless a test says why not)
TOL = 1e-5

# the one place that says how to get the system tools (scripts/system_packages.sh knows the package names)
INSTALL_HINT = "run `bash scripts/system_packages.sh` (it installs them, or prints the command to run)"


def require_tools(*names: str) -> None:
    """Fail, never skip, when a test's file generator is missing: a missing tool must not pass a test vacuously."""
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        pytest.fail(f"this test needs {', '.join(missing)} to write its audio files; {INSTALL_HINT}", pytrace=False)
