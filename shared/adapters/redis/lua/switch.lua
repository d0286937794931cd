-- SWITCH: a rebuild's last step. When the new generation and the live one both hold every event, make the new
-- one live and drop the old one. Answers 1, 0 (not caught up: build on and retry), -1 (the session was purged),
-- 2 (another rebuild already made a generation at least as new live: nothing left to do) or {'stale', live
-- generation} (the old generation's keys given are not the live one's).
local head, index = KEYS[1], KEYS[2]
local old_view, old_msgs, old_snaps, old_mods = KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local new_view, search = KEYS[7], KEYS[11]  -- KEYS[8..10]: the new generation's msgs, snaps, mods
local new, session_id, old = ARGV[1], ARGV[2], ARGV[3]

local h = redis.call('HMGET', head, 'v', 'g')
if not h[1] then return -1 end
local live = h[2] or '0'
if tonumber(new) <= tonumber(live) then return 2 end
if live ~= old then return {'stale', live} end
local fresh = redis.call('HMGET', new_view, 'v', 'j')
local at_old = tonumber(redis.call('HGET', old_view, 'v')) or 0
if tonumber(fresh[1]) ~= tonumber(h[1]) or at_old ~= tonumber(h[1]) then return 0 end
redis.call('HSET', head, 'g', new)
if fresh[2] then redis.call('ZADD', index, 0, session_id) else redis.call('ZREM', index, session_id) end
-- the search index: the old generation's members (its view's `ix`) out, the new one's in (all of them, so a
-- rebuild restores an index that lost entries)
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
local old_entries = redis.call('HGET', old_view, 'ix') or ''
local new_entries = redis.call('HGET', new_view, 'ix') or ''
local new_members, keep = members(new_entries), {}
for _, m in ipairs(new_members) do keep[m] = true end
for _, m in ipairs(members(old_entries)) do
  if not keep[m] then redis.call('ZREM', search, m) end
end
for _, m in ipairs(new_members) do redis.call('ZADD', search, 0, m) end
redis.call('UNLINK', old_view, old_msgs, old_snaps, old_mods)
return 1
