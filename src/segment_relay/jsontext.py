"""JSON read and written as Segment's API does (docs/api.md, "JSON"): orjson is the fast path,
and the standard library's parser takes a text only when orjson cannot read it as Segment
would.

- An integer of any size keeps its digits, from the client to the destination. orjson reads
  one past 64 bits as a float (a 23-digit order id would reach the destination as
  1.2345678901234568e+22) and cannot write one. A text with a run of 20 digits (or 19 after
  a minus sign) is read by `json`, whose integers are exact, and a value holding such an
  integer is written by `json`.
- A lone UTF-16 surrogate (a `\\ud83d` without its pair: a truncated emoji) becomes U+FFFD, in
  keys and in values, and invalid UTF-8 likewise: Segment's API accepts such a text, where
  orjson refuses all of it (and with it every message of a batch).

Everything else goes through orjson: `bench/ingest.py` shows the fast path unchanged.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import orjson

# Digits that orjson may not read exactly: past 2**64 - 1, or past -2**63.
_LONG_NUMBER = re.compile(rb"[0-9]{20}|-[0-9]{19}")
_LONG_NUMBER_TEXT = re.compile(r"[0-9]{20}|-[0-9]{19}")
_SURROGATE = re.compile("[\ud800-\udfff]")
REPLACEMENT = "\ufffd"


class InvalidJSONError(ValueError):
    """A text that is not JSON, however leniently read."""


def loads(data: bytes | str) -> Any:
    """The value of a JSON text (see the module's docstring); InvalidJSONError if none."""
    long_number = (
        _LONG_NUMBER.search(data) if isinstance(data, bytes) else _LONG_NUMBER_TEXT.search(data)
    )
    if long_number is None:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass  # a lone surrogate or invalid UTF-8 perhaps: the lenient reading decides
    return _lenient(data)


def dumps(value: Any) -> bytes:
    """`value` as compact JSON in UTF-8; integers past 64 bits written with their digits."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        return _exact_dumps(value, None)


def dumps_indented(value: Any) -> str:
    """`value` as JSON indented by two spaces (for people to read)."""
    try:
        return orjson.dumps(value, option=orjson.OPT_INDENT_2).decode()
    except orjson.JSONEncodeError:
        return _exact_dumps(value, 2).decode()


def _exact_dumps(value: Any, indent: int | None) -> bytes:
    separators = (",", ":") if indent is None else (",", ": ")
    text = json.dumps(
        value, ensure_ascii=False, allow_nan=False, indent=indent, separators=separators
    )
    return text.encode()


def _lenient(data: bytes | str) -> Any:
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=_finite)
        return _without_surrogates(value) if "\\u" in text else value
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


def _without_surrogates(value: Any) -> Any:
    """`value` with every lone surrogate in its strings (keys too) replaced by U+FFFD."""
    if isinstance(value, str):
        return _SURROGATE.sub(REPLACEMENT, value)
    if isinstance(value, list):
        return [_without_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {_without_surrogates(k): _without_surrogates(v) for k, v in value.items()}
    return value
