-- WEBHOOK_CREATE: stores a new webhook subscription with its cursor at the outbox's present (Redis's clock: the
-- subscription gets the events projected from now on), in the tenant's index and the set the deliverers walk, and
-- the change in the tenant's webhook changes.
local sub, index, all, changes = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local sub_id, json, change = ARGV[1], ARGV[2], ARGV[3]

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', sub, 'j', json, 'start', string.format('%d-18446744073709551615', now - 1), 'epoch', 0)
redis.call('ZADD', index, 0, sub_id)
redis.call('SADD', all, sub_id)
redis.call('XADD', changes, '*', 'd', change)
return 1
