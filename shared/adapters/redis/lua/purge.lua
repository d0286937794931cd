-- PURGE: erase everything a session wrote and record its tombstone, in one step. Answers 1, 0 (no such session
-- for this tenant), {'conflict', version} (it changed since the caller read it) or {'stale', live generation}:
-- the caller's view of the session's keys is out of date (its generation, its chat jobs or its idempotency
-- records changed since it read them); it reads them again and retries. {'forked', n}: n copy-on-write forks read
-- the session's log (`readers`), so it is not erased. A fork's purge takes it off its parent's `readers` and its
-- partition's list of forks (`forks`, "<parent>/<fork>").
local head, log, chats, idems, index, registry, audit, projected, search =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local readers, parent_readers = KEYS[10], KEYS[11]  -- the session's, and its parent's if it is a fork (else its own)
local forks = KEYS[12]
local READ_MODELS = 13  -- 8 keys: view, msgs, snaps, mods of the live generation, then of the next one (a killed
                        -- rebuild may have left it)
local FIRST_JOB = 21    -- then a chat job hash and its chunk stream per job, then the idempotency records
local tenant, session_id, expected, gen = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local tomb_type, tomb_id, tomb_at, tomb_data = ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local jobs, records, fork_member = tonumber(ARGV[9]), tonumber(ARGV[10]), ARGV[11]  -- fork_member '': not a fork
local FIRST_JOB_ID = 12  -- then the job ids, in the order of their keys

local h = redis.call('HMGET', head, 'v', 't', 'g', 'fp')
if not h[1] or h[2] ~= tenant then return 0 end
if tonumber(h[1]) ~= expected then return {'conflict', tonumber(h[1])} end
local reading = redis.call('SCARD', readers)
if reading > 0 then return {'forked', reading} end
local live = h[3] or '0'
if live ~= gen then return {'stale', live} end
if redis.call('ZCARD', chats) ~= jobs or redis.call('SCARD', idems) ~= records then return {'stale', live} end
for j = 0, jobs - 1 do
  if not redis.call('ZSCORE', chats, ARGV[FIRST_JOB_ID + j]) then return {'stale', live} end
end
local first_record = FIRST_JOB + 2 * jobs
for k = first_record, first_record + records - 1 do
  if redis.call('SISMEMBER', idems, KEYS[k]) == 0 then return {'stale', live} end
end

-- events the projector will now never apply count as projected, or the tenant's list would wait for them
local seen = tonumber(redis.call('HGET', KEYS[READ_MODELS], 'v')) or 0
redis.call('HINCRBY', projected, tenant, tonumber(h[1]) - seen)
-- the search index members the live view holds ("<length>:<member>" each)
local packed, at = redis.call('HGET', KEYS[READ_MODELS], 'ix') or '', 1
while at <= #packed do
  local colon = string.find(packed, ':', at, true)
  local n = tonumber(string.sub(packed, at, colon - 1))
  redis.call('ZREM', search, string.sub(packed, colon + 1, colon + n))
  at = colon + n + 1
end
local doomed = {head, log, chats, idems}
for k = READ_MODELS, #KEYS do doomed[#doomed + 1] = KEYS[k] end
for i = 1, #doomed, 500 do redis.call('UNLINK', unpack(doomed, i, math.min(i + 499, #doomed))) end
if h[4] then redis.call('SREM', parent_readers, session_id) end
if fork_member ~= '' then redis.call('ZREM', forks, fork_member) end
redis.call('ZREM', index, session_id)
redis.call('ZREM', registry, session_id)
redis.call('XADD', audit, '*', 't', tomb_type, 'i', tomb_id, 'a', tomb_at, 'd', tomb_data)
return 1
