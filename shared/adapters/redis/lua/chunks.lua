-- CHUNKS: appends entries to a chat job's chunk stream unless the session is gone (a late worker must not bring a
-- purged session's text back) or, for an attempt's chunks, a later attempt of the job started (its lease lapsed
-- while it ran: two attempts must not interleave in one stream) or the stream has ended (a delete or a cancel
-- wrote its `error` while the model still streamed: the end stays the stream's last entry, which is what a
-- synchronous chat waits for). One relay entry per call wakes whoever follows the job's chunks
-- (shared.adapters.redis.notify); a call whose last entry ends the stream (`done`, `error`) adds one to the
-- partition's ends stream too, for whoever waits for the answer alone. Answers the last entry's id, nil (purged),
-- or -1 (superseded).
local head, chunks, relay, job, ends = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local retention, job_id, attempt = ARGV[1], ARGV[2], ARGV[3]  -- attempt '': not an attempt's (an end, a cancel)
local FIRST = 4  -- then kind/data pairs

local function ends_stream(kind) return kind == 'done' or kind == 'error' end

if redis.call('EXISTS', head) == 0 then return false end
if attempt ~= '' then
  if tonumber(redis.call('HGET', job, 'attempts') or '0') > tonumber(attempt) then return -1 end
  local last = redis.call('XREVRANGE', chunks, '+', '-', 'COUNT', 1)[1]
  if last and ends_stream(last[2][2]) then return -1 end
end
local id
for i = FIRST, #ARGV, 2 do id = redis.call('XADD', chunks, '*', 'k', ARGV[i], 'd', ARGV[i + 1]) end
redis.call('EXPIRE', chunks, retention)
redis.call('XADD', relay, 'MAXLEN', '~', 10000, '*', 'j', job_id)
if ends_stream(ARGV[#ARGV - 1]) then redis.call('XADD', ends, 'MAXLEN', '~', 10000, '*', 'j', job_id) end
return id
