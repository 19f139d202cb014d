"""A test whose input is absent (a package, a server, a file) skips locally, saying what is
missing and how to get it, and FAILS under CI (`CI` set to anything): CI never passes without
having tested it (conftest.absent). Run here as a child pytest with the package hidden."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from serving import TIMEOUT_S

TESTS = Path(__file__).resolve().parent

# A child pytest that cannot import argv[1] (None in sys.modules makes the import fail).
HIDDEN = "import sys, pytest; sys.modules[sys.argv[1]] = None; sys.exit(pytest.main(sys.argv[2:]))"


def _pytest_without(
    package: str, test: str, ci: str, cwd: Path
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    return subprocess.run(
        # -n 0: in this process, where the package is hidden (pyproject asks for workers)
        [
            sys.executable,
            "-c",
            HIDDEN,
            package,
            "-q",
            "-n",
            "0",
            "-p",
            "no:cacheprovider",
            "-rs",
            test,
        ],
        env={**env, "CI": ci},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


@pytest.mark.parametrize(
    ("package", "test", "skipped", "failed", "says"),
    [
        # The whole module: skipped, pytest exits 5 (no test collected); failed, 2 (a
        # collection error).
        ("distributed", "test_dask.py", 5, 2, "pip install -e '.[test]' (or 'harmont-exec[dask]')"),
        # One test: skipped, 0; failed, 1.
        (
            "harmont",
            "test_load.py::test_load_harmont_dsl_output",
            0,
            1,
            "pip install -e '.[test]' (or 'harmont==0.0.9')",
        ),
    ],
    ids=["dask", "harmont-dsl"],
)
def test_absent_package_skips_locally_and_fails_under_ci(
    package: str, test: str, skipped: int, failed: int, says: str, tmp_path: Path
) -> None:
    path = str(TESTS / test)
    locally = _pytest_without(package, path, "", tmp_path)
    under_ci = _pytest_without(package, path, "1", tmp_path)  # any value, not only "true"
    assert locally.returncode == skipped, locally.stdout + locally.stderr
    assert "1 skipped" in locally.stdout and "passed" not in locally.stdout, locally.stdout
    assert under_ci.returncode == failed, under_ci.stdout + under_ci.stderr
    assert "under CI nothing is skipped" in under_ci.stdout, under_ci.stdout
    for result in (locally, under_ci):  # both say what is missing and how to get it
        assert says in result.stdout, result.stdout
