"""In-memory adapters of every port (`shared.app.ports`): the fakes the use cases' tests run on, real enough to
carry a whole Parley (`shared.bootstrap.in_memory`).

They share one `Memory`, as the Redis adapters share one Redis, and keep the Redis adapters' promises; the contract
suites under tests/contracts/ run the same tests against both. The model provider's fake is the offline model
(`shared.adapters.llm.offline.OfflineModel`): deterministic, no network.
"""

from shared.adapters.memory.admin import MemoryLogAdmin
from shared.adapters.memory.api_keys import MemoryApiKeys
from shared.adapters.memory.chats import MemoryChatJobs, MemoryChunkWriter
from shared.adapters.memory.feed import MemoryFeed
from shared.adapters.memory.limits import MemoryLimits
from shared.adapters.memory.log import MemoryEventLog
from shared.adapters.memory.queue import MemoryChatQueue, MemoryChatWorker
from shared.adapters.memory.store import Memory
from shared.adapters.memory.views import MemoryReadModels
from shared.adapters.memory.wakeups import MemoryWakeups, MemoryWatch

__all__ = [
    "Memory",
    "MemoryApiKeys",
    "MemoryChatJobs",
    "MemoryChatQueue",
    "MemoryChatWorker",
    "MemoryChunkWriter",
    "MemoryEventLog",
    "MemoryFeed",
    "MemoryLimits",
    "MemoryLogAdmin",
    "MemoryReadModels",
    "MemoryWakeups",
    "MemoryWatch",
]
