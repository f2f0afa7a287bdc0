"""The receiver as Segment's clients see it: every call type, every error row, limits, CORS."""

from __future__ import annotations

import asyncio
import base64
import gzip
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from segment.analytics import Client

from segment_relay.queue.protocol import Queue
from segment_relay.service import STORE
from support import (
    AUTH,
    WRITE_KEY,
    install_node_client,
    make_config,
    post,
    requires,
    running_relay,
    send_with_node_client,
)

WHEN = datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC)


async def queued(store: Queue) -> list[dict[str, Any]]:
    """The client calls in the queue (session events, which page/screen add, left out)."""
    rows = await store.due(time.time() + 1, (), 10_000)
    return [orjson.loads(r.body) for r in rows if not r.type.startswith("session_")]


def python_client_calls(url: str, *, gzip_body: bool) -> None:
    client = Client(WRITE_KEY, host=url, sync_mode=True, max_retries=0, gzip=gzip_body)
    client.identify(user_id="u1", traits={"plan": "pro"}, timestamp=WHEN)
    client.track(user_id="u1", event="Bought", properties={"n": 1}, timestamp=WHEN)
    client.page(
        anonymous_id="a1", category="Shop", name="Cart", properties={"path": "/c"}, timestamp=WHEN
    )
    client.screen(user_id="u1", name="Home", timestamp=WHEN)
    client.group(user_id="u1", group_id="g1", traits={"name": "Acme"}, timestamp=WHEN)
    client.alias(previous_id="a1", user_id="u1", timestamp=WHEN)


def check_every_call_type(messages: list[dict[str, Any]], library: str) -> None:
    by_type = {m["type"]: m for m in messages}
    assert sorted(by_type) == ["alias", "group", "identify", "page", "screen", "track"]
    assert by_type["identify"]["traits"] == {"plan": "pro"}
    assert (by_type["track"]["event"], by_type["track"]["properties"]) == ("Bought", {"n": 1})
    assert (
        by_type["page"]["name"],
        by_type["page"]["category"],
        by_type["page"]["anonymousId"],
    ) == ("Cart", "Shop", "a1")
    assert by_type["screen"]["name"] == "Home"
    assert (by_type["group"]["groupId"], by_type["group"]["traits"]) == ("g1", {"name": "Acme"})
    assert (by_type["alias"]["previousId"], by_type["alias"]["userId"]) == ("a1", "u1")
    for message in messages:
        assert message["context"]["library"]["name"] == library
        assert message["messageId"]
        assert message["receivedAt"].endswith("Z")
        assert "writeKey" not in message
        sent = datetime.fromisoformat(message["timestamp"])
        assert abs((sent - WHEN).total_seconds()) < 5


@pytest.mark.parametrize("gzip_body", [False, True])
async def test_the_python_client_every_call_type(queue_path: Path, gzip_body: bool) -> None:
    async with running_relay(make_config(queue_path, "http://127.0.0.1:9"), forward=False) as relay:
        await asyncio.to_thread(python_client_calls, relay.url, gzip_body=gzip_body)
        messages = await queued(relay.app[STORE])
    assert len(messages) == 6
    check_every_call_type(messages, "analytics-python")


@requires("node", "npm")
async def test_the_node_client_every_call_type(queue_path: Path) -> None:
    node = await asyncio.to_thread(install_node_client)
    ts = WHEN.isoformat()
    calls = [
        ["identify", {"userId": "u1", "traits": {"plan": "pro"}, "timestamp": ts}],
        ["track", {"userId": "u1", "event": "Bought", "properties": {"n": 1}, "timestamp": ts}],
        [
            "page",
            {
                "anonymousId": "a1",
                "category": "Shop",
                "name": "Cart",
                "properties": {"path": "/c"},
                "timestamp": ts,
            },
        ],
        ["screen", {"userId": "u1", "name": "Home", "timestamp": ts}],
        ["group", {"userId": "u1", "groupId": "g1", "traits": {"name": "Acme"}, "timestamp": ts}],
        ["alias", {"previousId": "a1", "userId": "u1", "timestamp": ts}],
    ]
    async with running_relay(make_config(queue_path, "http://127.0.0.1:9"), forward=False) as relay:
        await send_with_node_client(node, relay.url, calls)
        messages = await queued(relay.app[STORE])
    assert len(messages) == 6
    check_every_call_type(messages, "@segment/analytics-node")


