"""The package claims Python >= 3.10 (JetPack 6 ships 3.10); only 3.11 runs here, so a static check holds the
claim: vermin finds every language feature, module and member newer than 3.10."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "edge_alast"


def test_the_package_uses_nothing_newer_than_python_3_10():
    vermin = shutil.which("vermin", path=str(Path(sys.executable).parent)) or shutil.which("vermin")
    if vermin is None:
        pytest.fail("vermin is not installed (it is in the test extra: pip install -e '.[test]')")
    proc = subprocess.run([vermin, "--target=3.10-", "--no-tips", "--violations", "--eval-annotations",
                           str(PACKAGE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
