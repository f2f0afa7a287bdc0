"""JSON read and written as Segment's API does (docs/api.md, "JSON"): orjson is the fast path,
and the standard library's parser takes a text only when orjson cannot read it as Segment
would.

- An integer of any size keeps its digits, from the client to the destination. orjson reads
  one past 64 bits as a float (a 23-digit order id would reach the destination as
  1.2345678901234568e+22) and cannot write one. A request with a run of 20 digits (19 after
  a minus sign) is read by `json`, whose integers are exact, and a value holding such an
  integer is written by `json`.
- A lone UTF-16 surrogate (a `\\ud83d` without its pair: a truncated emoji) becomes U+FFFD, in
  keys and in values, and invalid UTF-8 likewise: Segment's API accepts such a text, where
  orjson refuses all of it (and with it every message of a batch). So does NUL (`\\u0000`),
  which PostgreSQL cannot store in text (an id or event name with it failed every commit or
  outcome it was part of).
- A value nested deeper than orjson writes (MAX_DEPTH) is InvalidJSONError, refused as
  invalid: never a 500, and never a stored message too deep for the forwarder to read.

Two costs are boxed here, each measured with bench/ingest.py:
- Finding a long run of digits in a request: `bytes.translate` maps every digit to "0" and
  `find` looks for nineteen of them, in C: 47 us for a 66 kB batch, where orjson reads it
  in 180 us (a regular expression took 960 us, and cost 100-call batches a third of their
  throughput); the expression looks only at a text with such a run.
- A text this module wrote with `json` (it holds an integer past 64 bits) starts with a
  space, EXACT_MARK, which any JSON reader skips: `loads_stored` reads a stored message with
  orjson unless it starts so, without looking for digits again.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import orjson

EXACT_MARK = " "
# orjson's limit of nesting when it writes; its error for an integer past 64 bits.
MAX_DEPTH = 254
_BIG_INTEGER = "Integer exceeds 64-bit range"
_TOO_DEEP = "Recursion limit reached"
_DIGITS_TO_ZERO = bytes.maketrans(b"123456789", b"000000000")
# 2**64 (20 digits) and -2**63 - 1 (19 after the minus) are the first integers orjson reads
# as floats. (A 19-digit id, as Twitter's, is common in strings: it stays on the fast path.)
_NINETEEN_DIGITS = b"0" * 19
_LONG_NUMBER = re.compile(rb"[0-9]{20}|-[0-9]{19}")
# A lone surrogate, or NUL: text that PostgreSQL cannot store either (kept as U+FFFD).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
_ESCAPED_NUL = b"\\u0000"
REPLACEMENT = "\ufffd"


class InvalidJSONError(ValueError):
    """A text that is not JSON, however leniently read."""


def loads(data: bytes) -> Any:
    """The value of a JSON text from outside (a request); InvalidJSONError if none."""
    if not _has_long_number(data) and _ESCAPED_NUL not in data:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass  # a lone surrogate or invalid UTF-8 perhaps: the lenient reading decides
    return _lenient(data.decode("utf-8", "replace"))


def loads_stored(text: str) -> Any:
    """The value of a JSON text that `dumps` wrote (a stored message)."""
    if text.startswith(EXACT_MARK):
        return json.loads(text)
    return orjson.loads(text)


def dumps(value: Any) -> bytes:
    """`value` as compact JSON in UTF-8; integers past 64 bits written with their digits (and
    the text marked so, see EXACT_MARK)."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError as exc:
        if str(exc) == _TOO_DEEP or (str(exc) == _BIG_INTEGER and _depth(value) > MAX_DEPTH):
            raise InvalidJSONError(f"the value is nested deeper than {MAX_DEPTH} levels") from exc
        if str(exc) != _BIG_INTEGER:
            raise InvalidJSONError(f"the value cannot be written as JSON: {exc}") from exc
    return (EXACT_MARK + _exact_dumps(value, None)).encode()


def dumps_indented(value: Any) -> str:
    """`value` as JSON indented by two spaces (for people to read)."""
    try:
        return orjson.dumps(value, option=orjson.OPT_INDENT_2).decode()
    except orjson.JSONEncodeError:
        return _exact_dumps(value, 2)


def stored(data: bytes) -> str:
    """A JSON text orjson wrote with parts written before embedded as they are (an
    orjson.Fragment), to be stored: marked when such a part holds a long integer."""
    text = data.decode()
    return EXACT_MARK + text if _has_long_number(data) else text


def storable_text(text: str) -> str:
    """`text` with what PostgreSQL cannot store in text (NUL, a lone surrogate) as U+FFFD."""
    return _UNSTORABLE.sub(REPLACEMENT, text)


def _has_long_number(data: bytes) -> bool:
    if data.translate(_DIGITS_TO_ZERO).find(_NINETEEN_DIGITS) < 0:
        return False
    return _LONG_NUMBER.search(data) is not None  # rare: a 19-digit id, or a long number


def _depth(value: Any) -> int:
    """How deeply `value` nests (for the rare value with a big integer), up to MAX_DEPTH + 1."""
    depth, level = 0, [value]
    while level and depth <= MAX_DEPTH:
        depth += 1
        level = [
            v
            for item in level
            if isinstance(item, dict | list)
            for v in (item.values() if isinstance(item, dict) else item)
        ]
    return depth - 1 if not level else depth


def _exact_dumps(value: Any, indent: int | None) -> str:
    separators = (",", ":") if indent is None else (",", ": ")
    return json.dumps(
        value, ensure_ascii=False, allow_nan=False, indent=indent, separators=separators
    )


def _lenient(text: str) -> Any:
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=_finite)
        return _storable(value) if "\\u" in text else value
    except ValueError as exc:
        raise InvalidJSONError(str(exc)) from exc
    except RecursionError as exc:
        raise InvalidJSONError("the text is nested too deeply") from exc


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(digits: str) -> float:
    """A number as orjson reads it: one too large for a double is refused, not infinity."""
    value = float(digits)
    if math.isinf(value):
        raise ValueError(f"the number {digits[:40]} is infinity when read as a double")
    return value


def _storable(value: Any) -> Any:
    """`value` with every lone surrogate and NUL in its strings (keys too) as U+FFFD."""
    if isinstance(value, str):
        return storable_text(value)
    if isinstance(value, list):
        return [_storable(v) for v in value]
    if isinstance(value, dict):
        return {_storable(k): _storable(v) for k, v in value.items()}
    return value
