-- WEBHOOK_UPDATE: replaces a subscription's fields (`j`), keeping its cursor, and records the change; answers 0 if
-- it was deleted meanwhile.
local sub, changes = KEYS[1], KEYS[2]
local json, change = ARGV[1], ARGV[2]

if redis.call('EXISTS', sub) == 0 then return 0 end
redis.call('HSET', sub, 'j', json)
redis.call('XADD', changes, '*', 'd', change)
return 1
