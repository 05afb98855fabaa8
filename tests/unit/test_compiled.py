"""The compiled per-request path's bookkeeping: which modules an edit made stale (pacslb/compiled.py)."""

from __future__ import annotations

import importlib.machinery
import os
from pathlib import Path

import pytest

from pacslb import compiled


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A source tree with the compiled modules' sources, as ``compiled`` sees it."""
    for module in compiled.HOT_MODULES:
        source = tmp_path.joinpath(*module.split(".")).with_suffix(".py")
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_text("")
        os.utime(source, (1000, 1000))
    monkeypatch.setattr(compiled, "ROOT", tmp_path)
    return tmp_path


def _library(tree: Path) -> Path:
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    return tree.joinpath(*compiled.GROUP.split(".")).with_name(compiled.GROUP.rsplit(".", 1)[1] + "__mypyc" + suffix)


def test_nothing_built_is_nothing_stale(tree: Path) -> None:
    assert compiled.built() == [] and compiled.stale() == []
    assert compiled.main(["check"]) == 0


def test_a_source_edited_after_the_build_is_stale_until_the_next_build(tree: Path) -> None:
    library = _library(tree)
    library.write_bytes(b"")
    os.utime(library, (2000, 2000))
    assert compiled.built() == [library] and compiled.stale() == []
    edited = tree / "pacslb" / "proxy" / "http.py"
    os.utime(edited, (3000, 3000))
    assert compiled.stale() == ["pacslb.proxy.http"]
    assert compiled.main(["check"]) == 1
    compiled.clean()
    assert not library.exists() and compiled.stale() == []


def test_building_outside_a_source_checkout_is_refused(tree: Path) -> None:
    assert compiled.build() == 1  # no pyproject.toml in the tree