async def raw(
    url: str, path: str, data: bytes, headers: dict[str, str]
) -> tuple[int, Any, dict[str, str]]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url + path, data=data, headers=headers) as response,
    ):
        return response.status, await response.json(content_type=None), dict(response.headers)


def error(code: str, message: str) -> dict[str, Any]:
    return {"success": False, "code": code, "message": message, "error": message}


GOOD = {"userId": "u1", "event": "e", "timestamp": "2024-03-01T12:00:00Z"}
BOMB = gzip.compress(b'{"batch": [' + b" " * 50_000_000 + b"]}", compresslevel=9)


@pytest.mark.parametrize(
    ("path", "data", "headers", "status", "body"),
    [
        ("/v1/track", b"{not json", {}, 400, None),
        (
            "/v1/track",
            b"[1, 2]",
            {},
            400,
            error("invalid_message", "the request body must be a JSON object"),
        ),
        (
            "/v1/track",
            orjson.dumps({**GOOD, "event": 5}),
            {},
            400,
            error("invalid_message", "event is required on track and must be a non-empty string"),
        ),
        (
            "/v1/track",
            orjson.dumps({**GOOD, "properties": []}),
            {},
            400,
            error("invalid_message", "properties must be an object"),
        ),
        (
            "/v1/identify",
            orjson.dumps({"traits": {}}),
            {},
            400,
            error(
                "invalid_message",
                "userId or anonymousId is required (a non-empty string or number)",
            ),
        ),
        (
            "/v1/alias",
            orjson.dumps({"userId": "u1"}),
            {},
            400,
            error("invalid_message", "alias requires userId and previousId"),
        ),
        (
            "/v1/group",
            orjson.dumps({"userId": "u1"}),
            {},
            400,
            error("invalid_message", "groupId is required on group"),
        ),
        ("/v1/track", orjson.dumps({**GOOD, "properties": {"x": "y" * 40_000}}), {}, 413, None),
        (
            "/v1/batch",
            orjson.dumps({"batch": [{**GOOD, "properties": {"pad": "x" * 6000}}] * 100}),
            {},
            413,
            error("request_too_large", "the request body is over 512000 bytes"),
        ),
        (
            "/v1/batch",
            orjson.dumps({"batch": [{}] * 2600}),
            {},
            400,
            error("too_many_messages", "the batch has 2600 messages; at most 2500 are accepted"),
        ),
        (
            "/v1/batch",
            orjson.dumps({"batch": "no"}),
            {},
            400,
            error("invalid_batch", 'the body must be an object with a "batch" list'),
        ),
        (
            "/v1/batch",
            BOMB,
            {"Content-Encoding": "gzip"},
            413,
            error("request_too_large", "the (inflated) request body is over 512000 bytes"),
        ),
        ("/v1/batch", b"\x1f\x8b garbage", {"Content-Encoding": "gzip"}, 400, None),
        (
            "/v1/track",
            orjson.dumps(GOOD),
            {"Authorization": "Basic " + base64.b64encode(b"wrong:").decode()},
            401,
            error("invalid_write_key", "the write key is not known to this relay"),
        ),
        (
            "/v1/track",
            orjson.dumps(GOOD),
            {"Authorization": ""},
            401,
            error("missing_write_key", "no write key: use HTTP Basic auth or writeKey"),
        ),
    ],
    ids=[
        "bad-json",
        "not-an-object",
        "event-type",
        "properties-type",
        "no-ids",
        "alias-ids",
        "group-id",
        "message-too-large",
        "batch-too-large",
        "too-many-messages",
        "batch-not-a-list",
        "gzip-bomb",
        "gzip-garbage",
        "unknown-key",
        "missing-key",
    ],
)
async def test_every_error_row(
    queue_path: Path,
    path: str,
    data: bytes,
    headers: dict[str, str],
    status: int,
    body: dict[str, Any] | None,
) -> None:
    async with running_relay(make_config(queue_path, "http://127.0.0.1:9"), forward=False) as relay:
        got_status, got_body, got_headers = await raw(relay.url, path, data, {**AUTH, **headers})
        assert got_status == status
        assert got_headers["Content-Type"].startswith("application/json")
        assert got_body["success"] is False
        assert set(got_body) == {"success", "code", "message", "error"}
        if body is not None:
            assert got_body == body
        # Nothing was stored, and the relay still serves.
        assert relay.app[STORE].pending_count == 0
        assert await post(relay.url, "/v1/track", GOOD) == (200, {"success": True})


