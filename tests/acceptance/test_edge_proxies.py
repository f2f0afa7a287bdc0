"""docs/deployment.md's nginx, Caddy and HAProxy configurations, as printed there (only the
addresses, ports and certificate paths made local), terminating HTTPS in front of real
relays: a browser library's call reaches the destination with the client's address, not the
proxy's nor one the client made up."""

from __future__ import annotations

import ssl
from pathlib import Path

import aiohttp
import pytest
import trustme

from segment_relay.testing import FakeInfinario
from support import (
    AUTH,
    fenced_block,
    free_port,
    haproxy_command,
    listening,
    nginx_command,
    requires,
    running_fake,
    start_daemon,
    write_config,
)

pytestmark = pytest.mark.acceptance
DOC = Path(__file__).parents[2] / "docs" / "deployment.md"
CLIENT = "127.0.0.2"  # the client connects from here; the proxies run on 127.0.0.1


def doc_block(after: str) -> str:
    return fenced_block(DOC, after)


def certificate(tmp_path: Path) -> tuple[trustme.CA, Path, Path]:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "fullchain.pem", tmp_path / "privkey.pem"
    for blob in leaf.cert_chain_pems:
        blob.write_to_path(str(cert), append=True)
    leaf.private_key_pem.write_to_path(str(key))
    return ca, cert, key


def proxy_command(kind: str, tmp_path: Path, front: int, relays: list[int]) -> list[str]:
    """The documented configuration of `kind`, made local, and the command that runs it."""
    live = "/etc/letsencrypt/live/relay.example.com"
    cert, key = tmp_path / "fullchain.pem", tmp_path / "privkey.pem"
    if kind == "nginx":
        site = doc_block("The nginx site:")
        site = site.replace("listen 443 ssl;", f"listen 127.0.0.1:{front} ssl;")
        site = site.replace(f"{live}/fullchain.pem", str(cert))
        site = site.replace(f"{live}/privkey.pem", str(key))
        site = site.replace("127.0.0.1:8088", f"127.0.0.1:{relays[0]}")
        return nginx_command(tmp_path, site)
    if kind == "caddy":
        site = doc_block("The Caddyfile:")
        site = site.replace(
            "relay.example.com {", f"https://127.0.0.1:{front} {{\n    tls {cert} {key}"
        )
        site = site.replace("127.0.0.1:8088", f"127.0.0.1:{relays[0]}")
        (tmp_path / "Caddyfile").write_text(
            f"{{\n    admin off\n    auto_https disable_redirects\n"
            f"    storage file_system {tmp_path / 'caddy'}\n}}\n{site}"
        )
        return ["caddy", "run", "--config", str(tmp_path / "Caddyfile"), "--adapter", "caddyfile"]
    combined = tmp_path / "haproxy.pem"
    combined.write_text(cert.read_text() + key.read_text())
    config = doc_block("10.0.0.12:")
    config = config.replace(
        "bind :443 ssl crt /etc/haproxy/relay.example.com.pem",
        f"bind 127.0.0.1:{front} ssl crt {combined}",
    )
    for n, port in enumerate(relays):
        config = config.replace(f"10.0.0.1{n + 1}:8088", f"127.0.0.1:{port}")
    return haproxy_command(tmp_path, config)


@pytest.mark.parametrize(
    "kind",
    [
        pytest.param("nginx", marks=requires("nginx")),
        pytest.param("caddy", marks=requires("caddy")),
        pytest.param("haproxy", marks=requires("haproxy")),
    ],
)
async def test_the_documented_proxy_gives_the_relay_the_clients_address(
    kind: str, tmp_path: Path
) -> None:
    ca, _, _ = certificate(tmp_path)
    relays = [free_port(), free_port()] if kind == "haproxy" else [free_port()]
    front = free_port()
    trust = ssl.create_default_context()
    ca.configure_trust(trust)
    async with running_fake(FakeInfinario()) as (fake, api):
        daemons = [
            await start_daemon(
                write_config(
                    tmp_path / f"relay{n}.yaml",
                    tmp_path / f"q{n}.db",
                    api.url,
                    server={"host": "127.0.0.1", "port": port, "trusted_proxies": ["127.0.0.1/32"]},
                )
            )
            for n, port in enumerate(relays)
        ]
        try:
            async with listening(proxy_command(kind, tmp_path, front, relays), front):
                connector = aiohttp.TCPConnector(ssl=trust, local_addr=(CLIENT, 0))
                async with aiohttp.ClientSession(connector=connector) as session:
                    call = {
                        "userId": "u",
                        "event": "Through the proxy",
                        "context": {"library": {"name": "analytics.js", "version": "next-1"}},
                    }
                    # The client writes an address of its own: the proxy's entry follows it.
                    spoofed = {**AUTH, "X-Forwarded-For": "6.6.6.6"}
                    url = f"https://127.0.0.1:{front}"
                    async with session.post(
                        url + "/v1/track", json=call, headers=spoofed
                    ) as response:
                        assert response.status == 200, await response.text()
                    if kind != "haproxy":  # these forward only /v1/
                        async with session.get(url + "/metrics") as response:
                            assert response.status == 404
                [command] = await fake.wait_for_commands(1)
        finally:
            for daemon in daemons:
                assert await daemon.stop() == 0
    assert command["data"]["type"] == "Through the proxy"
    assert command["data"]["properties"]["ip"] == CLIENT
