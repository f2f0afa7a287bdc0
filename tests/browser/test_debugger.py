"""The live debugger page, in headless Chromium, while the Python client sends calls."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests
from playwright.async_api import async_playwright
from segment.analytics import Client
from test_analytics_next import CHROMIUM, CHROMIUM_ARGS

from segment_relay.testing import FakeInfinario, Reply
from support import TESTS, WRITE_KEY, make_config, requires, running_fake, running_relay

pytestmark = [pytest.mark.acceptance, requires("chromium")]
ARTIFACTS = TESTS.parent / "test-artifacts"


def refuse_broken(commands: list[Any]) -> Reply:
    return Reply(
        commands=["error" if c["data"].get("type") == "Broken" else "ok" for c in commands]
    )


def send_calls(url: str) -> None:
    client = Client(WRITE_KEY, host=url, sync_mode=True, max_retries=0)
    client.identify(user_id="ann", traits={"plan": "pro"}, message_id="m-identify")
    client.track(
        user_id="ann", event="Order Completed", properties={"revenue": 9}, message_id="m-track"
    )
    client.page(anonymous_id="visitor-1", name="Pricing", message_id="m-page")
    client.track(user_id="bob", event="Broken", message_id="m-broken")
    # A track without `event` in a batch: refused, kept, and shown as refused.
    refused = {"type": "track", "userId": "dan", "messageId": "m-refused"}
    answer = requests.post(
        url + "/v1/batch", json={"batch": [refused]}, auth=(WRITE_KEY, ""), timeout=20
    )
    assert answer.status_code == 400


async def test_the_debugger_shows_calls_commands_and_states_live(tmp_path: Path) -> None:
    fake = FakeInfinario()
    fake.responder = refuse_broken
    ARTIFACTS.mkdir(exist_ok=True)
    async with running_fake(fake) as (_, api):
        config = make_config(tmp_path / "q.db", api.url, debugger={"enabled": True})
        async with running_relay(config) as relay, async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page(viewport={"width": 1280, "height": 800})
                await page.goto(relay.url + "/debugger")
                await page.wait_for_selector("#status:has-text('live')", timeout=20_000)
                await asyncio.to_thread(send_calls, relay.url)
                # Without reloading, each call appears with its command and delivery state.
                for message_id, state in [
                    ("m-identify", "sent"),
                    ("m-track", "sent"),
                    ("m-page", "sent"),
                    ("m-broken", "dead-lettered"),
                    ("m-refused", "refused"),
                ]:
                    await page.wait_for_selector(
                        f".call[data-id='{message_id}'] .state.{state}", timeout=20_000
                    )
                assert "crm/events Order Completed" in await page.inner_text(
                    ".call[data-id='m-track'] .commands"
                )
                assert "rejected" in await page.inner_text(".call[data-id='m-broken'] .state")
                assert "invalid: event is required" in await page.inner_text(
                    ".call[data-id='m-refused'] .state"
                )
                # The page call opened a session: its session_start shows as its own row.
                await page.wait_for_selector(".call.session .state.sent", timeout=20_000)
                await page.wait_for_selector(
                    ".call[data-id='m-page'] .sessions:has-text('session_start sent')",
                    timeout=20_000,
                )
                await page.screenshot(path=str(ARTIFACTS / "debugger-live.png"), full_page=True)
                # Click a call: the raw JSON on both sides.
                await page.click(".call[data-id='m-track'] .head")
                raw = await page.inner_text(".call[data-id='m-track'] .raw-commands")
                assert '"revenue": 9' in raw
                assert '"event": "Order Completed"' in await page.inner_text(
                    ".call[data-id='m-track'] .raw-call"
                )
                await page.screenshot(path=str(ARTIFACTS / "debugger-detail.png"), full_page=True)
                # Filter by user: only ann's calls stay.
                await page.fill("#user", "ann")
                shown = await page.eval_on_selector_all(
                    ".call:not(.hidden)", "els => els.map(e => e.dataset.id)"
                )
                assert sorted(shown) == ["m-identify", "m-track"]
                await page.fill("#user", "")
                await page.select_option("#type", "page")
                shown = await page.eval_on_selector_all(
                    ".call:not(.hidden)", "els => els.map(e => e.dataset.id)"
                )
                assert shown == ["m-page"]
                await page.screenshot(path=str(ARTIFACTS / "debugger-filtered.png"), full_page=True)
                # Pause: new calls wait until resumed.
                await page.select_option("#type", "")
                await page.click("#pause")
                client = Client(WRITE_KEY, host=relay.url, sync_mode=True, max_retries=0)
                await asyncio.to_thread(
                    client.track, user_id="cat", event="While paused", message_id="m-paused"
                )
                await page.wait_for_selector("#status:has-text('paused (')", timeout=20_000)
                assert await page.query_selector(".call[data-id='m-paused']") is None
                await page.click("#pause")
                await page.wait_for_selector(".call[data-id='m-paused']", timeout=20_000)
            finally:
                await browser.close()


async def test_a_session_start_shows_under_the_call_that_opened_it(tmp_path: Path) -> None:
    # A page then a screen of one user in one batch: the page opened the session.
    batch = [
        {
            "type": "page",
            "userId": "eve",
            "name": "Home",
            "messageId": "m-page-first",
            "timestamp": "2024-03-01T12:00:00.000Z",
        },
        {
            "type": "screen",
            "userId": "eve",
            "name": "Cart",
            "messageId": "m-screen-next",
            "timestamp": "2024-03-01T12:00:10.000Z",
        },
    ]
    async with running_fake(FakeInfinario()) as (_, api):
        config = make_config(tmp_path / "q.db", api.url, debugger={"enabled": True})
        async with running_relay(config) as relay, async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page()
                await page.goto(relay.url + "/debugger")
                await page.wait_for_selector("#status:has-text('live')", timeout=20_000)
                answer = await asyncio.to_thread(
                    requests.post,
                    relay.url + "/v1/batch",
                    json={"batch": batch},
                    auth=(WRITE_KEY, ""),
                    timeout=20,
                )
                assert answer.status_code == 200
                await page.wait_for_selector(
                    ".call[data-id='m-page-first'] .sessions:has-text('session_start sent')",
                    timeout=20_000,
                )
                await page.wait_for_selector(
                    ".call[data-id='m-screen-next'] .state.sent", timeout=20_000
                )
                assert await page.query_selector(".call[data-id='m-screen-next'] .sessions") is None
            finally:
                await browser.close()


async def test_the_debugger_refuses_addresses_not_allowed(tmp_path: Path) -> None:
    config = make_config(
        tmp_path / "q.db",
        "http://127.0.0.1:9",
        debugger={"enabled": True, "allow": ["127.0.0.2/32"]},
    )
    async with running_relay(config, forward=False) as relay:
        async with (
            aiohttp.ClientSession() as session,
            session.get(relay.url + "/debugger") as response,
        ):
            assert response.status == 403
            body = await response.json()
            assert body["code"] == "forbidden"
        connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.get(relay.url + "/debugger") as response,
        ):
            assert response.status == 200
            assert "segment-relay debugger" in await response.text()


async def test_the_debugger_is_off_by_default(tmp_path: Path) -> None:
    async with (
        running_relay(make_config(tmp_path / "q.db", "http://127.0.0.1:9"), forward=False) as relay,
        aiohttp.ClientSession() as session,
        session.get(relay.url + "/debugger") as response,
    ):
        assert response.status == 404
