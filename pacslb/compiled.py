"""The per-request path compiled to C with mypyc, and how to tell whether it is in use.

Theory of operation. A proxied HTTP request runs about 190k machine instructions of the interpreter spread
over the parser callbacks, the two heads and the balancer's bookkeeping, with no single piece over a seventh
of it (docs/performance.md, "HTTP (d)"). mypyc compiles these modules, as they are and type-checked, into C
extension modules: the same code runs about a third fewer instructions. The Python sources stay the truth:
an extension module sits next to its source (``pacslb/proxy/http.cpython-311-...so``) and Python imports it
in the source's place; without a C compiler, or with ``PACSLB_COMPILE=0``, nothing is built and the sources
run as they are, with the same behaviour.

Two ways to build them, one recipe (:func:`extension_modules`):

- ``pip install .`` / ``python -m build``: the build backend (``tools/pacslb_backend.py`` and ``setup.py``)
  compiles them into the wheel, next to the sources in the installed package, and writes why in
  ``pacslb/_build.txt`` when it could not (no C compiler, ``PACSLB_COMPILE=0``, a failed compile).
- A source checkout: ``python -m pacslb.compiled build`` compiles them in place (``make`` does it before
  running the tests or the bench); ``clean`` removes what it built; ``check`` says which modules run
  compiled, and fails when an extension is older than its source (it would hide an edit).

``PACSLB_COMPILE=0`` in the environment of a running pacslb makes it import the sources even where the
extensions are there (:func:`prefer_sources`, called by the package's ``__init__``): ``make test`` runs the
unit tests and the HTTP tests a second time so, for the promise that both behave the same to hold.

:func:`status` is what ``pacslb --version`` and ``pacslb check`` print: compiled, or pure Python and why.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import shlex
import shutil
import sys
import sysconfig
from pathlib import Path
from typing import Any

#: The modules of the per-request path, compiled together (calls between them stay in C): HTTP's, and the
#: splice relay's pumps, which every relayed connection runs (a relay worker imports the group's library
#: for them: about 0.7 MB more of its memory).
HOT_MODULES = (
    "pacslb.protocols.http1",
    "pacslb.proxy.http",
    "pacslb.proxy.exchange",
    "pacslb.balance.claim",
    "pacslb.balance.cookie",
    "pacslb.balance.decision",
    "pacslb.balance.persistence",
    "pacslb.balance.server",
    "pacslb.proxy.pumps",
    "pacslb.proxy.eventloop",
)
#: The shared library of the group: inside the package, so that it imports wherever the package does.
GROUP = "pacslb._hot"

#: What compiling needs besides setuptools: mypy (mypyc comes with it) and what mypy must see of the modules'
#: imports to type-check them as ``make lint`` does (their types decide the C code). The build backend asks
#: for these only when it is going to compile.
BUILD_REQUIRES = ("mypy>=1.10", "pydantic>=2.6,<3", "httptools>=0.6", "types-PyYAML")
#: Written into the package by a wheel build: "compiled", or why it runs as Python.
BUILD_NOTE = "_build.txt"

ROOT = Path(__file__).resolve().parent.parent


def _source(module: str) -> Path:
    return ROOT.joinpath(*module.split(".")).with_suffix(".py")


def _extensions(module: str) -> list[Path]:
    base = ROOT.joinpath(*module.split("."))
    return [base.with_name(base.name + suffix) for suffix in importlib.machinery.EXTENSION_SUFFIXES]


def built() -> list[Path]:
    """Every extension file the build made that is there."""
    paths = [path for module in (*HOT_MODULES, GROUP + "__mypyc") for path in _extensions(module)]
    return [path for path in paths if path.exists()]


def stale() -> list[str]:
    """Modules edited since the build (their code is in the group's library, whatever their own extension
    file's date: that is only a stub, which a build does not always rewrite)."""
    paths = built()
    if not paths or not (ROOT / "pyproject.toml").exists():
        return []  # nothing built, or an installed package: pip gives every file the time it unpacked it
    since = min(path.stat().st_mtime for path in paths)
    return [module for module in HOT_MODULES if _source(module).stat().st_mtime > since]


def clean() -> None:
    """Remove what the build made, and any other extension module in the package: one a build of an earlier
    list of modules left would be imported in its source's place, and would not import."""
    for path in (ROOT / "pacslb").rglob("*.so"):
        path.unlink()


def why_not() -> str | None:
    """Why a build here would leave the modules as Python (``PACSLB_COMPILE=0``, no C compiler), or None."""
    if os.environ.get("PACSLB_COMPILE", "1") == "0":
        return "PACSLB_COMPILE=0 when it was built"
    compiler = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    words = shlex.split(compiler)
    if not words or shutil.which(words[0]) is None:
        return f"no C compiler ({compiler.strip() or 'CC'} not found) when it was built"
    return None


def extension_modules(target_dir: str = "build") -> list[Any]:
    """The setuptools extensions of the group, their C code generated by mypyc into ``target_dir`` (it type-
    checks the modules first, with the project's mypy settings; a type error raises SystemExit). Run from the
    source tree's root."""
    from mypyc.build import mypycify

    sources = [str(_source(module).relative_to(ROOT)) for module in HOT_MODULES]
    extensions: list[Any] = mypycify(sources, opt_level="3", group_name=GROUP, target_dir=target_dir)
    return extensions


class _Sources(importlib.abc.MetaPathFinder):
    """Finds the modules of the per-request path as their sources, before the finder that would prefer the
    extension module next to them."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name not in HOT_MODULES:
            return None
        source = _source(name)
        return importlib.util.spec_from_file_location(name, source) if source.exists() else None


def prefer_sources() -> None:
    """Import the per-request path from its sources from now on (``PACSLB_COMPILE=0`` at run time)."""
    if not any(isinstance(finder, _Sources) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Sources())


def running_sources() -> bool:
    return any(isinstance(finder, _Sources) for finder in sys.meta_path)


def status() -> str:
    """How the per-request path runs here: "compiled with mypyc", or "pure Python (why)"."""
    if running_sources():
        return "pure Python (PACSLB_COMPILE=0 when it was started)"
    if built() and all(any(path.exists() for path in _extensions(module)) for module in HOT_MODULES):
        old = stale()
        if old:
            return f"compiled with mypyc, but older than the sources of {', '.join(old)} (make compile)"
        return "compiled with mypyc"
    note = ROOT / "pacslb" / BUILD_NOTE
    if note.exists():
        reason = note.read_text().strip()
    elif (ROOT / "pyproject.toml").exists():
        reason = "not compiled in this checkout: make compile"
    else:
        reason = "installed without it"
    return f"pure Python ({reason})"


def build() -> int:
    """Compile the modules in place. Returns 0, or 1 when they could not be (what was built is removed,
    so the sources run)."""
    if not (ROOT / "pyproject.toml").exists():
        print("pacslb: compiling needs a source checkout (with pyproject.toml)", file=sys.stderr)
        return 1
    clean()
    reason = why_not()
    if reason is not None:
        print(f"pacslb: {reason.removesuffix(' when it was built')}: the per-request path runs as Python")
        return 0 if os.environ.get("PACSLB_COMPILE") == "0" else 1
    try:
        from setuptools import setup

        os.chdir(ROOT)
        setup(
            name="pacslb-compiled",
            ext_modules=extension_modules(),
            script_args=["-q", "build_ext", "--inplace", "--build-temp", "build/compiled"],
        )
        for path in built():
            os.utime(path)  # built now, even where an unchanged stub was only copied again
    except (Exception, SystemExit) as exc:  # no compiler, no headers, a type error: run as Python
        clean()
        print(f"pacslb: compiling the per-request path failed ({exc}); it runs as Python", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "check"
    if command == "build":
        return build()
    if command == "clean":
        clean()
        return 0
    if command == "sources":  # what a build depends on, for the Makefile
        print(*[_source(module).relative_to(ROOT) for module in HOT_MODULES], "pacslb/compiled.py")
        return 0
    if command == "check":
        old = stale()
        if old:
            print(f"pacslb: compiled modules older than their sources: {', '.join(old)} (run make)", file=sys.stderr)
            return 1
        compiled = [module for module in HOT_MODULES if any(path.exists() for path in _extensions(module))]
        print(f"compiled: {', '.join(compiled) or 'none'}")
        print(f"per-request path: {status()}")
        return 0
    print("usage: python -m pacslb.compiled [build|clean|check|sources]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
