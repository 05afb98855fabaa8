"""The compiled per-request path's bookkeeping: which modules an edit made stale (pacslb/compiled.py)."""

from __future__ import annotations

import importlib.machinery
import os
import subprocess
import sys
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
    # As a pacslb started without PACSLB_COMPILE=0 sees it (this lane may run with it).
    monkeypatch.setattr(sys, "meta_path", [f for f in sys.meta_path if not isinstance(f, compiled._Sources)])
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


def test_clean_removes_an_extension_left_by_a_build_of_an_earlier_list(tree: Path) -> None:
    """A module compiled once and then dropped from HOT_MODULES: its extension file would still be imported
    in its source's place (and fail, the group library having no part of it)."""
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    left = tree / "pacslb" / "proxy" / ("tcp" + suffix)
    left.parent.mkdir(parents=True, exist_ok=True)
    left.write_bytes(b"")
    library = _library(tree)
    library.write_bytes(b"")
    compiled.clean()
    assert not left.exists() and not library.exists()


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


def test_compile_0_at_run_time_imports_the_sources_even_where_the_extensions_are() -> None:
    code = (
        "import pacslb.proxy.http, pacslb.protocols.http1, pacslb.compiled as c;"
        "print(pacslb.proxy.http.__file__); print(pacslb.protocols.http1.__file__); print(c.status())"
    )
    env = {**os.environ, "PACSLB_COMPILE": "0"}
    lines = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    proxy, http1, status = lines.splitlines()
    assert proxy.endswith("pacslb/proxy/http.py") and http1.endswith("pacslb/protocols/http1.py"), lines
    assert status == "pure Python (PACSLB_COMPILE=0 when it was started)"


def test_the_source_finder_answers_only_for_the_per_request_path() -> None:
    finder = compiled._Sources()
    spec = finder.find_spec("pacslb.balance.server")
    assert spec is not None and spec.origin is not None and spec.origin.endswith("balance/server.py")
    assert finder.find_spec("pacslb.engine") is None and finder.find_spec("json") is None


def test_no_await_inside_an_except_clause_of_a_compiled_module() -> None:
    """Compiled by mypyc, a coroutine that awaits inside an ``except`` clause can leave its exception as
    the one the next ``except`` of another coroutine catches (docs/performance.md): a head too large once
    got a 400 meant for another connection. The compiled modules must answer after the clause instead."""
    import ast

    found = []
    for module in compiled.HOT_MODULES:
        source = compiled._source(module)
        tree = ast.parse(source.read_text(), str(source))
        for handler in (node for node in ast.walk(tree) if isinstance(node, ast.ExceptHandler)):
            for node in ast.walk(handler):
                if isinstance(node, (ast.Await, ast.AsyncFor, ast.AsyncWith)):
                    found.append(f"{source.relative_to(compiled.ROOT)}:{node.lineno}")
    assert not found, f"await inside an except clause of a compiled module: {', '.join(found)}"


def test_the_makefile_compiles_when_a_compiled_module_changes() -> None:
    """The Makefile asks ``python -m pacslb.compiled sources`` for what the build depends on: one list."""
    out = subprocess.run(
        [sys.executable, "-m", "pacslb.compiled", "sources"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == [str(compiled._source(m).relative_to(compiled.ROOT)) for m in compiled.HOT_MODULES] + [
        "pacslb/compiled.py"
    ]
    makefile = (compiled.ROOT / "Makefile").read_text()
    assert "-m pacslb.compiled sources" in makefile and "pacslb/proxy/http.py" not in makefile
