"""Nothing an app sends is silently lost: messages refused at ingest are kept as dead letters
with the reason, listed, shown raw, counted, and replayed once fixed (docs/api.md, "Refused
messages")."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from segment_relay.service import FORWARDER
from segment_relay.testing import FakeInfinario
from support import AUTH, make_config, post, run_cli, running_fake, running_relay, write_config

pytestmark = pytest.mark.acceptance


def track(message_id: str, user: str, **fields: Any) -> dict[str, Any]:
    return {"type": "track", "userId": user, "messageId": message_id, **fields}


async def metric(url: str, name: str, reason: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as response:
        text = await response.text()
    found = re.search(rf'^{name}_total{{reason="{reason}"}} (\S+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


async def cli(config: Path, *args: str) -> tuple[int, str, str]:
    return await run_cli("dead-letters", *args, "--config", str(config))


async def test_refused_messages_are_kept_listed_fixed_and_replayed(tmp_path: Path) -> None:
    fake = FakeInfinario()
    queue = tmp_path / "q.db"
    big = "x" * 40_000  # over the 32 KiB a message may be
    async with running_fake(fake) as (_, api):
        config = make_config(queue, api.url, sessions={"enabled": False})
        config_path = write_config(tmp_path / "relay.yaml", queue, api.url)
        async with running_relay(config) as relay:
            status, _ = await post(
                relay.url,
                "/v1/batch",
                {
                    "batch": [
                        track("m-a", "a", event="Viewed"),
                        track("m-noevent", "b", properties={"plan": "pro"}),
                        track("m-big", "c", event="Big", properties={"blob": big}),
                        track("m-d", "d", event="Viewed"),
                    ]
                },
            )
            assert status == 200
            # A single call refused whole is answered 400 as before, and kept too.
            status, body = await post(relay.url, "/v1/track", track("m-single", "e"))
            assert (status, body["code"]) == (400, "invalid_message")
            await relay.app[FORWARDER].drain()
            assert await metric(relay.url, "segment_relay_messages_rejected", "invalid") == 2
            assert await metric(relay.url, "segment_relay_messages_rejected", "too_large") == 1
            assert await metric(relay.url, "segment_relay_requests_refused", "invalid_message") == 1
        # The neighbours went through.
        assert sorted(
            c["data"]["properties"].get("event", c["data"]["type"]) for c in fake.accepted
        ) == [
            "Viewed",
            "Viewed",
        ]

        code, out, err = await cli(config_path, "list", "--json", "--reason", "invalid")
        assert code == 0, err
        invalid = {d["message_id"]: d for d in map(json.loads, out.splitlines())}
        assert sorted(invalid) == ["m-noevent", "m-single"]
        assert "event is required" in invalid["m-noevent"]["detail"]
        code, out, _ = await cli(config_path, "list", "--json", "--reason", "too_large")
        [big] = map(json.loads, out.splitlines())
        assert big["message_id"] == "m-big"
        assert "bytes; at most 32768" in big["detail"]

        # `show` prints the raw message: the one too large cut at the limit, with its size.
        code, out, _ = await cli(config_path, "show", str(big["id"]))
        shown = json.loads(out)
        assert isinstance(shown["body"], str)
        assert len(shown["body"].encode()) <= 32768
        assert shown["body"].startswith('{"type":"track"')
        code, out, _ = await cli(config_path, "show", str(invalid["m-noevent"]["id"]))
        assert json.loads(out)["body"] == track("m-noevent", "b", properties={"plan": "pro"})

        # Not replayable as it is: replay says why and exits non-zero; nothing moves.
        noevent = str(invalid["m-noevent"]["id"])
        code, out, err = await cli(config_path, "replay", noevent)
        assert code == 1
        assert out.strip() == "replayed 0 dead letters"
        assert f"dead-letters fix {noevent} FILE" in err

        # A fix that is still invalid is refused; a good one is kept and then replays.
        still = tmp_path / "still.json"
        still.write_text(json.dumps(track("m-noevent", "b")))
        code, _, err = await cli(config_path, "fix", noevent, str(still))
        assert code == 1
        assert "still refused: event is required" in err
        fixed = tmp_path / "fixed.json"
        fixed.write_text(
            json.dumps(track("m-noevent", "b", event="Upgraded", properties={"plan": "pro"}))
        )
        code, out, err = await cli(config_path, "fix", noevent, str(fixed))
        assert code == 0, err
        code, out, err = await cli(config_path, "replay", noevent)
        assert (code, out.strip()) == (0, "replayed 1 dead letters"), err
        async with running_relay(config) as relay:
            await relay.app[FORWARDER].drain()
        upgraded = [c for c in fake.accepted if c["data"]["type"] == "Upgraded"]
        assert len(upgraded) == 1
        assert upgraded[0]["data"]["properties"]["plan"] == "pro"

        # Replaying ids that do not exist says so.
        code, _, err = await cli(config_path, "replay", "999999")
        assert code == 1
        assert "no dead letter 999999" in err


async def test_requests_refused_whole_are_counted_and_logged_once_per_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(tmp_path / "q.db", "http://127.0.0.1:9")
    async with running_relay(config, forward=False) as relay, aiohttp.ClientSession() as session:
        for _ in range(3):
            async with session.post(
                relay.url + "/v1/batch", data=b'{"batch": [', headers=AUTH
            ) as response:
                assert response.status == 400
                assert (await response.json())["code"] == "invalid_json"
        async with session.post(
            relay.url + "/v1/track", data=b"{}", headers={"Authorization": "Basic d3Jvbmc6"}
        ) as response:
            assert response.status == 401
        assert await metric(relay.url, "segment_relay_requests_refused", "invalid_json") == 3
        assert await metric(relay.url, "segment_relay_requests_refused", "invalid_write_key") == 1
    lines = [r for r in caplog.records if getattr(r, "action", None) == "request_refused"]
    assert [(r.levelname, r.reason) for r in lines] == [  # type: ignore[attr-defined]
        ("WARNING", "invalid_json"),
        ("WARNING", "invalid_write_key"),
    ]
    assert "from source test (127.0.0.1): 400 invalid_json" in lines[0].getMessage()
    assert "from an unknown source (127.0.0.1): 401 invalid_write_key" in lines[1].getMessage()
