"""Packaging metadata: what `pip install` reads."""
from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_license_is_an_spdx_string_setuptools_accepts_without_deprecation():
    """Issue 12, item 15: `license = {text = "MIT"}` makes setuptools warn at every install."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert data["project"]["license"] == "MIT"
    assert "setuptools>=77" in data["build-system"]["requires"]  # the first setuptools that reads SPDX strings


def test_version_is_one_number():
    import evefx

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert data["project"]["version"] == evefx.__version__
