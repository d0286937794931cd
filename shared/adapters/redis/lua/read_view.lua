-- READ_VIEW: one field of a session's view. Answers {head version (0: no such session for this tenant), view
-- version, the field (nil once deleted)} or {'stale', live generation}.
local head, view = KEYS[1], KEYS[2]
local tenant, field, gen = ARGV[1], ARGV[2], ARGV[3]

local h = redis.call('HMGET', head, 'v', 't', 'g')
if not h[1] or h[2] ~= tenant then return {0, 0} end
if (h[3] or '0') ~= gen then return {'stale', h[3] or '0'} end
local vw = redis.call('HMGET', view, 'v', 'j', field)
local body = false
if vw[2] then body = vw[3] end
return {tonumber(h[1]), tonumber(vw[1]) or 0, body}
