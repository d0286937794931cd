-- TRIM: free the read model's copies of the messages a `keep_messages` retention hides from the list
-- (`shared.domain.retention.keep`; READ_MESSAGES skips them). Each entry older than the newest `keep` by position
-- becomes its bare log version: a lookup by id, time travel or export reads it from the log, which keeps it.
-- (A removed message among the newest counts by position, so a few shown entries may be freed too: harmless, they
-- are read from the log.) At most `budget` entries per call; the view's `kt` says how far it got.
-- Answers how many entries it freed (or, `dry`, would free), or {'stale', live generation}.
local head, view, msgs = KEYS[1], KEYS[2], KEYS[3]
local tenant, gen, keep, budget, dry = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5] == '1'

local h = redis.call('HMGET', head, 'v', 't', 'g')
if not h[1] or h[2] ~= tenant then return 0 end
if (h[3] or '0') ~= gen then return {'stale', h[3] or '0'} end
local vw = redis.call('HMGET', view, 'j', 'kt')
if not vw[1] then return 0 end  -- deleted: nothing is listed
if string.find(vw[1], '"retention":{', 1, true) then  -- its own retention wins over the tenant's
  local own = cjson.decode(vw[1]).retention
  if type(own) == 'table' then keep = tonumber(own.keep_messages) or 0 end
end
if keep <= 0 then return 0 end
local from = tonumber(vw[2]) or 0
local cut = math.min(redis.call('LLEN', msgs) - keep, from + budget)
if cut <= from then return 0 end
if dry then return cut - from end
local freed = 0
for j, entry in ipairs(redis.call('LRANGE', msgs, from, cut - 1)) do
  local v = string.match(entry, '^(%d+)|')
  if v then
    redis.call('LSET', msgs, from + j - 1, v)
    freed = freed + 1
  end
end
redis.call('HSET', view, 'kt', cut)
return freed
