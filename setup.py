"""The part of pacslb's build that pyproject.toml cannot say: the per-request path compiled with mypyc.

pyproject.toml holds the metadata; this adds the C extension modules of ``pacslb.compiled.HOT_MODULES``
to the wheel where they can be built, and leaves the package pure Python where they cannot, with the reason
in ``pacslb/_build.txt`` (``pacslb --version`` prints it):

- ``PACSLB_COMPILE=0``, or no C compiler: no extension at all (a pure ``py3-none-any`` wheel);
- mypyc's type check or the C compiler fails: the build goes on without them (what was built is removed:
  a module whose group library is missing would not import);
- an editable install (``pip install -e .``, what ``make`` does): nothing compiled here;
  ``python -m pacslb.compiled build`` compiles in place next to the sources.

mypyc runs in ``build_ext`` when a wheel is built, not when this file is read nor when setuptools prepares
build_ext for metadata or an sdist: pip runs this file three times per install (requirements, metadata,
wheel) and only the last needs the C code. The build backend (tools/pacslb_backend.py) asks for
mypy and the modules' typing dependencies only when compiling is on.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pacslb import compiled  # stdlib only: importable before the dependencies are installed


def _write_note(build_lib: str, text: str) -> None:
    path = Path(build_lib, "pacslb", compiled.BUILD_NOTE)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def _drop_extensions(build_lib: str) -> None:
    """Remove the extension modules an earlier build left in the build directory. This build makes its own,
    or none; one of a module no longer compiled would go into the wheel beside the new group library, which
    has no part of it: that module would not import."""
    for path in Path(build_lib, "pacslb").rglob("*.so"):
        path.unlink()


class BuildPy(build_py):
    """Copies the sources, and notes why they will run as Python (build_ext replaces it when it compiles)."""

    def run(self) -> None:
        if not self.editable_mode:
            _drop_extensions(self.build_lib)
        super().run()
        if not self.editable_mode:
            _write_note(self.build_lib, compiled.why_not() or "not compiled")


#: The commands that build the package's code (a wheel, a plain build): only these run mypyc. setuptools also
#: prepares build_ext for metadata and for an sdist's file list, which pip asks for before the wheel.
BUILDING = {"bdist_wheel", "build", "build_ext", "install"}


def _failed(exc: BaseException) -> str:
    reason = f"compiling failed when it was built ({type(exc).__name__}: {exc})"
    print(f"pacslb: {reason}; the per-request path runs as Python", file=sys.stderr)
    return reason


class BuildExt(build_ext):
    """Generates the C code with mypyc and compiles it; on any failure the wheel stays pure Python."""

    reason: str | None = None  # why the modules stay Python; None while compiling is on

    def finalize_options(self) -> None:
        # mypyc runs here, before setuptools prepares each extension (its own finalize_options).
        commands = set(self.distribution.commands)
        if self.editable_mode or "editable_wheel" in commands:
            self.reason = "an editable install: python -m pacslb.compiled build compiles in place"
        elif not commands & BUILDING:
            self.reason = "not building"
        else:
            self.reason = compiled.why_not()
            if self.reason is None:
                try:
                    self.distribution.ext_modules = compiled.extension_modules(str(Path("build", "mypyc")))
                except (Exception, SystemExit) as exc:  # mypy missing; mypyc's type check exits on an error
                    self.reason = _failed(exc)
        if self.reason is not None:
            self.distribution.ext_modules = []  # the placeholder (_ext_modules) goes
        super().finalize_options()

    def run(self) -> None:
        if self.reason is None:
            try:
                super().run()
            except (Exception, SystemExit) as exc:  # the C compiler or the linker failed
                for output in self.get_outputs():
                    Path(output).unlink(missing_ok=True)
                self.distribution.ext_modules = self.extensions = []
                self.reason = _failed(exc)
        if not (self.editable_mode or self.inplace):
            _write_note(self.build_lib, self.reason or "compiled")


def _ext_modules() -> list[Extension]:
    # A placeholder, replaced in BuildExt.finalize_options by what mypyc makes: it tells setuptools there is C
    # to build, so that build_ext runs and the wheel is tagged for this Python and platform.
    return [] if compiled.why_not() else [Extension(compiled.GROUP + "__mypyc", sources=[])]


cmdclass: dict[str, Any] = {"build_py": BuildPy, "build_ext": BuildExt}
setup(ext_modules=_ext_modules(), cmdclass=cmdclass)
