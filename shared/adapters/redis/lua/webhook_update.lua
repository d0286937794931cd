-- WEBHOOK_UPDATE: replaces a subscription's fields (`j`), keeping its cursor; answers 0 if it was deleted meanwhile.
local sub = KEYS[1]
local json = ARGV[1]

if redis.call('EXISTS', sub) == 0 then return 0 end
redis.call('HSET', sub, 'j', json)
return 1
