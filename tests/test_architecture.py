"""The layout is checked, not only drawn: the import-linter contracts in pyproject.toml (layers from cli/ down to
errors.py, the model free of loading / text / serving / training, argparse only in cli/, no import cycles) hold,
and a change that breaks one of them fails here."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def lint(root: Path) -> subprocess.CompletedProcess:
    """import-linter over the package under `root`/src, with `root`/pyproject.toml's contracts."""
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True, no_logo=True))"
    return subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120)


def test_the_import_contracts_hold():
    done = lint(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "6 kept, 0 broken" in done.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        # The model reaching for the loader: a layer pointing upwards.
        ("model/qwen3_5.py", "from qwenlite.io import load", "layers, from cli/ down to errors.py"),
        # The reference forward taking the fast path itself (the cycle this layout removed).
        (
            "model/qwen3_5.py",
            "from qwenlite.model import runner",
            "the reference forward never imports the fast path chosen by its callers",
        ),
        # The scheduler computing with tensors (its annotations' TYPE_CHECKING imports are allowed).
        ("serve/scheduler.py", "import torch", "the serving scheduler decides without torch"),
        # argparse in a library module.
        ("io/quantized.py", "import argparse", "argparse only in cli/"),
        # Two io modules importing each other.
        ("io/checkpoint.py", "from qwenlite.io import quantized", "no import cycles among the modules of any package"),
    ],
)
def test_a_broken_layout_fails(tmp_path, module, line, contract):
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copytree(ROOT / "src" / "qwenlite", tmp_path / "src" / "qwenlite",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    path = tmp_path / "src" / "qwenlite" / module
    source = path.read_text()
    at = source.index("\nfrom qwenlite")  # among the module's own imports
    path.write_text(source[:at] + "\n" + line + source[at:])
    done = lint(tmp_path)
    assert done.returncode != 0
    assert f"{contract} BROKEN" in " ".join(done.stdout.split()), done.stdout
