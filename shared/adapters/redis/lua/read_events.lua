-- READ_EVENTS: up to `count` log entries after version `after`. Answers {head version (0: no such session for
-- this tenant), the entries as stored, a copy-on-write fork's parent and last inherited version (else nil)}, then,
-- when the range reaches a fork's inherited versions, per parent it reads them from (a fork of a fork: two): {parent,
-- after, count, its head version, its entries after `after` (at most `count`), its own parent and last inherited
-- version}: what `shared.adapters.forks.complete` would ask for, so completing the read needs no other round trip.
-- A fork's id is chosen in its parent's partition, so the parents' keys share this slot, named as keys.py does.
local head, log = KEYS[1], KEYS[2]
local tenant, after, count = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])

local h = redis.call('HMGET', head, 'v', 't', 'fp', 'fv')
if not h[1] or h[2] ~= tenant then return {0} end
local v = tonumber(h[1])
if after >= v then return {v, {}} end
local out = {v, redis.call('XRANGE', log, (after + 1) .. '-0', '+', 'COUNT', count), h[3], h[4]}
local tag = string.match(log, '^(.*}:)log:')
local a, upto, parent, last = after, math.min(v, after + count), h[3], h[4]
while parent do
  local lo, hi = math.max(a + 1, 2), math.min(upto, tonumber(last))
  if hi < lo then break end
  local pa, pn = lo - 2, hi - lo + 1
  local p = redis.call('HMGET', tag .. 'head:' .. parent, 'v', 'fp', 'fv')
  if not p[1] then break end
  local entries = redis.call('XRANGE', tag .. 'log:' .. parent, (pa + 1) .. '-0', '+', 'COUNT', pn)
  for _, x in ipairs({parent, pa, pn, p[1], entries, p[2], p[3]}) do out[#out + 1] = x end
  a, upto, parent, last = pa, math.min(tonumber(p[1]), pa + pn), p[2], p[3]
end
return out
