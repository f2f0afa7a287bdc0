"""`segment-relay dead-letters` and `status` on a real queue."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from segment_relay.service import FORWARDER
from segment_relay.testing import FakeInfinario, Reply
from support import make_config, post, run_cli, running_fake, running_relay, write_config

pytestmark = pytest.mark.acceptance


def track(n: int, user: str = "u1") -> dict[str, Any]:
    return {
        "type": "track",
        "userId": user,
        "event": f"e{n}",
        "messageId": f"m{n}",
        "timestamp": "2024-03-01T12:00:00Z",
    }


async def test_list_show_replay_and_purge(tmp_path: Path) -> None:
    fake = FakeInfinario()
    fake.script.append(Reply(commands=["error", "ok", "error"]))
    queue = tmp_path / "q.db"
    async with running_fake(fake) as (_, api):
        config = make_config(queue, api.url)
        config_path = write_config(tmp_path / "relay.yaml", queue, api.url)
        async with running_relay(config) as relay:
            assert (
                await post(
                    relay.url, "/v1/batch", {"batch": [track(1, "a"), track(2, "b"), track(3, "c")]}
                )
            )[0] == 200
            await relay.app[FORWARDER].drain()

        code, out, err = await run_cli("dead-letters", "list", "--config", str(config_path))
        assert code == 0, err
        # A header, then one aligned row each: every column starts where its heading does.
        header, *rows = out.splitlines()
        assert header.split() == [
            "ID",
            "LAST",
            "TRIED",
            "(UTC)",
            "REASON",
            "TYPE",
            "MESSAGE",
            "ID",
            "DETAIL",
        ]
        starts = [header.index(h) for h in ("REASON", "TYPE", "MESSAGE ID", "DETAIL")]
        assert [[row[i:].split(" ")[0] for i in starts] for row in rows] == [
            ["rejected", "track", "m1", "scripted"],
            ["rejected", "track", "m3", "scripted"],
        ]
        code, out, err = await run_cli(
            "dead-letters", "list", "--json", "--config", str(config_path)
        )
        listed = [json.loads(line) for line in out.splitlines()]
        assert [(d["reason"], d["type"], d["message_id"]) for d in listed] == [
            ("rejected", "track", "m1"),
            ("rejected", "track", "m3"),
        ]
        assert [d["id"] for d in listed] == [int(row.split()[0]) for row in rows]

        code, out, err = await run_cli(
            "dead-letters", "list", "--reason", "expired", "--config", str(config_path)
        )
        assert (code, out.strip()) == (
            0,
            "no dead letters with reason 'expired' (there are: 2 rejected)",
        ), err

        code, out, _ = await run_cli(
            "dead-letters", "show", str(listed[0]["id"]), "--config", str(config_path)
        )
        shown = json.loads(out)
        assert (shown["message_id"], shown["detail"], shown["body"]["event"]) == (
            "m1",
            "scripted error",
            "e1",
        )

        code, out, _ = await run_cli("status", "--config", str(config_path), "--json")
        status = json.loads(out)
        assert (status["pending"], status["dead_letters"]) == (0, {"rejected": 2})
        assert status["counters"] == {"delivered": 1, "dead_lettered": 2}

        code, out, _ = await run_cli(
            "dead-letters", "replay", str(listed[0]["id"]), "--config", str(config_path)
        )
        assert (code, out.strip()) == (0, "replayed 1 dead letters")
        async with running_relay(config) as relay:
            await relay.app[FORWARDER].drain()
        assert [c["data"]["type"] for c in fake.accepted] == ["e2", "e1"]

        code, out, _ = await run_cli(
            "dead-letters", "purge", "--older-than", "1d", "--config", str(config_path)
        )
        assert out.strip() == "purged 0 dead letters"
        # Without a filter, purge deletes everything: not from a script without --yes.
        code, out, err = await run_cli("dead-letters", "purge", "--config", str(config_path))
        assert code == 64
        assert "add --yes" in err
        code, out, _ = await run_cli("dead-letters", "purge", "--yes", "--config", str(config_path))
        assert out.strip() == "purged 1 dead letters"
        code, out, _ = await run_cli("status", "--config", str(config_path))
        assert "dead letters:       0" in out
        # The counters --json has, in the text too.
        assert "delivered / retried / dead-lettered: 2 / 0 / 2" in out
