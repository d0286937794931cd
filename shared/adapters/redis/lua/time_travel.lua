-- TIME_TRAVEL: what it takes to fold a session's state at version n: {head version} when n is past the head,
-- else {head, base, state at base (nil: fold from nothing), the log entries base+1..n, a copy-on-write fork's
-- parent and last inherited version (else nil)}: at most one snapshot interval of events, whatever n is. {0}: no such session for this tenant; {'stale', live generation}.
local head, snaps, log = KEYS[1], KEYS[2], KEYS[3]
local tenant, n, every, gen = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]

local h = redis.call('HMGET', head, 'v', 't', 'g', 'fp', 'fv')
if not h[1] or h[2] ~= tenant then return {0} end
if (h[3] or '0') ~= gen then return {'stale', h[3] or '0'} end
if n > tonumber(h[1]) then return {tonumber(h[1])} end
local base, state = n - n % every, false
while base > 0 do
  state = redis.call('HGET', snaps, base)
  if state then break end
  base = base - every
end
if not state then base = 0 end
local events = {}
if n > base then events = redis.call('XRANGE', log, (base + 1) .. '-0', n .. '-0') end
return {tonumber(h[1]), base, state, events, h[4], h[5]}
