"""JSON as Segment reads it (jsontext.py): lone surrogates mended, integers exact, and
everything else exactly as orjson reads and writes it."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from segment_relay import jsontext
from segment_relay.sessions import SessionEvent, SessionState

# Strings with lone surrogates, valid pairs and anything else; integers far past 64 bits.
texts = st.text(st.characters(codec=None, exclude_categories=()), max_size=12)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | texts
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=20,
)


def mended(value: Any) -> Any:
    """`value` as the relay reads it: each lone surrogate and NUL as U+FFFD."""
    if isinstance(value, str):
        return "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF or c == "\x00" else c for c in value)
    if isinstance(value, list):
        return [mended(v) for v in value]
    if isinstance(value, dict):
        return {mended(k): mended(v) for k, v in value.items()}
    return value


@given(values)
def test_any_text_a_client_writes_reads_back_mended_and_exact(value: Any) -> None:
    for text in (json.dumps(value), json.dumps(value, ensure_ascii=False)):
        encoded = text.encode("utf-8", "surrogatepass")  # a raw surrogate: invalid UTF-8
        read = jsontext.loads(encoded)
        if text.isascii():
            assert read == mended(value)
        # Written and read again, a value stays the same, digits and all.
        assert jsontext.loads(jsontext.dumps(read)) == read
        assert jsontext.loads_stored(jsontext.dumps(read).decode()) == read


def test_huge_integers_keep_their_digits() -> None:
    text = b'{"order_id": 12345678901234567890123, "balance": -1234567890123456789012345}'
    value = jsontext.loads(text)
    assert value == {"order_id": 12345678901234567890123, "balance": -1234567890123456789012345}
    assert jsontext.dumps(value) == b" " + text.replace(b" ", b"")  # marked: json wrote it
    # At the edges of what orjson reads exactly, and just past them.
    for number in (2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 10**19, -(10**18)):
        assert jsontext.loads(str(number).encode()) == number
        assert jsontext.loads_stored(jsontext.dumps(number).decode()) == number


def test_lone_surrogates_become_replacement_characters_pairs_stay() -> None:
    text = b'{"a": "broken \\ud83d emoji", "\\udc00k": "\\ud83d\\ude00", "b": "\\\\ud83d"}'
    assert jsontext.loads(text) == {
        "a": "broken \ufffd emoji",
        "\ufffdk": "\U0001f600",
        "b": "\\ud83d",  # an escaped backslash, not a surrogate
    }


def test_the_fast_path_reads_what_orjson_reads() -> None:
    text = b'{"a": [1, 2.5, "x", null, true], "n": 18446744073709551615}'
    assert jsontext.loads(text) == orjson.loads(text)
    assert jsontext.dumps({"a": 1}) == orjson.dumps({"a": 1})


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (b'{"a": NaN}', "NaN is not JSON"),
        (b"[1e400]", "infinity"),
        (b"[" * 100_000, "nested too deeply"),
        (b'{"a": 1', "Expecting"),
        (b'{"a": 12345678901234567890123', "Expecting"),
        (b"1" * 5000, "digits"),
    ],
)
def test_what_no_reading_accepts_is_refused_with_the_reason(text: bytes, problem: str) -> None:
    with pytest.raises(jsontext.InvalidJSONError, match=problem):
        jsontext.loads(text)


def test_a_session_event_keeps_the_digits_of_its_context() -> None:
    context = jsontext.dumps({"ip": "203.0.113.7", "account": 12345678901234567890123})
    state = SessionState("u", "s", 1000.0, 1010.0, 1070.0, {"userId": "u"}, context.decode())
    for kind in ("session_start", "session_end"):
        body = jsontext.loads_stored(SessionEvent(kind, state).body())
        assert body["context"]["account"] == 12345678901234567890123


def test_a_value_nested_deeper_than_orjson_writes_is_refused_not_an_error() -> None:
    deep: Any = 12345678901234567890123
    for _ in range(jsontext.MAX_DEPTH):
        deep = [deep]
    assert jsontext.loads_stored(jsontext.dumps(deep).decode()) == deep
    for value in ([deep], _nested("x", 255), _nested("x", 2000)):
        with pytest.raises(jsontext.InvalidJSONError, match="nested deeper than 254 levels"):
            jsontext.dumps(value)


def _nested(leaf: Any, depth: int) -> Any:
    for _ in range(depth):
        leaf = [leaf]
    return leaf
