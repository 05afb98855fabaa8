"""Typed, immutable configuration: the models (model.py) and YAML loading with located errors (loader.py)."""

from pacslb.config.loader import load_config, load_config_text
from pacslb.config.model import (
    CheckSpec,
    Config,
    LogSpec,
    PersistenceSpec,
    ServerSpec,
    ServiceSpec,
    TimeoutsSpec,
)
from pacslb.config.values import HostPort

__all__ = [
    "CheckSpec",
    "Config",
    "HostPort",
    "LogSpec",
    "PersistenceSpec",
    "ServerSpec",
    "ServiceSpec",
    "TimeoutsSpec",
    "load_config",
    "load_config_text",
]
