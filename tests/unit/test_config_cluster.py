"""The ``cluster:`` section: this balancer's name, the shared store's URL, the virtual IP for keepalived."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from pacslb.config import load_config_text
from pacslb.config.values import StoreLocation, parse_store_location
from pacslb.errors import ConfigError
from pacslb.state.redis import RedisStore
from pacslb.state.store import open_store

SERVICES = """\
services:
  web: {listen: "127.0.0.1:8080", mode: http, servers: {pacs1: "10.0.0.11:80"}}
"""


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("memory", StoreLocation("memory")),
        ("redis://10.0.0.5", StoreLocation("redis", (("10.0.0.5", 6379),), 0, url="redis://10.0.0.5")),
        ("redis://r.example:6380/3", StoreLocation("redis", (("r.example", 6380),), 3, url="redis://r.example:6380/3")),
        (
            "rediss://pacslb@[::1]:6390/0",
            StoreLocation("rediss", (("::1", 6390),), 0, None, "pacslb", "rediss://pacslb@[::1]:6390/0"),
        ),
        (
            "redis+sentinel://h1:26380,h2/mymaster/1",
            StoreLocation(
                "sentinel", (("h1", 26380), ("h2", 26379)), 1, "mymaster", url="redis+sentinel://h1:26380,h2/mymaster/1"
            ),
        ),
    ],
)
def test_store_urls(url: str, expected: StoreLocation) -> None:
    assert parse_store_location(url) == expected
    assert str(parse_store_location(url)) == url


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("redis://user:secret@h", "no password in the store URL"),
        ("mysql://h", "unknown store"),
        ("redis://h1,h2", "names one server"),
        ("redis+sentinel://h1", "master's name"),
        ("redis://h:99999", "port from 1 to 65535"),
        ("redis://h/zero", "database number"),
        ("redis://", "host is missing"),
    ],
)
def test_bad_store_urls_say_why(url: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_store_location(url)


def test_the_cluster_section_of_the_contract() -> None:
    config = load_config_text(
        SERVICES
        + textwrap.dedent("""\
            cluster:
              node: lb1
              store: redis://10.0.0.5:6379/0
              vrrp:
                interface: eth0
                router_id: 51
                priority: 150
                virtual_ips: [10.0.0.100/24]
                peers: [10.0.0.2]
            """),
        "pacslb.yaml",
    )
    cluster = config.cluster
    assert cluster.node == "lb1" and cluster.store.kind == "redis" and cluster.store.hosts == (("10.0.0.5", 6379),)
    assert cluster.vrrp is not None
    assert cluster.vrrp.virtual_ips == ("10.0.0.100/24",) and cluster.vrrp.peers == ("10.0.0.2",)
    assert cluster.vrrp.advert_interval == 0.2 and cluster.vrrp.preempt is False


def test_without_a_cluster_section_the_store_is_memory_and_the_node_is_named_after_the_host() -> None:
    cluster = load_config_text(SERVICES, "pacslb.yaml").cluster
    assert cluster.store.kind == "memory" and cluster.node and cluster.vrrp is None


def test_cluster_errors_name_line_and_field() -> None:
    text = SERVICES + textwrap.dedent("""\
        cluster:
          node: "lb 1"
          store: memory
          vrrp: {interface: eth0, router_id: 300, virtual_ips: [10.0.0.1/33]}
        """)
    with pytest.raises(ConfigError) as caught:
        load_config_text(text, "pacslb.yaml")
    found = {(issue.line, issue.field) for issue in caught.value.issues}
    assert (4, "cluster.node") in found
    assert (6, "cluster.vrrp.router_id") in found
    assert (6, "cluster.vrrp.virtual_ips.0") in found


@pytest.mark.parametrize(
    ("store", "key", "reason"),
    [
        ("redis://10.0.0.5/0", "sentinel_password_file", "sentinel_password_file is for a store behind Sentinels"),
        ("redis+sentinel://h1,h2,h3/mymaster", "ca_file", "ca_file is for a Redis store over TLS"),
        ("redis://10.0.0.5/0", "ca_file", "ca_file is for a Redis store over TLS"),
    ],
)
def test_the_sentinel_password_and_the_ca_file_go_with_their_kind_of_store(
    store: str, key: str, reason: str, tmp_path: Path
) -> None:
    secret = tmp_path / "file"
    secret.write_text("x\n")
    text = SERVICES + f"cluster: {{store: '{store}', {key}: '{secret}'}}\n"
    with pytest.raises(ConfigError, match=reason):
        load_config_text(text, "pacslb.yaml")


def test_the_sentinel_password_and_the_ca_file_reach_the_store(tmp_path: Path) -> None:
    (tmp_path / "redis.password").write_text("for-redis\n")
    (tmp_path / "sentinel.password").write_text("for-sentinel\n")
    text = SERVICES + textwrap.dedent(f"""\
        cluster:
          store: redis+sentinel://h1,h2,h3/mymaster/0
          password_file: {tmp_path / "redis.password"}
          sentinel_password_file: {tmp_path / "sentinel.password"}
        """)
    store = open_store(load_config_text(text, "pacslb.yaml").cluster)
    assert isinstance(store, RedisStore)
    assert (store.password, store.sentinel_password, store.ca_file) == ("for-redis", "for-sentinel", None)
    (tmp_path / "ca.pem").write_text("(a CA)\n")
    text = SERVICES + f"cluster: {{store: 'rediss://h/0', ca_file: '{tmp_path / 'ca.pem'}'}}\n"
    store = open_store(load_config_text(text, "pacslb.yaml").cluster)
    assert isinstance(store, RedisStore) and store.ca_file == str(tmp_path / "ca.pem")
