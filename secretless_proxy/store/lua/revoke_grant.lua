-- Revoke a grant for good: a tombstone that outlives it, the grant record marked, the event
-- published, atomically. Revoking again keeps the first revocation's time and reason.
-- KEYS[1]  the grant hash, <p>grant:<id>
-- KEYS[2]  the tombstones, <p>revoked (id -> revoked_at ms)
-- ARGV[1]  the grant id
-- ARGV[2]  now, ms since the epoch (the revocation time unless already revoked)
-- ARGV[3]  the revoke reason
-- ARGV[4]  tombstones revoked before this (ms) are pruned
-- ARGV[5]  the events channel
-- ARGV[6]  the grant_revoked event (JSON)
-- returns  {sealed grant or nil if unknown/expired, revoked_at ms, revoke reason or nil}
redis.call('ZADD', KEYS[2], 'NX', ARGV[2], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[4])
local at = redis.call('ZSCORE', KEYS[2], ARGV[1])
local sealed = redis.call('HGET', KEYS[1], 'sealed')
if sealed then
  redis.call('HSETNX', KEYS[1], 'revoked_at', at)
  redis.call('HSETNX', KEYS[1], 'revoke_reason', ARGV[3])
end
redis.call('PUBLISH', ARGV[5], ARGV[6])
return {sealed, at, redis.call('HGET', KEYS[1], 'revoke_reason')}