async def test_bodies_are_parsed_whatever_the_content_type(queue_path: Path) -> None:
    async with running_relay(make_config(queue_path, "http://127.0.0.1:9"), forward=False) as relay:
        status, body, _ = await raw(
            relay.url,
            "/v1/t",
            orjson.dumps({**GOOD, "writeKey": WRITE_KEY}),
            {"Content-Type": "text/plain"},
        )
        assert (status, body) == (200, {"success": True})


async def test_batch_envelope_skew_correction_and_context_merge(queue_path: Path) -> None:
    batch = {
        "batch": [
            {
                "type": "track",
                "userId": "u",
                "event": "e",
                "timestamp": "2024-03-01T12:00:00Z",
                "context": {"ip": "1.1.1.1"},
            }
        ],
        "sentAt": "2024-03-01T12:00:10Z",
        "context": {"ip": "9.9.9.9", "library": {"name": "lib"}},
        "integrations": {"All": False},
    }
    clock_now = datetime(2030, 1, 1, tzinfo=UTC).timestamp()
    config = make_config(queue_path, "http://127.0.0.1:9")
    async with running_relay(config, forward=False, clock=lambda: clock_now) as relay:
        assert (await post(relay.url, "/v1/batch", batch))[0] == 200
        [message] = [orjson.loads(r.body) for r in await relay.app[STORE].due(clock_now, (), 10)]
    assert message["timestamp"] == "2029-12-31T23:59:50.000Z"  # received - (sentAt - timestamp)
    assert message["originalTimestamp"] == "2024-03-01T12:00:00Z"
    assert message["context"] == {"ip": "1.1.1.1", "library": {"name": "lib"}}
    assert message["integrations"] == {"All": False}


async def test_session_activity_is_read_from_single_calls_and_batches(queue_path: Path) -> None:
    # The receiver keeps a parsed message for the commit only when it drives sessions: a page
    # and a configured track event open sessions, another track event opens none.
    config = make_config(
        queue_path, "http://127.0.0.1:9", sessions={"event_types": ["page", "Video Played"]}
    )
    at = {"timestamp": "2024-03-01T12:00:00Z"}
    async with running_relay(config, forward=False) as relay:
        assert (await post(relay.url, "/v1/page", {"anonymousId": "p1", **at}))[0] == 200
        assert (await post(relay.url, "/v1/track", {"userId": "t1", "event": "Other", **at}))[
            0
        ] == 200
        batch = [
            {"type": "track", "userId": "t2", "event": "Video Played", **at},
            {"type": "track", "userId": "t3", "event": "Other", **at},
            {"type": "page", "userId": "p2", **at},
        ]
        assert (await post(relay.url, "/v1/batch", {"batch": batch}))[0] == 200
        rows = await relay.app[STORE].due(time.time() + 1, (), 100)
    started = sorted(r.user_key for r in rows if r.type == "session_start")
    assert started == ["p1", "p2", "t2"]


