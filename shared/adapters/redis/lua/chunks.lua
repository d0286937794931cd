-- CHUNKS: appends entries to a chat job's chunk stream unless the session is gone (a late worker must not bring a
-- purged session's text back). One relay entry per call wakes whoever waits on the job
-- (shared.adapters.redis.notify). Answers the last entry's id, or nil.
local head, chunks, relay = KEYS[1], KEYS[2], KEYS[3]
local retention, job_id = ARGV[1], ARGV[2]
local FIRST = 3  -- then kind/data pairs

if redis.call('EXISTS', head) == 0 then return false end
local id
for i = FIRST, #ARGV, 2 do id = redis.call('XADD', chunks, '*', 'k', ARGV[i], 'd', ARGV[i + 1]) end
redis.call('EXPIRE', chunks, retention)
redis.call('XADD', relay, 'MAXLEN', '~', 10000, '*', 'j', job_id)
return id
