-- LOAD: a session's state and the log after it: the newer of what the caller knows and the view's state (the
-- newest snapshot), plus up to `max_events` events after it.
-- `gen` names the read-model generation of `view`; `live` = '1': it must be the head's live one,
-- else the answer is {'stale', live generation} and the caller asks again with that generation's keys.
local head, view, log = KEYS[1], KEYS[2], KEYS[3]
local known, max_events, gen, live = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4] == '1'

local h = redis.call('HMGET', head, 'v', 't', 'g')
if not h[1] then return {0} end
if live and (h[3] or '0') ~= gen then return {'stale', h[3] or '0'} end
local at = redis.call('HMGET', view, 'v', 'st')
local base, state = known, false
local vv = tonumber(at[1]) or 0
if vv > known then base, state = vv, at[2] end
local events = {}
if tonumber(h[1]) > base then
  events = redis.call('XRANGE', log, (base + 1) .. '-0', '+', 'COUNT', max_events)
end
return {tonumber(h[1]), h[2], base, state, events}
