-- READ_MESSAGES: a page of a session's messages, each as its latest edit at or before `at`, removed ones skipped
-- (`offset` counts the messages shown). Answers {head version, view version, live?, then "version|schema|data" of
-- each message on the page}, {0, 0, 0} for no such session of this tenant, or {'stale', live generation}.
-- `count` ('': every message; else a past version's message count: the page is read even if the session is
-- deleted now); `at` ('': now; else the version whose edits and removals count). `keep`: the tenant's
-- `retention_keep_messages` (0: all): the page then skips what a retention hides now, the list showing only the
-- newest that many messages, or as many as the session's own retention says when it has one
-- (`shared.domain.retention.keep`); '': every message.
local head, view, msgs, log, mods = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local tenant, offset, limit, count, at, gen = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], ARGV[5], ARGV[6]
local keep = ARGV[7] ~= '' and tonumber(ARGV[7]) or nil

-- an event's log fields by version; a copy-on-write fork's inherited event is its parent's one version lower (a
-- fork of a fork: its grandparent's two lower, ...). A fork's id is chosen in its parent's partition, so the
-- parent's keys share this slot, named as keys.py names them; a message's `session_id` is made this session's.
local function logged(version)
  local l, h, v = log, head, tonumber(version)
  local e = redis.call('XRANGE', l, v .. '-0', v .. '-0')[1]
  while not e do
    local parent = redis.call('HGET', h, 'fp')
    if not parent then return error('no log entry at version ' .. version .. ' of ' .. log) end
    local tag = string.match(l, '^(.*}:)log:')
    l, h, v = tag .. 'log:' .. parent, tag .. 'head:' .. parent, v - 1
    e = redis.call('XRANGE', l, v .. '-0', v .. '-0')[1]
  end
  if l ~= log then
    local f, own, found = e[2], string.match(log, ':log:(.*)$'), string.match(l, ':log:(.*)$')
    local needle = '"session_id":"' .. found .. '"'
    for k = 1, #f, 2 do
      if f[k] == 'd' then
        local at = string.find(f[k + 1], needle, 1, true)
        if at then
          f[k + 1] = string.sub(f[k + 1], 1, at - 1) .. '"session_id":"' .. own .. '"' .. string.sub(f[k + 1], at + #needle)
        end
      end
    end
  end
  return e[2]
end

local h = redis.call('HMGET', head, 'v', 't', 'g')
if not h[1] or h[2] ~= tenant then return {0, 0, 0} end
if (h[3] or '0') ~= gen then return {'stale', h[3] or '0'} end
local vw = redis.call('HMGET', view, 'v', 'j')
local live = vw[2] or count ~= ''
local out = {tonumber(h[1]), tonumber(vw[1]) or 0, live and 1 or 0}
if not live then return out end
local total = count ~= '' and tonumber(count) or redis.call('LLEN', msgs)
if keep and count == '' and string.find(vw[2], '"retention":{', 1, true) then  -- its own retention wins over the tenant's
  local own = cjson.decode(vw[2]).retention  -- (the text found may have been metadata's: then the tenant's holds)
  if type(own) == 'table' then keep = tonumber(own.keep_messages) or 0 end
end
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
if keep and count == '' and keep > 0 then  -- the messages a keep_messages retention hides come first: skip them
  local shown = total
  if removals then
    for j, mod in pairs(last) do if mod[1] == 'r' and j <= total then shown = shown - 1 end end
  end
  offset = offset + math.max(0, shown - keep)
end
if not removals then  -- positions are the messages shown: read the page alone
  local stop = math.min(offset + limit, total) - 1
  if stop >= offset then
    for j, v in ipairs(redis.call('LRANGE', msgs, offset, stop)) do page[#page + 1] = {offset + j, v} end
  end
else  -- skip the removed ones: find the page's first position, then read only as far as the page reaches
  local removed, shown, first = {}, 0, nil
  for j, mod in pairs(last) do if mod[1] == 'r' then removed[j] = true end end
  for j = 1, total do
    if not removed[j] then
      shown = shown + 1
      if shown > offset then first = j break end
    end
  end
  if first then
    local span = limit  -- the page, and the removed messages inside it
    for j in pairs(removed) do if j >= first then span = span + 1 end end
    local stop = math.min(first + span - 1, total)
    for idx, v in ipairs(redis.call('LRANGE', msgs, first - 1, stop - 1)) do
      local j = first + idx - 1
      if not removed[j] then
        page[#page + 1] = {j, v}
        if #page == limit then break end
      end
    end
  end
end
for _, p in ipairs(page) do
  local mod = last[p[1]]
  -- an entry is "version|schema|data" (APPLY keeps the message beside its version), answered as it is (the caller
  -- splits it: cheaper there than in Lua), or a bare version (a read model projected before APPLY kept data, or
  -- freed by a retention's trim): then, or for an edited message, the event is read from the log
  local bar = string.find(p[2], '|', 1, true)
  if bar and not (mod and mod[1] == 'e') then
    out[#out + 1] = p[2]
  else
    local version = (mod and mod[1] == 'e') and mod[2] or (bar and string.sub(p[2], 1, bar - 1) or p[2])
    local f = logged(version)
    local s, d
    for k = 1, #f, 2 do
      if f[k] == 's' then s = f[k + 1] elseif f[k] == 'd' then d = f[k + 1] end
    end
    out[#out + 1] = version .. '|' .. s .. '|' .. d
  end
end
return out
