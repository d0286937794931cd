"""The key layout. One place names every key, so docs/architecture.md can list them.

Sessions hash into a fixed number of partitions. Every key of a partition carries
the hash tag `{pN}`, so each script touches one Redis Cluster slot: a session's
head, log and read models, and its partition's feed, counters and tenant index.
"""

from __future__ import annotations

from shared.domain.ids import partition_of

__all__ = ["PREFIX", "USAGE_TTL_S", "Generations", "Keys", "partition_of"]


PREFIX = "parley"
USAGE_TTL_S = 40 * 86_400
"""Usage counters (per tenant and day) are kept this long."""


class Generations:
    """The read-model generation each session was last seen in (absent: 0, which nearly every session is in).

    Scripts get a generation's keys in KEYS and answer "stale" when the head names another generation (a rebuild
    switched); the caller notes the live one here and calls again. Bounded: the oldest entries go first."""

    def __init__(self, size: int = 100_000) -> None:
        self.size = size
        self._gens: dict[str, int] = {}

    def __getitem__(self, session_id: str) -> int:
        return self._gens.get(session_id, 0)

    def saw(self, session_id: str, gen: int) -> None:
        if gen == 0:
            self._gens.pop(session_id, None)
            return
        self._gens[session_id] = gen
        if len(self._gens) > self.size:
            del self._gens[next(iter(self._gens))]


