"""Numbered schema migrations, shared by the backends (docs/queue.md, "Schema versions").

Each backend keeps its migrations as `migrations/NNNN_what.sql` in its package. At start the
backend takes a lock, reads the version recorded in the database, applies every later
migration in order and records the new version, all in one transaction. A database whose
version is newer than the last migration this relay knows was written by a newer relay:
this one refuses to start rather than misread it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

from ..errors import StoreError

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def load(package: str) -> list[Migration]:
    """The migrations of a backend package, in order; numbered 1, 2, ... without gaps."""
    folder = resources.files(package).joinpath("migrations")
    found = []
    for entry in folder.iterdir():
        if match := _NAME.match(entry.name):
            found.append(Migration(int(match[1]), match[2], entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise RuntimeError(f"{package}: migrations are not numbered 1..n without gaps")
    return found


def pending(migrations: list[Migration], version: int, where: str) -> list[Migration]:
    """The migrations to apply to a database at `version`; StoreError if it is newer."""
    latest = migrations[-1].version if migrations else 0
    if version > latest:
        raise StoreError(
            f"the queue {where} has schema version {version}, newer than this relay knows "
            f"({latest}): it was upgraded by a newer segment-relay; run that version"
        )
    return [m for m in migrations if m.version > version]
