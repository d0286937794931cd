"""A write to a connection whose transport Redis closed meanwhile is a store out of reach, whatever the event loop
raises: uvloop raises RuntimeError ("the handler is closed") where asyncio's own loop raises an OSError."""

from __future__ import annotations

import asyncio

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from shared.adapters.redis.connect import ParleyConnection


class ClosedWriter:
    def writelines(self, data: object) -> None:
        raise RuntimeError("unable to perform operation on <TCPTransport closed=True>; the handler is closed")

    async def drain(self) -> None: ...

    def close(self) -> None: ...

    async def wait_closed(self) -> None: ...


def test_a_write_to_a_closed_transport_is_a_connection_error() -> None:
    async def main() -> None:
        connection = ParleyConnection(socket_timeout=1.0)
        connection._reader, connection._writer = object(), ClosedWriter()  # type: ignore[assignment]
        with pytest.raises(RedisConnectionError):
            await connection.send_packed_command([b"*1\r\n$4\r\nPING\r\n"], check_health=False)
        assert not connection.is_connected  # dropped: the next command connects again

    asyncio.run(main())
