-- WEBHOOK_REPLAY: moves a subscription's cursor to just after `after` in every partition, in a new epoch (so a
-- deliverer that read the old cursor cannot move the new one). Answers 0 if it is gone.
local sub = KEYS[1]
local after = ARGV[1]

if redis.call('EXISTS', sub) == 0 then return 0 end
local fields = redis.call('HKEYS', sub)
for _, f in ipairs(fields) do
  if string.sub(f, 1, 1) == 'c' then redis.call('HDEL', sub, f) end
end
redis.call('HSET', sub, 'start', after)
redis.call('HINCRBY', sub, 'epoch', 1)
return 1
