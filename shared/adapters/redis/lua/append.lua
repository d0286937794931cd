-- APPEND: a session's events, atomically under an expected version (docs/architecture.md, "A write").
-- The idempotency record (if claimed) is checked first: a replay answers the stored response, another body
-- 'mismatch'. Idempotent per event id: the same events sent again (a retry after a lost reply) answer 'already'
-- at their version, even after later appends, and nothing is stored twice: the log holds our first event at
-- expected + 1. A conflict answers the head and, when they are at most `tail`, the events after the
-- expected version, so the writer can fold them and decide again without loading them.
-- A copy-on-write fork's first append (`parent` not ''): its SessionForked at version 1, then its own events from
-- `last` + 1 (versions 2..last are its parent's, read from the parent's log); refused as 'missing' unless the
-- parent is this tenant's and reaches that far, and no purge of it has begun. The parent's `readers` then names
-- the fork. A purge's delete (`purging` = '1') is refused as {'forked', n} while n forks read the session; once
-- appended it marks the head (`pg`), so no fork is made before the purge erases it.
local head, log, feed, written, idem, registry, idems = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local parent_head, parent_readers = KEYS[8], KEYS[9]  -- a fork's parent's (same slot); else unused
local readers = KEYS[10]  -- the forks that read this session's log
local tenant, expected, session_id = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local claimed, request_hash, response, ttl, schema = ARGV[4] == '1', ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local tail, parent, last, purging = tonumber(ARGV[9]), ARGV[10], tonumber(ARGV[11]), ARGV[12] == '1'
local FIRST = 13  -- then 4 per event: type, id, occurred_at, data
local count = (#ARGV - FIRST + 1) / 4
if parent ~= '' then count = count + last - 1 end
local first_id = ARGV[FIRST + 1]

if claimed then
  local rec = redis.call('HMGET', idem, 'h', 'r')
  if rec[1] then
    if rec[1] == request_hash then return {'replayed', rec[2]} end
    return {'mismatch'}
  end
end
local current = redis.call('HMGET', head, 'v', 't')
local v = tonumber(current[1]) or 0
if current[2] and current[2] ~= tenant then return {'missing'} end
if v ~= expected then
  local mine = redis.call('XRANGE', log, (expected + 1) .. '-0', (expected + 1) .. '-0')
  if mine[1] then
    local f = mine[1][2]
    for k = 1, #f, 2 do
      if f[k] == 'i' and f[k + 1] == first_id then return {'already', expected + count} end
    end
  end
  if v > expected and v - expected <= tail then
    return {'conflict', v, redis.call('XRANGE', log, (expected + 1) .. '-0', '+', 'COUNT', tail)}
  end
  return {'conflict', v}
end
if parent ~= '' then
  local p = redis.call('HMGET', parent_head, 'v', 't', 'pg')
  if p[2] ~= tenant or (tonumber(p[1]) or 0) < last - 1 or p[3] then return {'missing'} end
end
if purging then
  local forks = redis.call('SCARD', readers)
  if forks > 0 then return {'forked', forks} end
end
for i = FIRST, #ARGV, 4 do
  v = v + 1
  redis.call('XADD', log, v .. '-0', 't', ARGV[i], 'i', ARGV[i + 1], 'a', ARGV[i + 2], 's', schema, 'd', ARGV[i + 3])
  if i == FIRST and parent ~= '' then v = last end
end
redis.call('HSET', head, 'v', v, 't', tenant)
if purging then redis.call('HSET', head, 'pg', '1') end
if parent ~= '' then
  redis.call('HSET', head, 'fp', parent, 'fv', last)
  redis.call('SADD', parent_readers, session_id)
end
redis.call('HINCRBY', written, tenant, v - expected)
redis.call('XADD', feed, '*', 's', session_id)
if expected == 0 then redis.call('ZADD', registry, 0, session_id) end
if claimed then
  redis.call('HSET', idem, 'h', request_hash, 'r', response)
  redis.call('EXPIRE', idem, ttl)
  redis.call('SADD', idems, idem)
end
return {'appended', v}
