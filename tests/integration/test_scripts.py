

async def test_append_called_twice_with_the_same_events_answers_already_and_stores_them_once(redis):
    """What a client library's retry after a lost reply sends: the same call again. The script recognises its own
    events (the log holds the first one at expected + 1), answers 'already' at their version, writes nothing."""
    from shared.adapters.codec import event_fields
    from shared.adapters.redis.scripts import APPEND
    from shared.domain.events import SCHEMA_VERSION

    k = Keys(4)
    state = SessionState(id=uuid7())
    p = partition_of(state.id, 4)
    events = decide(state, CreateSession(body=SessionCreate()), stamp())
    state = fold(state, events)
    more = decide(state, AddMessage(body=MessageCreate(role="user", content="once")), stamp())
    more += decide(fold(state, more), AddMessage(body=MessageCreate(role="user", content="twice?")), stamp())
    keys = [k.head(state.id), k.log(state.id), k.feed(p), k.written(p), k.idempotency(p, "acme", "-"), k.sessions(p, "acme"), k.idempotency_of(state.id)]

    def args(expected: int, evs) -> list:
        return ["acme", expected, state.id, "0", "", "", 60, SCHEMA_VERSION, *(x for e in evs for x in event_fields(e))]

    assert await APPEND(redis, keys, args(0, events)) == [b"appended", 1]
    assert await APPEND(redis, keys, args(1, more)) == [b"appended", 3]
    assert await APPEND(redis, keys, args(1, more)) == [b"already", 3]
    assert await APPEND(redis, keys, args(0, events)) == [b"already", 1]
    assert await redis.xlen(k.log(state.id)) == 3
    assert await redis.xlen(k.feed(p)) == 2  # one feed entry per append that wrote
    assert int(await redis.hget(k.written(p), "acme")) == 3
    other = decide(state, AddMessage(body=MessageCreate(role="user", content="other")), stamp())
    assert await APPEND(redis, keys, args(1, other)) == [b"conflict", 3]