async def test_a_client_retry_after_its_session_ended_opens_no_new_session(
    queue_path: Path,
) -> None:
    # The session rules skip repeats of accepted messageIds (the relay's own ids cannot
    # repeat, so only the client's are looked up): a page resent after its session was closed
    # must not open a second one.
    page = {"anonymousId": "a1", "messageId": "p-1", "timestamp": "2024-03-01T12:00:00Z"}
    async with running_relay(make_config(queue_path, "http://127.0.0.1:9"), forward=False) as relay:
        store = relay.app[STORE]
        assert (await post(relay.url, "/v1/page", page))[0] == 200
        assert await store.expire_sessions(time.time() + 7200) == 1
        assert (await post(relay.url, "/v1/page", page))[0] == 200
        rows = await store.due(time.time() + 1, (), 100)
    assert [r.type for r in rows] == ["session_start", "page", "session_end"]


async def test_a_duplicate_message_id_is_answered_200_and_stored_once_across_restarts(
    queue_path: Path,
) -> None:
    config = make_config(queue_path, "http://127.0.0.1:9")
    message = {**GOOD, "messageId": "same-id"}
    async with running_relay(config, forward=False) as relay:
        assert await post(relay.url, "/v1/track", message) == (200, {"success": True})
        assert await post(relay.url, "/v1/track", message) == (200, {"success": True})
    async with running_relay(config, forward=False) as relay:
        assert await post(relay.url, "/v1/batch", {"batch": [{"type": "track", **message}]}) == (
            200,
            {"success": True},
        )
        assert [m["messageId"] for m in await queued(relay.app[STORE])] == ["same-id"]


async def test_a_full_queue_answers_503_keeps_what_it_has_and_recovers(queue_path: Path) -> None:
    config = make_config(queue_path, "http://127.0.0.1:9", queue={"max_size": 400_000})
    big = {"userId": "u", "event": "e", "properties": {"pad": "x" * 20_000}}
    async with running_relay(config, forward=False) as relay:
        store = relay.app[STORE]
        accepted = 0
        for n in range(100):
            status, body, headers = await raw(
                relay.url, "/v1/track", orjson.dumps({**big, "messageId": f"m{n}"}), AUTH
            )
            if status != 200:
                break
            accepted += 1
        assert (status, body["code"], headers["Retry-After"]) == (503, "queue_full", "5")
        assert 5 < accepted < 100
        assert len(await queued(store)) == accepted
        # A call that does not fit is refused again while the file is full (how small a call
        # still fits in the last free page depends on SQLite's page layout), and nothing
        # stored is lost.
        again = orjson.dumps({**big, "messageId": "again"})
        assert (await raw(relay.url, "/v1/track", again, AUTH))[0] == 503
        assert len(await queued(store)) == accepted
        # The forwarder delivers and frees pages: the receiver takes calls again by itself.
        rows = await store.due(time.time() + 1, (), 10)
        await store.settle(acked=rows, now=time.time())
        assert (await raw(relay.url, "/v1/track", again, AUTH))[:2] == (200, {"success": True})
        assert len(await queued(store)) == accepted - 10 + 1


