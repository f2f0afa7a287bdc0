"""The SQLite queue backend: one relay process on one VM, the embedded default."""

from .store import SqliteQueue

__all__ = ["SqliteQueue"]
