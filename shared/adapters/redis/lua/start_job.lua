-- START_JOB: takes a queued arq job for this worker, as arq's own `start_jobs` does (the job is due, nobody holds
-- its in-progress key; then that key is set for the lease), but in one round trip instead of arq's WATCH / EXISTS /
-- ZSCORE / MULTI / EXEC, and atomically without a WATCH to lose. Answers the job's score, or false if it is not
-- due or another worker has it.
local in_progress, queue = KEYS[1], KEYS[2]
local job_id, now_ms, lease_ms = ARGV[1], tonumber(ARGV[2]), ARGV[3]

if redis.call('EXISTS', in_progress) == 1 then return false end
local score = redis.call('ZSCORE', queue, job_id)
if not score or tonumber(score) > now_ms then return false end
redis.call('PSETEX', in_progress, lease_ms, '1')
return score
