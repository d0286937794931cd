-- READ_CHAT: a chat job's record. Answers {head version, view version, live?, then the job hash's field/value
-- pairs (none once the session is deleted, none for a job of another session: a job is found only through its
-- own session)}, {0, 0, 0} for no such session of this tenant, or {'stale', live generation}.
local head, view, job, chats = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local tenant, job_id, gen = ARGV[1], ARGV[2], ARGV[3]

local h = redis.call('HMGET', head, 'v', 't', 'g')
if not h[1] or h[2] ~= tenant then return {0, 0, 0} end
if (h[3] or '0') ~= gen then return {'stale', h[3] or '0'} end
local vw = redis.call('HMGET', view, 'v', 'j')
local out = {tonumber(h[1]), tonumber(vw[1]) or 0, vw[2] and 1 or 0}
if vw[2] and redis.call('ZSCORE', chats, job_id) then
  for _, x in ipairs(redis.call('HGETALL', job)) do out[#out + 1] = x end
end
return out
