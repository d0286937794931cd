-- WEBHOOK_LEASE: takes a subscription's delivery lease for `holder`, or renews it if `holder` has it. Answers 1
-- (held now) or 0 (another holder has it). A holder that dies loses it after `ttl_ms`.
local lease = KEYS[1]
local holder, ttl_ms = ARGV[1], ARGV[2]

local current = redis.call('GET', lease)
if current and current ~= holder then return 0 end
redis.call('SET', lease, holder, 'PX', ttl_ms)
return 1
