-- WEBHOOK_DELETE: removes a subscription of the tenant's with its cursor, deliveries and lease, and records the
-- change (0: none such).
local sub, index, all, deliveries, lease, changes = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local sub_id, change = ARGV[1], ARGV[2]

if redis.call('ZREM', index, sub_id) == 0 then return 0 end
redis.call('SREM', all, sub_id)
redis.call('DEL', sub, deliveries, lease)
redis.call('XADD', changes, '*', 'd', change)
return 1
