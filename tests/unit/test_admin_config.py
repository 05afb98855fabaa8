"""The operations sections of the config (admin, alerts, fate_sharing, halt_grace): defaults and errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from pacslb.config import load_config_text
from pacslb.errors import ConfigError

SERVICES = "services: {a: {listen: 127.0.0.1:5000, servers: {p: 127.0.0.1:6000}}}\n"


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config_text(SERVICES + text, "lb.yaml")
    return [str(issue) for issue in caught.value.issues]


def test_defaults() -> None:
    config = load_config_text(SERVICES + "admin: {}\n")
    assert config.admin is not None and str(config.admin.listen) == "127.0.0.1:9900"
    assert config.admin.token_file is None and config.alerts is None
    assert config.fate_sharing is False and config.halt_grace == 10.0
    assert load_config_text(SERVICES).admin is None  # no section: no admin listener


def test_an_admin_api_off_loopback_needs_a_token(tmp_path: Path) -> None:
    assert errors("admin: {listen: 0.0.0.0:9900}\n") == [
        "lb.yaml:2: admin: listen 0.0.0.0:9900 is reachable from the network: it needs a token_file"
    ]
    short = tmp_path / "short"
    short.write_text("abc\n")
    assert "shorter than 16 characters" in errors(f"admin: {{token_file: {short}}}\n")[0]
    good = tmp_path / "good"
    good.write_text("x" * 32 + "\n")
    config = load_config_text(SERVICES + f"admin: {{listen: 0.0.0.0:9900, token_file: {good}}}\n")
    assert config.admin is not None and config.admin.token_file == str(good)


def test_alert_sections_are_checked() -> None:
    assert "give email, webhook or both" in errors("alerts: {batch: 1s}\n")[0]
    found = errors(
        "alerts: {email: {server: 'mail.example.org:587', username: u, sender: a@b.c, recipients: [d@e.f]}}\n"
    )
    assert found == ["lb.yaml:2: alerts.email: username and password_file go together"]
    assert "unknown key" in errors("alerts: {webhook: {url: 'http://x/'}, flood: 1}\n")[0]
    assert "alerts.webhook.url" in errors("alerts: {webhook: {url: 'ftp://x/'}}\n")[0]
    config = load_config_text(
        SERVICES + "alerts: {email: {server: mail.example.org, sender: a@b.c, recipients: [d@e.f]}}"
    )
    assert config.alerts is not None and config.alerts.email is not None
    assert config.alerts.email.server == ("mail.example.org", 25)
    assert config.alerts.events == ("health", "service") and config.alerts.max_per_hour == 12
