-- KEY_CREATE: stores an API key (its SHA-256 only) for a tenant, and its id, together.
local keys, key_ids = KEYS[1], KEYS[2]
local digest, key_id, tenant = ARGV[1], ARGV[2], ARGV[3]

redis.call('HSET', keys, digest, tenant)
redis.call('HSET', key_ids, key_id, digest)
return 1
