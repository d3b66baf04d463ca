"""What a person sees of the package itself: its version on the command line, its licence on install."""

from __future__ import annotations

import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest

from fedfreeze import __version__
from fedfreeze.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_version_prints_the_installed_package_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"fedfreeze {version('fedfreeze')}"
    assert __version__ == version("fedfreeze")  # one source: pyproject.toml, through the package's metadata


def test_licence_is_an_spdx_expression():
    """A ``{ text = ... }`` table makes setuptools (>= 77) print a deprecation banner on every install."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["project"]["license"] == "Apache-2.0"
    assert any(
        req.startswith("setuptools>=") and int(req.split(">=")[1]) >= 77
        for req in pyproject["build-system"]["requires"]
    )
