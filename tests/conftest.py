"""Fixtures: a fake Infinario API on 127.0.0.1, and config factories."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from segment_relay.testing import FakeInfinario
from support import SUMMARIES, Server, running_fake


@pytest.fixture
async def fake_api() -> AsyncIterator[tuple[FakeInfinario, Server]]:
    async with running_fake() as pair:
        yield pair


@pytest.fixture
def queue_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "queue.db"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the summaries tests recorded (the chaos runs' counts), passing or not."""
    for line in SUMMARIES:
        terminalreporter.write_line(line)
