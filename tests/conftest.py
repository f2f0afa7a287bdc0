"""Fixtures: a fake Infinario API on 127.0.0.1, and config factories."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from segment_relay.testing import FakeInfinario
from support import SUMMARIES, Backend, Server, postgres_database, running_fake


@pytest.fixture
async def fake_api() -> AsyncIterator[tuple[FakeInfinario, Server]]:
    async with running_fake() as pair:
        yield pair


@pytest.fixture
def queue_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "queue.db"


@pytest.fixture
async def postgres_url() -> AsyncIterator[str]:
    """A new database on the test PostgreSQL server, dropped after the test."""
    async with postgres_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    """The queue under test, for the contract suite: each test runs once per backend."""
    if request.param == "sqlite":
        opener = Backend("sqlite", path=tmp_path / "queue.db")
        try:
            yield opener
        finally:
            await opener.close_all()
        return
    async with postgres_database() as url:
        opener = Backend("postgres", url=url)
        try:
            yield opener
        finally:
            await opener.close_all()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the summaries tests recorded (the chaos runs' counts), passing or not."""
    for line in SUMMARIES:
        terminalreporter.write_line(line)
