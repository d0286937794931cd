"""Wake-ups: blocking readers per partition and process, shared by every client that waits.

Thousands of open event streams and waiting chats must not each hold a Redis connection in a blocking read (the
pool runs dry and ordinary requests starve). Every append already adds an entry naming the session to its
partition's feed; every chunk write adds one naming the job to the partition's relay stream, and a job's last
entry one to its ends stream. A process runs, per partition that has waiters, one reader of the feed and the ends
stream (for `appends` and `end` waiters: streams of session events, synchronous chats) and, only while someone
follows a job's chunks, one of the relay stream: a model streaming a long answer then wakes only the processes
that relay its chunks, not every one that waits for an answer. A partition's streams share its hash tag, so one
`XREAD BLOCK` covers a reader's streams in Redis Cluster too. A reader starts with its first waiter and stops a
while after its last; it only sets the waiters' events. A waiter then reads its own log or chunk stream with an
ordinary, short command.

Waiters re-check on their own every few seconds as well, so a wake-up lost to a reader's restart (Redis down)
or to trimming only delays them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from redis.asyncio import Redis

from shared.adapters.redis.keys import Keys, partition_of
from shared.app.ports import WakeOn
from shared.supervise import Supervisor

__all__ = ["Notifier", "Watch"]


class Watch:
    """One waiter's wake-up flag. Clear it, read, and wait only if the read found nothing: a wake-up that
    arrives while reading is kept."""

    __slots__ = ("_event", "on")

    def __init__(self, on: WakeOn) -> None:
        self._event = asyncio.Event()
        self.on = on

    def clear(self) -> None:
        self._event.clear()

    def set(self) -> None:
        self._event.set()

    async def wait(self, timeout_s: float) -> bool:
        """True if woken, False after `timeout_s`."""
        try:
            await asyncio.wait_for(self._event.wait(), max(timeout_s, 0.0))
            return True
        except TimeoutError:
            return False


class _Reader:
    __slots__ = ("partition", "chunks", "cursors", "armed", "waiters", "idle_since")

    def __init__(self, partition: int, chunks: bool) -> None:
        self.partition = partition
        self.chunks = chunks
        """Reads the relay stream (for `chunks` waiters), else the feed and the ends stream."""
        self.cursors: dict[str, str] | None = None
        self.armed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters = 0
        self.idle_since = time.monotonic()


class Notifier:
    def __init__(
        self,
        blocking: Redis,
        keys: Keys,
        supervisor: Supervisor,
        block_ms: int = 5_000,
        poll_s: float | None = None,
        idle_s: float = 30.0,
    ) -> None:
        """`poll_s`: poll at this interval instead of blocking (fakeredis answers a blocking read at once)."""
        self.redis = blocking
        self.keys = keys
        self.supervisor = supervisor
        self.block_ms = block_ms
        self.poll_s = poll_s
        self.idle_s = idle_s
        self._readers: dict[tuple[int, bool], _Reader] = {}
        self._watches: dict[str, set[Watch]] = {}

    @contextlib.asynccontextmanager
    async def watching(self, name: str, session_id: str, on: WakeOn) -> AsyncIterator[Watch]:
        """Wake-ups `on` what `name` names (a session id for `appends`, else a job id), whose data lives in
        `session_id`'s partition. The reader is armed before this yields, so nothing written after a read that
        follows is missed."""
        key = (partition_of(session_id, self.keys.partitions), on == "chunks")
        reader = self._readers.get(key)
        if reader is None:
            reader = self._readers[key] = _Reader(*key)
            self.supervisor.run(f"notify:p{key[0]}{':chunks' if key[1] else ''}", lambda: self._read(reader))
        reader.waiters += 1
        watch = Watch(on)
        self._watches.setdefault(name, set()).add(watch)
        try:
            with contextlib.suppress(TimeoutError):  # Redis is down: the waiter's own re-checks carry it
                await asyncio.wait_for(asyncio.shield(reader.armed), 1.0)
            yield watch
        finally:
            watches = self._watches.get(name)
            if watches is not None:
                watches.discard(watch)
                if not watches:
                    del self._watches[name]
            reader.waiters -= 1
            if reader.waiters == 0:
                reader.idle_since = time.monotonic()

    @property
    def readers(self) -> int:
        return len(self._readers)

    async def _read(self, reader: _Reader) -> None:
        k, p = self.keys, reader.partition
        on = {k.relay(p): "chunks"} if reader.chunks else {k.feed(p): "appends", k.ends(p): "end"}
        if reader.cursors is None:  # first start: from the streams' ends now (later restarts resume)
            reader.cursors = dict.fromkeys(on, "0-0")
            for stream in reader.cursors:
                last = await self.redis.xrevrange(stream, count=1)
                if last:
                    reader.cursors[stream] = last[0][0].decode()
            if not reader.armed.done():
                reader.armed.set_result(None)
        while True:
            if reader.waiters == 0 and time.monotonic() - reader.idle_since >= self.idle_s:
                if self._readers.get((p, reader.chunks)) is reader:
                    del self._readers[(p, reader.chunks)]
                return
            block = None if self.poll_s is not None else self.block_ms
            reply = await self.redis.xread(reader.cursors, count=1000, block=block)
            if not reply and self.poll_s is not None:
                await asyncio.sleep(self.poll_s)
            for stream, entries in reply or ():
                name = stream.decode() if isinstance(stream, bytes) else stream
                reader.cursors[name] = entries[-1][0].decode()
                kind = on[name]
                for _, fields in entries:
                    target = fields.get(b"s") or fields.get(b"j")
                    for watch in self._watches.get(target.decode() if target else "", ()):
                        if watch.on == kind:
                            watch.set()
