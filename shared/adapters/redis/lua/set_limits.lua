-- SET_LIMITS: sets some of a tenant's limits and resets others to the deployment's defaults, in one step.
local limits = KEYS[1]
local count = tonumber(ARGV[1])
local FIRST = 2  -- then `count` field/value pairs, then the fields to reset

for i = FIRST, FIRST + 2 * count - 1, 2 do redis.call('HSET', limits, ARGV[i], ARGV[i + 1]) end
for i = FIRST + 2 * count, #ARGV do redis.call('HDEL', limits, ARGV[i]) end
return 1
