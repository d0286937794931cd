-- APPLY: one projected update of a session's read models, only on top of the version it starts from
-- (docs/architecture.md, "Projection"). Answers 1 (applied), 0 (refused: the view moved, or the session was
-- purged) or {'stale', live generation}: `gen` is not the live generation the caller thought (a rebuild switched).
-- A rebuild (`live` = '0') writes only its own generation's views, and only one newer than the live one.
local head, view, msgs, snaps, index, projected, chats, mods = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local log, idle, ticks, outbox, forks, search = KEYS[9], KEYS[10], KEYS[11], KEYS[12], KEYS[13], KEYS[14]
local FIRST_JOB_KEY = 15  -- then one chat job hash per job update, then one usage hash per usage delta
local tenant, from, to, state, session_json, tools_json = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], ARGV[5], ARGV[6]
local index_op, session_id, retention, gen, live = ARGV[7], ARGV[8], ARGV[9], ARGV[10], ARGV[11] == '1'
local idle_member, changed_ms = ARGV[12], ARGV[13]  -- "tenant/session id", its last change ('': deleted)
local next_tick = ARGV[14]  -- the session's next schedule tick (ms), '' none, 'k' unchanged by this update
local fork_member = ARGV[15]  -- "parent id/session id" when this update starts a fork, else ''
local entries = ARGV[16]  -- the session's search index members, each "<length>:<member>" ('': none)
-- then, from the 17th argument: message count n, n message versions; mod count d, d (seq, version, kind) triples;
-- snapshot count s, s version/state pairs; job count J, per job: job id, field count m, m field/value pairs;
-- usage count U, per usage delta: chats, prompt tokens, completion tokens, TTL seconds;
-- outbox count O, the outbox's cap (approximate MAXLEN), O (version, event type, event id) triples
local i = 17

