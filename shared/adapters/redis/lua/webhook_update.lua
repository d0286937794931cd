-- WEBHOOK_UPDATE: replaces a subscription's fields (`j`), keeping its cursor, and records the change, iff it is
-- still as the caller read it (its JSON's `updated_at` is `was`: each change moves it on), so two changes made
-- at once (a secret rotation, a pause) cannot undo each other. Answers 1, 0 (deleted meanwhile) or -1 (changed
-- meanwhile: read it again).
local sub, changes = KEYS[1], KEYS[2]
local json, change, was = ARGV[1], ARGV[2], ARGV[3]

local current = redis.call('HGET', sub, 'j')
if not current then return 0 end
if not string.find(current, '"updated_at":"' .. was .. '"', 1, true) then return -1 end
redis.call('HSET', sub, 'j', json)
redis.call('XADD', changes, '*', 'd', change)
return 1
