"""Segment message validation, enrichment and clock-skew correction."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from segment_relay.segment import (
    BatchEnvelope,
    InvalidMessageError,
    corrected_timestamp,
    enrich,
    format_time,
    new_message_id,
    parse_time,
    user_key,
    validate,
)

T0 = 1709294400.0  # 2024-03-01T12:00:00Z


def test_times_parse_and_format_as_segment_writes_them() -> None:
    assert parse_time("2024-03-01T12:00:00.000Z") == T0
    assert parse_time("2024-03-01T13:00:00+01:00") == T0
    assert parse_time("2024-03-01T12:00:00") == T0
    assert parse_time("nope") is None
    assert format_time(T0 + 1.25) == "2024-03-01T12:00:01.250Z"


@pytest.mark.parametrize(
    ("message", "kind", "reason"),
    [
        ([], "track", "must be a JSON object"),
        ({"event": "x"}, "track", "userId or anonymousId is required"),
        ({"userId": "", "event": "x"}, "track", "userId or anonymousId is required"),
        ({"userId": True, "event": "x"}, "track", "userId or anonymousId is required"),
        ({"userId": "u", "anonymousId": {}, "event": "x"}, "track", "anonymousId must be"),
        ({"userId": "u"}, "track", "event is required"),
        ({"userId": "u", "event": "  "}, "track", "event is required"),
        ({"userId": "u", "event": 5}, "track", "event is required"),
        ({"userId": "u", "previousId": ""}, "alias", "alias requires userId and previousId"),
        ({"anonymousId": "a", "previousId": "p"}, "alias", "alias requires userId and previousId"),
        ({"userId": "u"}, "group", "groupId is required"),
        ({"userId": "u", "traits": [1]}, "identify", "traits must be an object"),
        ({"userId": "u", "properties": "x", "event": "e"}, "track", "properties must be an object"),
        (
            {"userId": "u", "timestamp": "yesterday"},
            "identify",
            "timestamp must be an ISO 8601 time",
        ),
        ({"userId": "u", "type": "nope"}, None, "type must be one of"),
    ],
)
def test_invalid_messages_are_refused_with_a_reason(
    message: Any, kind: str | None, reason: str
) -> None:
    with pytest.raises(InvalidMessageError, match=reason):
        validate(message, kind)


def test_the_path_decides_the_type() -> None:
    assert validate({"userId": 1, "type": "identify", "event": "e"}, "track")["type"] == "track"


def test_clock_skew_is_removed_using_sent_at() -> None:
    # The client's clock is 60 s fast: it says it sent at T0+65 an event of T0+60; we got it at T0+5.
    message = {"timestamp": format_time(T0 + 60), "sentAt": format_time(T0 + 65)}
    assert corrected_timestamp(message, T0 + 5, None) == T0
    # Batch-level sentAt serves messages without their own.
    assert corrected_timestamp({"timestamp": format_time(T0 + 60)}, T0 + 5, T0 + 65) == T0
    # Without sentAt the client's timestamp is taken; without either, the receive time.
    assert corrected_timestamp({"timestamp": format_time(T0)}, T0 + 99, None) == T0
    assert corrected_timestamp({}, T0 + 99, T0) == T0 + 99


def test_enrich_adds_ids_times_and_merges_the_batch_context() -> None:
    message = {
        "type": "track",
        "userId": "u",
        "event": "e",
        "writeKey": "secret",
        "timestamp": "2024-03-01T12:00:00Z",
        "context": {"ip": "1.2.3.4"},
    }
    envelope = BatchEnvelope(
        context={"ip": "9.9.9.9", "library": {"name": "x"}}, integrations={"All": True}
    )
    out = enrich(message, T0 + 1, envelope)
    assert "writeKey" not in out
    assert len(out["messageId"]) == 36
    assert out["receivedAt"] == "2024-03-01T12:00:01.000Z"
    assert out["timestamp"] == "2024-03-01T12:00:00.000Z"
    assert out["originalTimestamp"] == "2024-03-01T12:00:00Z"
    assert out["context"] == {"ip": "1.2.3.4", "library": {"name": "x"}}
    assert out["integrations"] == {"All": True}


def test_a_corrected_time_outside_any_sane_range_is_refused() -> None:
    message = {"timestamp": "0001-01-01T00:00:00Z", "sentAt": "9999-01-01T00:00:00Z"}
    with pytest.raises(InvalidMessageError, match="outside the years"):
        enrich(message, T0, BatchEnvelope())


def test_the_user_key_prefers_anonymous_id() -> None:
    assert user_key({"userId": "u", "anonymousId": "a"}) == "a"
    assert user_key({"userId": 7}) == "7"


def test_format_time_matches_datetime_to_the_millisecond() -> None:
    rng = random.Random(7)
    for i in range(20_000):
        seconds = (
            rng.uniform(0, 4_102_444_799)
            if i % 2
            else round(rng.uniform(1.7e9, 1.8e9), rng.randint(0, 6))
        )
        expected = (
            datetime.fromtimestamp(seconds, tz=UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z")
        )
        assert format_time(seconds) == expected, seconds


def test_generated_message_ids_are_distinct_time_ordered_version_7_uuids() -> None:
    ids = {new_message_id(T0) for _ in range(10_000)}
    assert len(ids) == 10_000
    assert all(uuid.UUID(i).version == 7 and uuid.UUID(i).variant == uuid.RFC_4122 for i in ids)
    # The first 48 bits are the receive time in milliseconds (RFC 9562), so they sort by it.
    assert {uuid.UUID(i).int >> 80 for i in ids} == {int(T0 * 1000)}
    later = [new_message_id(T0 + n / 1000) for n in range(1, 100)]
    assert later == sorted(later)
    assert min(later) > max(ids)
