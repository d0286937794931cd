"""Lua scripts: each one is an atomic step of the design and touches one slot.

Read-model keys live in a generation named by the head's field `g` (see `Keys.view`);
scripts that touch them get the generation-0 names in KEYS and derive the live
generation's names with `at`, inside the same hash tag, so the switch a rebuild
makes is atomic for every reader and writer.
"""

GEN = """
local function at(key, g)
  if g and g ~= '' and tonumber(g) > 0 then return key .. ':g' .. g end
  return key
end
"""

APPEND = """
-- KEYS: head, log, feed, written, idempotency, the tenant's session registry, the session's idempotency set
-- ARGV: tenant, expected, session id, claim?, request hash, response, ttl, schema, then 4 per event (type, id,
--       occurred_at, data)
-- Idempotent per event id: appending the same events again (a client library's retry) answers 'appended'.
local tenant, expected = ARGV[1], tonumber(ARGV[2])
if ARGV[4] == '1' then
  local rec = redis.call('HMGET', KEYS[5], 'h', 'r')
  if rec[1] then
    if rec[1] == ARGV[5] then return {'replayed', rec[2]} end
    return {'mismatch'}
  end
end
local head = redis.call('HMGET', KEYS[1], 'v', 't')
local v = tonumber(head[1]) or 0
if head[2] and head[2] ~= tenant then return {'missing'} end
if v ~= expected then
  -- a retry of an append that did land (its reply was lost): the log holds our first event at expected + 1
  local mine = redis.call('XRANGE', KEYS[2], (expected + 1) .. '-0', (expected + 1) .. '-0')
  if mine[1] then
    local f = mine[1][2]
    for k = 1, #f, 2 do
      if f[k] == 'i' and f[k + 1] == ARGV[10] then return {'appended', expected + (#ARGV - 8) / 4} end
    end
  end
  return {'conflict', v}
end
for i = 9, #ARGV, 4 do
  v = v + 1
  redis.call('XADD', KEYS[2], v .. '-0', 't', ARGV[i], 'i', ARGV[i+1], 'a', ARGV[i+2], 's', ARGV[8], 'd', ARGV[i+3])
end
redis.call('HSET', KEYS[1], 'v', v, 't', tenant)
redis.call('HINCRBY', KEYS[4], tenant, v - expected)
redis.call('XADD', KEYS[3], '*', 's', ARGV[3])
if expected == 0 then redis.call('ZADD', KEYS[6], 0, ARGV[3]) end
if ARGV[4] == '1' then
  redis.call('HSET', KEYS[5], 'h', ARGV[5], 'r', ARGV[6])
  redis.call('EXPIRE', KEYS[5], ARGV[7])
  redis.call('SADD', KEYS[7], KEYS[5])
end
return {'appended', v}
"""

LOAD = GEN + """
-- KEYS: head, view, log.  ARGV: known version, max events, generation ('': the live one)
-- The view's state is the newest snapshot: start from it when it is ahead of what the caller knows.
local head = redis.call('HMGET', KEYS[1], 'v', 't', 'g')
if not head[1] then return {0} end
local known = tonumber(ARGV[1])
local g = ARGV[3] ~= '' and ARGV[3] or head[3]
local view = redis.call('HMGET', at(KEYS[2], g), 'v', 'st')
local base, state = known, false
local vv = tonumber(view[1]) or 0
if vv > known then base, state = vv, view[2] end
local events = {}
if tonumber(head[1]) > base then
  events = redis.call('XRANGE', KEYS[3], (base + 1) .. '-0', '+', 'COUNT', ARGV[2])
end
return {tonumber(head[1]), head[2], base, state, events}
"""

