-- ENQUEUE: queues one chat job on arq's queue exactly as arq's own enqueue does (the pickled job under its job key,
-- then its id in the queue's sorted set), in one round trip instead of arq's WATCH / EXISTS / MULTI / EXEC; a job
-- already queued or running (its job key exists) or with a result is left alone. Wakes an idle worker only when it
-- queued a job that is due now, so a second enqueue of the same job (the projector's) costs no worker a poll.
-- Answers 1 if it queued the job, else 0.
local job_key, result_key, queue, wake = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local job_id, job, score, expires_ms, due_now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]

if redis.call('EXISTS', job_key, result_key) > 0 then return 0 end
redis.call('PSETEX', job_key, expires_ms, job)
redis.call('ZADD', queue, score, job_id)
if due_now == '1' then
  redis.call('LPUSH', wake, '1')
  redis.call('LTRIM', wake, 0, 999)
end
return 1
