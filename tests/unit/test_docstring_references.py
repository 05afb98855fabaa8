"""Every cross-reference in pacslb's docstrings and comments (``:func:``, ``:meth:``, ``:class:``, ``:data:``,
``:attr:``, ``:mod:``, ``:exc:``) names something that exists: a docstring that names a function since
renamed or removed sends its reader nowhere.

A reference is looked up as a reader would: a dotted ``pacslb.`` path from the package; ``.name`` as a
module beside the one that names it; otherwise from the names the module defines or imports, then as an
attribute of one of its classes (a method named from its class's docstring), then as an attribute an
instance of one of its classes sets (``self.name =``), or a name defined for the type checker only.
"""

from __future__ import annotations

import builtins
import importlib
import inspect
import re
from pathlib import Path
from types import ModuleType

import pytest

import pacslb

ROLE = re.compile(r":(?:func|meth|class|data|attr|mod|exc):`~?([A-Za-z_.][\w.]*)`")
#: Modules that run something when imported.
SKIP = {"pacslb.__main__"}


ROOT = Path(pacslb.__file__).resolve().parent.parent


def _modules() -> list[tuple[Path, ModuleType]]:
    """Each module of the package with its source (compiled or not, the source is what a reader reads)."""
    found = []
    for path in sorted((ROOT / "pacslb").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if name not in SKIP:
            found.append((path, importlib.import_module(name)))
    return found


def _source(module: ModuleType) -> str:
    parts = module.__name__.split(".")
    path = ROOT.joinpath(*parts)
    return (path / "__init__.py" if hasattr(module, "__path__") else path.with_suffix(".py")).read_text()


def _resolve_dotted(path: str) -> bool:
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            module = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        rest = ".".join(parts[cut:])
        return not rest or _resolves(module, _source(module), rest)
    return False


def _resolves(module: ModuleType, source: str, target: str) -> bool:
    if target.startswith("pacslb."):
        return _resolve_dotted(target)
    if target.startswith("."):
        package = module.__name__ if hasattr(module, "__path__") else module.__name__.rpartition(".")[0]
        return _resolve_dotted(package + target)
    first, *rest = target.split(".")
    namespace = vars(module)
    if first in namespace or hasattr(builtins, first):
        obj = namespace[first] if first in namespace else getattr(builtins, first)
        for attr in rest:
            if not hasattr(obj, attr):
                # An attribute its instances set (compiled classes have no source to inspect: the module's).
                return inspect.isclass(obj) and bool(re.search(rf"self\.{re.escape(attr)}\b", source))
            obj = getattr(obj, attr)
        return True
    if re.search(rf"^\s*(?:class|def) {re.escape(first)}\b", source, re.M):
        return True  # defined for the type checker only (a Protocol under TYPE_CHECKING)
    if rest:
        return False
    classes = [obj for obj in namespace.values() if inspect.isclass(obj) and obj.__module__ == module.__name__]
    if any(hasattr(cls, first) for cls in classes):
        return True
    return bool(re.search(rf"self\.{re.escape(first)}\b", source))


def _references() -> list[tuple[str, int, str, ModuleType, str]]:
    found = []
    for path, module in _modules():
        source = path.read_text()
        for number, line in enumerate(source.splitlines(), 1):
            for match in ROLE.finditer(line):
                found.append((str(path.relative_to(ROOT)), number, match.group(1), module, source))
    return found


def test_every_docstring_reference_names_something_that_exists() -> None:
    references = _references()
    assert len(references) > 100  # the scan sees them
    stale = [
        f"{path}:{line}: {target}"
        for path, line, target, module, source in references
        if not _resolves(module, source, target)
    ]
    assert not stale, "references to nothing:\n" + "\n".join(stale)


@pytest.mark.parametrize(
    ("target", "ok"),
    [("Claim.release", True), ("Claim.nothing", False), ("pacslb.balance.claim.Claims.cut", True), ("nothing", False)],
)
def test_the_lookup_itself(target: str, ok: bool) -> None:
    module = importlib.import_module("pacslb.balance.claim")
    assert _resolves(module, (ROOT / "pacslb" / "balance" / "claim.py").read_text(), target) is ok
