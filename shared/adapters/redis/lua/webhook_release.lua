-- WEBHOOK_RELEASE: gives a subscription's delivery lease back, only if `holder` still has it.
local lease = KEYS[1]
local holder = ARGV[1]

if redis.call('GET', lease) == holder then redis.call('DEL', lease) end
return 1
