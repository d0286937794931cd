-- WEBHOOK_ADVANCE: moves one partition's cursor of a subscription iff the cursor is still in the epoch the deliverer
-- read (no replay meanwhile, not deleted). Answers 1 or 0.
local sub = KEYS[1]
local epoch, field, position = ARGV[1], ARGV[2], ARGV[3]

if redis.call('HGET', sub, 'epoch') ~= epoch then return 0 end
redis.call('HSET', sub, field, position)
return 1