APPLY = GEN + """
-- KEYS: head, view, messages, snapshots, index, projected, session's chat list, message mods, then one chat job
--       hash per job update, then one usage hash per usage delta
-- ARGV: tenant, from, to, state, session JSON ('' once deleted), tools JSON ('' unchanged), index op, session id,
--       retention seconds, generation ('': the live one), message count n, n message versions,
--       mod count d, d (seq, version, kind) triples, snapshot count s, s version/state pairs, job count J, then per
--       job: job id, field count m, m field/value pairs, then usage count U, then per usage delta: chats, prompt
--       tokens, completion tokens, TTL seconds
-- A rebuild names its generation: it then writes only that generation's keys (no index, counters or jobs).
local head = redis.call('HMGET', KEYS[1], 'v', 'g')
if not head[1] then return 0 end  -- purged meanwhile: nothing may bring its content back
local live = ARGV[10] == ''
-- a rebuild writes only a generation newer than the live one (another rebuild may have switched to its own)
if not live and tonumber(ARGV[10]) <= (tonumber(head[2]) or 0) then return 0 end
local g = live and head[2] or ARGV[10]
local view, msgs, snaps = at(KEYS[2], g), at(KEYS[3], g), at(KEYS[4], g)
local current = tonumber(redis.call('HGET', view, 'v')) or 0
if current ~= tonumber(ARGV[2]) then return 0 end
local n = tonumber(ARGV[11])
if n > 0 then redis.call('RPUSH', msgs, unpack(ARGV, 12, 11 + n)) end
local i = 12 + n
local mods = at(KEYS[8], g)
local d = tonumber(ARGV[i])
for j = i + 1, i + 3 * d, 3 do  -- seq -> "version:kind,..." in version order; 'r' counts the removals
  redis.call('HSET', mods, ARGV[j], (redis.call('HGET', mods, ARGV[j]) or '') .. ARGV[j + 1] .. ':' .. ARGV[j + 2] .. ',')
  if ARGV[j + 2] == 'r' then redis.call('HINCRBY', mods, 'r', 1) end
end
i = i + 1 + 3 * d
local s = tonumber(ARGV[i])
for j = i + 1, i + 2 * s, 2 do redis.call('HSET', snaps, ARGV[j], ARGV[j + 1]) end
i = i + 1 + 2 * s
if ARGV[5] == '' then
  redis.call('HDEL', view, 'j', 'tools')
else
  redis.call('HSET', view, 'j', ARGV[5])
  if ARGV[6] ~= '' then redis.call('HSET', view, 'tools', ARGV[6]) end
end
redis.call('HSET', view, 'v', ARGV[3], 't', ARGV[1], 'st', ARGV[4])
if not live then return 1 end
if ARGV[7] == 'add' then
  redis.call('ZADD', KEYS[5], 0, ARGV[8])
elseif ARGV[7] == 'remove' then
  redis.call('ZREM', KEYS[5], ARGV[8])
end
redis.call('HINCRBY', KEYS[6], ARGV[1], tonumber(ARGV[3]) - tonumber(ARGV[2]))
local k = 9
local jobs = tonumber(ARGV[i])
i = i + 1
for _ = 1, jobs do
  local job, m = ARGV[i], tonumber(ARGV[i + 1])
  redis.call('ZADD', KEYS[7], 0, job)
  local status = redis.call('HGET', KEYS[k], 'status')
  for j = i + 2, i + 1 + 2 * m, 2 do
    -- a worker may already have marked the job running: 'queued' never overwrites a status
    if not (ARGV[j] == 'status' and ARGV[j + 1] == 'queued' and status) then
      redis.call('HSET', KEYS[k], ARGV[j], ARGV[j + 1])
    end
  end
  status = redis.call('HGET', KEYS[k], 'status')
  if status == 'succeeded' or status == 'failed' or status == 'cancelled' then
    redis.call('EXPIRE', KEYS[k], ARGV[9])
  end
  i, k = i + 2 + 2 * m, k + 1
end
-- the tenant's usage per day: exactly once, as everything above, because the version check guards it
local usage = tonumber(ARGV[i])
for j = i + 1, i + 4 * usage, 4 do
  redis.call('HINCRBY', KEYS[k], 'chats', ARGV[j])
  redis.call('HINCRBY', KEYS[k], 'prompt_tokens', ARGV[j + 1])
  redis.call('HINCRBY', KEYS[k], 'completion_tokens', ARGV[j + 2])
  redis.call('EXPIRE', KEYS[k], ARGV[j + 3])
  k = k + 1
end
return 1
"""

