-- WEBHOOK_RECORD: adds a delivery attempt to the subscription's list, newest first, keeping the newest `keep`;
-- nothing once the subscription is deleted (its list would outlive it).
local sub, deliveries = KEYS[1], KEYS[2]
local delivery, keep = ARGV[1], tonumber(ARGV[2])

if redis.call('EXISTS', sub) == 0 then return 0 end
redis.call('LPUSH', deliveries, delivery)
redis.call('LTRIM', deliveries, 0, keep - 1)
return 1
