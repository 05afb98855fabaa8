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
    (tree / "pyproject.toml").write_text("")  # a source checkout
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


def _build_everything(tree: Path) -> None:
    """Extension files for the group and every module, as a build leaves them."""
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    for module in (*compiled.HOT_MODULES, compiled.GROUP + "__mypyc"):
        base = tree.joinpath(*module.split("."))
        path = base.with_name(base.name + suffix)
        path.write_bytes(b"")
        os.utime(path, (2000, 2000))


def test_status_in_a_checkout_says_how_to_compile(tree: Path) -> None:
    (tree / "pyproject.toml").write_text("")
    assert compiled.status() == "pure Python (not compiled in this checkout: make compile)"
    _build_everything(tree)
    assert compiled.status() == "compiled with mypyc"
    os.utime(tree / "pacslb" / "balance" / "server.py", (3000, 3000))
    assert "older than the sources of pacslb.balance.server" in compiled.status()


def test_status_of_an_installed_package_gives_the_build_s_reason(tree: Path) -> None:
    assert compiled.status() == "pure Python (installed without it)"
    (tree / "pacslb" / compiled.BUILD_NOTE).write_text("no C compiler (cc not found) when it was built\n")
    assert compiled.status() == "pure Python (no C compiler (cc not found) when it was built)"
    _build_everything(tree)  # a wheel that compiled: the files decide, whatever a note says
    os.utime(tree / "pacslb" / "balance" / "server.py", (3000, 3000))  # pip's unpacking order, not an edit
    assert compiled.status() == "compiled with mypyc"


def test_no_compiling_without_a_compiler_or_when_told_not_to(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PACSLB_COMPILE", raising=False)
    monkeypatch.setenv("CC", "/nonexistent/cc -pthread")
    assert compiled.why_not() == "no C compiler (/nonexistent/cc -pthread not found) when it was built"
    monkeypatch.setenv("PACSLB_COMPILE", "0")
    assert compiled.why_not() == "PACSLB_COMPILE=0 when it was built"
    monkeypatch.setenv("PACSLB_COMPILE", "1")
    monkeypatch.setenv("CC", "sh")  # any program found on PATH counts as the compiler: a failed build falls back
    assert compiled.why_not() is None
