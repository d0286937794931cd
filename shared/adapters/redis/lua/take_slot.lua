-- TAKE_SLOT: takes one of a tenant's slots (a concurrent chat, an open stream) unless the tenant holds its limit;
-- slots of crashed holders expire. Answers {taken 1/0, limit, held}.
local held_slots, limits = KEYS[1], KEYS[2]
local field, default, member, ttl_ms = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', held_slots, '-inf', now)
local limit = tonumber(redis.call('HGET', limits, field)) or tonumber(default)
local held = redis.call('ZCARD', held_slots)
if limit > 0 and held >= limit and not redis.call('ZSCORE', held_slots, member) then return {0, limit, held} end
redis.call('ZADD', held_slots, now + ttl_ms, member)
redis.call('PEXPIRE', held_slots, ttl_ms + 1000)
return {1, limit, redis.call('ZCARD', held_slots)}
