"""Lua scripts: each one is an atomic step of the design and touches one slot."""

APPEND = """
-- KEYS: head, log, feed, written, idempotency
-- ARGV: tenant, expected, session id, claim?, request hash, response, ttl, schema, then 4 per event
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
if v ~= expected then return {'conflict', v} end
for i = 9, #ARGV, 4 do
  v = v + 1
  redis.call('XADD', KEYS[2], v .. '-0', 't', ARGV[i], 'i', ARGV[i+1], 'a', ARGV[i+2], 's', ARGV[8], 'd', ARGV[i+3])
end
redis.call('HSET', KEYS[1], 'v', v, 't', tenant)
redis.call('HINCRBY', KEYS[4], tenant, v - expected)
redis.call('XADD', KEYS[3], '*', 's', ARGV[3])
if ARGV[4] == '1' then
  redis.call('HSET', KEYS[5], 'h', ARGV[5], 'r', ARGV[6])
  redis.call('EXPIRE', KEYS[5], ARGV[7])
end
return {'appended', v}
"""

LOAD = """
-- KEYS: head, view, log.  ARGV: known version, max events
-- The view's state is the newest snapshot: start from it when it is ahead of what the caller knows.
local head = redis.call('HMGET', KEYS[1], 'v', 't')
if not head[1] then return {0} end
local known = tonumber(ARGV[1])
local view = redis.call('HMGET', KEYS[2], 'v', 'st')
local base, state = known, false
local vv = tonumber(view[1]) or 0
if vv > known then base, state = vv, view[2] end
local events = {}
if tonumber(head[1]) > base then
  events = redis.call('XRANGE', KEYS[3], (base + 1) .. '-0', '+', 'COUNT', ARGV[2])
end
return {tonumber(head[1]), head[2], base, state, events}
"""

APPLY = """
-- KEYS: view, messages, index, projected, session's chat list, then one chat job hash per job update
-- ARGV: tenant, from, to, state, session JSON ('' once deleted), tools JSON ('' unchanged), index op, session id,
--       retention seconds, message count n, n message versions, then per job: job id, field count m, m field/value pairs
local current = tonumber(redis.call('HGET', KEYS[1], 'v')) or 0
if current ~= tonumber(ARGV[2]) then return 0 end
local n = tonumber(ARGV[10])
if ARGV[5] == '' then
  redis.call('HDEL', KEYS[1], 'j', 'tools')
  redis.call('DEL', KEYS[2])
else
  redis.call('HSET', KEYS[1], 'j', ARGV[5])
  if ARGV[6] ~= '' then redis.call('HSET', KEYS[1], 'tools', ARGV[6]) end
  if n > 0 then redis.call('RPUSH', KEYS[2], unpack(ARGV, 11, 10 + n)) end
end
redis.call('HSET', KEYS[1], 'v', ARGV[3], 't', ARGV[1], 'st', ARGV[4])
if ARGV[7] == 'add' then
  redis.call('ZADD', KEYS[3], 0, ARGV[8])
elseif ARGV[7] == 'remove' then
  redis.call('ZREM', KEYS[3], ARGV[8])
end
redis.call('HINCRBY', KEYS[4], ARGV[1], tonumber(ARGV[3]) - tonumber(ARGV[2]))
local i, k = 11 + n, 6
while i <= #ARGV do
  local job, m = ARGV[i], tonumber(ARGV[i + 1])
  redis.call('ZADD', KEYS[5], 0, job)
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
return 1
"""

READ_MESSAGES = """
-- KEYS: head, view, messages, log.  ARGV: tenant, start, stop
-- Answers {head version, view version, live?, then schema and data of each message on the page}.
local head = redis.call('HMGET', KEYS[1], 'v', 't')
if not head[1] or head[2] ~= ARGV[1] then return {0, 0, 0} end
local view = redis.call('HMGET', KEYS[2], 'v', 'j')
local out = {tonumber(head[1]), tonumber(view[1]) or 0, view[2] and 1 or 0}
if view[2] then
  for _, v in ipairs(redis.call('LRANGE', KEYS[3], ARGV[2], ARGV[3])) do
    local e = redis.call('XRANGE', KEYS[4], v .. '-0', v .. '-0')
    local f = e[1][2]
    local s, d
    for k = 1, #f, 2 do
      if f[k] == 's' then s = f[k + 1] elseif f[k] == 'd' then d = f[k + 1] end
    end
    out[#out + 1] = s
    out[#out + 1] = d
  end
end
return out
"""

MARK_RUNNING = """
-- KEYS: chat job hash.  ARGV: started_at.  Marks a job running unless it already ended; answers the attempt.
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'succeeded' or status == 'failed' or status == 'cancelled' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[1])
return redis.call('HINCRBY', KEYS[1], 'attempts', 1)
"""

READ_CHAT = """
-- KEYS: head, view, chat job hash, the session's chat list.  ARGV: tenant, job id
-- Answers {head version, view version, live?, then the job hash's field/value pairs (none once the session is
-- deleted, none for a job of another session: a job is found only through its own session)}.
local head = redis.call('HMGET', KEYS[1], 'v', 't')
if not head[1] or head[2] ~= ARGV[1] then return {0, 0, 0} end
local view = redis.call('HMGET', KEYS[2], 'v', 'j')
local out = {tonumber(head[1]), tonumber(view[1]) or 0, view[2] and 1 or 0}
if view[2] and redis.call('ZSCORE', KEYS[4], ARGV[2]) then
  for _, x in ipairs(redis.call('HGETALL', KEYS[3])) do out[#out + 1] = x end
end
return out
"""
