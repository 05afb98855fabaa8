"""The per-request path compiled to C with mypyc, and how to tell whether it is in use.

Theory of operation. A proxied HTTP request runs about 190k machine instructions of the interpreter spread
over the parser callbacks, the two heads and the balancer's bookkeeping, with no single piece over a seventh
of it (docs/performance.md, "HTTP (d)"). mypyc compiles these modules, as they are and type-checked, into C
extension modules: the same code runs about a third fewer instructions. The Python sources stay the truth:
an extension module sits next to its source (``pacslb/proxy/http.cpython-311-...so``) and Python imports it
in the source's place; without a C compiler, or with ``PACSLB_COMPILE=0``, nothing is built and the sources
run as they are, with the same behaviour.

``python -m pacslb.compiled build`` compiles them in place (``make`` does it before running or testing);
``clean`` removes what it built; ``check`` says which modules run compiled, and fails when an extension is
older than its source (it would hide an edit).
"""

from __future__ import annotations

import importlib.machinery
import os
import sys
from pathlib import Path

#: The modules of the per-request path, compiled together (calls between them stay in C).
HOT_MODULES = (
    "pacslb.protocols.http1",
    "pacslb.proxy.http",
    "pacslb.balance.cookie",
    "pacslb.balance.decision",
    "pacslb.balance.persistence",
    "pacslb.balance.server",
)
#: The shared library of the group: inside the package, so that it imports wherever the package does.
GROUP = "pacslb._hot"

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
    if not paths:
        return []
    since = min(path.stat().st_mtime for path in paths)
    return [module for module in HOT_MODULES if _source(module).stat().st_mtime > since]


def clean() -> None:
    for path in built():
        path.unlink()


def build() -> int:
    """Compile the modules in place. Returns 0, or 1 when they could not be (what was built is removed,
    so the sources run)."""
    if not (ROOT / "pyproject.toml").exists():
        print("pacslb: compiling needs a source checkout (with pyproject.toml)", file=sys.stderr)
        return 1
    clean()
    if os.environ.get("PACSLB_COMPILE", "1") == "0":
        print("pacslb: PACSLB_COMPILE=0: the per-request path runs as Python")
        return 0
    try:
        from mypyc.build import mypycify
        from setuptools import setup

        os.chdir(ROOT)
        sources = [str(_source(module).relative_to(ROOT)) for module in HOT_MODULES]
        setup(
            name="pacslb-compiled",
            ext_modules=mypycify(sources, opt_level="3", group_name=GROUP),
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
    if command == "check":
        old = stale()
        if old:
            print(f"pacslb: compiled modules older than their sources: {', '.join(old)} (run make)", file=sys.stderr)
            return 1
        compiled = [module for module in HOT_MODULES if any(path.exists() for path in _extensions(module))]
        print(f"compiled: {', '.join(compiled) or 'none'}")
        return 0
    print("usage: python -m pacslb.compiled [build|clean|check]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