READ_MESSAGES = GEN + """
-- KEYS: head, view, messages, log, message mods.  ARGV: tenant, offset, limit, count ('': every message; else a past
--       version's message count: the page is read even if the session is deleted now), at ('': now; else the version
--       whose edits and removals count)
-- Answers {head version, view version, live?, then schema and data of each message on the page}: each message as
-- its latest edit at or before `at`, removed ones skipped (`offset` counts the messages shown).
local head = redis.call('HMGET', KEYS[1], 'v', 't', 'g')
if not head[1] or head[2] ~= ARGV[1] then return {0, 0, 0} end
local g = head[3]
local view = redis.call('HMGET', at(KEYS[2], g), 'v', 'j')
local live = view[2] or ARGV[4] ~= ''
local out = {tonumber(head[1]), tonumber(view[1]) or 0, live and 1 or 0}
if not live then return out end
local msgs = at(KEYS[3], g)
local offset, limit = tonumber(ARGV[2]), tonumber(ARGV[3])
local total = ARGV[4] ~= '' and tonumber(ARGV[4]) or redis.call('LLEN', msgs)
local upto = ARGV[5] ~= '' and tonumber(ARGV[5]) or math.huge
local last, removals = {}, false
local mods = redis.call('HGETALL', at(KEYS[5], g))
for i = 1, #mods, 2 do
  if mods[i] ~= 'r' then
    for v, kind in string.gmatch(mods[i + 1], '(%d+):(%a)') do
      if tonumber(v) <= upto then
        last[tonumber(mods[i])] = {kind, v}
        if kind == 'r' then removals = true end
      end
    end
  end
end
local page = {}
if not removals then  -- positions are the messages shown: read the page alone
  local stop = math.min(offset + limit, total) - 1
  if stop >= offset then
    for j, v in ipairs(redis.call('LRANGE', msgs, offset, stop)) do page[#page + 1] = {offset + j, v} end
  end
else  -- skip the removed ones: walk from the start (only sessions with removals pay for this)
  local shown = 0
  for j, v in ipairs(redis.call('LRANGE', msgs, 0, total - 1)) do
    local m = last[j]
    if not (m and m[1] == 'r') then
      shown = shown + 1
      if shown > offset then page[#page + 1] = {j, v} end
      if #page == limit then break end
    end
  end
end
for _, p in ipairs(page) do
  local m = last[p[1]]
  local v = (m and m[1] == 'e') and m[2] or p[2]
  local e = redis.call('XRANGE', KEYS[4], v .. '-0', v .. '-0')
  local f = e[1][2]
  local s, d
  for k = 1, #f, 2 do
    if f[k] == 's' then s = f[k + 1] elseif f[k] == 'd' then d = f[k + 1] end
  end
  out[#out + 1] = s
  out[#out + 1] = d
end
return out
"""

MARK_RUNNING = """
-- KEYS: chat job hash, the session's head, the session's chat list.  ARGV: started_at, job id.
-- Marks a job running unless it already ended or its session was purged; answers the attempt (0: don't run).
-- The job joins the chat list here too (the projector may not have listed it yet), so a purge finds its keys.
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
redis.call('ZADD', KEYS[3], 0, ARGV[2])
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'succeeded' or status == 'failed' or status == 'cancelled' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[1])
return redis.call('HINCRBY', KEYS[1], 'attempts', 1)
"""

READ_CHAT = GEN + """
-- KEYS: head, view, chat job hash, the session's chat list.  ARGV: tenant, job id
-- Answers {head version, view version, live?, then the job hash's field/value pairs (none once the session is
-- deleted, none for a job of another session: a job is found only through its own session)}.
local head = redis.call('HMGET', KEYS[1], 'v', 't', 'g')
if not head[1] or head[2] ~= ARGV[1] then return {0, 0, 0} end
local view = redis.call('HMGET', at(KEYS[2], head[3]), 'v', 'j')
local out = {tonumber(head[1]), tonumber(view[1]) or 0, view[2] and 1 or 0}
if view[2] and redis.call('ZSCORE', KEYS[4], ARGV[2]) then
  for _, x in ipairs(redis.call('HGETALL', KEYS[3])) do out[#out + 1] = x end
end
return out
"""

