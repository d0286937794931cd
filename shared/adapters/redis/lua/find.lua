-- FIND: one partition's share of a session search (docs/architecture.md, "Finding sessions"): walk the most
-- selective term's members in the requested order from the cursor, keep those every other term and the other
-- time's range match, and stop at `limit` matches or after `budget` members walked, whichever comes first.
-- Members: "<term>\0<order>\0<ms, 15 digits>\0<session id>", and "#\0<id>\0<created ms>\0<updated ms>".
-- Answers, mode 'list': {'done' | 'more', where it stopped ("<ms>\0<id>", 'more' only), match, ...}, each match
-- "<ms>\0<id>"; mode 'count': {count, 1 exact | 0 the budget ran out first: a lower bound}.
local search = KEYS[1]
local mode, order, desc = ARGV[1], ARGV[2], ARGV[3] == '1'
local lo, hi, after = ARGV[4], ARGV[5], ARGV[6]  -- the order's time bounds (15 digits, inclusive; '' none), cursor
local limit, budget = tonumber(ARGV[7]), tonumber(ARGV[8])
local other, other_lo, other_hi = ARGV[9], ARGV[10], ARGV[11]  -- the other order, its time bounds
local n = tonumber(ARGV[12])  -- then n terms; every match has them all
local terms = {}
for j = 13, 12 + n do terms[#terms + 1] = ARGV[j] end

local function bounds(t)
  local p = t .. '\0' .. order .. '\0'
  local min = '[' .. p .. lo
  local max = hi ~= '' and ('(' .. p .. hi .. '\1') or ('(' .. t .. '\0' .. order .. '\1')
  return p, min, max
end

-- the driver: the term with the fewest members in range (each count is O(log N))
local driver, p, min, max, size = nil, nil, nil, nil, nil
for _, t in ipairs(terms) do
  local tp, tmin, tmax = bounds(t)
  local c = #terms > 1 and redis.call('ZLEXCOUNT', search, tmin, tmax) or -1
  if size == nil or c < size then driver, p, min, max, size = t, tp, tmin, tmax, c end
end
if size == 0 then
  if mode == 'count' then return {0, 1} end
  return {'done', ''}
end
local others = {}
for _, t in ipairs(terms) do
  if t ~= driver then others[#others + 1] = t .. '\0' .. order .. '\0' end
end
local ranged = other_lo ~= '' or other_hi ~= ''
if mode == 'count' and #others == 0 and not ranged then
  return {redis.call('ZLEXCOUNT', search, min, max), 1}
end
if after ~= '' then
  if desc then max = '(' .. p .. after else min = '(' .. p .. after end
end

local found, count, walked, last = {}, 0, 0, ''
while true do
  local want = budget - walked
  if mode == 'list' then want = math.min(want, math.max(limit - #found, 32)) end
  local page
  if desc then
    page = redis.call('ZREVRANGEBYLEX', search, max, min, 'LIMIT', 0, want)
  else
    page = redis.call('ZRANGEBYLEX', search, min, max, 'LIMIT', 0, want)
  end
  for j, m in ipairs(page) do
    walked = walked + 1
    local tail = string.sub(m, #p + 1)
    last = tail
    local ok = true
    for _, o in ipairs(others) do
      if not redis.call('ZSCORE', search, o .. tail) then
        ok = false
        break
      end
    end
    if ok and ranged then
      local sid = string.sub(tail, 17)
      local rec = redis.call('ZRANGEBYLEX', search, '[#\0' .. sid .. '\0', '(#\0' .. sid .. '\1', 'LIMIT', 0, 1)[1]
      local at = ''
      if not rec then
        ok = false
      elseif other == 'c' then
        at = string.sub(rec, #sid + 4, #sid + 18)
      else
        at = string.sub(rec, #sid + 20, #sid + 34)
      end
      if ok and ((other_lo ~= '' and at < other_lo) or (other_hi ~= '' and at > other_hi)) then ok = false end
    end
    if ok then
      count = count + 1
      if mode == 'list' then
        found[#found + 1] = tail
        if #found == limit then return {'more', tail, unpack(found)} end
      end
    end
    if walked == budget and (j < #page or #page == want) then
      if mode == 'count' then return {count, 0} end
      return {'more', last, unpack(found)}
    end
  end
  if #page < want then
    if mode == 'count' then return {count, 1} end
    return {'done', '', unpack(found)}
  end
  if desc then max = '(' .. page[#page] else min = '(' .. page[#page] end
end
