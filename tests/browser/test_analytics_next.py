"""@segment/analytics-next in headless Chromium, sending to the relay from another origin."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
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
    start_server,
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


@pytest.fixture
async def page_server() -> AsyncIterator[Server]:
    await install_node_client_async()
    app = web.Application()

    async def page(_: web.Request) -> web.FileResponse:
        return web.FileResponse(HERE / "page.html")

    app.router.add_get("/", page)
    app.router.add_static("/analytics-next/bundles/", BUNDLES)
    server = await start_server(app)
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


async def send_from_browser(page_url: str, relay_url: str, batching: bool) -> str:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            await page.goto(page_url)
            settings = {
                "writeKey": WRITE_KEY,
                "apiHost": relay_url.removeprefix("http://") + "/v1",
                "batching": batching,
            }
            anonymous_id: str = await page.evaluate(
                "settings => window.sendEverything(settings)", settings
            )
            return anonymous_id
        finally:
            await browser.close()


def check_commands(commands: list[dict[str, Any]], anonymous_id: str) -> None:
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
    assert page["properties"]["page_url"].startswith("http://127.0.0.1:")
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
