"""Named SQL: each backend keeps its queries in `queries.sql`, each after "-- name: NAME"."""

from __future__ import annotations

import re
from importlib import resources


def load_queries(package: str) -> dict[str, str]:
    """name -> SQL text of the queries in `package`'s queries.sql."""
    text = resources.files(package).joinpath("queries.sql").read_text("utf-8")
    parts = re.split(r"^-- name: (\w+)\n", text, flags=re.MULTILINE)
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}
