-- READ_EVENTS: up to `count` log entries after version `after`. Answers {head version (0: no such session for
-- this tenant), then the entries, then a copy-on-write fork's parent and last inherited version (else nil), so a
-- read of its inherited history goes to the parent's log without asking for its head again}.
local head, log = KEYS[1], KEYS[2]
local tenant, after, count = ARGV[1], tonumber(ARGV[2]), ARGV[3]

local h = redis.call('HMGET', head, 'v', 't', 'fp', 'fv')
if not h[1] or h[2] ~= tenant then return {0} end
local v = tonumber(h[1])
if after >= v then return {v, {}} end
return {v, redis.call('XRANGE', log, (after + 1) .. '-0', '+', 'COUNT', count), h[3], h[4]}