class Keys:
    def __init__(self, partitions: int) -> None:
        self.partitions = partitions
        self.generations = Generations()

    def tag(self, partition: int) -> str:
        return f"{PREFIX}:{{p{partition}}}"

    def of(self, session_id: str) -> str:
        return self.tag(partition_of(session_id, self.partitions))

    # -- write side (the log): written only by the append script ------------------------
    def head(self, sid: str) -> str:
        """Hash {v: last version, t: tenant, g: live read-model generation; a copy-on-write fork's fp: parent,
        fv: last inherited version; pg: a purge's delete is in}: the expected-version check reads this."""
        return f"{self.of(sid)}:head:{sid}"

    def log(self, sid: str) -> str:
        """Stream: the session's events; entry id `<version>-0`."""
        return f"{self.of(sid)}:log:{sid}"

    def readers(self, sid: str) -> str:
        """Set: the copy-on-write forks that read this session's log (in its partition: a fork's id is chosen
        there). Written by the fork's append; a purge of the session is refused while it has a member."""
        return f"{self.of(sid)}:readers:{sid}"

    def feed(self, partition: int) -> str:
        """Stream: one entry per append naming the session; the projector's consumer group reads it."""
        return f"{self.tag(partition)}:feed"

    def relay(self, partition: int) -> str:
        """Stream (capped): one entry per chunk write naming the job, so a process's relay reader of the partition
        (running while someone follows a job's chunks) wakes whoever follows that job's (`shared.adapters.redis.notify`)."""
        return f"{self.tag(partition)}:relay"

    def ends(self, partition: int) -> str:
        """Stream (capped): one entry per job's last chunk-stream entry naming the job, read with the feed, so a
        synchronous chat's wait is not woken by every chunk of a streaming model (`shared.adapters.redis.notify`)."""
        return f"{self.tag(partition)}:ends"

    def sessions(self, partition: int, tenant: str) -> str:
        """Sorted set of every session id the tenant ever created in this partition, deleted ones too
        (all scores 0): what `rebuild --tenant` and `purge --user-id` walk. Only a purge removes one."""
        return f"{self.tag(partition)}:sessions:{tenant}"

    def written(self, partition: int) -> str:
        """Hash tenant → events appended in this partition (read-your-writes for lists)."""
        return f"{self.tag(partition)}:written"

    def idempotency(self, partition: int, tenant: str, key_hash: str) -> str:
        return f"{self.tag(partition)}:idem:{tenant}:{key_hash}"

    def idempotency_of(self, sid: str) -> str:
        """Set of the idempotency record keys written with the session's appends, so a purge finds them."""
        return f"{self.of(sid)}:idems:{sid}"

    def audit(self, partition: int, tenant: str) -> str:
        """Stream of the tenant's `SessionPurged` tombstones in this partition (no content, kept forever)."""
        return f"{self.tag(partition)}:audit:{tenant}"

    # -- read side (projections): written only by the projector and `parley rebuild` ---------
    # The session's read models live in a generation (the head's field `g`, 0 when absent); a
    # rebuild fills generation g+1 beside the live one and switches the head over atomically.
    def view(self, sid: str, gen: int = 0) -> str:
        """Hash {v, t, st: state (msgpack), j: session JSON, tools: tool list JSON}; v and st outlive a delete."""
        return _gen(f"{self.of(sid)}:view:{sid}", gen)

    def messages(self, sid: str, gen: int = 0) -> str:
        """List of the session's `MessageAdded` events in `seq` order, each "version|schema|data" (its log
        version, and the message as added, so a page is one range read; a bare version in read models projected
        before that), kept after a delete: time travel reads it."""
        return _gen(f"{self.of(sid)}:msgs:{sid}", gen)

    def mods(self, sid: str, gen: int = 0) -> str:
        """Hash seq → "version:kind,…" of the session's message edits (e) and removals (r), and `r`: how many
        removals; reads show each message as its latest edit up to the version they read."""
        return _gen(f"{self.of(sid)}:mods:{sid}", gen)

    def snapshots(self, sid: str, gen: int = 0) -> str:
        """Hash version → state (msgpack) every `SNAPSHOT_EVERY` versions: time travel folds from the nearest."""
        return _gen(f"{self.of(sid)}:snaps:{sid}", gen)

    def idle(self, partition: int) -> str:
        """Sorted set "tenant/session id" → the session's last change (ms since the epoch), of the partition's live
        sessions: the retention sweeper reads it oldest first."""
        return f"{self.tag(partition)}:idle"

    def schedules(self, partition: int) -> str:
        """Sorted set "tenant/session id" → the session's next schedule tick (ms since the epoch), of the partition's
        sessions with a running schedule: the scheduler reads what is due."""
        return f"{self.tag(partition)}:schedules"

    def forks(self, partition: int) -> str:
        """Sorted set "parent id/fork id" (all scores 0) of the forks made in this partition: a parent's forks are
        one lexicographic range in each partition."""
        return f"{self.tag(partition)}:forks"

    def index(self, partition: int, tenant: str) -> str:
        """Sorted set of the tenant's live session ids in this partition (all scores 0: UUIDv7 text order)."""
        return f"{self.tag(partition)}:idx:{tenant}"

    def search(self, partition: int, tenant: str) -> str:
        """Sorted set (all scores 0, read by lex range) of the tenant's live sessions in this partition, one member
        per sort order and filter term each, and one with their times (`shared.domain.search`): what `GET /sessions`
        and `/sessions/count` walk. The view's `ix` keeps the session's own members, so APPLY and SWITCH replace
        them."""
        return f"{self.tag(partition)}:search:{tenant}"

    def usage(self, partition: int, tenant: str, day: str) -> str:
        """Hash {chats, prompt_tokens, completion_tokens}: the tenant's usage on `day` (YYYY-MM-DD) from this
        partition's sessions, counted by APPLY (exactly once); kept `USAGE_TTL_S`."""
        return f"{self.tag(partition)}:usage:{tenant}:{day}"

    def chat(self, sid: str, job_id: str) -> str:
        """Hash: a chat job's record (the `ChatJob` resource's fields; nested ones as JSON)."""
        return f"{self.of(sid)}:chat:{job_id}"

    def chats(self, sid: str) -> str:
        """Sorted set of the session's chat job ids (all scores 0: UUIDv7 text order)."""
        return f"{self.of(sid)}:chats:{sid}"

    def chunks(self, sid: str, job_id: str) -> str:
        """Stream: a chat job's answer as the worker produced it, chunk by chunk, then `done`."""
        return f"{self.of(sid)}:chunks:{job_id}"

    def outbox(self, partition: int) -> str:
        """Stream (capped ~`PARLEY_OUTBOX_MAXLEN`): one entry per event of a webhook type, written by the live APPLY
        (exactly once per event): `t` tenant, `s` session, `v` version, `e` type, `i` event id."""
        return f"{self.tag(partition)}:outbox"

    def projected(self, partition: int) -> str:
        """Hash tenant → events projected in this partition."""
        return f"{self.tag(partition)}:projected"

    def rebuild(self, scope: str) -> str:
        """Hash: a running `parley rebuild`'s progress (done sessions, events), so a killed run resumes."""
        return f"{PREFIX}:{{sys}}:rebuild:{scope}"

    # -- webhooks: every subscription's keys share the `{wh}` slot (small, and one script sees them all) ------
    webhooks = f"{PREFIX}:{{wh}}:subs"
    """Set of every subscription id (the deliverers walk it)."""

    def webhook(self, sub_id: str) -> str:
        """Hash: the subscription (`j` its JSON), its cursor (`start`, `c<partition>`) and `epoch` (a replay bumps it)."""
        return f"{PREFIX}:{{wh}}:sub:{sub_id}"

    def webhooks_of(self, tenant: str) -> str:
        """Sorted set of the tenant's subscription ids (scores 0: UUIDv7 order)."""
        return f"{PREFIX}:{{wh}}:tenant:{tenant}"

    def deliveries(self, sub_id: str) -> str:
        """List (capped): the subscription's delivery attempts, newest first, as JSON."""
        return f"{PREFIX}:{{wh}}:deliveries:{sub_id}"

    def webhook_changes(self, tenant: str) -> str:
        """Stream: the tenant's subscription changes (`d`: a `WebhookChange`'s JSON), written with each change."""
        return f"{PREFIX}:{{wh}}:changes:{tenant}"

    def webhook_lease(self, sub_id: str) -> str:
        """String with a TTL: the worker delivering the subscription now."""
        return f"{PREFIX}:{{wh}}:lease:{sub_id}"

    # -- global ----------------------------------------------------------------------
    config = f"{PREFIX}:{{sys}}:config"
    projectors = f"{PREFIX}:{{sys}}:projectors"
    """Sorted set consumer → last heartbeat (ms): /ready checks a projector is alive."""
    api_keys = f"{PREFIX}:{{auth}}:keys"
    """Hash sha256(key) → tenant."""
    api_key_ids = f"{PREFIX}:{{auth}}:key_ids"
    """Hash key id → sha256(key), so a key can be revoked by its id."""


def _gen(key: str, gen: int) -> str:
    """Generation 0 keeps the plain name."""
    return f"{key}:g{gen}" if gen else key
