-- ADMIT: GCRA (a token bucket without a refill timer): each request moves the tenant's theoretical arrival time
-- on by 1/rate; a request is admitted while that stays within `burst` requests of now. Redis's clock, so every
-- API process agrees. A process may ask for up to `want` requests at once (a lease it spends without asking
-- again): as many are granted as fit, at least one or none. It may also give back `unused` requests of an earlier
-- lease, counted on `unused_requests` (the day that lease was counted on): the arrival time moves back by them
-- (never before now) and the day's counter forgets them, before this call's grant is decided.
-- Answers {requests granted (0: refused), burst, remaining, ms until a request is admitted again (refused) or
-- until the burst is whole again (admitted), the rate in thousandths per second}.
local rate, limits, requests, unused_requests = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local default_rps, default_burst, counter_ttl = ARGV[1], ARGV[2], ARGV[3]
local want, unused = tonumber(ARGV[4]), tonumber(ARGV[5])

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lim = redis.call('HMGET', limits, 'rps', 'burst')
local rps = tonumber(lim[1]) or tonumber(default_rps)
local burst = tonumber(lim[2]) or tonumber(default_burst)

if unused > 0 then
  local counted = tonumber(redis.call('GET', unused_requests))
  if counted then redis.call('DECRBY', unused_requests, math.min(unused, counted)) end
end
local function count(n)
  if redis.call('INCRBY', requests, n) == n then redis.call('EXPIRE', requests, counter_ttl) end
end

if rps <= 0 or burst <= 0 then
  if want > 0 then count(want) end
  return {want, 0, 0, 0, 0}
end
local milli = math.floor(rps * 1000)
local step = 1000 / rps
local span = step * burst
local tat = tonumber(redis.call('GET', rate)) or now
if unused > 0 then tat = tat - unused * step end
if tat < now then tat = now end
-- whole requests that fit: tat + n * step - now <= span
local fit = math.floor((span - (tat - now)) / step + 1e-9)
local granted = math.min(want, fit)
if granted < 1 then
  if unused > 0 then redis.call('SET', rate, tat, 'PX', math.ceil(tat - now) + 1) end
  return {0, burst, 0, math.ceil(tat + step - now - span), milli}
end
local next_tat = tat + granted * step
redis.call('SET', rate, next_tat, 'PX', math.ceil(next_tat - now) + 1)
count(granted)
return {granted, burst, math.floor((span - (next_tat - now)) / step), math.ceil(next_tat - now), milli}
