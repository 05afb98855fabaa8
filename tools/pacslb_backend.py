"""pacslb's build backend: setuptools' own, asking for mypy only when the build is going to compile.

pyproject.toml names it (``build-backend``, ``backend-path = ["tools"]``). Everything is
``setuptools.build_meta``; only the build requirements differ: a wheel build where compiling is on
(a C compiler found, ``PACSLB_COMPILE`` not 0) also needs ``pacslb.compiled.BUILD_REQUIRES`` (mypy, which
provides mypyc, and what it must see to type-check the modules). An editable install never compiles
(setup.py), so it does not wait for them either. The compiling itself is in setup.py's build_ext.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403  (the PEP 517 hooks this module does not change)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pacslb import compiled  # stdlib only


def get_requires_for_build_wheel(config_settings: dict[str, Any] | None = None) -> list[str]:
    requires = list(_setuptools.get_requires_for_build_wheel(config_settings))
    if compiled.why_not() is None:
        requires += compiled.BUILD_REQUIRES
    return requires
