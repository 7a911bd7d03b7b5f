"""The architecture is enforced: import-linter's contracts hold, and a broken one is caught.

The contracts live in ``pyproject.toml`` (``[tool.importlinter]``); ``make test`` runs
``lint-imports`` as well, this file checks that the check itself bites.
"""

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
CONTRACTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def _lint(root: Path) -> subprocess.CompletedProcess:
    # PYTHONPATH first, so the package analysed is the copy under ``root``, not the installed one.
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "copy"
    shutil.copytree(ROOT / "bluesky_ptychonn", root / "bluesky_ptychonn", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    return root


@pytest.fixture(scope="module")
def _linter() -> None:
    if not LINT_IMPORTS.exists():
        pytest.fail(f"{LINT_IMPORTS} is missing: install the dev extra (import-linter)")


def test_the_contracts_hold(_linter, tmp_path):
    result = _lint(_copy(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        # The core reaching up to the live path breaks the layers.
        ("core/geometry.py", "from ..live import sink  # noqa", "Layers"),
        # The simulator importing the Tiled client breaks the stack-free contract.
        ("sim/physics.py", "import tiled.client  # noqa", "never import the Bluesky/Tiled stack"),
        # Replay loading the simulated devices (and so ophyd) breaks the archive contract.
        ("archive/replay.py", "from ..acquisition import devices  # noqa", "never load ophyd"),
    ],
)
def test_a_broken_contract_is_caught(_linter, tmp_path, module, line, contract):
    root = _copy(tmp_path)
    path = root / "bluesky_ptychonn" / module
    text = path.read_text()
    # After the __future__ import, so the file stays valid Python.
    marker = "from __future__ import annotations\n"
    path.write_text(text.replace(marker, marker + line + "\n", 1))
    result = _lint(root)
    assert result.returncode != 0, result.stdout
    # lint-imports wraps long contract names; compare with whitespace collapsed.
    text = " ".join(result.stdout.split())
    (name,) = [c["name"] for c in CONTRACTS if contract in c["name"]]
    assert f"{name} BROKEN" in text, text
