-- READ_MESSAGES: a page of a session's messages, each as its latest edit at or before `at`, removed ones skipped
-- (`offset` counts the messages shown). Answers {head version, view version, live?, then schema and data of each
-- message on the page}, {0, 0, 0} for no such session of this tenant, or {'stale', live generation}.
-- `count` ('': every message; else a past version's message count: the page is read even if the session is
-- deleted now); `at` ('': now; else the version whose edits and removals count).
local head, view, msgs, log, mods = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local tenant, offset, limit, count, at, gen = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], ARGV[5], ARGV[6]

local h = redis.call('HMGET', head, 'v', 't', 'g')
if not h[1] or h[2] ~= tenant then return {0, 0, 0} end
if (h[3] or '0') ~= gen then return {'stale', h[3] or '0'} end
local vw = redis.call('HMGET', view, 'v', 'j')
local live = vw[2] or count ~= ''
local out = {tonumber(h[1]), tonumber(vw[1]) or 0, live and 1 or 0}
if not live then return out end
local total = count ~= '' and tonumber(count) or redis.call('LLEN', msgs)
local upto = at ~= '' and tonumber(at) or math.huge
local last, removals = {}, false
local m = redis.call('HGETALL', mods)
for i = 1, #m, 2 do
  if m[i] ~= 'r' then
    for v, kind in string.gmatch(m[i + 1], '(%d+):(%a)') do
      if tonumber(v) <= upto then
        last[tonumber(m[i])] = {kind, v}
        if kind == 'r' then removals = true end
      end
    end
  end
end
local page = {}
if not removals then  -- positions are the messages shown: read the page alone
  local stop = math.min(offset + limit, total) - 1
  if stop >= offset then
    for j, v in ipairs(redis.call('LRANGE', msgs, offset, stop)) do page[#page + 1] = {offset + j, v} end
  end
else  -- skip the removed ones: walk from the start (only sessions with removals pay for this)
  local shown = 0
  for j, v in ipairs(redis.call('LRANGE', msgs, 0, total - 1)) do
    local mod = last[j]
    if not (mod and mod[1] == 'r') then
      shown = shown + 1
      if shown > offset then page[#page + 1] = {j, v} end
      if #page == limit then break end
    end
  end
end
for _, p in ipairs(page) do
  local mod = last[p[1]]
  local v = (mod and mod[1] == 'e') and mod[2] or p[2]
  local e = redis.call('XRANGE', log, v .. '-0', v .. '-0')
  local f = e[1][2]
  local s, d
  for k = 1, #f, 2 do
    if f[k] == 's' then s = f[k + 1] elseif f[k] == 'd' then d = f[k + 1] end
  end
  out[#out + 1] = s
  out[#out + 1] = d
end
return out
