"""`segment-relay status`: the queue, the destination as the relays see it, and the relays
sharing a PostgreSQL queue (text, or JSON with --json)."""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import orjson

from . import jsontext
from .config import load_config
from .queue import open_queue


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)

    async def read() -> dict[str, Any]:
        store = await open_queue(config.queue, daemon=False)
        try:
            now = time.time()
            stats = await store.stats(now)
            open_sessions, next_expiry = await store.session_stats()
            instances = await store.instances()
            destinations = await store.destinations()
            imports = await store.imports_waiting()
        finally:
            await store.close()
        return {
            "queue": store.where,
            "pending": stats.pending,
            "in_backoff": stats.in_backoff,
            "imports_waiting": imports,
            "oldest_pending_age_s": None
            if stats.oldest_received_at is None
            else round(now - stats.oldest_received_at, 3),
            "dead_letters": stats.dead_letters,
            "counters": stats.counters,
            "open_sessions": open_sessions,
            "next_session_expiry_in_s": None
            if next_expiry is None
            else round(next_expiry - now, 3),
            "destination": [_destination(relay, text, now) for relay, text in destinations],
            "instances": [
                {
                    "id": i.id,
                    "host": i.host,
                    "pid": i.pid,
                    "up_s": round(now - i.started_at, 1),
                    "seen_s_ago": round(now - i.seen_at, 1),
                    "buckets": i.buckets,
                    "forwards": i.forwards,
                }
                for i in instances
            ],
        }

    report = asyncio.run(read())
    if args.json:
        print(orjson.dumps(report).decode())
    else:
        age = report["oldest_pending_age_s"]
        print(f"queue {report['queue']}")
        print(f"  pending messages:   {report['pending']}")
        print(f"  waiting to retry:   {report['in_backoff']}")
        print(
            f"  imported, waiting:  {report['imports_waiting']} (queued while live calls are not)"
        )
        print(f"  oldest pending age: {'-' if age is None else f'{age:.1f}s'}")
        counters = report["counters"]
        print(
            "  delivered / retried / dead-lettered: "
            + " / ".join(str(counters.get(k, 0)) for k in ("delivered", "retried", "dead_lettered"))
        )
        for seen in report["destination"]:
            relay = f" (relay {seen['relay']})" if seen["relay"] else ""
            print(f"  destination{relay}: {_describe(seen)}")
        dead = report["dead_letters"]
        expiry = report["next_session_expiry_in_s"]
        print(
            f"  open sessions:      {report['open_sessions']}"
            + ("" if expiry is None else f" (next ends in {max(expiry, 0):.1f}s)")
        )
        print(
            f"  dead letters:       {sum(dead.values())}"
            + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(dead.items()))})" if dead else "")
        )
        if config.queue.url:
            print(f"  relays:             {len(report['instances'])}")
            for i in report["instances"]:
                held = (
                    f"{len(i['buckets'])} buckets {_ranges(i['buckets'])}"
                    if i["forwards"]
                    else "receive only"
                )
                print(f"    {i['id']} (pid {i['pid']} on {i['host']}, up {i['up_s']:.0f}s): {held}")
            if report["instances"] and not any(i["forwards"] for i in report["instances"]):
                print("  no live relay forwards (each has queue.forward: false): calls wait")
    return 0


# A relay records the destination's state when it changes, so at every probe while it is
# down or paused: a record older than this is a relay that stopped.
STALE_S = 600.0


def _destination(relay: str, text: str, now: float) -> dict[str, Any]:
    """A relay's view of the destination (as Destination.report wrote it), timed from now."""
    seen = jsontext.loads_stored(text)
    probe = seen.get("next_probe_at")
    return {
        "relay": relay or None,
        "state": seen["state"],
        "since": seen["since"],
        "for_s": round(max(0.0, now - seen["since"]), 1),
        "reason": seen.get("reason"),
        "last_error": seen.get("last_error"),
        "next_probe_in_s": None if probe is None else round(max(0.0, probe - now), 1),
        "recorded_s_ago": round(max(0.0, now - seen["at"]), 1),
    }


def _describe(seen: dict[str, Any]) -> str:
    """ "down for 45s: connection refused; next probe in 8.0s" and the like."""
    state = seen["state"] + (f" ({seen['reason']})" if seen["reason"] else "")
    text = f"{state} for {_duration(seen['for_s'])}"
    if seen["last_error"] and seen["state"] != "up":
        text += f": {seen['last_error']}"
    if seen["next_probe_in_s"] is not None:
        text += f"; next probe in {seen['next_probe_in_s']:.1f}s"
    if seen["state"] != "up" and seen["recorded_s_ago"] > STALE_S:
        text += f" (as recorded {_duration(seen['recorded_s_ago'])} ago: is the relay running?)"
    return text


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes}m" if hours else f"{minutes}m {secs}s" if minutes else f"{secs}s"


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    parts: list[str] = []
    for n in numbers:
        if parts and n == int(parts[-1].split("-")[-1]) + 1:
            parts[-1] = f"{parts[-1].split('-')[0]}-{n}"
        else:
            parts.append(str(n))
    return ",".join(parts)
