"""The PostgreSQL queue backend: several relays on one database (docs/queue.md)."""

from .store import PostgresQueue

__all__ = ["PostgresQueue"]
