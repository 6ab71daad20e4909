from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from .helpers import Servers, Stack, start_stack


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    """Gateway plus stub old and new backends; every user goes old unless a test reroutes."""
    s = await start_stack()
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def servers() -> AsyncIterator[Servers]:
    """Start stacks, stubs and recording backends through this; all are stopped at teardown."""
    s = Servers()
    try:
        yield s
    finally:
        await s.close()
