-- KEY_REVOKE: removes an API key given by its id or by the key itself. Answers 1 (revoked) or 0 (unknown).
local keys, key_ids = KEYS[1], KEYS[2]
local key_or_id, its_id, its_digest = ARGV[1], ARGV[2], ARGV[3]  -- the id and digest it has if it is a key

local kid, digest = key_or_id, redis.call('HGET', key_ids, key_or_id)
if not digest then kid, digest = its_id, its_digest end
local removed = redis.call('HDEL', keys, digest)
redis.call('HDEL', key_ids, kid)
return removed
