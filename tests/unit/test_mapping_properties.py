"""Properties of the mapping for arbitrary JSON traits and properties (hypothesis)."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from segment_relay.config import DestinationConfig
from segment_relay.errors import MappingError
from segment_relay.infinario import api_style
from segment_relay.mapping import MAX_PROPERTIES, MappingSettings, map_message

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
keys = st.text(alphabet=st.sampled_from("ab.$_xY1 é"), min_size=0, max_size=6)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=6),
    max_leaves=30,
)
objects = st.dictionaries(keys, json_values, max_size=300)
types = st.sampled_from(
    ["identify", "track", "page", "screen", "group", "alias", "session_start", "bogus"]
)
ids = st.none() | st.text(max_size=8) | st.integers() | st.booleans()


def depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return max((depth(v) for v in value), default=0)
    return 0


def nesting_of_objects(value: Any) -> int:
    """How many object levels deep a value goes, counting only objects."""
    return depth(value)


@st.composite
def messages(draw: st.DrawFn) -> dict[str, Any]:
    message: dict[str, Any] = {
        "type": draw(types),
        "messageId": "m1",
        "timestamp": draw(st.sampled_from(["2024-03-01T12:00:00.000Z", "not a time", None])),
        "userId": draw(ids),
        "anonymousId": draw(ids),
        "event": draw(st.none() | st.text(max_size=10)),
        "groupId": draw(ids),
        "previousId": draw(ids),
        "name": draw(st.none() | st.text(max_size=10)),
        "traits": draw(objects),
        "properties": draw(objects),
        "context": draw(
            st.dictionaries(st.sampled_from(["ip", "os", "page", "userAgent", "x"]), json_values)
        ),
    }
    return {k: v for k, v in message.items() if v is not None or draw(st.booleans())}


@settings(max_examples=300, deadline=None)
@given(messages(), st.sampled_from(["infinario", "exponea"]))
def test_mapping_is_total_and_its_output_is_well_formed(message: dict[str, Any], api: str) -> None:
    try:
        command = map_message(message, MappingSettings())
    except MappingError:
        return
    if command is None:
        assert message["type"] == "alias"
        return
    props = command.properties
    assert len(props) <= MAX_PROPERTIES
    assert all("." not in k and "$" not in k for k in props)
    # Only the first level is unpacked: no value is nested deeper than the input's
    # second level (an object inside a first-level object stays an object).
    source_depth = max(
        nesting_of_objects(message.get(n, {})) for n in ("traits", "properties", "context")
    )
    assert all(nesting_of_objects(v) <= max(source_depth - 1, 0) for v in props.values())
    assert command.ids
    assert all(isinstance(v, str) and v for v in command.ids.values())
    rendered = api_style(DestinationConfig(api=api, project_token="T")).render(command)
    assert orjson.loads(orjson.dumps(rendered)) == rendered


def spec_properties(pairs: list[tuple[str, Any]]) -> tuple[dict[str, Any], int]:
    """docs/mapping.md's property pipeline, written as plainly as possible: unpack one
    level, `.`/`$` -> `_`, the first of colliding keys wins, the first MAX_PROPERTIES kept."""
    unpacked: list[tuple[str, Any]] = []
    for key, value in pairs:
        if isinstance(value, dict):
            unpacked.extend((f"{key}_{inner}", v) for inner, v in value.items())
        else:
            unpacked.append((key, value))
    out: dict[str, Any] = {}
    dropped = 0
    for key, value in unpacked:
        clean = key.replace(".", "_").replace("$", "_")
        if clean in out:
            continue
        if len(out) == MAX_PROPERTIES:
            dropped += 1
            continue
        out[clean] = value
    return out, dropped


@settings(max_examples=300, deadline=None)
@given(objects, objects, st.sampled_from(["identify", "group", "track", "page"]))
def test_properties_follow_the_pipeline_in_document_order(
    traits: dict[str, Any], properties: dict[str, Any], kind: str
) -> None:
    context = {"ip": "203.0.113.7", "page": {"url": "https://x/", "path": "/"}, "userAgent": "ua"}
    message = {
        "type": kind,
        "messageId": "m1",
        "timestamp": "2024-03-01T12:00:00.000Z",
        "userId": "u1",
        "event": "Bought",
        "groupId": "g1",
        "name": "Home",
        "traits": traits,
        "properties": properties,
        "context": context,
    }
    command = map_message(message, MappingSettings(context_fields=("userAgent", "page", "ip")))
    assert command is not None
    if kind == "identify":
        pairs = list(traits.items())
    elif kind == "group":
        pairs = [("group_id", "g1"), *((f"group_{k}", v) for k, v in traits.items())]
    else:
        pairs = list(properties.items())
        if kind == "page":
            pairs.append(("page_name", "Home"))
        pairs += [("user_agent", "ua"), ("page", context["page"]), ("ip", "203.0.113.7")]
    assert (command.properties, command.dropped_keys) == spec_properties(pairs)
