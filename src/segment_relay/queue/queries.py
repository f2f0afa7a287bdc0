"""Named SQL: each backend keeps its queries in `queries.sql`, each after "-- name: NAME"
(and the fragments they share after "-- fragment: NAME")."""

from __future__ import annotations

import re
from importlib import resources

_SECTION = re.compile(r"^-- (name|fragment): (\w+)\n", flags=re.MULTILINE)
_FRAGMENT_USE = re.compile(r"\{(\w+)\}")


def load_queries(package: str) -> dict[str, str]:
    """name -> SQL text of the queries in `package`'s queries.sql, with the fragments they
    name as {NAME} put in (a fragment starts with "-- fragment: NAME")."""
    text = resources.files(package).joinpath("queries.sql").read_text("utf-8")
    parts = _SECTION.split(text)
    queries: dict[str, str] = {}
    fragments: dict[str, str] = {}
    for kind, name, body in zip(parts[1::3], parts[2::3], parts[3::3], strict=True):
        (fragments if kind == "fragment" else queries)[name] = body.strip()
    return {
        name: _FRAGMENT_USE.sub(lambda use: fragments[use.group(1)], sql)
        for name, sql in queries.items()
    }
