from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from .helpers import RELAYS, Servers, Stack, start_stack


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "relays(*names): run the test once per relay named ('byte', 'frame') through the `relay` "
        "fixture, which `stack` and `servers` use; a test's own marker overrides its module's",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """`@pytest.mark.relays("byte", "frame")` (on a test or a module) runs the test on each relay."""
    marker = metafunc.definition.get_closest_marker("relays")
    if marker is None or "relay" not in metafunc.fixturenames:
        return
    names = list(marker.args)
    unknown = set(names) - set(RELAYS)
    if not names or unknown:
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: relays() takes names from {RELAYS}, got {names}")
    metafunc.parametrize("relay", names, indirect=True)


@pytest.fixture
def relay(request: pytest.FixtureRequest) -> str:
    """The relay the test's stacks use after the switch: "byte" unless a `relays` marker says otherwise."""
    return getattr(request, "param", "byte")


@pytest.fixture
async def stack(relay: str) -> AsyncIterator[Stack]:
    """Gateway plus stub old and new backends; every user goes old unless a test reroutes."""
    s = await start_stack(relay=relay)
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def servers(relay: str) -> AsyncIterator[Servers]:
    """Start stacks, stubs and recording backends through this; all are stopped at teardown."""
    s = Servers(relay)
    try:
        yield s
    finally:
        await s.close()
