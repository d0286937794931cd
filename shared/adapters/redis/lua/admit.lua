-- ADMIT: GCRA (a token bucket without a refill timer): each request moves the tenant's theoretical arrival time
-- on by 1/rate; a request is admitted while that stays within `burst` requests of now. Redis's clock, so every
-- API process agrees. Answers {admitted 1/0, burst, remaining, ms until a request is admitted again (refused) or
-- until the burst is whole again (admitted), the rate in thousandths per second}.
local rate, limits, requests = KEYS[1], KEYS[2], KEYS[3]
local default_rps, default_burst, counter_ttl = ARGV[1], ARGV[2], ARGV[3]

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lim = redis.call('HMGET', limits, 'rps', 'burst')
local rps = tonumber(lim[1]) or tonumber(default_rps)
local burst = tonumber(lim[2]) or tonumber(default_burst)
if rps <= 0 or burst <= 0 then
  if redis.call('INCR', requests) == 1 then redis.call('EXPIRE', requests, counter_ttl) end
  return {1, 0, 0, 0, 0}
end
local milli = math.floor(rps * 1000)
local step = 1000 / rps
local span = step * burst
local tat = tonumber(redis.call('GET', rate)) or now
if tat < now then tat = now end
local next_tat = tat + step
if next_tat - now > span then
  return {0, burst, 0, math.ceil(next_tat - now - span), milli}
end
redis.call('SET', rate, next_tat, 'PX', math.ceil(next_tat - now) + 1)
if redis.call('INCR', requests) == 1 then redis.call('EXPIRE', requests, counter_ttl) end
return {1, burst, math.floor((span - (next_tat - now)) / step), math.ceil(next_tat - now), milli}