READ_VIEW = GEN + """
-- KEYS: head, view.  ARGV: tenant, field
-- Answers {head version (0: no such session for this tenant), view version, the field (nil once deleted)}.
local head = redis.call('HMGET', KEYS[1], 'v', 't', 'g')
if not head[1] or head[2] ~= ARGV[1] then return {0, 0} end
local view = redis.call('HMGET', at(KEYS[2], head[3]), 'v', 'j', ARGV[2])
local body = false
if view[2] then body = view[3] end
return {tonumber(head[1]), tonumber(view[1]) or 0, body}
"""

READ_EVENTS = """
-- KEYS: head, log.  ARGV: tenant, after, count
-- Answers {head version (0: no such session for this tenant), then up to count log entries after `after`}.
local head = redis.call('HMGET', KEYS[1], 'v', 't')
if not head[1] or head[2] ~= ARGV[1] then return {0} end
local v, after = tonumber(head[1]), tonumber(ARGV[2])
if after >= v then return {v, {}} end
return {v, redis.call('XRANGE', KEYS[2], (after + 1) .. '-0', '+', 'COUNT', ARGV[3])}
"""

TIME_TRAVEL = GEN + """
-- KEYS: head, snapshots, log.  ARGV: tenant, version n, snapshot interval
-- Answers {head version} when n is past the head, else {head, base, state at base (nil: fold from nothing),
-- the log entries base+1..n}: at most one interval of events, whatever n is.
local head = redis.call('HMGET', KEYS[1], 'v', 't', 'g')
if not head[1] or head[2] ~= ARGV[1] then return {0} end
local n, every = tonumber(ARGV[2]), tonumber(ARGV[3])
if n > tonumber(head[1]) then return {tonumber(head[1])} end
local snaps = at(KEYS[2], head[3])
local base, state = n - n % every, false
while base > 0 do
  state = redis.call('HGET', snaps, base)
  if state then break end
  base = base - every
end
if not state then base = 0 end
local events = {}
if n > base then events = redis.call('XRANGE', KEYS[3], (base + 1) .. '-0', n .. '-0') end
return {tonumber(head[1]), base, state, events}
"""

SWITCH = GEN + """
-- KEYS: head, view, messages, snapshots, the tenant's index, message mods.  ARGV: new generation, session id
-- A rebuild's last step: when the new generation and the live one both hold every event, make the new one
-- live and drop the old one. Answers 1, 0 (not caught up: build on and retry), -1 (the session was purged) or
-- 2 (another rebuild already made a generation at least as new live: nothing left to do).
local head = redis.call('HMGET', KEYS[1], 'v', 'g')
if not head[1] then return -1 end
local old, new = head[2] or '0', ARGV[1]
if tonumber(new) <= tonumber(old) then return 2 end
local fresh = redis.call('HMGET', at(KEYS[2], new), 'v', 'j')
local live = tonumber(redis.call('HGET', at(KEYS[2], old), 'v')) or 0
if tonumber(fresh[1]) ~= tonumber(head[1]) or live ~= tonumber(head[1]) then return 0 end
redis.call('HSET', KEYS[1], 'g', new)
if fresh[2] then redis.call('ZADD', KEYS[5], 0, ARGV[2]) else redis.call('ZREM', KEYS[5], ARGV[2]) end
redis.call('UNLINK', at(KEYS[2], old), at(KEYS[3], old), at(KEYS[4], old), at(KEYS[6], old))
return 1
"""