-- an event's log fields by version; a copy-on-write fork's inherited event is its parent's one version lower (a
-- fork of a fork: its grandparent's two lower, ...). A fork's id is chosen in its parent's partition, so the
-- parent's keys share this slot, named as keys.py names them; a message's `session_id` is made this session's.
local function logged(version)
  local l, h, v = log, head, tonumber(version)
  local e = redis.call('XRANGE', l, v .. '-0', v .. '-0')[1]
  while not e do
    local parent = redis.call('HGET', h, 'fp')
    if not parent then return error('no log entry at version ' .. version .. ' of ' .. log) end
    local tag = string.match(l, '^(.*}:)log:')
    l, h, v = tag .. 'log:' .. parent, tag .. 'head:' .. parent, v - 1
    e = redis.call('XRANGE', l, v .. '-0', v .. '-0')[1]
  end
  if l ~= log then
    local f, own, found = e[2], string.match(log, ':log:(.*)$'), string.match(l, ':log:(.*)$')
    local needle = '"session_id":"' .. found .. '"'
    for k = 1, #f, 2 do
      if f[k] == 'd' then
        local at = string.find(f[k + 1], needle, 1, true)
        if at then
          f[k + 1] = string.sub(f[k + 1], 1, at - 1) .. '"session_id":"' .. own .. '"' .. string.sub(f[k + 1], at + #needle)
        end
      end
    end
  end
  return e[2]
end

local h = redis.call('HMGET', head, 'v', 'g')
if not h[1] then return 0 end  -- purged meanwhile: nothing may bring its content back
local live_gen = h[2] or '0'
if live and live_gen ~= gen then return {'stale', live_gen} end
if not live and tonumber(gen) <= tonumber(live_gen) then return 0 end  -- another rebuild switched to its own
local current = tonumber(redis.call('HGET', view, 'v')) or 0
if current ~= from then return 0 end

local n = tonumber(ARGV[i])
if n > 0 then
  -- each message as "version|schema|data": a page of messages is then one LRANGE, not one XRANGE per message
  local entries = {}
  for j = i + 1, i + n do
    local f = logged(ARGV[j])
    local sch, data
    for k = 1, #f, 2 do
      if f[k] == 's' then sch = f[k + 1] elseif f[k] == 'd' then data = f[k + 1] end
    end
    entries[#entries + 1] = ARGV[j] .. '|' .. sch .. '|' .. data
  end
  for j = 1, #entries, 500 do redis.call('RPUSH', msgs, unpack(entries, j, math.min(j + 499, #entries))) end
end
i = i + 1 + n
local d = tonumber(ARGV[i])
for j = i + 1, i + 3 * d, 3 do  -- seq -> "version:kind,..." in version order; 'r' counts the removals
  redis.call('HSET', mods, ARGV[j], (redis.call('HGET', mods, ARGV[j]) or '') .. ARGV[j + 1] .. ':' .. ARGV[j + 2] .. ',')
  if ARGV[j + 2] == 'r' then redis.call('HINCRBY', mods, 'r', 1) end
end
i = i + 1 + 3 * d
local s = tonumber(ARGV[i])
for j = i + 1, i + 2 * s, 2 do redis.call('HSET', snaps, ARGV[j], ARGV[j + 1]) end
i = i + 1 + 2 * s
if session_json == '' then
  redis.call('HDEL', view, 'j', 'tools')
else
  redis.call('HSET', view, 'j', session_json)
  if tools_json ~= '' then redis.call('HSET', view, 'tools', tools_json) end
end
-- the search index: the view's `ix` holds the members the session has in it, replaced by the new ones
local old_entries = redis.call('HGET', view, 'ix') or ''
if entries == '' then redis.call('HDEL', view, 'ix') else redis.call('HSET', view, 'ix', entries) end
redis.call('HSET', view, 'v', to, 't', tenant, 'st', state)
if not live then return 1 end

local function members(packed)
  local out, at = {}, 1
  while at <= #packed do
    local colon = string.find(packed, ':', at, true)
    local n = tonumber(string.sub(packed, at, colon - 1))
    out[#out + 1] = string.sub(packed, colon + 1, colon + n)
    at = colon + n + 1
  end
  return out
end
if old_entries ~= entries then
  local new_members, keep = members(entries), {}
  for _, m in ipairs(new_members) do keep[m] = true end
  for _, m in ipairs(members(old_entries)) do
    if not keep[m] then redis.call('ZREM', search, m) end
  end
  for _, m in ipairs(new_members) do redis.call('ZADD', search, 0, m) end
end

if index_op == 'add' then
  redis.call('ZADD', index, 0, session_id)
elseif index_op == 'remove' then
  redis.call('ZREM', index, session_id)
end
if changed_ms ~= '' then redis.call('ZADD', idle, changed_ms, idle_member) else redis.call('ZREM', idle, idle_member) end
if fork_member ~= '' then redis.call('ZADD', forks, 0, fork_member) end
if next_tick == '' then redis.call('ZREM', ticks, idle_member) elseif next_tick ~= 'k' then redis.call('ZADD', ticks, next_tick, idle_member) end
redis.call('HINCRBY', projected, tenant, to - from)
local k = FIRST_JOB_KEY
local jobs = tonumber(ARGV[i])
i = i + 1
for _ = 1, jobs do
  local job, m = ARGV[i], tonumber(ARGV[i + 1])
  redis.call('ZADD', chats, 0, job)
  local status = redis.call('HGET', KEYS[k], 'status')
  for j = i + 2, i + 1 + 2 * m, 2 do
    -- a worker may already have marked the job running: 'queued' never overwrites a status
    if not (ARGV[j] == 'status' and ARGV[j + 1] == 'queued' and status) then
      redis.call('HSET', KEYS[k], ARGV[j], ARGV[j + 1])
    end
  end
  status = redis.call('HGET', KEYS[k], 'status')
  if status == 'succeeded' or status == 'failed' or status == 'cancelled' then
    redis.call('EXPIRE', KEYS[k], retention)
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
i = i + 1 + 4 * usage
-- the webhook outbox: each event of a webhook type once, in version order (the version check guards it too)
local o, cap = tonumber(ARGV[i]), ARGV[i + 1]
for j = i + 2, i + 1 + 3 * o, 3 do
  redis.call('XADD', outbox, 'MAXLEN', '~', cap, '*', 't', tenant, 's', session_id, 'v', ARGV[j], 'e', ARGV[j + 1], 'i', ARGV[j + 2])
end
return 1
