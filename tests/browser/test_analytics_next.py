"""@segment/analytics-next in headless Chromium, sending to the relay from another origin."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import shutil
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from playwright.async_api import async_playwright

from segment_relay.service import METRICS
from segment_relay.testing import FakeInfinario
from support import (
    NODE_DIR,
    WRITE_KEY,
    Server,
    install_node_client,
    make_config,
    requires,
    running_fake,
    running_relay,
    start_daemon,
    start_server,
    write_config,
)

pytestmark = [pytest.mark.acceptance, requires("chromium", "node", "npm")]
HERE = Path(__file__).parent
BUNDLES = NODE_DIR / "node_modules" / "@segment" / "analytics-next" / "dist" / "umd"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# As the machine's notes say: headless, as root, no background traffic to the outside.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def page_app() -> web.Application:
    """The test page and analytics-next's bundles, from node_modules (no CDN)."""
    app = web.Application()

    async def page(_: web.Request) -> web.FileResponse:
        return web.FileResponse(HERE / "page.html")

    app.router.add_get("/", page)
    app.router.add_static("/analytics-next/bundles/", BUNDLES)
    return app


@pytest.fixture
async def page_server() -> AsyncIterator[Server]:
    await install_node_client_async()
    server = await start_server(page_app())
    yield server
    await server.runner.cleanup()


async def install_node_client_async() -> None:
    await asyncio.to_thread(install_node_client)


def requests_by_endpoint(relay: Server) -> dict[tuple[str, str], float]:
    found = {}
    for family in relay.app[METRICS].registry.collect():
        for sample in family.samples:
            if sample.name == "segment_relay_requests_total":
                found[(sample.labels["endpoint"], sample.labels["status"])] = sample.value
    return found


async def send_from_browser(
    page_url: str, relay_url: str, batching: bool, args: tuple[str, ...] = ()
) -> str:
    """Load the page in Chromium (with `args` too) and send every call to `relay_url`."""
    protocol, _, host = relay_url.partition("://")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=[*CHROMIUM_ARGS, *args]
        )
        try:
            page = await browser.new_page()
            await page.goto(page_url)
            settings = {
                "writeKey": WRITE_KEY,
                "apiHost": host + "/v1",
                "batching": batching,
                "protocol": protocol,
            }
            anonymous_id: str = await page.evaluate(
                "settings => window.sendEverything(settings)", settings
            )
            return anonymous_id
        finally:
            await browser.close()


def check_commands(commands: list[dict[str, Any]], anonymous_id: str, scheme: str = "http") -> None:
    by_kind: dict[str, dict[str, Any]] = {}
    for command in commands:
        data = command["data"]
        by_kind[
            data.get("type")
            or (
                "alias"
                if "a-prev" in data["ids"].values()
                else "group"
                if "group_id" in data["properties"]
                else "identify"
            )
        ] = data
    assert set(by_kind) == {"page_visit", "identify", "Clicked", "group", "alias"}
    page = by_kind["page_visit"]
    assert page["customer_ids"] == {"cookie": anonymous_id}
    assert (
        page["properties"]["page_name"],
        page["properties"]["page_category"],
        page["properties"]["path"],
    ) == ("Cart", "Shop", "/cart")
    assert page["properties"]["library_name"] == "analytics.js"
    assert page["properties"]["page_url"].startswith(f"{scheme}://127.0.0.1:")
    # A browser's calls carry the address they came from (none of their own).
    assert page["properties"]["ip"] == "127.0.0.1"
    assert by_kind["Clicked"]["properties"]["ip"] == "127.0.0.1"
    assert by_kind["identify"]["ids"] == {"registered": "u1", "cookie": anonymous_id}
    assert by_kind["identify"]["properties"] == {"plan": "pro"}
    assert by_kind["Clicked"]["customer_ids"] == {"registered": "u1", "cookie": anonymous_id}
    assert by_kind["Clicked"]["properties"]["n"] == 1
    assert by_kind["group"]["properties"] == {"group_id": "g1", "group_name": "Acme"}
    assert by_kind["alias"]["ids"] == {"registered": "u1", "cookie": "a-prev"}


@pytest.mark.parametrize("batching", [False, True], ids=["standard", "batching"])
async def test_analytics_next_in_chromium(
    page_server: Server, tmp_path: Path, batching: bool
) -> None:
    async with running_fake(FakeInfinario()) as (fake, api):
        config = make_config(
            tmp_path / "q.db",
            api.url,
            sessions={"enabled": False},
            server={"cors_origins": [page_server.url]},
        )
        async with running_relay(config) as relay:
            anonymous_id = await send_from_browser(page_server.url + "/", relay.url, batching)
            commands = await fake.wait_for_commands(5)
            endpoints = requests_by_endpoint(relay)
    check_commands(commands, anonymous_id)
    if batching:
        assert endpoints.get(("b", "200"), 0) >= 1
        assert not any(e in ("p", "i", "t", "g", "a") for e, _ in endpoints)
    else:
        assert {e for e, s in endpoints if s == "200"} == {"p", "i", "t", "g", "a"}
        # The Authorization header makes the browser ask first: the preflights were answered.
        assert any(s == "204" for _, s in endpoints)


def spki_pin(leaf: trustme.LeafCert) -> str:
    """What Chromium's --ignore-certificate-errors-spki-list takes to trust exactly this
    certificate's key: the base64 SHA-256 of its SubjectPublicKeyInfo."""
    certificate = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    spki = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


async def test_analytics_next_on_an_https_page_sends_over_https(
    tmp_path: Path, page_server_https: tuple[Server, trustme.LeafCert]
) -> None:
    page_server, leaf = page_server_https
    cert, key = tmp_path / "relay.pem", tmp_path / "relay.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    async with running_fake(FakeInfinario()) as (fake, api):
        config = write_config(
            tmp_path / "relay.yaml",
            tmp_path / "q.db",
            api.url,
            sessions={"enabled": False},
            server={"cors_origins": [page_server.url], "tls_cert": str(cert), "tls_key": str(key)},
        )
        daemon = await start_daemon(config)
        try:
            assert daemon.url.startswith("https://")
            pin = f"--ignore-certificate-errors-spki-list={spki_pin(leaf)}"
            anonymous_id = await send_from_browser(
                page_server.url + "/", daemon.url, batching=False, args=(pin,)
            )
            commands = await fake.wait_for_commands(5)
        finally:
            assert await daemon.stop() == 0
    check_commands(commands, anonymous_id, scheme="https")


@pytest.fixture
async def page_server_https() -> AsyncIterator[tuple[Server, trustme.LeafCert]]:
    """The test page over HTTPS (a mixed-content page could not send to HTTPS and back), with
    a certificate for 127.0.0.1 from a throwaway CA."""
    await install_node_client_async()
    leaf = trustme.CA().issue_cert("127.0.0.1")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(context)
    server = await start_server(page_app(), ssl_context=context)
    yield server, leaf
    await server.runner.cleanup()
