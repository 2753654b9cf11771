"""Shared fixtures: one throwaway redis-server for the whole session, flushed before each test.

Async tests run on pytest-asyncio in strict mode: mark them `@pytest.mark.asyncio` and declare
async fixtures with `@pytest_asyncio.fixture`. Each test gets its own event loop, so a fixture
that opens connections must be function-scoped.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.servers import RedisServer


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server started for this session on a free loopback port, stopped by pid after it."""
    server = RedisServer(tmp_path_factory.mktemp("redis-server"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of the session's Redis server, emptied with FLUSHALL before the test.

    A test that stopped or killed the server leaves it stopped, so it is started again here.
    """
    if not redis_server.running:
        redis_server.start()
    redis_server.flush()
    return redis_server.url