async def test_cors(queue_path: Path) -> None:
    config = make_config(
        queue_path, "http://127.0.0.1:9", server={"cors_origins": ["http://app.test"]}
    )
    preflight = {
        "Origin": "http://app.test",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    async with running_relay(config, forward=False) as relay, aiohttp.ClientSession() as session:
        async with session.options(relay.url + "/v1/t", headers=preflight) as response:
            assert response.status == 204
            assert response.headers["Access-Control-Allow-Origin"] == "http://app.test"
            assert "Authorization" in response.headers["Access-Control-Allow-Headers"]
        async with session.options(
            relay.url + "/v1/batch", headers={**preflight, "Origin": "http://evil.test"}
        ) as response:
            assert response.status == 403
            assert "Access-Control-Allow-Origin" not in response.headers
        async with session.post(
            relay.url + "/v1/t",
            data=orjson.dumps(GOOD),
            headers={**AUTH, "Origin": "http://app.test"},
        ) as response:
            assert response.status == 200
            assert response.headers["Access-Control-Allow-Origin"] == "http://app.test"
            assert response.headers["Access-Control-Expose-Headers"] == "Retry-After"


async def test_unknown_paths_and_methods_get_json_errors(queue_path: Path) -> None:
    config = make_config(queue_path, "http://127.0.0.1:9")
    async with running_relay(config, forward=False) as relay, aiohttp.ClientSession() as session:
        for method, path, status, allow in [
            ("GET", "/v2/track", 404, None),
            ("POST", "/", 404, None),
            ("GET", "/v1/track", 405, "OPTIONS, POST"),
            ("DELETE", "/v1/batch", 405, "OPTIONS, POST"),
        ]:
            async with session.request(method, relay.url + path, headers=AUTH) as response:
                body = await response.json()
                assert (response.status, response.headers.get("Allow")) == (status, allow)
                assert body["success"] is False
                assert path in body["message"]
                assert body["code"] == ("not_found" if status == 404 else "method_not_allowed")
        # A real route still answers as before.
        assert (await post(relay.url, "/v1/track", {"userId": "u", "event": "e"}))[0] == 200


async def test_context_ip_comes_from_the_client_behind_trusted_proxies(queue_path: Path) -> None:
    config = make_config(
        queue_path, "http://127.0.0.1:9", server={"trusted_proxies": ["127.0.0.0/8"]}
    )
    browser = {"library": {"name": "analytics.js", "version": "next-1.70.0"}}
    server_side = {"library": {"name": "analytics-python", "version": "2.3.0"}}
    calls = [
        ("browser", browser),
        ("server", server_side),
        ("direct", {**server_side, "direct": True}),
        ("own-ip", {**browser, "ip": "192.0.2.44"}),
    ]
    batch = [
        {"type": "track", "userId": "u", "event": name, "messageId": name, "context": context}
        for name, context in calls
    ]
    # The peer (127.0.0.1) is a trusted proxy; the client wrote an address of its own first.
    forwarded = {**AUTH, "X-Forwarded-For": "1.2.3.4, 203.0.113.9"}
    async with running_relay(config, forward=False) as relay:
        status, _ = await post(relay.url, "/v1/batch", {"batch": batch}, forwarded)
        assert status == 200
        single = {"userId": "u", "event": "single", "messageId": "single", "context": browser}
        assert (await post(relay.url, "/v1/track", single, forwarded))[0] == 200
        stored = {m["messageId"]: m["context"].get("ip") for m in await queued(relay.app[STORE])}
    assert stored == {
        "browser": "203.0.113.9",
        "server": None,
        "direct": "203.0.113.9",
        "own-ip": "192.0.2.44",
        "single": "203.0.113.9",
    }


async def test_without_trusted_proxies_a_forwarded_address_is_ignored(queue_path: Path) -> None:
    config = make_config(queue_path, "http://127.0.0.1:9")
    call = {
        "userId": "u",
        "event": "e",
        "context": {"library": {"name": "analytics-ios", "version": "4.1"}},
    }
    spoofed = {**AUTH, "X-Forwarded-For": "203.0.113.9"}
    async with running_relay(config, forward=False) as relay:
        assert (await post(relay.url, "/v1/track", call, spoofed))[0] == 200
        [message] = await queued(relay.app[STORE])
    assert message["context"]["ip"] == "127.0.0.1"


@pytest.mark.parametrize(("trusted", "opens"), [(["127.0.0.0/8"], True), ([], False)])
async def test_the_debugger_allows_the_client_behind_trusted_proxies(
    queue_path: Path, trusted: list[str], opens: bool
) -> None:
    config = make_config(
        queue_path,
        "http://127.0.0.1:9",
        server={"trusted_proxies": trusted},
        debugger={"enabled": True, "allow": ["203.0.113.0/24"]},
    )
    async with running_relay(config, forward=False) as relay, aiohttp.ClientSession() as session:
        through_proxy = {"X-Forwarded-For": "203.0.113.9"}
        async with session.get(relay.url + "/debugger", headers=through_proxy) as response:
            assert response.status == (200 if opens else 403)
        async with session.get(relay.url + "/debugger") as response:
            assert response.status == 403  # the proxy itself is not in debugger.allow
