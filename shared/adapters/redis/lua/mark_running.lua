-- MARK_RUNNING: marks a chat job running unless it already ended or its session was purged; answers the attempt
-- (0: don't run). The job joins the session's chat list here too (the projector may not have listed it yet), so
-- a purge finds its keys.
local job, head, chats = KEYS[1], KEYS[2], KEYS[3]
local started_at, job_id = ARGV[1], ARGV[2]

if redis.call('EXISTS', head) == 0 then return 0 end
redis.call('ZADD', chats, 0, job_id)
local status = redis.call('HGET', job, 'status')
if status == 'succeeded' or status == 'failed' or status == 'cancelled' then return 0 end
redis.call('HSET', job, 'status', 'running', 'started_at', started_at)
return redis.call('HINCRBY', job, 'attempts', 1)