PURGE = GEN + """
-- KEYS: head, log, view, messages, snapshots, chat list, idempotency set, index, session registry, audit stream,
--       projected, message mods
-- ARGV: tenant, session id, expected version, key prefix of the session's slot, then the tombstone's
--       type, id, occurred_at, data
-- Erases everything the session wrote and records the tombstone, in one step. Answers 1, 0 (no such session
-- for this tenant) or {'conflict', version} (it changed since the caller read it).
local head = redis.call('HMGET', KEYS[1], 'v', 't', 'g')
if not head[1] or head[2] ~= ARGV[1] then return 0 end
if tonumber(head[1]) ~= tonumber(ARGV[3]) then return {'conflict', tonumber(head[1])} end
local doomed = {KEYS[1], KEYS[2], KEYS[6], KEYS[7]}
local g = tonumber(head[3]) or 0
-- events the projector will now never apply count as projected, or the tenant's list would wait for them
local seen = tonumber(redis.call('HGET', at(KEYS[3], g), 'v')) or 0
redis.call('HINCRBY', KEYS[11], ARGV[1], tonumber(head[1]) - seen)
for _, gen in ipairs({g, g + 1}) do  -- the live generation, and one a killed rebuild may have left
  for _, k in ipairs({3, 4, 5, 12}) do doomed[#doomed + 1] = at(KEYS[k], gen) end
end
for _, job in ipairs(redis.call('ZRANGE', KEYS[6], 0, -1)) do
  doomed[#doomed + 1] = ARGV[4] .. 'chat:' .. job
  doomed[#doomed + 1] = ARGV[4] .. 'chunks:' .. job
end
for _, key in ipairs(redis.call('SMEMBERS', KEYS[7])) do doomed[#doomed + 1] = key end
for i = 1, #doomed, 500 do redis.call('UNLINK', unpack(doomed, i, math.min(i + 499, #doomed))) end
redis.call('ZREM', KEYS[8], ARGV[2])
redis.call('ZREM', KEYS[9], ARGV[2])
redis.call('XADD', KEYS[10], '*', 't', ARGV[5], 'i', ARGV[6], 'a', ARGV[7], 'd', ARGV[8])
return 1
"""

CHUNKS = """
-- KEYS: head, a chat job's chunk stream, the partition's relay stream.  ARGV: retention seconds, job id, then
--       kind/data pairs
-- Appends the entries unless the session is gone: a late worker must not bring a purged session's text back.
-- One relay entry per call wakes whoever waits on the job (shared.adapters.redis.notify).
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local id
for i = 3, #ARGV, 2 do id = redis.call('XADD', KEYS[2], '*', 'k', ARGV[i], 'd', ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[2], ARGV[1])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', 10000, '*', 'j', ARGV[2])
return id
"""

ADMIT = """
-- KEYS: the tenant's rate state (its theoretical arrival time, ms), its limits hash, today's request counter
-- ARGV: default requests per second, default burst, the counter's TTL seconds
-- GCRA (a token bucket without a refill timer): each request moves the arrival time on by 1/rate; a request is
-- admitted while that stays within `burst` requests of now. Redis's clock, so every API process agrees.
-- Answers {admitted 1/0, burst, remaining, ms until a request is admitted again (refused) or until the burst is
-- whole again (admitted), the rate in thousandths per second}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lim = redis.call('HMGET', KEYS[2], 'rps', 'burst')
local rps = tonumber(lim[1]) or tonumber(ARGV[1])
local burst = tonumber(lim[2]) or tonumber(ARGV[2])
if rps <= 0 or burst <= 0 then
  if redis.call('INCR', KEYS[3]) == 1 then redis.call('EXPIRE', KEYS[3], ARGV[3]) end
  return {1, 0, 0, 0, 0}
end
local milli = math.floor(rps * 1000)
local step = 1000 / rps
local span = step * burst
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local next_tat = tat + step
if next_tat - now > span then
  return {0, burst, 0, math.ceil(next_tat - now - span), milli}
end
redis.call('SET', KEYS[1], next_tat, 'PX', math.ceil(next_tat - now) + 1)
if redis.call('INCR', KEYS[3]) == 1 then redis.call('EXPIRE', KEYS[3], ARGV[3]) end
return {1, burst, math.floor((span - (next_tat - now)) / step), math.ceil(next_tat - now), milli}
"""

TAKE_SLOT = """
-- KEYS: a set of the tenant's held slots (sorted set: member -> expiry ms), its limits hash
-- ARGV: the limit's field in the hash, its default, member, ttl ms
-- Takes a slot (a concurrent chat, an open stream) unless the tenant holds its limit; slots of crashed holders
-- expire. Answers {taken 1/0, limit, held}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local limit = tonumber(redis.call('HGET', KEYS[2], ARGV[1])) or tonumber(ARGV[2])
local held = redis.call('ZCARD', KEYS[1])
if limit > 0 and held >= limit and not redis.call('ZSCORE', KEYS[1], ARGV[3]) then return {0, limit, held} end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[4]) + 1000)
return {1, limit, redis.call('ZCARD', KEYS[1])}
"""
