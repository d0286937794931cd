-- WEBHOOK_REPLAY: moves a subscription's cursor to just after `after` in every partition, in a new epoch (so a
-- deliverer that read the old cursor cannot move the new one), and records the change. Answers 0 if it is gone.
local sub, changes = KEYS[1], KEYS[2]
local after, change = ARGV[1], ARGV[2]

if redis.call('EXISTS', sub) == 0 then return 0 end
local fields = redis.call('HKEYS', sub)
for _, f in ipairs(fields) do
  if string.sub(f, 1, 1) == 'c' then redis.call('HDEL', sub, f) end
end
redis.call('HSET', sub, 'start', after)
redis.call('HINCRBY', sub, 'epoch', 1)
redis.call('XADD', changes, '*', 'd', change)
return 1
