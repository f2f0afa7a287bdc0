"""The fake API answers like the real one: malformed commands get a per-command error."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import aiohttp

from segment_relay.testing import FakeInfinario
from support import Server, relay_command

GOOD_EVENT = {
    "name": "crm/events",
    "data": {
        "customer_ids": {"registered": "u"},
        "project_id": "TOKEN",
        "type": "t",
        "properties": {},
        "timestamp": 1.0,
    },
}


async def test_malformed_commands_are_refused_one_by_one(
    fake_api: tuple[FakeInfinario, Server],
) -> None:
    fake, api = fake_api
    commands = [
        GOOD_EVENT,
        {
            "name": "crm/events",
            "data": {"customer_ids": {}, "project_id": "TOKEN", "type": "", "properties": {}},
        },
        {
            "name": "crm/customers",
            "data": {"ids": {"registered": "u"}, "project_id": "WRONG", "properties": {}},
        },
        {"name": "crm/nope", "data": {}},
    ]
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{api.url}/bulk", json={"commands": commands}) as response,
    ):
        body = await response.json()
    assert response.status == 200
    statuses = [r["status"] for r in body["results"]]
    assert statuses == ["ok", "error", "error", "error"]
    assert any("customer_ids" in e for e in body["results"][1]["errors"])
    assert any("project_id" in e for e in body["results"][2]["errors"])
    assert fake.accepted == [GOOD_EVENT]


async def test_v2_needs_the_api_key(fake_api: tuple[FakeInfinario, Server]) -> None:
    _, api = fake_api
    url = f"{api.url}/track/v2/projects/TOKEN/batch"
    async with aiohttp.ClientSession() as session:
        async with session.post(
            url, json={"commands": []}, headers={"Authorization": "Token bad"}
        ) as response:
            assert response.status == 401
        async with session.post(
            url, json={"commands": []}, headers={"Authorization": "Token KEY"}
        ) as response:
            assert response.status == 200


async def test_the_fake_infinario_command_prints_what_it_accepts() -> None:
    process = await asyncio.create_subprocess_exec(
        *relay_command(),
        "fake-infinario",
        "--port",
        "0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    assert process.stderr is not None
    try:
        async with asyncio.timeout(30):
            banner = (await process.stderr.readline()).decode()
            url = banner.split("listening on ")[1].split(" ")[0]
            async with (
                aiohttp.ClientSession() as session,
                session.post(f"{url}/bulk", json={"commands": [GOOD_EVENT]}) as response,
            ):
                assert response.status == 200
            printed = json.loads(await process.stdout.readline())
    finally:
        process.send_signal(signal.SIGINT)
        async with asyncio.timeout(30):
            await process.wait()
    assert printed == GOOD_EVENT
