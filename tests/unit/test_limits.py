"""Infinario's project-wide limits of 255 event types and 255 customer property keys."""

from __future__ import annotations

from segment_relay.limits import ProjectLimits
from segment_relay.mapping import Command


def event(name: str) -> Command:
    return Command("m", {"registered": "u"}, {}, 0.0, name)


def update(*keys: str) -> Command:
    return Command("m", {"registered": "u"}, dict.fromkeys(keys, 1), 0.0)


def test_new_event_types_are_admitted_up_to_the_limit_and_known_ones_always() -> None:
    limits = ProjectLimits(limit=2)
    assert limits.admit(event("a")) == (None, [("event_type", "a")])
    assert limits.admit(event("b")) == (None, [("event_type", "b")])
    reason, names = limits.admit(event("c"))
    assert reason is not None
    assert "2 event types" in reason
    assert "'c'" in reason
    assert names == []
    assert limits.admit(event("a")) == (None, [])


def test_customer_property_keys_count_across_updates() -> None:
    limits = ProjectLimits.from_names([("customer_property", "plan")], limit=3)
    assert limits.admit(update("plan", "email")) == (None, [("customer_property", "email")])
    reason, _ = limits.admit(update("plan", "age", "city"))
    assert reason is not None
    assert "adds 2 more: age, city" in reason
    # A refused update reserves nothing: a smaller one still fits.
    assert limits.admit(update("age")) == (None, [("customer_property", "age")])
